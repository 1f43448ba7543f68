"""The files lorasweep writes into an experiment directory (beside Tune's own `tune/`), and the one way they are
written: to a temporary name in the same directory, then renamed, so that a reader, a resumed run or a copy
never sees half a file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

CONFIG_FILE = "config.yaml"
SEARCH_SPACE_FILE = "search_space.json"
# What the report needs of the sweep's plan (metric, mode, ASHA's rungs, the GPU share the trials got), saved
# by the driver so that eval/ never has to rebuild the plan from config.yaml.
PLAN_FILE = "plan.json"
TIMINGS_FILE = "timings.json"
MERGE_CHECK_FILE = "merge_check.json"
EVAL_DIR = "eval"
TUNE_DIR = "tune"
# The data files and the model an experiment was started with (sweeps/experiment.py): a resume must match them.
INPUTS_FILE = "inputs.json"
# Held (flock) by the run that owns the experiment directory, for the whole run.
LOCK_FILE = ".lock"


def generations_file(experiment_dir: Path, row_id: str) -> Path:
    return Path(experiment_dir) / EVAL_DIR / f"generations_{row_id}.jsonl"


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a unique temporary file in the same directory and a rename."""
    path = Path(path)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".partial")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(partial, 0o644)  # mkstemp creates 0600; results are as readable as the directory
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, data) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, default=str))


def read_json(path: Path):
    """The parsed file, or None when it is missing or not valid JSON (an experiment copied in part)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


@contextmanager
def directory_written_atomically(target: Path):
    """Yields a fresh `<target>.partial` directory path to fill; on success it replaces `target`."""
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
    except BaseException:  # a failure or a Ctrl-C midway leaves neither a half directory nor its partial
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
