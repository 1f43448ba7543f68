"""Read a dataset (local files, a save_to_disk directory or a hub id), check it, split it, render each
example as prompt/completion text in the configured format, and tokenize it once for the whole sweep."""

from __future__ import annotations

import csv
import json
import logging
import random
import string
from contextlib import contextmanager
from pathlib import Path

from sweeps.config import MIN_SPLIT_ROWS, ConfigError, DataConfig

SPLITS = ("train", "validation", "test")
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# The prompts of the Stanford Alpaca release, which most instruction-tuning notebooks copy.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataError(ConfigError):
    """Bad data: the message names the file, the line and what was found."""


# In a split's origin: the split was carved out of the training file (_fill_missing_splits).
CARVED = "split off"
# Why each split needs MIN_SPLIT_ROWS rows (sweeps/config.py), for the message that refuses fewer.
WHY_MINIMUM = {"train": "to train on", "validation": "for ASHA to compare trials by their validation loss",
               "test": "held-out prompts, so that one prompt moves exact match by 10 points at most"}


# ---------------------------------------------------------------- reading


def read_splits(cfg: DataConfig) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Raw rows per split and where each split came from; fails early on missing files and bad lines."""
    explicit = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    if any(explicit.values()):
        if not explicit["train"]:
            raise DataError("data.train_file: give a training file when data.validation_file or data.test_file is set")
        sources = {split: _existing_file(f"data.{split}_file", path) for split, path in explicit.items() if path}
        raw = {split: read_file(path) for split, path in sources.items()}
        origin = {split: str(path) for split, path in sources.items()}
    else:
        raw, origin = _read_dataset_name(cfg.dataset_name)
    for split, rows in raw.items():  # before any split is carved out, so that row numbers are the file's own
        check_rows(rows, origin[split], cfg)
    return _fill_missing_splits(raw, origin, cfg), origin


def _existing_file(key: str, path_text: str) -> Path:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise DataError(f"{key}: dataset file {str(path)!r} does not exist")
    if path.suffix not in FILE_TYPES:
        raise DataError(f"{key}: {str(path)!r} has an unknown file type; use one of {', '.join(FILE_TYPES)}")
    return path


def _read_dataset_name(name: str) -> tuple[dict[str, list[dict]], dict[str, str]]:
    path = Path(name).expanduser()
    if path.is_file():
        return {"train": read_file(_existing_file("data.dataset_name", name))}, {"train": str(path)}
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            return _read_saved_dataset(path)
        found = {}
        for split in SPLITS:
            candidates = [path / f"{split}{suffix}" for suffix in FILE_TYPES if (path / f"{split}{suffix}").is_file()]
            if candidates:
                found[split] = candidates[0]
        if "train" not in found:
            raise DataError(f"data.dataset_name: {str(path)!r} holds no train file (expected train.jsonl, train.json, "
                            f"train.csv or train.parquet, optionally with validation.* and test.*)")
        return {s: read_file(p) for s, p in found.items()}, {s: str(p) for s, p in found.items()}
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise DataError(f"data.dataset_name: {name!r} does not exist (a local file or directory was expected)")
    return _read_hub_dataset(name)


def _read_saved_dataset(path: Path) -> tuple[dict[str, list[dict]], dict[str, str]]:
    from datasets import Dataset, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as err:  # a copied directory missing its arrow files, a newer or damaged state file
        raise DataError(f"data.dataset_name: the saved dataset {str(path)!r} cannot be loaded ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else 'no detail'}); save it again with "
                        f"save_to_disk or give the data as files") from None
    if isinstance(loaded, Dataset):
        return {"train": loaded.to_list()}, {"train": str(path)}
    raw = {split: loaded[split].to_list() for split in SPLITS if split in loaded}
    if "train" not in raw:
        raise DataError(f"data.dataset_name: the saved dataset {str(path)!r} has splits {list(loaded)}, no 'train'")
    return raw, {split: f"{path} [{split}]" for split in raw}


def _read_hub_dataset(name: str) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """A hub dataset id: used when the hub is reachable, with a clear error when it is not."""
    from datasets import load_dataset

    try:
        loaded = load_dataset(name)
    except Exception as err:  # offline, unknown id, gated: all end the same way for the user
        raise DataError(f"data.dataset_name: {name!r} is not a local path and the hub could not load it "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    aliases = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation", "test": "test"}
    raw = {aliases[s]: loaded[s].to_list() for s in loaded if s in aliases}
    if "train" not in raw:
        raise DataError(f"data.dataset_name: hub dataset {name!r} has splits {list(loaded)}, no 'train'")
    return raw, {split: f"{name} [{split}]" for split in raw}


def read_file(path: Path) -> list[dict]:
    """Rows of a JSONL, JSON, CSV or Parquet file. Text files are checked line by line first, because
    pyarrow's and pandas' errors name neither the line nor the byte; CSV and Parquet are read by `datasets`."""
    kind = FILE_TYPES[path.suffix]
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if kind in ("json", "csv"):
        _check_utf8(path)
    if kind == "json":
        try:
            loaded = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is no error
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        rows = loaded.get("data", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
        return rows
    if kind == "csv":
        _check_csv(path)
    from datasets import load_dataset

    # keep_default_na=False: a text such as "NA" or "null" stays text, and an empty field is "" (refused by
    # check_rows where a value is needed) instead of a silent NaN.
    options = {"keep_default_na": False} if kind == "csv" else {}
    try:
        with _datasets_quiet():
            return load_dataset(kind, data_files=str(path), split="train", **options).to_list()
    except Exception as err:  # pyarrow and pandas raise many types for a damaged file; all are the file's fault
        cause = err.__cause__ or err  # datasets wraps the reader's own error, which says what is wrong
        raise DataError(f"{path}: cannot be read as {path.suffix[1:]} ({type(cause).__name__}: "
                        f"{str(cause).splitlines()[0][:200] if str(cause) else 'no detail'}); check that the file "
                        f"is complete and really {path.suffix[1:]}, or convert it to JSONL") from None


@contextmanager
def _datasets_quiet():
    """Without datasets' progress bars and its log line about a file it cannot read: the error that follows says it
    in one line."""
    from datasets.utils import logging as datasets_logging

    logger = logging.getLogger("datasets")
    level, bars = logger.level, datasets_logging.is_progress_bar_enabled()
    logger.setLevel(logging.CRITICAL)
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets_logging.enable_progress_bar()


def _check_csv(path: Path) -> None:
    """Every CSV line has as many fields as the header: a delimiter other than a comma, an unquoted comma inside
    a text or a cut-off last line fail here with the line number, not as a pandas traceback."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, strict=True)
        try:
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: the file is empty; a CSV needs a header line of column names, then rows")
            if len(header) == 1:
                for separator in (";", "\t", "|"):
                    if separator in header[0]:
                        raise DataError(f"{path}:1: the header {header[0][:80]!r} is one column; lorasweep reads "
                                        f"comma-separated CSV and this file looks {separator!r}-separated: save it "
                                        f"with commas (quoting texts that contain commas) or as JSONL")
            for row in reader:
                if row and len(row) != len(header):
                    raise DataError(f"{path}:{reader.line_num}: {len(row)} comma-separated field(s), but the header "
                                    f"has {len(header)} ({', '.join(header)[:120]}); quote texts that contain commas "
                                    f"(\"a, b\"), check that the delimiter is a comma and that the line is complete")
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: invalid CSV ({err}); close the quoted field or check that "
                            f"the file is complete") from None


