"""`ray job submit --working-dir . -- python sweeps/lora_search.py ...` against a real local cluster started
as a user starts one: `ray start --head`, and a worker node joined with `ray start --address`."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, ray_test_env, throwaway_ray, tiny_sweep_overrides

pytestmark = pytest.mark.sweep


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_job_submit_runs_the_sweep_on_a_head_and_a_worker_node(tiny_model_dir, tiny_data_dir, tmp_path, ray_tmp):
    with throwaway_ray() as worker_tmp:
        submit = submit_to_a_two_node_cluster(tiny_model_dir, tiny_data_dir, tmp_path, ray_tmp, worker_tmp)
        # A trial ran on the worker node: its worker processes logged there, in the node's own temp dir.
        worker_logs = "".join(path.read_text(errors="replace") for path in worker_tmp.glob("session_*/logs/worker-*"))
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert "succeeded" in submit.stdout
    board = json.loads((tmp_path / "job" / "leaderboard.json").read_text())
    assert len([r for r in board["rows"] if r["trial_id"] != "base"]) == 2
    assert (tmp_path / "job" / "merged_model" / "config.json").is_file()
    assert "[lorasweep] trial path:" in worker_logs, "no trial ran on the worker node"


def submit_to_a_two_node_cluster(tiny_model_dir, tiny_data_dir, tmp_path, ray_tmp, worker_tmp):
    """`ray start --head`, `ray start --address` for a worker node, then `ray job submit` of the tiny sweep."""
    env = ray_test_env(ray_tmp)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` is the project's venv
    bin_dir = Path(sys.executable).parent
    gcs_port, dashboard_port = free_port(), free_port()
    try:
        subprocess.run([str(bin_dir / "ray"), "start", "--head", f"--port={gcs_port}", "--num-cpus=1",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                        f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, text=True, timeout=120)
        # A second node on this machine. Its own temp dir, as a real node has its own disk: nodes sharing one
        # would share the runtime-env cache, and one node's cleanup would delete the job's working_dir under
        # the other.
        subprocess.run([str(bin_dir / "ray"), "start", f"--address=127.0.0.1:{gcs_port}", "--num-cpus=1",
                        f"--temp-dir={worker_tmp}", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, text=True, timeout=120)
        # Two trials at once, one CPU per node: one of them runs on the worker node.
        args = tiny_sweep_overrides(tiny_model_dir, tiny_data_dir, tmp_path, "job") + ["sweep.max_concurrent_trials=2"]
        # The head's job agent registers seconds after `ray start` returns, more on a busy machine.
        deadline = time.time() + 180
        while True:
            submit = subprocess.run(
                [str(bin_dir / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dashboard_port}",
                 f"--working-dir={PROJECT_ROOT}", "--", "python", "sweeps/lora_search.py", *args],
                env=env, capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in submit.stderr + submit.stdout or time.time() > deadline:
                break
            time.sleep(2)
    finally:
        # `ray stop` also ends the dashboard and job agents, whose process names do not carry the temp dir.
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    return submit
