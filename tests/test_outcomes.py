"""Trial outcomes on hand-made records: the status wording, which trials the evaluation stage scores, who wins,
and the leaderboard's order (eval/outcomes.py, which the driver, the leaderboard, the report and the benchmark
share)."""

import hashlib
import json
import math
from datetime import datetime
from pathlib import Path

import pytest
import torch

from eval.leaderboard import build_rows
from eval.leaderboard import write_leaderboard
from eval.outcomes import (describe_selection, evaluation_candidates, leaderboard_key, paired_comparison,
                           rank_by_eval_loss, select_winner, short_status, sign_test_p, status_kind, trial_record,
                           trial_status, wilson_interval)

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
    # Peak memory is in MiB and says so; results written under the old name still read.
    assert trial_record("t3", {}, "completed", [1.0], {"peak_memory_mib": 12.5})["peak_memory_mib"] == 12.5
    assert trial_record("t4", {}, "completed", [1.0], {"peak_memory_mb": 7.0})["peak_memory_mib"] == 7.0


def test_candidates_are_the_top_k_by_loss_that_did_not_fail_and_left_a_checkpoint():
    records = [record("slow", [0.9]), record("best", [0.3]), record("failed", [0.1], error="RuntimeError: x"),
               record("no-ckpt", [0.2], checkpoint=False), record("second", [0.5], evaluation=1),
               record("diverged", [math.inf])]
    assert [r["trial_id"] for r in rank_by_eval_loss(records)] == ["no-ckpt", "best", "second", "slow"]
    assert [r["trial_id"] for r in evaluation_candidates(records, 2)] == ["best", "second"]
    assert evaluation_candidates([record("failed", [0.1], error="x")], 2) == []


def scored(hits: list[int], loss: float, losses: list[float] | None = None) -> tuple[dict, list[dict]]:
    """A model's evaluation result and generation records from its exact-match flags on the held-out prompts."""
    n = len(hits)
    losses = losses or [loss] * n
    result = {"exact_match": sum(hits) / n, "exact_match_ci": wilson_interval(sum(hits), n), "heldout_loss": loss,
              "rouge_l": sum(hits) / n, "chrf": sum(hits) / n, "n": n}
    lines = [{"prompt": f"p{i}", "target": "t", "generation": "t" if h else "x", "exact_match": bool(h),
              "rouge_l": float(h), "chrf": float(h), "heldout_loss": l} for i, (h, l) in enumerate(zip(hits, losses))]
    return result, lines


def evaluated(**models) -> tuple[dict, dict]:
    results, generations = {}, {}
    for name, (hits, loss) in models.items():
        results[name], generations[name] = scored(hits, loss)
    return results, generations


def test_wilson_interval_matches_published_values():
    # Wilson (1927) / Newcombe (1998), 95%: 81 of 263 -> 0.2553-0.3662; 0 of 10 -> 0-0.2775; 10 of 10 -> 0.7225-1.
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) is None
    assert wilson_interval(0, 18)[0] == 0.0 and wilson_interval(18, 18)[1] == 1.0  # exactly, not a hair inside
    low, high = wilson_interval(2553, 3080)  # the 82.9%: about +-1.3 points on 3,080 prompts
    assert high - low == pytest.approx(0.0266, abs=5e-4)


def test_sign_test_is_mcnemars_exact_test_on_the_discordant_pairs():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(3, 0) == pytest.approx(0.25)  # 2 * (1/2)^3
    assert sign_test_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 2**12)
    assert sign_test_p(2, 10) == sign_test_p(10, 2)
    assert sign_test_p(6, 5) == 1.0
    # The case: 3 prompts apart on 3,080, say 40 against 37 discordant: nowhere near significant.
    assert sign_test_p(40, 37) > 0.8
    comparison = paired_comparison([1, 1, 0, 0, 1], [1, 0, 1, 0, 0], "exact_match")
    assert (comparison["first_better"], comparison["second_better"], comparison["prompts"]) == (2, 1, 5)
    lower_is_better = paired_comparison([0.1, 0.5], [0.2, 0.2], "heldout_loss")
    assert (lower_is_better["first_better"], lower_is_better["second_better"]) == (1, 1)


