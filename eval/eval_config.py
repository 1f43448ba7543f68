"""The evaluation stage's settings: the config's `eval` section, typed, handed to the stage as it is. Standard
library only: the config imports this module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class EvalConfig:
    top_k: int = 2
    max_new_tokens: int = 12
    batch_size: int = 32
    # What picks the winner (eval/outcomes.py): exact match, ROUGE-L or chrF (highest; eval/text_metrics.py), or
    # held-out loss (lowest). Trials tied with the best within noise go to the lowest held-out loss.
    select_by: Literal["exact_match", "rouge_l", "chrf", "heldout_loss"] = "exact_match"
    # Exact-match normalization, with the options of the `evaluate` exact_match metric.
    first_line_only: bool = True
    ignore_case: bool = True
    ignore_punctuation: bool = False
    ignore_numbers: bool = False
    regexes_to_ignore: list[str] = field(default_factory=list)
    merge: bool = True
    merge_check_prompts: int = 32
    # The merged weights are rounded to bf16 once, so a rare greedy flip against the adapter is expected;
    # a broken merge moves exact match by far more than this.
    merge_check_tolerance: float = 0.05

    def normalization(self) -> dict:
        """The keyword arguments of eval.exact_match.exact_match_flags."""
        return {"first_line_only": self.first_line_only, "ignore_case": self.ignore_case,
                "ignore_punctuation": self.ignore_punctuation, "ignore_numbers": self.ignore_numbers,
                "regexes_to_ignore": list(self.regexes_to_ignore)}
