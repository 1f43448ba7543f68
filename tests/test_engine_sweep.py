"""The whole pipeline with resources.engine=shared, as a user runs it: one engine holds the base, three trials of
a grid share its two slots (the third joins the running engine when a slot frees), Tune reports and checkpoints
as with per-process trials, and the evaluation stage, the merge and the report read the engine's PEFT adapters."""

import json
import math
import re

import pytest
import torch

from conftest import run_lora_search, tiny_sweep_overrides

pytestmark = pytest.mark.sweep


@pytest.fixture(scope="module")
def engine_sweep(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    from conftest import throwaway_ray

    out = tmp_path_factory.mktemp("runs")
    args = tiny_sweep_overrides(tiny_model_dir, tiny_data_dir, out, "engine") + [
        "resources.engine=shared", "resources.engine_slots=2", "sweep.max_concurrent_trials=2",
        "sweep.parameters={learning_rate: {values: [3.0e-2, 1.0e-7, 2.0e-2]}}", "sweep.early_terminate={type: none}"]
    with throwaway_ray() as ray_tmp:
        proc = run_lora_search(args, ray_tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "engine", proc


def test_every_trial_trains_in_the_engine_and_gets_a_leaderboard_row(engine_sweep):
    experiment, proc = engine_sweep
    output = proc.stdout + proc.stderr
    assert "shared-base engine: 1 engine(s) x 2 adapter slots" in output
    assert "trial path: shared-base engine" in output  # (Ray folds the same line of several trials into one)
    # The engine's figures at the end of the sweep (the line with the most steps: the engine also prints one every
    # 30 s): 3 trials x 6 steps over 2 slots took at least 9 engine steps.
    lines = re.findall(r"\[lorasweep\] engine: (\d+) steps, ([\d.]+) adapters per step, ([\d.]+) ms per step", output)
    steps, adapters_per_step, step_ms = max(lines, key=lambda line: int(line[0]))
    assert int(steps) >= 9 and 1.0 <= float(adapters_per_step) <= 2.0 and float(step_ms) > 0
    plan = json.loads((experiment / "plan.json").read_text())
    assert plan["engine"] == "shared" and plan["engines"] == 1 and plan["gpus_per_trial"] == 0
    board = json.loads((experiment / "leaderboard.json").read_text())
    trials = [r for r in board["rows"] if r["trial_id"] != "base"]
    base = next(r for r in board["rows"] if r["trial_id"] == "base")
    assert len(trials) == 3 and all(r["status"] == "completed" and r["steps"] == 6 for r in trials)
    assert all(math.isfinite(r["best_eval_loss"]) and r["tokens"] > 0 for r in trials)
    by_lr = {r["learning_rate"]: r for r in trials}
    # The learning rate that barely moves stays at the base's loss; the others learn.
    assert by_lr[3e-2]["best_eval_loss"] < by_lr[1e-7]["best_eval_loss"]
    winner = next(r for r in trials if r["winner"])
    assert winner["learning_rate"] != 1e-7 and winner["heldout_loss"] < base["heldout_loss"]


def test_the_engines_checkpoints_are_peft_adapters_the_evaluation_stage_merged(engine_sweep, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    experiment, _ = engine_sweep
    adapter = experiment / "best_adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert not (adapter / "lorasweep_engine_state.pt").exists()  # the optimizer state stays in the trial checkpoint
    assert json.loads((experiment / "merge_check.json").read_text())["passed"]

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    batch = tokenizer(["Query: what is my balance\nIntent:"], return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(experiment / "merged_model", dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                        adapter).eval()
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapted(**batch).logits, atol=0.1, rtol=0.05)
    # Every trial's kept checkpoints can resume it (Tune keeps the best and, for fault tolerance, the latest).
    trial_dirs = [d for d in (experiment / "tune").iterdir() if (d / "result.json").is_file()]
    assert len(trial_dirs) == 3
    for trial_dir in trial_dirs:
        checkpoints = list(trial_dir.glob("checkpoint_*"))
        assert checkpoints and all((c / "lorasweep_engine_state.pt").is_file() and (c / "adapter_model.safetensors")
                                   .is_file() for c in checkpoints), trial_dir
