"""The evaluation stage: score the top trials and the base model on held-out prompts, pick the winner
(eval/outcomes.py decides), merge it, and check that the merged model answers as the adapter did."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from eval.artifacts import (EVAL_DIR, MERGE_CHECK_FILE, directory_written_atomically, generations_file,
                            write_json_atomically, write_text_atomically)
from eval.eval_config import EvalConfig
from eval.exact_match import exact_match_flags
from eval.generation import generate_greedy, heldout_losses
from eval.model_card import CardFacts, StudyFacts
from eval.outcomes import BASE_ROW_ID, describe_selection, select_winner, wilson_interval
from eval.text_metrics import text_scores
from trainables.trial_spec import RESUME_FILES, BaseModelSpec


def evaluate_candidates(base: BaseModelSpec, candidates: list[dict], test_rows: list[dict], options: EvalConfig,
                        experiment_dir: Path) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """({trial_id or "base": {exact_match, exact_match_ci, rouge_l, chrf, heldout_loss, n, seconds}}, {the same ids:
    their generations, with each prompt's scores}), the
    generations also written to eval/generations_<id>.jsonl. One base model is loaded; each adapter is attached
    to it in turn instead of reloading the base."""
    from peft import PeftModel
    from transformers.utils import logging as hf_logging

    from trainables.model_loading import load_base_model, load_tokenizer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(base.model_dir, base.trust_remote_code)
    base_model = load_base_model(base.model_dir, base.precision, base.bnb_4bit_quant_type,
                                 base.bnb_4bit_use_double_quant, base.trust_remote_code, device=base.device)
    base_model.eval()
    (Path(experiment_dir) / EVAL_DIR).mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    generations: dict[str, list[dict]] = {}
    model = base_model
    order = [BASE_ROW_ID] + [c["trial_id"] for c in candidates]
    adapters = {c["trial_id"]: c["checkpoint_dir"] for c in candidates}
    # Each model: its prompts once for generation and once for the held-out loss.
    progress = progress_bar(total=2 * len(test_rows) * len(order), desc="evaluation stage (prompts)")
    for index, row_id in enumerate(order, start=1):
        started = time.time()
        if row_id != BASE_ROW_ID:
            if model is base_model:
                model = PeftModel.from_pretrained(base_model, adapters[row_id], adapter_name=row_id)
            else:
                model.load_adapter(adapters[row_id], adapter_name=row_id)
            model.set_adapter(row_id)
            model.eval()
        scored = _score(model, tokenizer, test_rows, options, progress)
        generations[row_id] = [{"prompt": row["prompt"], "target": row["target"], "generation": prediction,
                                **{metric: values[i] for metric, values in scored["per_prompt"].items()}}
                               for i, (row, prediction) in enumerate(zip(test_rows, scored.pop("predictions")))]
        del scored["per_prompt"]
        write_text_atomically(generations_file(experiment_dir, row_id),
                              "".join(json.dumps(g) + "\n" for g in generations[row_id]))
        scored["seconds"] = round(time.time() - started, 2)
        results[row_id] = scored
        print(f"[lorasweep] eval {index}/{len(order)} {row_id}: exact_match={scored['exact_match']:.3f} "
              f"rouge_l={scored['rouge_l']:.3f} chrf={scored['chrf']:.3f} heldout_loss={scored['heldout_loss']:.4f} "
              f"({scored['seconds']:.1f}s)", flush=True)
    progress.close()
    return results, generations


def progress_bar(total: int, desc: str):
    """tqdm in a plain process; inside a Ray worker (a task or an actor), Ray's tqdm, which the driver draws as one
    live bar instead of a scroll of carriage-return lines from the worker's captured output."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None:
        from ray.experimental.tqdm_ray import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc)


def _score(model, tokenizer, rows: list[dict], options: EvalConfig, progress=None) -> dict:
    predictions = generate_greedy(model, tokenizer, [r["prompt"] for r in rows], options.max_new_tokens,
                                  options.batch_size, progress)
    targets = [r["target"] for r in rows]
    flags = exact_match_flags(predictions, targets, **options.normalization())
    texts = text_scores([p.strip() for p in predictions], [t.strip() for t in targets])
    loss, losses = heldout_losses(model, tokenizer, rows, options.batch_size, progress)
    return {
        "exact_match": sum(flags) / len(flags),
        "exact_match_ci": wilson_interval(sum(flags), len(flags)),
        **{metric: score for metric, (score, _) in texts.items()},
        "heldout_loss": loss,
        "n": len(rows),
        "predictions": predictions,
        # Each prompt's scores, kept in the generations files: the paired comparisons of eval/outcomes.py use them.
        "per_prompt": {"exact_match": flags, **{metric: each for metric, (_, each) in texts.items()},
                       "heldout_loss": losses},
    }


def merge_and_check(base: BaseModelSpec, adapter_dir: str, experiment_dir: Path, facts: CardFacts,
                    check_rows: list[dict], options: EvalConfig) -> dict:
    """Copy the winner to best_adapter/, merge it into merged_model/ (each with its model card), and compare the
    merged model's greedy answers with the adapter's on a sample of held-out prompts (both on the same bf16 base)."""
    from peft import PeftModel

    from eval.merge import merge_adapter
    from eval.model_card import adapter_card, merged_card, point_adapter_at_base
    from trainables.model_loading import load_base_model, load_tokenizer

    best_adapter = experiment_dir / "best_adapter"
    with directory_written_atomically(best_adapter) as partial:
        # The adapter and tokenizer only: optimizer and trainer state were there for resuming the trial.
        shutil.copytree(adapter_dir, partial, ignore=shutil.ignore_patterns(*RESUME_FILES))
        point_adapter_at_base(partial, facts.study.base)  # the checkpoint names the trial's copy of the base
        adapter_card(facts).save(partial / "README.md")

    merged = merge_adapter(base.model_dir, best_adapter, experiment_dir / "merged_model", merged_card(facts),
                           base.trust_remote_code).to(base.device)
    tokenizer = load_tokenizer(str(best_adapter))
    adapted = PeftModel.from_pretrained(load_base_model(base.model_dir, "bf16", trust_remote_code=base.trust_remote_code,
                                                        device=base.device), str(best_adapter)).eval()
    prompts = [r["prompt"] for r in check_rows]
    targets = [r["target"] for r in check_rows]
    adapter_out = generate_greedy(adapted, tokenizer, prompts, options.max_new_tokens, options.batch_size)
    merged_out = generate_greedy(merged.eval(), tokenizer, prompts, options.max_new_tokens, options.batch_size)
    adapter_flags = exact_match_flags(adapter_out, targets, **options.normalization())
    merged_flags = exact_match_flags(merged_out, targets, **options.normalization())
    same = sum(a == m for a, m in zip(adapter_out, merged_out))
    check = {
        "prompts": len(prompts),
        "adapter_exact_match": sum(adapter_flags) / len(prompts),
        "merged_exact_match": sum(merged_flags) / len(prompts),
        "identical_generations": same,
        "tolerance": options.merge_check_tolerance,
    }
    check["passed"] = abs(check["adapter_exact_match"] - check["merged_exact_match"]) <= check["tolerance"]
    write_json_atomically(experiment_dir / MERGE_CHECK_FILE, check)
    return check


def run_evaluation_stage(base: BaseModelSpec, candidates: list[dict], test_rows: list[dict], options: EvalConfig,
                         experiment_dir: str, study: StudyFacts) -> dict:
    """Score, choose, merge, check: everything after the sweep, in one process (a Ray actor on a GPU node)."""
    experiment = Path(experiment_dir)
    results, generations = evaluate_candidates(base, candidates, test_rows, options, experiment)
    selection = select_winner(results, generations, options.select_by)
    winner = selection["winner"]
    outcome = {"results": results, "generations": generations, "winner": winner, "selection": selection,
               "merge_check": None, "merge_error": None}
    if winner is None or not options.merge:
        return outcome
    winning = next(c for c in candidates if c["trial_id"] == winner)
    facts = CardFacts(study=study, trial_id=winner, params=winning.get("params", {}), steps=winning.get("steps"),
                      results=results, options=options, example=test_rows[0],
                      selection=tuple(describe_selection(selection, results)))
    print(f"[lorasweep] merging {winner} into the base: best_adapter/, merged_model/, then the merge check on "
          f"{min(len(test_rows), options.merge_check_prompts)} held-out prompts", flush=True)
    try:
        outcome["merge_check"] = merge_and_check(base, winning["checkpoint_dir"], experiment, facts,
                                                 test_rows[: options.merge_check_prompts], options)
    except Exception as err:  # the leaderboard is still written; the exit code says the merge failed
        outcome["merge_error"] = f"{type(err).__name__}: {err}"
    return outcome
