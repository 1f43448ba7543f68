"""One run owns its experiment directory: a second run on it is refused while the first holds the lock, and a
rerun is refused when the config or what it points at (data files, model) changed since the experiment started.
Each refusal: exit 2, one line naming the directory and what changed, the experiment left exactly as it was."""

import os
import shutil
from pathlib import Path

import pytest

from conftest import run_lora_search, start_lora_search, tiny_sweep_overrides
from sweeps.config import load_config
from eval.artifacts import PLAN_FILE, write_json_atomically
from sweeps.config import ConfigError
from sweeps.experiment import Experiment, ExperimentInUse, check_same_inputs, input_fingerprint, lock_experiment_dir
from sweeps.lora_search import main


def tree_state(path: Path):
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


@pytest.fixture
def inputs(tmp_path, tiny_data_dir, tiny_model_dir):
    """Copies of the tiny data and model that a test may change."""
    data, model = tmp_path / "data", tmp_path / "model"
    shutil.copytree(tiny_data_dir, data)
    shutil.copytree(tiny_model_dir, model)
    return data, model


def overrides(data: Path, model: Path, out: Path) -> list[str]:
    return [f"model.model_name_or_path={model}", f"data.dataset_name={data}", f"output.dir={out}", "output.name=exp"]


def start_experiment(args: list[str]) -> Path:
    """What the driver does when a new experiment starts (lora_search.run, then sweep_and_evaluate), short of Ray."""
    config = load_config(None, args)
    experiment = Experiment(config, config.experiment_dir)
    experiment.claim()
    experiment.create("bf16")
    experiment.release()
    (config.experiment_dir / "tune").mkdir()  # as if a sweep had run in it
    write_json_atomically(config.experiment_dir / PLAN_FILE, {"precision": "bf16"})  # as the run writes it
    return config.experiment_dir


def refused(args: list[str], capsys, monkeypatch) -> str:
    """main(args) is refused at once: before the data is even read."""
    import sweeps.data_loading

    def read_splits(*args, **kwargs):
        raise AssertionError("the run went on past the experiment directory's checks")

    monkeypatch.setattr(sweeps.data_loading, "read_splits", read_splits)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("lora_search: error:") == 1 and err.count("\n") == 1, err
    return err


def test_a_second_run_is_refused_while_another_holds_the_experiment(inputs, tmp_path, capsys, monkeypatch):
    args = overrides(*inputs, tmp_path / "runs")
    experiment = start_experiment(args)
    before = tree_state(experiment)
    holder = lock_experiment_dir(experiment)  # the first run, as far as the lock goes
    try:
        err = refused(args, capsys, monkeypatch)
        assert f"{experiment} is in use: another lorasweep run holds it" in err
        assert tree_state(experiment) == before
    finally:
        os.close(holder)
    # The lock went with its holder: the directory can be taken again (and main() released its own).
    os.close(lock_experiment_dir(experiment))


def test_a_run_that_finds_the_experiment_taken_when_it_creates_it_writes_nothing(inputs, tmp_path):
    """Two new runs started together: both pass the first check (no experiment yet), the second to reach the
    point where the directory is created is refused there, before it writes a file."""
    config = load_config(None, overrides(*inputs, tmp_path / "runs"))
    second = Experiment(config, config.experiment_dir)
    second.claim()  # nothing there yet: not locked, nothing to compare
    config.experiment_dir.mkdir(parents=True)
    first = lock_experiment_dir(config.experiment_dir)
    try:
        with pytest.raises(ExperimentInUse, match="another lorasweep run holds it"):
            second.create("bf16")
        assert sorted(p.name for p in config.experiment_dir.iterdir()) == [".lock"]
    finally:
        os.close(first)


def test_changed_data_file_is_refused_naming_it(inputs, tmp_path, capsys, monkeypatch):
    data, model = inputs
    args = overrides(data, model, tmp_path / "runs")
    experiment = start_experiment(args)
    before = tree_state(experiment)
    test_file = data / "test.jsonl"
    lines = test_file.read_text().splitlines(keepends=True)
    test_file.write_text("".join(lines[1:]))  # replaced by other rows under the same name

    err = refused(args, capsys, monkeypatch)
    assert f"{experiment} was started on other inputs: data file {test_file.resolve()} changed" in err
    assert "set output.name=<new name>" in err
    assert tree_state(experiment) == before

    # The same bytes again (a new mtime, as a copy has) are the same inputs.
    test_file.write_text("".join(lines))
    config = load_config(None, args)
    check_same_inputs(input_fingerprint(config), experiment)


