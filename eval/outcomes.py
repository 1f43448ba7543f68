"""What happened to each trial, which trials the evaluation stage scores, and which one wins. The one owner of
the status wording, the top-k, the winner and the leaderboard's order: the driver, the leaderboard, the report
and the benchmark all call this module, whether they read Tune's ResultGrid or Tune's files."""

from __future__ import annotations

import math
import re

BASE_ROW_ID = "base"
BASE_STATUS = "base model (no adapter)"
# What a trial reports at its last evaluation that the leaderboard shows (trainables/qlora_trial.py reports them).
REPORTED_FIGURES = ("tokens", "wall_time_s", "peak_memory_mb", "startup_s", "trial_in_process", "train_seconds")


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
        **{name: last.get(name) for name in REPORTED_FIGURES},
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


def selection_key(scores: dict, select_by: str) -> tuple:
    """Lower is better: highest exact match, ties by lower held-out loss; or held-out loss alone."""
    if select_by == "exact_match":
        return (-scores["exact_match"], scores["heldout_loss"])
    return (scores["heldout_loss"],)


def choose_winner(results: dict[str, dict], select_by: str) -> str | None:
    """The best evaluated trial by eval.select_by (never the base row), or None when no trial was evaluated."""
    trial_ids = [k for k in results if k != BASE_ROW_ID]
    if not trial_ids:
        return None
    return min(trial_ids, key=lambda k: selection_key(results[k], select_by))


def leaderboard_key(row: dict, select_by: str) -> tuple:
    """The leaderboard's order: evaluated trials by the selection rule, then the rest by validation loss."""
    if row.get("exact_match") is not None:
        return (0, *selection_key(row, select_by))
    loss = row["best_eval_loss"] if _finite(row.get("best_eval_loss")) else math.inf
    return (1, loss)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
