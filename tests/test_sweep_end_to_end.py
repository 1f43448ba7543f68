"""The whole pipeline as a user runs it: `python sweeps/lora_search.py` on a local Ray instance, two trials
(one cut by ASHA), held-out evaluation, merge, and the leaderboard files."""

import ast
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import run_tiny_sweep

pytestmark = pytest.mark.sweep


@pytest.fixture(scope="module")
def finished_sweep(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    return run_tiny_sweep(tiny_model_dir, tiny_data_dir, tmp_path_factory.mktemp("runs"), "e2e")


def test_one_leaderboard_row_per_trial_plus_base(finished_sweep):
    experiment, _ = finished_sweep
    board = json.loads((experiment / "leaderboard.json").read_text())
    trial_rows = [r for r in board["rows"] if r["trial_id"] != "base"]
    base_rows = [r for r in board["rows"] if r["trial_id"] == "base"]
    assert len(trial_rows) == 2 and len(base_rows) == 1
    statuses = sorted(r["status"] for r in trial_rows)
    assert statuses[0] == "completed"
    assert statuses[1].startswith("stopped by ASHA at rung 0"), statuses
    stopped = next(r for r in trial_rows if r["status"].startswith("stopped"))
    assert stopped["learning_rate"] == pytest.approx(1e-7) and stopped["steps"] == 2
    winner = next(r for r in trial_rows if r["winner"])
    assert winner["learning_rate"] == pytest.approx(3e-2) and winner["rank"] == 1
    for row in trial_rows:
        assert math.isfinite(row["best_eval_loss"]) and row["tokens"] > 0 and row["wall_time_s"] > 0
        assert row["peak_memory_mib"] > 0
    assert 0.0 <= winner["exact_match"] <= 1.0 and math.isfinite(winner["heldout_loss"])
    assert 0.0 <= base_rows[0]["exact_match"] <= 1.0
    # the trained adapter fits the held-out completions better than the base model does
    assert winner["heldout_loss"] < base_rows[0]["heldout_loss"]
    with (experiment / "leaderboard.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3
    assert (experiment / "leaderboard.md").read_text().count("\n| ") == 4  # header + 3 rows


def test_leaderboard_carries_intervals_the_selection_and_metadata(finished_sweep):
    experiment, proc = finished_sweep
    board = json.loads((experiment / "leaderboard.json").read_text())
    evaluated = [r for r in board["rows"] if r["exact_match"] is not None]
    assert len(evaluated) == 2  # the top trial (eval.top_k=1) and the base model
    for row in evaluated:
        assert row["exact_match_ci_low"] <= row["exact_match"] <= row["exact_match_ci_high"]
        assert row["exact_match_ci_high"] - row["exact_match_ci_low"] > 0.1  # 18 prompts: a wide interval
        assert row["heldout_prompts"] == 18 and 0 <= row["rouge_l"] <= 1 and 0 <= row["chrf"] <= 1
    for row in (r for r in board["rows"] if r["trial_id"] != "base"):
        assert (experiment / row["adapter_path"] / "adapter_config.json").is_file()
    selection = board["selection"]
    assert selection["winner"] == next(r["trial_id"] for r in board["rows"] if r["winner"])
    assert selection["tie"] is False and selection["versus_runner_up"] is None  # one trial evaluated: no runner-up
    assert selection["versus_base"]["prompts"] == 18 and isinstance(selection["better_than_base"], bool)
    assert board["metadata"]["config_sha256"] and board["metadata"]["versions"]["evaluate"] != "not installed"
    markdown = (experiment / "leaderboard.md").read_text()
    if selection["better_than_base"]:
        assert selection["warning"] is None and "WARNING" not in proc.stderr
    else:  # said in the leaderboard and on the console
        assert "NOT better than the base model" in markdown and "NOT better than the base model" in proc.stderr


def test_outputs_and_paths_are_printed(finished_sweep):
    experiment, proc = finished_sweep
    for name in ("leaderboard.md", "best_adapter", "merged_model"):
        assert str(experiment / name) in proc.stdout
    assert (experiment / "config.yaml").is_file() and (experiment / "search_space.json").is_file()
    generations = (experiment / "eval" / "generations_base.jsonl").read_text().splitlines()
    assert len(generations) == 18 and {"prompt", "target", "generation", "exact_match"} <= set(json.loads(generations[0]))


def test_adapter_artifacts_follow_peft_layout(finished_sweep):
    experiment, _ = finished_sweep
    adapter = experiment / "best_adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert "library_name: peft" in (adapter / "README.md").read_text()
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [t for n, t in weights.items() if "lora_B" in n]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "LoRA B is initialised to zero: training must move it"


def test_merged_model_matches_the_adapter(finished_sweep, tiny_model_dir):
    experiment, _ = finished_sweep
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = experiment / "merged_model"
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert "library_name: transformers" in (merged_dir / "README.md").read_text()
    check = json.loads((experiment / "merge_check.json").read_text())
    assert check["passed"] and check["prompts"] == 8

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = tokenizer(["Query: what is my balance\nIntent:", "Query: set an alarm\nIntent:"], return_tensors="pt", padding=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, experiment / "best_adapter").eval()
    with torch.no_grad():
        merged_logits = merged(**batch).logits
        adapter_logits = adapted(**batch).logits
    # The merged weights are stored in bf16: equal up to bf16 rounding, and the same greedy tokens.
    assert torch.allclose(merged_logits, adapter_logits, atol=0.1, rtol=0.05)
    assert torch.equal(merged_logits.argmax(-1), adapter_logits.argmax(-1))


def test_the_cards_say_what_the_sweep_did_and_a_copied_adapter_runs_its_snippet(finished_sweep, tiny_model_dir,
                                                                                 tmp_path):
    """The cards carry the winner's figures, hyperparameters and prompt format; best_adapter/ copied elsewhere names
    the base as the user gave it and runs its card's snippet in a fresh process with no lorasweep cache."""
    from huggingface_hub import ModelCard
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.generation import generate_greedy

    experiment, _ = finished_sweep
    board = json.loads((experiment / "leaderboard.json").read_text())
    winner = next(r for r in board["rows"] if r["winner"])
    for name in ("best_adapter", "merged_model"):
        card = ModelCard.load(experiment / name / "README.md")
        figures = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert figures["exact_match"] == pytest.approx(winner["exact_match"])
        assert figures["heldout_loss"] == pytest.approx(winner["heldout_loss"])
        assert f"| this model (trial `{winner['trial_id']}`) | 18 |" in card.text
        assert f"Winner {winner['trial_id']}: the only evaluated trial." in card.text
        assert ("NOT better than the base model" in card.text) == (not board["selection"]["better_than_base"])
        assert "| `learning_rate` | 0.03 (searched) |" in card.text and "trained 6 of 6 steps" in card.text
        assert "```text\nQuery: {text}\nIntent:\n```" in card.text and "at most 6 new tokens" in card.text
    adapter = tmp_path / "best_adapter"
    shutil.copytree(experiment / "best_adapter", adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir.resolve())
    assert AutoPeftModelForCausalLM.from_pretrained(adapter).base_model.model.config.hidden_size == 64

    code = re.findall(r"```python\n(.*?)```", (adapter / "README.md").read_text(), re.S)[0]
    env = {**os.environ, "LORASWEEP_CACHE": str(tmp_path / "no-cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prompt = re.search(r"^prompt = (.*)$", code, re.M).group(1)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16),
                                        adapter).eval()
    assert proc.stdout == generate_greedy(adapted, tokenizer, [ast.literal_eval(prompt)], 6, 1)[0] + "\n"


def test_the_second_trial_reuses_the_first_trials_worker_and_base_model(finished_sweep):
    """resources.reuse_actors: the next trial runs in the finished trial's process, with its imports and loaded
    base, so it reaches its first optimizer step sooner."""
    experiment, proc = finished_sweep
    last_results = [json.loads(path.read_text().splitlines()[-1])
                    for path in sorted((experiment / "tune").glob("*/result.json"))]
    by_order = sorted(last_results, key=lambda result: result["trial_in_process"])
    assert [r["trial_in_process"] for r in by_order] == [1, 2]
    first, second = by_order
    assert 0 < second["startup_s"] < first["startup_s"], (first["startup_s"], second["startup_s"])
    assert "base model reused from this worker's previous trial" in proc.stdout + proc.stderr
    board = json.loads((experiment / "leaderboard.json").read_text())
    assert all(row["startup_s"] > 0 for row in board["rows"] if row["trial_id"] != "base")


def test_the_evaluation_stage_shows_a_progress_bar(finished_sweep):
    """Ray's tqdm in the evaluation task: the driver draws one bar over every model's prompts."""
    _, proc = finished_sweep
    output = proc.stdout + proc.stderr
    assert "evaluation stage (prompts)" in output
    assert "100%" in output[output.index("evaluation stage (prompts)"):], "the bar reaches every model's prompts"