def test_changed_model_is_refused_naming_it(inputs, tmp_path, capsys, monkeypatch):
    data, model = inputs
    args = overrides(data, model, tmp_path / "runs")
    experiment = start_experiment(args)
    config_json = model / "config.json"
    config_json.write_text(config_json.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'))
    err = refused(args, capsys, monkeypatch)
    assert f"model file {config_json.resolve()} changed" in err


def test_changed_config_is_refused_naming_the_keys(inputs, tmp_path, capsys, monkeypatch):
    args = overrides(*inputs, tmp_path / "runs")
    experiment = start_experiment(args)
    before = tree_state(experiment)
    err = refused(args + ["training.max_steps=40"], capsys, monkeypatch)
    assert f"{experiment} holds a sweep with a different config (changed: training.max_steps)" in err
    assert tree_state(experiment) == before


def test_a_rerun_that_changes_only_what_does_not_change_results_resumes(inputs, tmp_path, capsys, monkeypatch):
    """resources.* (but resources.engine) and the spelling of output.dir may change; the saved config follows."""
    args = overrides(*inputs, tmp_path / "runs")
    experiment = start_experiment(args)
    monkeypatch.chdir(tmp_path)
    rerun = [*args[:2], "output.dir=runs", "output.name=exp",  # the same directory, spelled relative
             "resources.cpus_per_trial=2", "resources.eval_cpus=1", "resources.max_failures=5",
             "resources.reuse_actors=false", "resources.gpus_per_trial=0.5", "resources.engine_slots=3"]
    config = load_config(None, rerun)
    assert config.experiment_dir == experiment
    resumed = Experiment(config, experiment)
    resumed.claim()
    resumed.create("bf16")
    resumed.release()
    assert "cpus_per_trial: 2.0" in (experiment / "config.yaml").read_text()

    err = refused(rerun + ["resources.engine=shared"], capsys, monkeypatch)  # another trial code and checkpoint format
    assert "holds a sweep with a different config (changed: resources.engine)" in err


def test_a_resume_whose_trials_would_train_in_another_precision_is_refused(inputs, tmp_path):
    """resources.gpus_per_trial=0 on a GPU cluster (or a resume on a cluster without GPUs) would continue 4-bit
    checkpoints on a bf16 base: refused where the precision is known, before anything is written."""
    args = overrides(*inputs, tmp_path / "runs")
    experiment = start_experiment(args)
    write_json_atomically(experiment / PLAN_FILE, {"precision": "4bit"})
    before = tree_state(experiment)
    resumed = Experiment(load_config(None, args + ["resources.gpus_per_trial=0"]), experiment)
    resumed.claim()
    try:
        with pytest.raises(ConfigError, match=f"{experiment} was trained on a 4bit base and this run would train "
                                              f"on a bf16 one"):
            resumed.create("bf16")
    finally:
        resumed.release()
    assert tree_state(experiment) == before


def test_ctrl_c_while_the_data_is_prepared_exits_130_and_releases_the_experiment(inputs, tmp_path, capsys,
                                                                                  monkeypatch):
    import sweeps.data_loading

    args = overrides(*inputs, tmp_path / "runs")
    experiment = start_experiment(args)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweeps.data_loading, "prepare_splits", interrupted)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert err == f"lora_search: interrupted; run the same command again to resume from {experiment}\n"
    os.close(lock_experiment_dir(experiment))  # not left held by the interrupted run


@pytest.mark.sweep
def test_a_second_run_is_refused_while_a_real_first_run_holds_the_experiment(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                             ray_tmp):
    args = tiny_sweep_overrides(tiny_model_dir, tiny_data_dir, tmp_path, "busy")
    experiment = tmp_path / "busy"
    first = start_lora_search(args, ray_tmp)
    try:
        for line in first.stdout:
            if line.startswith("[lorasweep] trial ") and " started: " in line:
                break  # the experiment directory is the first run's by now
        second = run_lora_search(args, ray_tmp, timeout=120)
        first_was_running = first.poll() is None
        first_output = first.communicate(timeout=300)[0]
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert second.stderr.endswith(f"lora_search: error: {experiment} is in use: another lorasweep run holds it "
                                  f"(lock {experiment / '.lock'}); wait for that run to end, or set "
                                  f"output.name=<new name> for a new sweep\n"), second.stderr
    assert second.stderr.count("lora_search:") == 1
    assert first_was_running, "the first run ended before the second was refused"
    # The first run went on undisturbed and finished its own sweep.
    assert first.returncode == 0, first_output[-3000:]
    assert "resuming" not in first_output
    assert (experiment / "leaderboard.json").is_file()
