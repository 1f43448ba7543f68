"""Trackers: one 2-trial sweep with W&B (offline), MLflow and the stored Optuna study on, then each tracker's
own files read back (TensorBoard is Tune's default logger); plus the tracking section's config checks."""

import json
import struct

import pytest

from conftest import run_lora_search, throwaway_ray, tiny_sweep_overrides
from sweeps.config import ConfigError, LorasweepConfig, load_config
from sweeps.trackers import StoredStudyOptunaSearch, check_optuna_study

NAME = "trackers"


@pytest.fixture(scope="module")
def tracked_sweep(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    args = tiny_sweep_overrides(tiny_model_dir, tiny_data_dir, out, NAME) + [
        "sweep.method=bayes", "sweep.run_cap=2",  # the stored study needs Optuna, which a grid does not use
        "tracking.wandb=true", "tracking.mlflow=true", "tracking.optuna_storage=default",
    ]
    with pytest.MonkeyPatch.context() as env, throwaway_ray() as ray_tmp:
        # Offline because no key is set, whatever the machine running the tests has configured.
        env.delenv("WANDB_API_KEY", raising=False)
        env.delenv("WANDB_MODE", raising=False)
        proc = run_lora_search(args, ray_tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / NAME


def reported_losses(experiment) -> dict[str, list[float]]:
    """Every trial's eval_loss at each evaluation, from Tune's own result.json files."""
    losses = {}
    for result_file in (experiment / "tune").glob("*/result.json"):
        results = [json.loads(line) for line in result_file.read_text().splitlines()]
        losses[results[0]["trial_id"]] = [r["eval_loss"] for r in results]
    assert len(losses) == 2
    return losses


def leaderboard_trials(experiment) -> list[dict]:
    board = json.loads((experiment / "leaderboard.json").read_text())
    return [r for r in board["rows"] if r["trial_id"] != "base"]


def wandb_records(path):
    """The records of an offline .wandb file: W&B's LevelDB-style log of 32 KiB blocks of chunked protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks = path.read_bytes(), 32768, 7, b""  # a 7-byte ":W&B" file header
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            yield wandb_internal_pb2.Record.FromString(chunks)
            chunks = b""


def wandb_runs(experiment) -> list[dict]:
    runs = []
    for path in (experiment / "wandb").glob("offline-run-*/run-*.wandb"):
        run, history = None, []
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "run":
                run = record.run
            elif record.WhichOneof("record_type") == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
        runs.append({"id": run.run_id, "group": run.run_group, "job_type": run.job_type, "history": history,
                     "dir": path.parent})
    return runs


@pytest.mark.sweep
def test_wandb_writes_one_offline_run_per_trial_in_the_sweeps_group(tracked_sweep):
    runs = [r for r in wandb_runs(tracked_sweep) if r["job_type"] != "evaluation"]
    losses = reported_losses(tracked_sweep)
    assert sorted(r["id"] for r in runs) == sorted(losses)
    for run in runs:
        assert run["group"] == NAME
        assert [h["eval_loss"] for h in run["history"] if "eval_loss" in h] == pytest.approx(losses[run["id"]])


@pytest.mark.sweep
def test_wandb_logs_the_held_out_generations_as_a_table(tracked_sweep):
    [run] = [r for r in wandb_runs(tracked_sweep) if r["job_type"] == "evaluation"]
    assert run["group"] == NAME
    [table_file] = (run["dir"] / "files" / "media" / "table").glob("generations_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["model", "prompt", "target", "generation", "exact_match"]
    winner = next(r["trial_id"] for r in leaderboard_trials(tracked_sweep) if r["winner"])
    # 18 held-out prompts for the base model and for the one evaluated trial (eval.top_k=1)
    assert sorted({row[0] for row in table["data"]}) == sorted(["base", winner]) and len(table["data"]) == 36


@pytest.mark.sweep
def test_mlflow_store_holds_one_run_per_trial_with_its_eval_losses(tracked_sweep):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tracked_sweep / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id])
    losses = reported_losses(tracked_sweep)
    assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)
    for run in runs:
        [trial_id] = [t for t in losses if t in run.info.run_name]  # Ray names the run after the trial
        history = sorted(client.get_metric_history(run.info.run_id, "eval_loss"), key=lambda m: m.step)
        assert [m.value for m in history] == pytest.approx(losses[trial_id])
        assert "learning_rate" in run.data.params


def tensorboard_scalars(path) -> dict[str, list[float]]:
    """Scalars of a TensorBoard event file: TFRecords (length, its CRC, an Event protobuf, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    data, pos, scalars = path.read_bytes(), 0, {}
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        for value in Event.FromString(data[pos + 12:pos + 12 + length]).summary.value:
            scalars.setdefault(value.tag, []).append(value.simple_value)
        pos += 12 + length + 4
    return scalars


@pytest.mark.sweep
def test_tensorboard_event_files_hold_each_trials_eval_loss(tracked_sweep):
    losses = reported_losses(tracked_sweep)
    logged = {}
    for trial_dir in (tracked_sweep / "tune").glob("train_qlora_trial_*"):
        trial_id = json.loads((trial_dir / "result.json").read_text().splitlines()[0])["trial_id"]
        [events] = trial_dir.glob("events.out.tfevents.*")
        logged[trial_id] = tensorboard_scalars(events)["ray/tune/eval_loss"]
    assert logged.keys() == losses.keys()
    for trial_id, values in logged.items():
        assert values == pytest.approx(losses[trial_id], rel=1e-6)  # stored as float32


@pytest.mark.sweep
def test_optuna_study_matches_the_leaderboard(tracked_sweep):
    import optuna

    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{tracked_sweep / 'optuna.db'}")
    rows = leaderboard_trials(tracked_sweep)
    assert len(study.trials) == len(rows) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    learning_rates = sorted(t.params["learning_rate"] for t in study.trials)
    assert learning_rates == pytest.approx(sorted(r["learning_rate"] for r in rows))
    # Tune hands the searcher each evaluation but the last as an intermediate value, and the last as the trial's
    # value; the leaderboard's best_eval_loss is a trial's lowest evaluation.
    stored = sorted([*(t.intermediate_values[step] for step in sorted(t.intermediate_values)), t.value]
                    for t in study.trials)
    assert stored == sorted(reported_losses(tracked_sweep).values())  # doubles on both sides: exact
    assert study.best_value == pytest.approx(min(losses[-1] for losses in stored))
    assert min(min(losses) for losses in stored) == pytest.approx(min(r["best_eval_loss"] for r in rows))


def test_trackers_are_off_by_default():
    tracking = LorasweepConfig().tracking
    assert not (tracking.wandb or tracking.mlflow or tracking.optuna_storage)


@pytest.mark.parametrize("overrides, message", [
    (["tracking.optuna_storage=optuna.db"], r"tracking.optuna_storage: 'optuna.db' is not a database URL"),
    (["tracking.optuna_storage=default", "sweep.method=grid"], r"sweep.method=grid runs without Optuna"),
    (["tracking.optuna_storage=postgresql://me:secret@db/optuna"], r"optuna_storage: the URL holds a password"),
    (["tracking.mlflow_tracking_uri=https://me:secret@mlflow.example"], r"MLFLOW_TRACKING_PASSWORD"),
    (["tracking.mlflow_tracking_uri=./mlruns"], r"'./mlruns' is not a tracking URI"),
    (["tracking.wandb=yes please"], r"tracking.wandb: expected true or false"),
])
def test_bad_tracking_values_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_new_sweep_refuses_a_study_name_taken_in_a_shared_database(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(study_name="taken", storage=url)
    config = load_config(None, [f"output.dir={tmp_path}", "output.name=taken", f"tracking.optuna_storage={url}"])
    with pytest.raises(ConfigError, match=r"already holds an Optuna study 'taken'.*optuna delete-study"):
        check_optuna_study(config.tracking, config.output.name, config.experiment_dir, resumable=False)


def test_stored_study_survives_a_resume_from_an_older_snapshot(tmp_path):
    import optuna
    from ray import tune

    url = f"sqlite:///{tmp_path / 'optuna.db'}"

    def searcher():
        return StoredStudyOptunaSearch(sampler=optuna.samplers.RandomSampler(seed=0), study_name="s",
                                       storage=optuna.storages.RDBStorage(url))

    before = searcher()
    before.set_search_properties("eval_loss", "min", {"learning_rate": tune.uniform(0.0, 1.0)})
    before.suggest("a")
    before.save(str(tmp_path / "searcher.pkl"))  # Tune's last snapshot: trial a running
    before.on_trial_complete("a", {"eval_loss": 1.0, "training_iteration": 1})
    before.suggest("b")  # then the driver dies, before Tune snapshots trial b

    after = searcher()
    after.restore(str(tmp_path / "searcher.pkl"))
    # The resumed trial a reports its saved final result again; b is gone from Tune and fails in the study.
    after.on_trial_result("a", {"eval_loss": 1.0, "training_iteration": 1})
    after.on_trial_complete("a", {"eval_loss": 1.0, "training_iteration": 1})
    after.suggest("c")
    after.on_trial_complete("c", {"eval_loss": 0.5, "training_iteration": 1})
    study = optuna.load_study(study_name="s", storage=url)
    assert [(t.state.name, t.value) for t in study.trials] == [("COMPLETE", 1.0), ("FAIL", None), ("COMPLETE", 0.5)]
