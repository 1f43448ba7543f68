"""Exact match with the normalization options of the `evaluate` exact_match metric (which fetches its
code from the hub at run time, so offline clusters cannot load it; this is the same few lines)."""

from __future__ import annotations

import re
import string


def normalize(text: str, *, first_line_only: bool = True, ignore_case: bool = True, ignore_punctuation: bool = False,
              ignore_numbers: bool = False, regexes_to_ignore: list[str] | None = None) -> str:
    """Strip whitespace always; the rest as configured (same order as `evaluate`: regexes, case, punctuation, numbers)."""
    if first_line_only:
        stripped = text.strip()
        text = stripped.splitlines()[0] if stripped else ""
    for pattern in regexes_to_ignore or []:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if ignore_numbers:
        text = text.translate(str.maketrans("", "", string.digits))
    return " ".join(text.split())


def exact_match_flags(predictions: list[str], references: list[str], **options) -> list[bool]:
    """One flag per pair: does the normalized prediction equal the normalized reference?"""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return [normalize(p, **options) == normalize(r, **options) for p, r in zip(predictions, references)]


def exact_match(predictions: list[str], references: list[str], **options) -> float:
    """Fraction of exact matches, in [0, 1]."""
    flags = exact_match_flags(predictions, references, **options)
    return sum(flags) / len(flags) if flags else 0.0
