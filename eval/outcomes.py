"""What happened to each trial, which trials the evaluation stage scores, and which one wins. The one owner of
the status wording, the top-k, the winner and the leaderboard's order: the driver, the leaderboard, the report
and the benchmark all call this module, whether they read Tune's ResultGrid or Tune's files."""

from __future__ import annotations

import math
import re

BASE_ROW_ID = "base"
BASE_STATUS = "base model (no adapter)"
# What a trial reports at its last evaluation that the leaderboard shows (trainables/qlora_trial.py reports them).
REPORTED_FIGURES = ("tokens", "wall_time_s", "peak_memory_mib", "startup_s", "trial_in_process", "train_seconds")
# The same figure under the name it had before it said its unit (results written by older runs).
_OLD_NAMES = {"peak_memory_mib": "peak_memory_mb"}


def trial_status(*, error: str | None, last: dict, done: bool, max_evaluations: int | None,
                 asha_rungs: list[int]) -> str:
    """`completed`, `stopped by ASHA at rung k (evaluation i of n)`, `failed: <reason>` or `unfinished: ...`.
    `last` is the trial's last reported result ({} when it reported none); `asha_rungs` is empty when ASHA is
    off; `max_evaluations` is None when the plan is not known (an experiment written by an older version)."""
    of = f" of {max_evaluations}" if max_evaluations is not None else ""
    evaluation = last.get("evaluation", 0)
    if error:
        status = "failed: " + error[:300]
    elif last.get("failure"):
        status = f"failed: {last['failure']}"
    elif not last:
        return "unfinished: no evaluation reported"
    elif max_evaluations is not None and evaluation >= max_evaluations:
        status = "completed"
    elif not done:
        status = f"unfinished: interrupted after evaluation {evaluation}{of}"
    elif evaluation in asha_rungs:
        status = f"stopped by ASHA at rung {asha_rungs.index(evaluation)} (evaluation {evaluation}{of})"
    else:
        status = f"stopped after evaluation {evaluation}{of}"
    if last.get("retry_note"):
        status += f" ({last['retry_note']})"
    return status


def status_kind(status: str) -> str:
    """completed, stopped, failed, unfinished, base or other: what the report colours a status by."""
    for kind in ("completed", "stopped", "failed", "unfinished", "base"):
        if status.startswith(kind):
            return kind
    return "other"


def short_status(status: str) -> str:
    """A status in a few words, for legends and narrow cells: "ASHA rung 1", "failed", "completed"."""
    match = re.match(r"stopped by ASHA at rung (\d+)", status)
    if match:
        return f"ASHA rung {match.group(1)}"
    return status.split(":")[0]


def trial_record(trial_id: str, params: dict, status: str, losses: list[float], last: dict,
                 checkpoint_dir: str | None = None) -> dict:
    """One plain dict per trial: its params, status, lowest finite eval loss and reported figures."""
    finite = [loss for loss in losses if _finite(loss)]
    return {
        "trial_id": trial_id,
        "params": params,
        "status": status,
        "best_eval_loss": min(finite) if finite else None,
        "steps": last.get("step"),
        **{name: last.get(name, last.get(_OLD_NAMES.get(name, name))) for name in REPORTED_FIGURES},
        "checkpoint_dir": checkpoint_dir,
    }


def rank_by_eval_loss(records: list[dict]) -> list[dict]:
    """Trials that did not fail and have a validation loss, lowest loss first (the sweep's metric is eval_loss,
    minimized: sweeps/search_space.py refuses any other)."""
    scored = [r for r in records if _finite(r.get("best_eval_loss")) and not r["status"].startswith("failed")]
    return sorted(scored, key=lambda r: r["best_eval_loss"])


def evaluation_candidates(records: list[dict], top_k: int) -> list[dict]:
    """The top-k trials by validation loss that left a checkpoint: what the evaluation stage scores."""
    return [r for r in rank_by_eval_loss(records) if r.get("checkpoint_dir")][:top_k]


# Two models whose per-prompt scores differ at a two-sided p of this or more are a tie within noise.
TIE_P_VALUE = 0.05
TIE_RULE = ("the trials whose per-prompt scores on the selection metric do not differ from the best one's at "
            f"p < {TIE_P_VALUE} (exact two-sided sign test on the prompts where they differ: McNemar's exact test "
            "for exact match) are tied with it; among them the lowest held-out loss wins")
# 97.5th percentile of the standard normal: a two-sided 95% interval.
_Z95 = 1.959963984540054


def higher_is_better(metric: str) -> bool:
    """Held-out loss is minimized; every task metric is maximized."""
    return metric != "heldout_loss"


def selection_key(scores: dict, select_by: str) -> tuple:
    """Lower is better: the selection metric (highest task score or lowest held-out loss), ties by lower held-out
    loss."""
    if higher_is_better(select_by):
        return (-scores[select_by], scores["heldout_loss"])
    return (scores["heldout_loss"],)


