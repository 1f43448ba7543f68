"""Kill the driver (SIGKILL, as a lost head or a killed job does) in the middle of a sweep, run the same
command again, and check that the sweep resumes: finished trials are kept, not re-run."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from conftest import run_lora_search, start_lora_search, stop_ray_processes, tiny_sweep_overrides

pytestmark = pytest.mark.sweep


def finished_trial_dirs(tune_dir: Path, evaluations: int) -> list[Path]:
    if not tune_dir.is_dir():
        return []
    return [d for d in tune_dir.iterdir()
            if (d / "result.json").is_file() and len((d / "result.json").read_text().splitlines()) >= evaluations]


@pytest.mark.parametrize("engine", ["per_process", "shared"])
def test_killed_sweep_resumes_without_rerunning_finished_trials(engine, tiny_model_dir, tiny_data_dir, tmp_path,
                                                                 ray_tmp):
    """Both trial paths: with the shared-base engine, the engine dies with the driver's Ray instance and the
    resumed sweep starts a new one, into which the unfinished trial comes back from its checkpoint."""
    args = tiny_sweep_overrides(tiny_model_dir, tiny_data_dir, tmp_path, "resume") + [
        "sweep.parameters={learning_rate: {values: [3.0e-2, 2.0e-2, 1.0e-2]}}",
        "sweep.early_terminate={type: none}",  # every trial runs to the end: three full trials expected
        "eval.merge=false", f"resources.engine={engine}",
    ]
    tune_dir = tmp_path / "resume" / "tune"
    driver = start_lora_search(args, ray_tmp)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not finished_trial_dirs(tune_dir, 3) and driver.poll() is None:
            time.sleep(0.1)
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        first_done = finished_trial_dirs(tune_dir, 3)
        # On the engine a tiny trial takes well under a second: a second one may have finished by the check.
        assert 1 <= len(first_done) < 3, "some, not all, trials should have finished when the driver is killed"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        stop_ray_processes(ray_tmp)  # what the killed driver left running, before the same command runs again
    assert not (tmp_path / "resume" / "leaderboard.json").exists()
    done_before = {trial: (trial / "result.json").read_text().splitlines() for trial in first_done}

    proc = run_lora_search(args, ray_tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming the sweep" in proc.stdout
    # The finished trials were not trained again: their steps never restart. (If Tune's snapshot missed a
    # trial's end, the resumed trial reports its saved final metrics once more, at the final step.)
    for trial, lines in done_before.items():
        after = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        assert after[: len(lines)] == [json.loads(line) for line in lines]
        assert [r["step"] for r in after if r["step"] < 6] == [2, 4]
        assert all(r["step"] == 6 for r in after[2:])
    board = json.loads((tmp_path / "resume" / "leaderboard.json").read_text())
    trial_rows = [r for r in board["rows"] if r["trial_id"] != "base"]
    assert len(trial_rows) == 3 and all(r["status"] == "completed" for r in trial_rows)
    assert sorted(r["learning_rate"] for r in trial_rows) == [1e-2, 2e-2, 3e-2]


def test_crash_in_the_evaluation_stage_keeps_the_sweep_and_rerun_finishes_it(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                             ray_tmp):
    args = tiny_sweep_overrides(tiny_model_dir, tiny_data_dir, tmp_path, "evalcrash")
    experiment = tmp_path / "evalcrash"
    driver = start_lora_search(args, ray_tmp)
    try:
        for line in driver.stdout:
            if "[lorasweep] evaluation stage:" in line:
                os.killpg(driver.pid, signal.SIGKILL)  # the driver dies as the evaluation stage starts
                break
        driver.wait()
    finally:
        stop_ray_processes(ray_tmp)  # what the killed driver left running, before the same command runs again
    assert driver.returncode == -signal.SIGKILL
    assert not (experiment / "leaderboard.json").exists() and not (experiment / "merged_model").exists()
    results_before = {p: p.read_text() for p in (experiment / "tune").glob("*/result.json")}
    assert len(results_before) == 2

    proc = run_lora_search(args, ray_tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p: p.read_text() for p in (experiment / "tune").glob("*/result.json")} == results_before  # no trial re-ran
    board = json.loads((experiment / "leaderboard.json").read_text())
    assert len([r for r in board["rows"] if r["trial_id"] != "base"]) == 2
    assert json.loads((experiment / "merge_check.json").read_text())["passed"]
    assert not list(experiment.glob("*.partial"))  # no half-written output left behind



# When to press Ctrl-C: the first line of output that shows the phase has begun.
CTRL_C_MOMENTS = {"data": "[lorasweep] data:", "sweep": " step 2: eval_loss=",
                  "evaluation stage": "[lorasweep] evaluation stage:", "merge": "[lorasweep] merging "}


@pytest.mark.parametrize("phase", sorted(CTRL_C_MOMENTS))
def test_ctrl_c_exits_130_and_the_same_command_finishes(phase, tiny_model_dir, tiny_data_dir, tmp_path, ray_tmp):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once the data is ready (as Ray starts), in
    the sweep, where Tune catches it, and after it (evaluation stage, merge), where Tune's handler must not swallow
    it: exit 130, one line saying how to resume, no half-written
    files; the same command then finishes the run, and after the data changed it is refused."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    args = tiny_sweep_overrides(tiny_model_dir, data, tmp_path, "ctrlc")
    experiment = tmp_path / "ctrlc"
    driver = start_lora_search(args, ray_tmp)
    try:
        lines = []
        for line in driver.stdout:
            lines.append(line)
            if CTRL_C_MOMENTS[phase] in line:
                os.killpg(driver.pid, signal.SIGINT)
                interrupted = time.time()
                break
        output = "".join(lines) + driver.communicate(timeout=180)[0]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        stop_ray_processes(ray_tmp)
    assert driver.returncode == 130, output[-3000:]
    assert time.time() - interrupted < 90  # it stopped, instead of going on to the end first
    assert f"lora_search: interrupted; run the same command again to resume from {experiment}\n" in output
    assert output.count("lora_search:") == 1
    assert not (experiment / "leaderboard.json").exists()
    # The tiny model's merge may end before the interrupt reaches it; only whole directories may be left.
    assert phase == "merge" or not (experiment / "merged_model").exists()
    assert not list(experiment.rglob("*.partial")), "half-written files left behind"
    results_before = {p: p.read_text() for p in (experiment / "tune").glob("*/result.json")}
    # After the sweep both trials had ended; in it, at least the first had reported; after the data, none had started.
    assert {"data": not results_before, "sweep": bool(results_before), "evaluation stage": len(results_before) == 2,
            "merge": len(results_before) == 2}[phase]

    proc = run_lora_search(args, ray_tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("resuming the sweep" in proc.stdout) == (phase != "data")
    if phase in ("evaluation stage", "merge"):  # the sweep had ended: no trial ran again
        assert {p: p.read_text() for p in (experiment / "tune").glob("*/result.json")} == results_before
    board = json.loads((experiment / "leaderboard.json").read_text())
    assert len([r for r in board["rows"] if r["trial_id"] != "base"]) == 2
    assert json.loads((experiment / "merge_check.json").read_text())["passed"]
    assert not list(experiment.rglob("*.partial"))

    # The same command on replaced data would score these adapters on other prompts: refused, nothing touched.
    test_file = data / "test.jsonl"
    test_file.write_text("".join(test_file.read_text().splitlines(keepends=True)[2:]))
    board_before = (experiment / "leaderboard.json").stat().st_mtime_ns
    proc = run_lora_search(args, ray_tmp, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"lora_search: error: {experiment} was started on other inputs: data file {test_file.resolve()} changed" \
        in proc.stderr
    assert proc.stderr.count("lora_search:") == 1
    assert (experiment / "leaderboard.json").stat().st_mtime_ns == board_before
