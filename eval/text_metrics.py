"""ROUGE-L and chrF, the task scores users of free-text formats expect beside exact match, computed by the
`evaluate` metric modules that ship inside this package (eval/metrics/<name>/<name>.py) and are loaded from that
local path: no hub access at run time."""

from __future__ import annotations

from importlib import resources

TEXT_METRICS = ("rouge_l", "chrf")


def metric_path(name: str) -> str:
    """The directory of a shipped metric module, as `evaluate.load` takes it."""
    return str(resources.files("eval") / "metrics" / name)


def text_scores(predictions: list[str], references: list[str]) -> dict[str, tuple[float, list[float]]]:
    """{metric: (the model's score, each prediction's score)}, all in [0, 1]."""
    import evaluate

    scores = {}
    for name in TEXT_METRICS:
        # In memory: no Arrow cache file to lock or leave behind in the user's home on a cluster node.
        module = evaluate.load(metric_path(name), keep_in_memory=True)
        result = module.compute(predictions=predictions, references=references)
        scores[name] = (float(result[name]), [float(s) for s in result["scores"]])
    return scores