def wilson_interval(successes: int, n: int) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a proportion (exact match over n prompts); None without prompts. Unlike
    the normal approximation it stays inside [0, 1] and is not empty at 0% or 100%."""
    if n <= 0:
        return None
    p = successes / n
    scale = 1 + _Z95**2 / n
    center = (p + _Z95**2 / (2 * n)) / scale
    half = _Z95 / scale * math.sqrt(p * (1 - p) / n + _Z95**2 / (4 * n * n))
    # At 0 or n successes the bound is exactly 0 or 1; floating point would leave it a hair inside.
    return (0.0 if successes == 0 else center - half), (1.0 if successes == n else center + half)


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided binomial test of wins against losses at 1/2 (ties left out): McNemar's exact test when
    they are the discordant pairs of two models' exact-match flags on the same prompts."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_comparison(first: list, second: list, metric: str) -> dict:
    """The two models' per-prompt scores on the same prompts: on how many prompts each is better, and the exact
    sign test's p-value (for exact-match flags, McNemar's exact test on the discordant pairs)."""
    if len(first) != len(second):
        raise ValueError(f"paired comparison needs the same prompts: {len(first)} scores against {len(second)}")
    sign = 1 if higher_is_better(metric) else -1
    first_better = sum(sign * (a - b) > 0 for a, b in zip(first, second))
    second_better = sum(sign * (b - a) > 0 for a, b in zip(first, second))
    return {"metric": metric, "prompts": len(first), "first_better": first_better, "second_better": second_better,
            "p_value": sign_test_p(first_better, second_better)}


def per_prompt_scores(generations: list[dict], metric: str) -> list:
    """One model's score on each held-out prompt, from its generation records (eval/stage.py writes them)."""
    return [float(g[metric]) for g in generations]


def select_winner(results: dict[str, dict], generations: dict[str, list[dict]], select_by: str) -> dict:
    """Who wins, and how sure that is: the best trial by eval.select_by, the trials tied with it within noise, the
    tie rule's choice among them (TIE_RULE), the winner against the runner-up and against the base model on the
    same prompts (paired), and a warning when the winner is not better than the base model. Never the base row."""
    trial_ids = [k for k in results if k != BASE_ROW_ID]
    selection = {"select_by": select_by, "tie_rule": TIE_RULE, "tie_p_value": TIE_P_VALUE, "winner": None,
                 "runner_up": None, "tied": [], "tie": False, "versus_runner_up": None, "versus_base": None,
                 "better_than_base": None, "warning": None}
    if not trial_ids:
        return selection
    scores = {k: per_prompt_scores(generations[k], select_by) for k in results}
    ranked = sorted(trial_ids, key=lambda k: selection_key(results[k], select_by))
    leader = ranked[0]
    tied = [k for k in ranked[1:]
            if paired_comparison(scores[leader], scores[k], select_by)["p_value"] >= TIE_P_VALUE]
    winner = min([leader] + tied, key=lambda k: (results[k]["heldout_loss"], ranked.index(k)))
    runner_up = next((k for k in ranked if k != winner), None)
    selection.update(winner=winner, runner_up=runner_up, tied=sorted(set([leader] + tied) - {winner}, key=ranked.index))
    if runner_up is not None:
        versus = paired_comparison(scores[winner], scores[runner_up], select_by)
        selection["versus_runner_up"] = versus
        selection["tie"] = versus["p_value"] >= TIE_P_VALUE
    if BASE_ROW_ID in results:
        versus = paired_comparison(scores[winner], scores[BASE_ROW_ID], select_by)
        selection["versus_base"] = versus
        better = versus["first_better"] > versus["second_better"] and versus["p_value"] < TIE_P_VALUE
        selection["better_than_base"] = better
        if not better:
            selection["warning"] = (
                f"the winner {winner} is NOT better than the base model on {select_by}: "
                f"{results[winner][select_by]:.3f} against {results[BASE_ROW_ID][select_by]:.3f}, better on "
                f"{versus['first_better']} and worse on {versus['second_better']} of {versus['prompts']} held-out "
                f"prompts (p = {versus['p_value']:.3g}); the fine-tune may not have learned the task")
    return selection


def describe_selection(selection: dict, results: dict[str, dict]) -> list[str]:
    """The selection in sentences, for the leaderboard, the console and the report (the warning first)."""
    winner, metric = selection.get("winner"), selection.get("select_by")
    if winner is None:
        return ["No trial was evaluated: no winner."]
    lines = [f"WARNING: {selection['warning']}."] if selection.get("warning") else []
    versus = selection.get("versus_runner_up")
    if versus is None:
        lines.append(f"Winner {winner}: the only evaluated trial.")
        return lines
    runner_up = selection["runner_up"]
    verdict = "a tie within noise" if selection["tie"] else "a significant difference"
    lines.append(f"Winner {winner} against runner-up {runner_up} on {metric}: {results[winner][metric]:.3f} against "
                 f"{results[runner_up][metric]:.3f}, better on {versus['first_better']} and worse on "
                 f"{versus['second_better']} of {versus['prompts']} held-out prompts (p = {versus['p_value']:.3g}): "
                 f"{verdict}.")
    if selection.get("tied"):
        lines.append(f"Tied with the best within noise: {', '.join([winner] + selection['tied'])}; tie rule: "
                     f"{selection['tie_rule']}.")
    return lines


def leaderboard_key(row: dict, select_by: str) -> tuple:
    """The leaderboard's order: the winner first, the other evaluated trials by the selection rule, then the rest by
    validation loss."""
    if row.get(select_by) is not None and row.get("heldout_loss") is not None:
        return (0, not row.get("winner"), *selection_key(row, select_by))
    loss = row["best_eval_loss"] if _finite(row.get("best_eval_loss")) else math.inf
    return (1, loss)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