def _check_utf8(path: Path) -> None:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not UTF-8 ({err.reason} at byte {err.start}); "
                                f"re-encode the file as UTF-8") from None


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; bad JSON or bytes fail naming the file and line."""
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark is no error
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


def _fill_missing_splits(raw: dict[str, list[dict]], origin: dict[str, str], cfg: DataConfig) -> dict[str, list[dict]]:
    """Carve missing validation/test splits out of train, deterministically by data.seed."""
    missing = [s for s in ("validation", "test") if s not in raw]
    if not missing:
        return raw
    rows = list(raw["train"])
    random.Random(cfg.seed).shuffle(rows)
    fractions = {"validation": cfg.validation_fraction, "test": cfg.test_fraction}
    total = len(rows)
    for split in missing:
        count = max(1, round(total * fractions[split])) if rows else 0
        raw[split], rows = rows[:count], rows[count:]
        origin[split] = f"{origin['train']} ({fractions[split]:.0%} {CARVED} by data.seed={cfg.seed})"
    raw["train"] = rows
    return raw


# ---------------------------------------------------------------- checking and rendering


def required_fields(cfg: DataConfig) -> list[str]:
    """The fields every row needs under data.format (the template's placeholders have been checked by the config)."""
    if cfg.format == "template":
        return [name for _, name, _, _ in string.Formatter().parse(cfg.prompt_template) if name] + [cfg.target_field]
    if cfg.format == "alpaca":
        return ["instruction", "output"]
    if cfg.format == "prompt_completion":
        return ["prompt", "completion"]
    return [cfg.messages_field]


def check_rows(rows: list[dict], where: str, cfg: DataConfig) -> None:
    """Every row has the fields data.format needs, holding text (or a number) that is not empty where it is the
    prompt or the target, and renders with data.prompt_template; the message names the file (`where`), the row
    (counting from 1) and the field."""
    needed = required_fields(cfg)
    for number, row in enumerate(rows, start=1):
        at = f"{where}: row {number}"
        missing = [name for name in needed if name not in row]
        if missing:
            raise DataError(f"{at}: field(s) {missing} needed by data.format={cfg.format} are missing; "
                            f"columns found: {sorted(row)}")
        if cfg.format == "messages":
            _check_messages(row[cfg.messages_field], f"{at}: field {cfg.messages_field!r}")
            continue
        for name in needed:
            _check_text(row[name], f"{at}: field {name!r}", cfg.format)
        if cfg.format == "alpaca" and row.get("input") is not None:
            _check_text(row["input"], f"{at}: field 'input'", cfg.format)
        if not target_of(row, cfg):
            raise DataError(f"{at}: the target ({needed[-1]!r}) is empty; every row needs the answer the model "
                            f"should learn: fill it in or remove the row")
        if cfg.format == "template":
            try:
                prompt = cfg.prompt_template.format(**row)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
                raise DataError(f"{at}: data.prompt_template {cfg.prompt_template!r} cannot render this row "
                                f"({type(err).__name__}: {err}); fix the placeholder's format spec or the row") from None
        else:
            prompt = str(row["instruction"] if cfg.format == "alpaca" else row["prompt"])
        if not prompt.strip():
            raise DataError(f"{at}: the prompt is empty; the model would have nothing to answer: fill it in or "
                            f"remove the row")


def _check_text(value, at: str, data_format: str) -> None:
    # Numbers are rendered as text (a label 3, an age); null, lists and objects are a wrong column or a broken row.
    if not isinstance(value, (str, int, float)):
        shown = "null" if value is None else f"a {type(value).__name__} {json.dumps(value, default=str)[:60]}"
        raise DataError(f"{at} is {shown}; data.format={data_format} needs text there: fix the row or remove it")


def _check_messages(messages, at: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{at} is {json.dumps(messages, default=str)[:80]}; data.format=messages needs a non-empty "
                        f"list of {{role, content}} turns ending with an assistant turn")
    for index, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise DataError(f"{at}, turn {index + 1}: {json.dumps(turn, default=str)[:80]} is not a {{role, content}} "
                            f"turn with text in both")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(f"{at}: the last turn is {json.dumps(messages[-1])[:80]}; data.format=messages learns the "
                        f"last turn, which must be an assistant turn with text")


def target_of(row: dict, cfg: DataConfig) -> str:
    """The answer a row teaches, as exact match compares it (stripped)."""
    if cfg.format == "template":
        return str(row[cfg.target_field]).strip()
    if cfg.format == "alpaca":
        return str(row["output"]).strip()
    if cfg.format == "prompt_completion":
        return str(row["completion"]).strip()
    return str(row[cfg.messages_field][-1]["content"]).strip()


def check_and_filter(raw: dict[str, list[dict]], origin: dict[str, str], cfg: DataConfig) -> dict[str, list[dict]]:
    """Label filter and row limits applied; every split holds at least MIN_SPLIT_ROWS rows and the training rows
    more than one target (the rows themselves were checked by read_splits)."""
    before = {split: len(rows) for split, rows in raw.items()}
    if cfg.num_targets and cfg.format == "template":
        kept = set(sorted({str(r[cfg.target_field]) for r in raw["train"]})[: cfg.num_targets])
        raw = {split: [r for r in rows if str(r[cfg.target_field]) in kept] for split, rows in raw.items()}
    limits = {"train": cfg.max_train_rows, "validation": cfg.max_validation_rows, "test": cfg.max_test_rows}
    out = {}
    for split, rows in raw.items():
        if limits[split] and len(rows) > limits[split]:
            # A seeded sample, so that a limit does not keep only the first labels of a file sorted by label.
            picked = sorted(random.Random(cfg.seed).sample(range(len(rows)), limits[split]))
            rows = [rows[i] for i in picked]
        if len(rows) < MIN_SPLIT_ROWS[split]:
            raise DataError(_too_few_rows_message(split, len(rows), before, origin, cfg))
        out[split] = rows
    targets = {target_of(row, cfg) for row in out["train"]}
    if len(targets) == 1:
        raise DataError(f"{origin['train']}: every training row has the same target {targets.pop()[:60]!r}; a model "
                        f"that always answers it scores 100% exact match, which says nothing: use data with more "
                        f"than one answer")
    return out


def _too_few_rows_message(split: str, count: int, before: dict[str, int], origin: dict[str, str],
                          cfg: DataConfig) -> str:
    """Why the split is too small and the fix that gets it to the minimum (never one that only moves the problem)."""
    minimum = MIN_SPLIT_ROWS[split]
    head = (f"{origin[split]}: the {split} split has {count} row(s); lorasweep needs at least {minimum} "
            f"({WHY_MINIMUM[split]})")
    if before[split] >= minimum:  # the label filter took them (row limits are at least the minimum)
        return (f"{head} and data.num_targets={cfg.num_targets} kept {count} of {before[split]}: raise "
                f"data.num_targets or set it to 0 (all labels)")
    carved = [s for s in ("validation", "test") if CARVED in origin[s]]
    if carved and (split == "train" or split in carved):
        return (f"{head}: {origin['train'].split(' (')[0]} is split by data.validation_fraction="
                f"{cfg.validation_fraction:g} and data.test_fraction={cfg.test_fraction:g} and needs at least "
                f"{_rows_needed_for_carving(carved, cfg)} rows; add rows, or give data.validation_file and "
                f"data.test_file")
    return f"{head}: add rows to it"


def _rows_needed_for_carving(carved: list[str], cfg: DataConfig) -> int:
    """The fewest rows a training file needs so that the splits carved out of it and what is left for training
    all reach MIN_SPLIT_ROWS (before any label filter)."""
    fractions = {"validation": cfg.validation_fraction, "test": cfg.test_fraction}
    total = sum(MIN_SPLIT_ROWS[s] for s in ["train", *carved])
    while True:  # ends: each carved split grows with the total (its fraction is above 0 and below 0.5)
        sizes = [max(1, round(total * fractions[s])) for s in carved]
        if total - sum(sizes) >= MIN_SPLIT_ROWS["train"] and all(
                size >= MIN_SPLIT_ROWS[s] for s, size in zip(carved, sizes)):
            return total
        total += 1


def render(rows: list[dict], cfg: DataConfig, tokenizer) -> list[dict]:
    """{"prompt", "completion", "target"} text per row; the completion ends the way the model must stop
    (the EOS token, or the chat template's end of turn), so that greedy generation stops after the target."""
    return [_render_one(row, cfg, tokenizer) for row in rows]


def _render_one(row: dict, cfg: DataConfig, tokenizer) -> dict:
    eos = tokenizer.eos_token
    if cfg.format == "template":
        target = str(row[cfg.target_field])
        return {"prompt": cfg.prompt_template.format(**row), "completion": cfg.target_prefix + target + eos, "target": target}
    if cfg.format == "alpaca":
        template = ALPACA_WITH_INPUT if str(row.get("input") or "").strip() else ALPACA_NO_INPUT
        target = str(row["output"])
        return {"prompt": template.format(instruction=row["instruction"], input=row.get("input") or ""),
                "completion": target + eos, "target": target}
    if cfg.format == "prompt_completion":
        target = str(row["completion"])
        return {"prompt": str(row["prompt"]), "completion": target + eos, "target": target.strip()}
    return _render_messages(row[cfg.messages_field], cfg, tokenizer)


def _render_messages(messages: list[dict], cfg: DataConfig, tokenizer) -> dict:
    """Chat rows: everything before the last assistant turn is the prompt (rendered with the tokenizer's
    chat template and its generation prompt); the last assistant turn is the completion, so the loss
    falls on that assistant turn only."""
    if tokenizer.chat_template is None:
        raise DataError("data.format=messages needs a tokenizer with a chat template; this model has none "
                        "(use data.format=template or prompt_completion)")
    if cfg.system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}] + messages
    from jinja2 import TemplateError

    try:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError as err:  # the template's own checks, e.g. roles that must alternate
        raise DataError(f"data.format=messages: the model's chat template refuses the conversation "
                        f"{json.dumps(messages)[:100]} ({err}); fix the turns or use data.format=prompt_completion") from None
    if not full.startswith(prompt):
        raise DataError("data.format=messages: this chat template renders the conversation differently from its "
                        "prompt part, so the completion cannot be cut out; use data.format=prompt_completion")
    return {"prompt": prompt, "completion": full[len(prompt):], "target": str(messages[-1]["content"]).strip()}


