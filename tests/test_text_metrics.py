"""ROUGE-L and chrF through `evaluate`, loaded offline from the metric modules shipped in the package."""

import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF

from eval.text_metrics import metric_path, text_scores


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub: evaluate must load the modules from their local path; a fresh modules cache, so nothing cached helps."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))


def test_scores_match_the_libraries_and_stay_in_unit_range():
    predictions = ["set an alarm for seven", "alarm", "", "the balance of my account"]
    references = ["set an alarm for 7 am", "alarm", "balance", "what is my account balance"]
    scores = text_scores(predictions, references)
    rouge, rouge_each = scores["rouge_l"]
    chrf, chrf_each = scores["chrf"]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    assert rouge_each == pytest.approx(expected) and rouge == pytest.approx(sum(expected) / 4)
    assert rouge_each[1] == 1.0 and rouge_each[2] == 0.0 and 0 < rouge_each[0] < 1
    assert chrf == pytest.approx(CHRF().corpus_score(predictions, [references]).score / 100)
    assert chrf_each == pytest.approx([CHRF().sentence_score(p, [r]).score / 100 for p, r in zip(predictions, references)])
    assert chrf_each[1] == 1.0 and chrf_each[2] == 0.0 and all(0 <= s <= 1 for s in chrf_each)


def test_the_modules_are_package_files_loaded_from_a_local_path():
    import evaluate

    module = evaluate.load(metric_path("rouge_l"), keep_in_memory=True)
    assert module.name == "rouge_l"
    assert module.compute(predictions=["a b c"], references=["a c"])["rouge_l"] == pytest.approx(0.8)
