"""The benchmark runs both ways of the same study and prints comparable figures (on the CPU here, with the tiny
model: the figures of BENCHMARKS.md come from a GPU)."""

import json
import math
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT, ray_test_env
from sweeps.benchmark import speed_line


def test_the_speed_line_says_faster_or_slower_as_the_times_say():
    assert speed_line({"way": "baseline", "sweep_seconds": 740}, {"way": "lorasweep", "sweep_seconds": 56}) \
        == "lorasweep sweep wall time: 13.21x faster than baseline"
    assert speed_line({"way": "baseline", "sweep_seconds": 50}, {"way": "lorasweep", "sweep_seconds": 100}) \
        == "lorasweep sweep wall time: 2.00x slower than baseline"


@pytest.mark.sweep
def test_both_ways_run_the_same_study_and_the_table_compares_them(tiny_model_dir, tiny_data_dir, tmp_path, ray_tmp):
    overrides = [
        f"model.model_name_or_path={tiny_model_dir}", f"data.dataset_name={tiny_data_dir}", "model.cpu_fallback=bf16",
        f"output.dir={tmp_path}", "sweep.run_cap=2", "sweep.max_concurrent_trials=1", "training.max_steps=4",
        "training.eval_steps=2", "training.per_device_train_batch_size=8", "training.per_device_eval_batch_size=8",
        "data.max_validation_rows=16", "data.max_test_rows=16", "eval.top_k=1", "eval.batch_size=16",
        "eval.max_new_tokens=6", "resources.eval_cpus=1",
    ]
    for way in ("baseline", "lorasweep", "engine"):
        proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "sweeps" / "benchmark.py"), way, "--config",
                               str(PROJECT_ROOT / "sweeps" / "configs" / "benchmark.yaml"), *overrides],
                              env=ray_test_env(ray_tmp), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    figures = {way: json.loads((tmp_path / f"benchmark_{way}.json").read_text())
               for way in ("baseline", "lorasweep", "engine")}
    for way, f in figures.items():
        assert f["trials"] == 2 and f["total_steps"] > 0, way
        assert f["sweep_seconds"] > 0 and f["train_tokens_per_s_per_gpu"] > 0
        # The engine's trials share its steps: no rate of their own.
        assert (f["train_tokens_per_s_per_trial"] is None) == (way == "engine"), way
        assert f["startup_first_in_process_s"] > 0
        assert math.isfinite(f["best_eval_loss"]) and 0.0 <= f["exact_match_of_best"] <= 1.0
        assert f["test_prompts"] == 16 and f["eval_seconds_per_adapter"] > 0
    # The baseline starts every trial in a new process; lorasweep's second trial reuses the first one's worker.
    assert figures["baseline"]["trials_on_reused_workers"] == 0
    assert figures["lorasweep"]["trials_on_reused_workers"] == 1
    assert figures["lorasweep"]["startup_later_s_median"] < figures["baseline"]["startup_first_in_process_s"]

    table = subprocess.run([sys.executable, str(PROJECT_ROOT / "sweeps" / "benchmark.py"), "table", str(tmp_path)],
                           capture_output=True, text=True, check=True).stdout
    assert "| | baseline | lorasweep | engine |" in table and "sweep wall time" in table
    assert "engine aggregate training tokens/s per GPU" in table
    # The comparison line follows the measured times, whichever way they went.
    assert speed_line(figures["baseline"], figures["lorasweep"]) in table
    assert speed_line(figures["lorasweep"], figures["engine"]) in table


def test_the_sampler_benchmark_runs_each_sampler_over_the_budget_on_the_engine(tiny_model_dir, tiny_data_dir,
                                                                               tmp_path, capsys):
    """Every sampler's studies train their whole budget for real (finite held-out losses), and the table has a row
    per sampler."""
    from sweeps.sampler_benchmark import SAMPLERS, main

    figures = tmp_path / "samplers.json"
    assert main(["--budget", "5", "--in-flight", "2", "--seeds", "2", "--json", str(figures),
                 f"model.model_name_or_path={tiny_model_dir}", f"data.dataset_name={tiny_data_dir}",
                 "data.num_targets=0", "training.max_steps=4", "training.eval_steps=2",
                 "training.per_device_train_batch_size=4"]) == 0
    studies = json.loads(figures.read_text())["studies"]
    assert sorted((s["sampler"], s["seed"]) for s in studies) == sorted((n, seed) for n in SAMPLERS for seed in (0, 1))
    assert all(s["completed"] == 5 and math.isfinite(s["best_eval_loss"]) for s in studies)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and " of 2 |" in line]
    assert [line.split(" | ")[0][2:] for line in table] == list(SAMPLERS)


def test_the_sampler_benchmark_refuses_a_bad_config_in_one_line(capsys):
    from sweeps.sampler_benchmark import main

    assert main(["training.max_steps=3", "--seeds", "1", "training.eval_steps=8"]) == 2  # overrides around a flag
    assert capsys.readouterr().err.startswith("sampler_benchmark: error: training.max_steps (3)")
