"""The evaluation stage: score the top trials and the base model on held-out prompts, pick the winner,
merge it, and check that the merged model answers as the adapter did."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from eval.exact_match import exact_match_flags
from eval.generation import generate_greedy, heldout_loss

BASE_ROW_ID = "base"


def evaluate_candidates(base_dir: str, precision: str, candidates: list[dict], test_rows: list[dict],
                        eval_options: dict, out_dir: Path, quant_type: str = "nf4", double_quant: bool = True,
                        trust_remote_code: bool = False) -> dict[str, dict]:
    """{trial_id or "base": {exact_match, heldout_loss, n}} with generations written per candidate.
    One base model is loaded; each adapter is attached to it in turn instead of reloading the base."""
    import torch
    from peft import PeftModel

    from trainables.model_loading import load_base_model, load_tokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    base = load_base_model(base_dir, precision, quant_type, double_quant, trust_remote_code, device=device)
    base.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    model = base
    order = [BASE_ROW_ID] + [c["trial_id"] for c in candidates]
    adapters = {c["trial_id"]: c["checkpoint_dir"] for c in candidates}
    # Each model: its prompts once for generation and once for the held-out loss.
    progress = progress_bar(total=2 * len(test_rows) * len(order), desc="evaluation stage (prompts)")
    for index, row_id in enumerate(order, start=1):
        started = time.time()
        if row_id == BASE_ROW_ID:
            scored = _score(base, tokenizer, test_rows, eval_options, progress)
        else:
            if model is base:
                model = PeftModel.from_pretrained(base, adapters[row_id], adapter_name=row_id)
            else:
                model.load_adapter(adapters[row_id], adapter_name=row_id)
            model.set_adapter(row_id)
            model.eval()
            scored = _score(model, tokenizer, test_rows, eval_options, progress)
        _write_generations(out_dir / f"generations_{row_id}.jsonl", test_rows, scored.pop("predictions"), scored.pop("flags"))
        scored["seconds"] = round(time.time() - started, 2)
        results[row_id] = scored
        print(f"[lorasweep] eval {index}/{len(order)} {row_id}: exact_match={scored['exact_match']:.3f} "
              f"heldout_loss={scored['heldout_loss']:.4f} ({scored['seconds']:.1f}s)", flush=True)
    progress.close()
    return results


def progress_bar(total: int, desc: str):
    """tqdm in a plain process; inside a Ray task, Ray's tqdm, which the driver draws as one live bar instead of a
    scroll of carriage-return lines from the task's captured output."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None:
        from ray.experimental.tqdm_ray import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc)


def _score(model, tokenizer, rows: list[dict], options: dict, progress=None) -> dict:
    predictions = generate_greedy(model, tokenizer, [r["prompt"] for r in rows], options["max_new_tokens"],
                                  options["batch_size"], progress)
    flags = exact_match_flags(predictions, [r["target"] for r in rows], **normalization_options(options))
    return {
        "exact_match": sum(flags) / len(flags),
        "heldout_loss": heldout_loss(model, tokenizer, rows, options["batch_size"], progress),
        "n": len(rows),
        "predictions": predictions,
        "flags": flags,
    }


def normalization_options(options: dict) -> dict:
    keys = ("first_line_only", "ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore")
    return {k: options[k] for k in keys}


def _write_generations(path: Path, rows: list[dict], predictions: list[str], flags: list[bool]) -> None:
    with path.open("w") as handle:
        for row, prediction, flag in zip(rows, predictions, flags):
            handle.write(json.dumps({"prompt": row["prompt"], "target": row["target"], "generation": prediction,
                                     "exact_match": flag}) + "\n")


def choose_winner(results: dict[str, dict], select_by: str) -> str | None:
    """The best trial (never the base row): highest exact match, ties by lower held-out loss; or by loss alone."""
    trial_ids = [k for k in results if k != BASE_ROW_ID]
    if not trial_ids:
        return None
    if select_by == "exact_match":
        return min(trial_ids, key=lambda k: (-results[k]["exact_match"], results[k]["heldout_loss"]))
    return min(trial_ids, key=lambda k: results[k]["heldout_loss"])


