"""Trial outcomes on hand-made records: the status wording, which trials the evaluation stage scores, who wins,
and the leaderboard's order (eval/outcomes.py, which the driver, the leaderboard, the report and the benchmark
share)."""

import math

import pytest

from eval.leaderboard import build_rows
from eval.outcomes import (choose_winner, evaluation_candidates, leaderboard_key, rank_by_eval_loss, short_status,
                           status_kind, trial_record, trial_status)

RUNGS = [1, 2]  # ASHA with min_iter 1, eta 2 over 4 evaluations


def status(last: dict, error: str | None = None, done: bool = True, rungs=RUNGS, max_evaluations=4) -> str:
    return trial_status(error=error, last=last, done=done, max_evaluations=max_evaluations, asha_rungs=rungs)


def test_status_wording_for_every_fate():
    assert status({"evaluation": 4}) == "completed"
    assert status({"evaluation": 1}) == "stopped by ASHA at rung 0 (evaluation 1 of 4)"
    assert status({"evaluation": 2}) == "stopped by ASHA at rung 1 (evaluation 2 of 4)"
    assert status({"evaluation": 3}) == "stopped after evaluation 3 of 4"
    assert status({"evaluation": 1}, rungs=[]) == "stopped after evaluation 1 of 4"  # ASHA off: no rung to name
    assert status({"evaluation": 2}, done=False) == "unfinished: interrupted after evaluation 2 of 4"
    assert status({}, done=False) == "unfinished: no evaluation reported"
    assert status({"evaluation": 1, "failure": "eval_loss is nan at step 2"}) == "failed: eval_loss is nan at step 2"
    assert status({"evaluation": 1}, error="RuntimeError: boom") == "failed: RuntimeError: boom"
    assert status({"evaluation": 4, "retry_note": "CUDA out of memory at micro-batch 8; retried with 4 x 2 accumulation"}) \
        == "completed (CUDA out of memory at micro-batch 8; retried with 4 x 2 accumulation)"
    # An experiment from before plan.json: no plan, so no "of n" and no rung.
    assert status({"evaluation": 2}, rungs=[], max_evaluations=None) == "stopped after evaluation 2"


def test_status_kinds_and_short_forms_follow_the_wording():
    assert [status_kind(s) for s in (status({"evaluation": 4}), status({"evaluation": 1}), status({}, error="x"),
                                      status({"evaluation": 1}, done=False), "base model (no adapter)")] \
        == ["completed", "stopped", "failed", "unfinished", "base"]
    assert short_status(status({"evaluation": 2})) == "ASHA rung 1"
    assert short_status(status({}, error="RuntimeError: boom")) == "failed"


def record(trial_id: str, losses: list[float], evaluation: int = 4, error: str | None = None, checkpoint: bool = True):
    last = {"evaluation": evaluation, "step": 2 * evaluation, "tokens": 100}
    return trial_record(trial_id, {"lora_r": 8}, status(last, error=error), losses, last,
                        f"/ckpt/{trial_id}" if checkpoint else None)


def test_records_keep_the_lowest_finite_loss_and_the_reported_figures():
    r = record("t1", [2.0, math.nan, 0.7, 0.9])
    assert r["best_eval_loss"] == 0.7 and r["steps"] == 8 and r["tokens"] == 100 and r["checkpoint_dir"] == "/ckpt/t1"
    assert record("t2", [math.inf, math.nan])["best_eval_loss"] is None


def test_candidates_are_the_top_k_by_loss_that_did_not_fail_and_left_a_checkpoint():
    records = [record("slow", [0.9]), record("best", [0.3]), record("failed", [0.1], error="RuntimeError: x"),
               record("no-ckpt", [0.2], checkpoint=False), record("second", [0.5], evaluation=1),
               record("diverged", [math.inf])]
    assert [r["trial_id"] for r in rank_by_eval_loss(records)] == ["no-ckpt", "best", "second", "slow"]
    assert [r["trial_id"] for r in evaluation_candidates(records, 2)] == ["best", "second"]
    assert evaluation_candidates([record("failed", [0.1], error="x")], 2) == []


def test_winner_and_ranking_use_the_same_rule():
    results = {"base": {"exact_match": 0.9, "heldout_loss": 0.1},  # never the winner, whatever its scores
               "a": {"exact_match": 0.8, "heldout_loss": 0.5},
               "b": {"exact_match": 0.8, "heldout_loss": 0.3},
               "c": {"exact_match": 0.6, "heldout_loss": 0.2}}
    assert choose_winner(results, "exact_match") == "b"  # a tie on exact match goes to the lower held-out loss
    assert choose_winner(results, "heldout_loss") == "c"
    assert choose_winner({"base": results["base"]}, "exact_match") is None

    trials = [record(t, [loss]) for t, loss in (("a", 0.4), ("b", 0.6), ("c", 0.5), ("d", 0.2), ("e", 0.9))]
    for select_by, order in (("exact_match", ["b", "a", "c", "d", "e"]), ("heldout_loss", ["c", "b", "a", "d", "e"])):
        rows = build_rows(trials, results, ["lora_r"], choose_winner(results, select_by), select_by)
        # evaluated trials first by the selection rule, then the others by validation loss; the base row last
        assert [r["trial_id"] for r in rows] == order + ["base"]
        assert rows[0]["winner"] and rows[0]["rank"] == 1 and [r["rank"] for r in rows][-1] is None
        assert sorted(rows[:-1], key=lambda row: leaderboard_key(row, select_by)) == rows[:-1]


@pytest.mark.parametrize("select_by", ["exact_match", "heldout_loss"])
def test_a_trial_without_a_loss_ranks_last(select_by):
    rows = build_rows([record("none", []), record("some", [1.0])], {}, ["lora_r"], None, select_by)
    assert [r["trial_id"] for r in rows] == ["some", "none"]
