"""What clusters do to sweeps: a diverged trial, and a worker node lost in the middle of a trial."""

import json
import subprocess
import sys
import time

import pytest

from conftest import PROJECT_ROOT, ray_test_env, run_lora_search, start_lora_search, tiny_sweep_overrides

pytestmark = pytest.mark.sweep


def test_diverged_trial_is_marked_failed_and_the_sweep_goes_on(tiny_model_dir, tiny_data_dir, tmp_path, ray_tmp):
    args = tiny_sweep_overrides(tiny_model_dir, tiny_data_dir, tmp_path, "nan") + [
        "sweep.parameters={learning_rate: {values: [3.0e-2, 1.0e+30]}}", "sweep.early_terminate={type: none}"]
    proc = run_lora_search(args, ray_tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["learning_rate"]: r for r in json.loads((tmp_path / "nan" / "leaderboard.json").read_text())["rows"]
            if r["trial_id"] != "base"}
    assert rows[1e30]["status"].startswith("failed: eval_loss is nan at step 2") or \
        rows[1e30]["status"].startswith("failed: eval_loss is inf at step 2"), rows[1e30]["status"]
    assert rows[1e30]["exact_match"] is None  # never a candidate
    assert rows[3e-2]["status"] == "completed" and rows[3e-2]["winner"]
    # The searcher and ASHA saw the worst possible loss for the diverged trial (not a retry, not nothing).
    trial_dir = next(d for d in (tmp_path / "nan" / "tune").iterdir()
                     if (d / "params.json").is_file() and json.loads((d / "params.json").read_text())["learning_rate"] == 1e30)
    reported = [json.loads(l) for l in (trial_dir / "result.json").read_text().splitlines()]
    assert len(reported) == 1 and reported[0]["eval_loss"] == float("inf")


def test_lost_worker_node_retries_the_trial_from_its_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch,
                                                                ray_tmp):
    from ray.cluster_utils import Cluster

    for key, value in ray_test_env(ray_tmp).items():
        monkeypatch.setenv(key, value)
    # The head runs the driver only; trials and the evaluation stage need a worker node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    args = tiny_sweep_overrides(tiny_model_dir, tiny_data_dir, tmp_path, "node") + [
        "sweep.parameters={learning_rate: {values: [3.0e-2]}}", "sweep.early_terminate={type: none}",
        "training.max_steps=80", "training.eval_steps=4", "eval.merge=false"]
    env = {**ray_test_env(ray_tmp), "RAY_ADDRESS": cluster.address}
    driver = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "sweeps" / "lora_search.py"), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        results = tmp_path / "node" / "tune"
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            lines = [l for f in results.glob("*/result.json") for l in f.read_text().splitlines()] if results.is_dir() else []
            if any(json.loads(l)["step"] >= 8 for l in lines):
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the sweep ended before the node could be lost"
        cluster.remove_node(worker, allow_graceful=False)  # the node dies mid-trial
        cluster.add_node(num_cpus=2)  # a replacement joins, as an autoscaler would bring one
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
        cluster.shutdown()
    assert driver.returncode == 0, out[-4000:]
    assert "trial resumes from its checkpoint at step" in out
    steps = [json.loads(l)["step"] for f in results.glob("*/result.json") for l in f.read_text().splitlines()]
    assert steps[-1] == 80
    # After the loss, training went on from the checkpoint: steps never went back to the start.
    first_after_gap = [s for a, s in zip(steps, steps[1:]) if s <= a]
    assert not first_after_gap or first_after_gap[0] > 4, steps
    board = json.loads((tmp_path / "node" / "leaderboard.json").read_text())
    trial = next(r for r in board["rows"] if r["trial_id"] != "base")
    assert trial["status"] == "completed" and trial["steps"] == 80


def test_lost_engine_restarts_and_its_trials_go_on_from_their_checkpoints(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                         ray_tmp):
    """The shared-base engine's process killed mid-sweep: Ray starts the engine again, and both trials it held
    come back from their last checkpoints (Tune's FailureConfig) and finish on the fresh engine."""
    import os
    import signal

    args = tiny_sweep_overrides(tiny_model_dir, tiny_data_dir, tmp_path, "engine-loss") + [
        "resources.engine=shared", "resources.engine_slots=2", "sweep.max_concurrent_trials=2",
        "sweep.parameters={learning_rate: {values: [3.0e-2, 2.0e-2]}}", "sweep.early_terminate={type: none}",
        "training.max_steps=60", "training.eval_steps=4", "eval.merge=false"]
    log = tmp_path / "driver.log"
    driver = start_lora_search(args, ray_tmp, stdout=log.open("w"))
    results = tmp_path / "engine-loss" / "tune"

    def reports() -> list[dict]:
        return [json.loads(l) for f in results.glob("*/result.json") for l in f.read_text().splitlines()] \
            if results.is_dir() else []

    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None and \
                not (len(reports()) >= 4 and all(r["step"] >= 8 for r in reports()[-2:])):
            time.sleep(0.2)
        assert driver.poll() is None, "the sweep ended before the engine could be lost"
        lost_pid = reports()[-1]["engine_pid"]
        os.kill(lost_pid, signal.SIGKILL)
        driver.wait(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
    out = log.read_text()
    assert driver.returncode == 0, out[-4000:]
    assert "trial resumes from its checkpoint at step" in out
    by_trial = {}
    for f in results.glob("*/result.json"):
        by_trial[f.parent.name] = [json.loads(l) for l in f.read_text().splitlines()]
    assert len(by_trial) == 2
    for trial, rows in by_trial.items():
        steps = [r["step"] for r in rows]
        assert steps[-1] == 60, (trial, steps)
        assert {r["engine_pid"] for r in rows[-1:]} != {lost_pid}, trial  # finished on the fresh engine
        # Training went on from the checkpoint: after the loss, steps never went back to the start.
        went_back = [b for a, b in zip(steps, steps[1:]) if b <= a]
        assert not went_back or went_back[0] > 4, (trial, steps)
    board = json.loads((tmp_path / "engine-loss" / "leaderboard.json").read_text())
    assert all(r["status"] == "completed" and r["steps"] == 60 for r in board["rows"] if r["trial_id"] != "base")