def merge_and_check(base_dir: str, adapter_dir: str, experiment_dir: Path, base_model_id: str, summary: str,
                    check_rows: list[dict], eval_options: dict, trust_remote_code: bool = False) -> dict:
    """Copy the winner to best_adapter/, merge it into merged_model/, and compare the merged model's
    greedy answers with the adapter's on a sample of held-out prompts (both on the same bf16 base)."""
    import torch
    from peft import PeftModel

    from eval.merge import merge_adapter, write_adapter_card
    from trainables.model_loading import load_base_model, load_tokenizer
    from trainables.qlora_trial import RESUME_FILES

    best_adapter = experiment_dir / "best_adapter"
    partial = best_adapter.with_name("best_adapter.partial")
    shutil.rmtree(partial, ignore_errors=True)
    # The adapter and tokenizer only: optimizer and trainer state were there for resuming the trial.
    shutil.copytree(adapter_dir, partial, ignore=shutil.ignore_patterns(*RESUME_FILES))
    write_adapter_card(partial, base_model_id, summary)
    shutil.rmtree(best_adapter, ignore_errors=True)
    partial.rename(best_adapter)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    merged_dir = experiment_dir / "merged_model"
    merged = merge_adapter(base_dir, best_adapter, merged_dir, base_model_id, summary, trust_remote_code).to(device)
    tokenizer = load_tokenizer(str(best_adapter))
    adapted = PeftModel.from_pretrained(load_base_model(base_dir, "bf16", trust_remote_code=trust_remote_code, device=device),
                                        str(best_adapter)).eval()
    prompts = [r["prompt"] for r in check_rows]
    targets = [r["target"] for r in check_rows]
    norm = normalization_options(eval_options)
    adapter_out = generate_greedy(adapted, tokenizer, prompts, eval_options["max_new_tokens"], eval_options["batch_size"])
    merged_out = generate_greedy(merged.eval(), tokenizer, prompts, eval_options["max_new_tokens"], eval_options["batch_size"])
    adapter_flags = exact_match_flags(adapter_out, targets, **norm)
    merged_flags = exact_match_flags(merged_out, targets, **norm)
    same = sum(a == m for a, m in zip(adapter_out, merged_out))
    check = {
        "prompts": len(prompts),
        "adapter_exact_match": sum(adapter_flags) / len(prompts),
        "merged_exact_match": sum(merged_flags) / len(prompts),
        "identical_generations": same,
        "tolerance": eval_options["merge_check_tolerance"],
    }
    check["passed"] = abs(check["adapter_exact_match"] - check["merged_exact_match"]) <= check["tolerance"]
    (experiment_dir / "merge_check.json").write_text(json.dumps(check, indent=2))
    return check


def run_evaluation_stage(base_dir: str, precision: str, candidates: list[dict], test_rows: list[dict],
                         eval_options: dict, experiment_dir: str, base_model_id: str, merge: bool,
                         quant_type: str = "nf4", double_quant: bool = True, trust_remote_code: bool = False) -> dict:
    """Score, choose, merge, check: everything after the sweep, in one process (a Ray task on a GPU node)."""
    experiment = Path(experiment_dir)
    results = evaluate_candidates(base_dir, precision, candidates, test_rows, eval_options, experiment / "eval",
                                  quant_type, double_quant, trust_remote_code)
    winner = choose_winner(results, eval_options["select_by"])
    outcome = {"results": results, "winner": winner, "merge_check": None, "merge_error": None}
    if winner is None or not merge:
        return outcome
    adapter_dir = next(c["checkpoint_dir"] for c in candidates if c["trial_id"] == winner)
    scored = results[winner]
    summary = (f"Trial `{winner}` of a lorasweep sweep; held-out exact match {scored['exact_match']:.3f}, "
               f"held-out loss {scored['heldout_loss']:.4f} on {scored['n']} prompts.")
    try:
        outcome["merge_check"] = merge_and_check(base_dir, adapter_dir, experiment, base_model_id, summary,
                                                 test_rows[: eval_options["merge_check_prompts"]], eval_options,
                                                 trust_remote_code)
    except Exception as err:  # the leaderboard is still written; the exit code says the merge failed
        outcome["merge_error"] = f"{type(err).__name__}: {err}"
    return outcome
