"""ROUGE-L as an `evaluate` metric module shipped inside lorasweep and loaded from its local path, so that it works
offline: Google's `rouge_score` (the implementation behind the hub's `rouge` metric), F1 of the longest common
subsequence of tokens, per prediction and averaged."""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = ("ROUGE-L F1: the longest common subsequence of the prediction's and the reference's tokens, as "
                "precision and recall combined; rouge_score's tokenizer (lowercase, letters and digits), no stemming.")
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, one per prediction.
Returns:
    rouge_l: the mean F1 over the pairs, in [0, 1].
    scores: the F1 of each pair, in the order given.
"""
_CITATION = """@inproceedings{lin-2004-rouge, title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
author = "Lin, Chin-Yew", booktitle = "Text Summarization Branches Out", year = "2004", pages = "74--81"}"""


class RougeL(evaluate.Metric):
    """ROUGE-L F1 per prediction and averaged."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"])

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        scores = [scorer.score(reference, prediction)["rougeL"].fmeasure
                  for prediction, reference in zip(predictions, references)]
        return {"rouge_l": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
