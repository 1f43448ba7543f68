"""Exact-match scoring and its documented normalization."""

from eval.exact_match import exact_match, exact_match_flags, normalize


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
