"""Exact-match scoring and its documented normalization."""

from eval.exact_match import exact_match, exact_match_flags, normalize
from eval.outcomes import choose_winner


def test_whitespace_case_and_first_line():
    assert normalize("  Balance \n and more text") == "balance"
    assert exact_match([" balance", "ALARM", "alarm clock"], ["balance", "alarm", "alarm"]) == 2 / 3


def test_options_match_the_evaluate_metric():
    assert exact_match_flags(["Balance!"], ["balance"], ignore_punctuation=False) == [False]
    assert exact_match_flags(["Balance!"], ["balance"], ignore_punctuation=True) == [True]
    assert exact_match_flags(["Balance"], ["balance"], ignore_case=False) == [False]
    assert exact_match_flags(["room 12"], ["room"], ignore_numbers=True) == [True]
    assert exact_match_flags(["intent: alarm"], ["alarm"], regexes_to_ignore=[r"^intent:\s*"]) == [True]
    assert exact_match_flags(["a\nb"], ["a b"], first_line_only=False) == [True]


def test_winner_by_exact_match_then_loss_never_the_base():
    results = {"base": {"exact_match": 1.0, "heldout_loss": 0.1},
               "t1": {"exact_match": 0.8, "heldout_loss": 0.5},
               "t2": {"exact_match": 0.8, "heldout_loss": 0.3},
               "t3": {"exact_match": 0.5, "heldout_loss": 0.2}}
    assert choose_winner(results, "exact_match") == "t2"
    assert choose_winner(results, "heldout_loss") == "t3"
