"""Read the dataset files and render prompt/completion rows for training, validation and the held-out test."""

from __future__ import annotations

import json
import string
from pathlib import Path

from sweeps.config import ConfigError, DataConfig

SPLITS = ("train", "validation", "test")


class DataError(ConfigError):
    """Bad data: the message names the file, the line and what was found."""


def split_files(cfg: DataConfig) -> dict[str, Path]:
    """The train/validation/test files named by the config (explicit files win over dataset_name)."""
    explicit = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    files = {}
    for split in SPLITS:
        if explicit[split]:
            files[split] = Path(explicit[split]).expanduser()
        else:
            files[split] = Path(cfg.dataset_name).expanduser() / f"{split}.jsonl"
        if not files[split].is_file():
            key = f"data.{split}_file" if explicit[split] else "data.dataset_name"
            raise DataError(f"{key}: dataset file {str(files[split])!r} does not exist "
                            f"(expected {', '.join(s + '.jsonl' for s in SPLITS)} in a directory, or data.<split>_file)")
    return files


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; bad JSON or bytes fail naming the file and line."""
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not UTF-8 ({err.reason} at byte {err.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def load_splits(cfg: DataConfig) -> dict[str, list[dict]]:
    """{split: [{"prompt", "completion", "target"}]} rendered from the config's template and target field;
    the caller appends the tokenizer's EOS token to each completion (see with_eos)."""
    files = split_files(cfg)
    raw = {split: read_jsonl(path) for split, path in files.items()}
    needed = template_fields(cfg.prompt_template) + [cfg.target_field]
    for split, rows in raw.items():
        if not rows:
            raise DataError(f"{files[split]}: the {split} split is empty")
        missing = [f for f in needed if f not in rows[0]]
        if missing:
            raise DataError(f"{files[split]}:1: field(s) {missing} used by data.prompt_template/data.target_field "
                            f"are missing; columns found: {sorted(rows[0])}")
    if cfg.num_targets:
        kept = set(sorted({str(r[cfg.target_field]) for r in raw["train"]})[: cfg.num_targets])
        raw = {split: [r for r in rows if str(r[cfg.target_field]) in kept] for split, rows in raw.items()}
    limits = {"train": cfg.max_train_rows, "validation": cfg.max_validation_rows, "test": cfg.max_test_rows}
    out = {}
    for split, rows in raw.items():
        if limits[split]:
            rows = _spread_sample(rows, limits[split], cfg.seed)
        if not rows:
            raise DataError(f"{files[split]}: the {split} split is empty after filtering (data.num_targets={cfg.num_targets})")
        out[split] = [_render(cfg, row) for row in rows]
    return out


def _spread_sample(rows: list[dict], limit: int, seed: int) -> list[dict]:
    """A seeded random subset, so a row limit does not keep only the first few labels of a sorted file."""
    import random

    if len(rows) <= limit:
        return rows
    picked = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in picked]


def _render(cfg: DataConfig, row: dict) -> dict:
    target = str(row[cfg.target_field])
    return {"prompt": cfg.prompt_template.format(**row), "completion": cfg.target_prefix + target, "target": target}


def with_eos(splits: dict[str, list[dict]], eos_token: str) -> dict[str, list[dict]]:
    """End every completion with EOS so that greedy generation stops after the target (TRL would add it
    too; doing it here makes the held-out loss score exactly what the trials trained on)."""
    return {split: [{**row, "completion": row["completion"] + eos_token} for row in rows] for split, rows in splits.items()}