def test_a_clear_winner_is_not_a_tie_and_beats_the_base():
    results, generations = evaluated(base=([0] * 40, 3.0), a=([1] * 36 + [0] * 4, 0.5), b=([1] * 10 + [0] * 30, 0.4))
    selection = select_winner(results, generations, "exact_match")
    assert selection["winner"] == "a" and selection["runner_up"] == "b"
    assert selection["tie"] is False and selection["tied"] == [] and selection["better_than_base"] is True
    assert selection["versus_runner_up"]["first_better"] == 26 and selection["versus_runner_up"]["p_value"] < 1e-6
    assert selection["warning"] is None
    assert "a significant difference" in describe_selection(selection, results)[0]


def test_a_tie_within_noise_goes_to_the_lower_heldout_loss():
    # a answers one prompt more than b (the 3 of 3,080), but b has the lower held-out loss: a tie, b wins.
    a_hits = [1] * 30 + [0] * 10
    b_hits = [1] * 29 + [0] * 11
    b_hits[0], b_hits[35] = 0, 1  # discordant both ways: 2 against 1
    results, generations = evaluated(base=([0] * 40, 3.0), a=(a_hits, 0.6), b=(b_hits, 0.4), c=([1] * 5 + [0] * 35, 0.1))
    selection = select_winner(results, generations, "exact_match")
    assert results["a"]["exact_match"] > results["b"]["exact_match"]
    assert selection["winner"] == "b" and selection["tied"] == ["a"] and selection["tie"] is True
    assert selection["runner_up"] == "a"  # c has the lowest loss but is far behind on exact match: not tied
    lines = describe_selection(selection, results)
    assert any("a tie within noise" in line for line in lines) and any("lowest held-out loss wins" in l for l in lines)


def test_a_winner_no_better_than_the_base_model_is_warned_about():
    results, generations = evaluated(base=([0] * 40, 3.0), a=([0] * 40, 2.0), b=([0] * 40, 2.5))
    selection = select_winner(results, generations, "exact_match")
    assert selection["winner"] == "a" and selection["better_than_base"] is False
    assert "NOT better than the base model on exact_match: 0.000 against 0.000" in selection["warning"]
    assert describe_selection(selection, results)[0].startswith("WARNING: the winner a is NOT better")
    # Better on a few prompts only is not better either: 2 against 0 discordant has p = 0.5.
    results, generations = evaluated(base=([0] * 40, 3.0), a=([1] * 2 + [0] * 38, 2.0))
    assert select_winner(results, generations, "exact_match")["better_than_base"] is False


def test_selection_by_heldout_loss_uses_each_prompts_loss():
    results, generations = evaluated(base=([0] * 20, 3.0), a=([1] * 20, 0.5), b=([0] * 20, 0.4))
    results["a"]["heldout_loss"], results["b"]["heldout_loss"] = 0.5, 0.4
    for line, loss in zip(generations["a"], [0.5] * 20):
        line["heldout_loss"] = loss
    for i, line in enumerate(generations["b"]):
        line["heldout_loss"] = 0.4 if i < 15 else 0.6  # lower on 15 prompts, higher on 5: p = 0.04
    selection = select_winner(results, generations, "heldout_loss")
    assert selection["winner"] == "b" and selection["tie"] is False and selection["better_than_base"] is True
    assert selection["versus_runner_up"]["first_better"] == 15 and selection["versus_runner_up"]["second_better"] == 5


@pytest.mark.parametrize("select_by", ["rouge_l", "chrf"])
def test_selection_by_a_text_metric_uses_each_prompts_score(select_by):
    # No exact matches anywhere; a's answers are much closer to the targets than b's on every prompt.
    results, generations = evaluated(base=([0] * 12, 3.0), a=([0] * 12, 0.9), b=([0] * 12, 0.5))
    for name, score in (("base", 0.1), ("a", 0.7), ("b", 0.3)):
        results[name][select_by] = score
        for line in generations[name]:
            line[select_by] = score
    selection = select_winner(results, generations, select_by)
    assert selection["winner"] == "a" and selection["tie"] is False and selection["better_than_base"] is True
    assert selection["versus_runner_up"] == {"metric": select_by, "prompts": 12, "first_better": 12,
                                             "second_better": 0, "p_value": pytest.approx(2 / 2**12)}
    assert select_winner(results, generations, "exact_match")["winner"] == "b"  # exact match ties: lower loss


