"""chrF as an `evaluate` metric module shipped inside lorasweep and loaded from its local path, so that it works
offline: sacrebleu's CHRF (the implementation behind the hub's `chrf` metric) with its defaults (character
6-grams, beta 2, no word n-grams), over the corpus and per prediction, scaled to [0, 1]."""

import datasets
import evaluate
from sacrebleu.metrics import CHRF

_DESCRIPTION = ("chrF: the F-score (beta 2) of character n-gram (n up to 6) precision and recall, sacrebleu's "
                "defaults, divided by 100 to lie in [0, 1] like lorasweep's other task scores.")
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, one per prediction.
Returns:
    chrf: the corpus-level chrF (statistics summed over all pairs, as sacrebleu reports it), in [0, 1].
    scores: the sentence-level chrF of each pair, in the order given, in [0, 1].
"""
_CITATION = """@inproceedings{popovic-2015-chrf, title = "chr{F}: character n-gram {F}-score for automatic {MT}
evaluation", author = "Popovi{\\'c}, Maja", booktitle = "Proceedings of the Tenth Workshop on Statistical Machine
Translation", year = "2015", pages = "392--395"}"""


class Chrf(evaluate.Metric):
    """chrF over the corpus and per prediction."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            reference_urls=["https://github.com/mjpost/sacrebleu"])

    def _compute(self, predictions, references):
        chrf = CHRF()
        scores = [chrf.sentence_score(prediction, [reference]).score / 100
                  for prediction, reference in zip(predictions, references)]
        corpus = chrf.corpus_score(list(predictions), [list(references)]).score / 100 if scores else 0.0
        return {"chrf": corpus, "scores": scores}