# ---------------------------------------------------------------- tokenizing once


def tokenize(rows: list[dict], tokenizer) -> list[dict]:
    """input_ids and completion_mask per row, as TRL builds them: the prompt is the common prefix of the
    tokenized prompt and prompt+completion. Trials get these tokens and skip TRL's own tokenization."""
    out = []
    for row in rows:
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        full_ids = tokenizer(row["prompt"] + row["completion"])["input_ids"]
        prompt_len = 0
        while prompt_len < min(len(prompt_ids), len(full_ids)) and prompt_ids[prompt_len] == full_ids[prompt_len]:
            prompt_len += 1
        out.append({**row, "input_ids": full_ids, "completion_mask": [0] * prompt_len + [1] * (len(full_ids) - prompt_len)})
    return out


def apply_length_policy(split: str, rows: list[dict], max_length: int, policy: str) -> tuple[list[dict], str | None]:
    """Drop or truncate examples longer than max_length tokens; returns the rows and a line saying what was done."""
    long_rows = [r for r in rows if len(r["input_ids"]) > max_length]
    if not long_rows:
        return rows, None
    note = (f"{len(long_rows)} of {len(rows)} {split} examples are longer than data.max_length={max_length} tokens "
            f"(longest {max(len(r['input_ids']) for r in long_rows)})")
    if policy == "drop":
        kept = [r for r in rows if len(r["input_ids"]) <= max_length]
        if len(kept) < MIN_SPLIT_ROWS[split]:  # the minimum holds for what the trials and the evaluation get
            left = (f"{len(kept)} are left, fewer than the {MIN_SPLIT_ROWS[split]} a study needs" if kept
                    else "all were dropped")
            raise DataError(f"{note}; {left} (data.length_policy=drop): raise data.max_length")
        return kept, note + ": dropped (data.length_policy=drop)"
    truncated = [{**r, "input_ids": r["input_ids"][:max_length], "completion_mask": r["completion_mask"][:max_length]}
                 for r in rows]
    return truncated, note + ": truncated at the end (data.length_policy=truncate)"


def overlap_count(train: list[dict], test: list[dict]) -> int:
    """How many held-out test prompts also occur, word for word, among the training prompts."""
    seen = {r["prompt"].strip() for r in train}
    return sum(r["prompt"].strip() in seen for r in test)


def prepare_splits(cfg: DataConfig, raw: dict[str, list[dict]], tokenizer, log=print) -> dict[str, list[dict]]:
    """Render, tokenize once, apply the length policy and warn on train/test overlap."""
    prepared = {}
    for split in SPLITS:
        rows = tokenize(render(raw[split], cfg, tokenizer), tokenizer)
        rows, note = apply_length_policy(split, rows, cfg.max_length, cfg.length_policy)
        if note:
            log(f"[lorasweep] data: {note}")
        prepared[split] = rows
    overlap = overlap_count(prepared["train"], prepared["test"])
    if overlap:
        log(f"[lorasweep] WARNING: {overlap} of {len(prepared['test'])} held-out test prompts also occur in the "
            f"training data; their exact match overstates what the model learned")
    return prepared