def test_no_evaluated_trial_has_no_winner():
    results, generations = evaluated(base=([1] * 4, 0.1))
    selection = select_winner(results, generations, "exact_match")
    assert selection["winner"] is None and selection["versus_base"] is None


def test_winner_and_ranking_use_the_same_rule(tmp_path):
    results, generations = evaluated(base=([1] * 18 + [0] * 2, 0.1),  # never the winner, whatever its scores
                                     a=([1] * 16 + [0] * 4, 0.5), b=([1] * 16 + [0] * 4, 0.3),
                                     c=([1] * 6 + [0] * 14, 0.2))
    assert select_winner(results, generations, "exact_match")["winner"] == "b"  # tied with a, lower loss
    assert select_winner(results, generations, "heldout_loss")["winner"] == "c"

    trials = [record(t, [loss]) for t, loss in (("a", 0.4), ("b", 0.6), ("c", 0.5), ("d", 0.2), ("e", 0.9))]
    for select_by, order in (("exact_match", ["b", "a", "c", "d", "e"]), ("heldout_loss", ["c", "b", "a", "d", "e"])):
        selection = select_winner(results, generations, select_by)
        rows = build_rows(trials, results, ["lora_r"], selection, select_by, experiment_dir=Path("/ckpt"))
        # evaluated trials first by the selection rule, then the others by validation loss; the base row last
        assert [r["trial_id"] for r in rows] == order + ["base"]
        assert rows[0]["winner"] and rows[0]["rank"] == 1 and [r["rank"] for r in rows][-1] is None
        assert sorted(rows[:-1], key=lambda row: leaderboard_key(row, select_by)) == rows[:-1]
        assert rows[0]["adapter_path"] == rows[0]["trial_id"]  # relative to the experiment directory
        assert rows[-1]["heldout_prompts"] == 20 and rows[-1]["adapter_path"] is None

    # The leaderboard's JSON carries the interval per evaluated model, the tie flag and the run's metadata.
    selection = select_winner(results, generations, "exact_match")
    rows = build_rows(trials, results, ["lora_r"], selection, "exact_match")
    (tmp_path / "config.yaml").write_text("eval: {select_by: exact_match}\n")
    paths = write_leaderboard(rows, ["lora_r"], tmp_path, "t", selection, results)
    board = json.loads(paths["json"].read_text())
    by_id = {r["trial_id"]: r for r in board["rows"]}
    for trial_id in ("a", "b", "c", "base"):
        low, high = wilson_interval(round(results[trial_id]["exact_match"] * 20), 20)
        assert (by_id[trial_id]["exact_match_ci_low"], by_id[trial_id]["exact_match_ci_high"]) == (low, high)
        assert low <= by_id[trial_id]["exact_match"] <= high
    assert by_id["d"]["exact_match_ci_low"] is None and by_id["d"]["tied_with_winner"] is None
    assert by_id["a"]["tied_with_winner"] is True and by_id["c"]["tied_with_winner"] is False
    assert board["selection"]["tie"] is True and board["selection"]["winner"] == "b"
    meta = board["metadata"]
    assert meta["config_sha256"] == hashlib.sha256(b"eval: {select_by: exact_match}\n").hexdigest()
    assert torch.__version__.startswith(meta["versions"]["torch"].split("+")[0])
    assert datetime.fromisoformat(meta["written_utc"]).tzinfo is not None
    markdown = paths["md"].read_text()
    assert "a tie within noise" in markdown and "| 0.800 |" in markdown and "on 20 held-out test prompts" in markdown


@pytest.mark.parametrize("select_by", ["exact_match", "heldout_loss"])
def test_a_trial_without_a_loss_ranks_last(select_by):
    rows = build_rows([record("none", []), record("some", [1.0])], {}, ["lora_r"], None, select_by)
    assert [r["trial_id"] for r in rows] == ["some", "none"]
