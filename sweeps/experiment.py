"""The experiment directory (`output.dir/output.name`) as one run owns it: an exclusive lock for the whole run,
and what the experiment was started with (the config's keys that change results, the base's precision, and a
fingerprint of the data files and the model it points at), which a rerun must match to resume. Every refusal is a
ConfigError: exit 2, one line, nothing written."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from eval.artifacts import CONFIG_FILE, INPUTS_FILE, LOCK_FILE, PLAN_FILE, read_json, write_json_atomically
from sweeps.config import ConfigError, save_config

# Keys a rerun may change and still resume, because they do not change what the trials compute: where and how fast
# trials run (resources.*), and the experiment directory's own name (output.*). Not resources.engine: it picks the
# training code and the format of the trials' checkpoints. A change of device that changes the base's precision
# (resources.gpus_per_trial=0 on a GPU cluster) is refused by Experiment.create, which knows the precision.
RESULT_NEUTRAL_PREFIXES = ("resources.", "output.")
RESULT_CHANGING = {"resources.engine"}

# Files up to this size are fingerprinted by their content (a copy or a `touch` is not a change); larger ones by
# size and modification time, so that a resume never waits on hashing gigabytes of weights.
HASH_LIMIT_BYTES = 64 * 2**20


class ExperimentInUse(ConfigError):
    """Another run holds the experiment directory."""


class Experiment:
    """One run's hold on its experiment directory. `claim()` before any work: it locks an experiment that already
    exists and refuses one started with another config or other inputs; `create()` where the first file is
    written (after every check, so that a refused run leaves no directory behind); `release()` at the end (the OS
    releases the lock too when the process dies)."""

    def __init__(self, config, experiment_dir: Path):
        self.config = config
        self.dir = Path(experiment_dir)
        self.inputs: dict[str, dict] = {}
        self._lock_fd: int | None = None

    def claim(self) -> None:
        self.inputs = input_fingerprint(self.config)
        # A directory that is not an experiment yet (absent, or without its files) is locked when it becomes one:
        # a run refused before that must leave it exactly as it was.
        if (self.dir / LOCK_FILE).exists() or (self.dir / CONFIG_FILE).exists():
            self._lock()
            self._check_same_experiment()

    def check(self) -> None:
        """What claim() checks, without the lock and without writing (for --dry-run): a run of this config would
        be refused as a different config or on other inputs."""
        self.inputs = input_fingerprint(self.config)
        self._check_same_experiment()

    def create(self, precision: str) -> None:
        """Make the directory this run's experiment: locked, checked once more under the lock (another run may have
        started it meanwhile), the config saved and, for a new experiment, the fingerprint of its inputs.
        `precision`: the base's precision the trials will train in, which a resume must keep."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._lock_fd is None:
            self._lock()
            self._check_same_experiment()
        check_same_precision(precision, self.dir)
        save_config(self.config, self.dir / CONFIG_FILE)
        if not (self.dir / INPUTS_FILE).is_file():
            write_json_atomically(self.dir / INPUTS_FILE, self.inputs)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _lock(self) -> None:
        self._lock_fd = lock_experiment_dir(self.dir)

    def _check_same_experiment(self) -> None:
        check_same_sweep(self.config, self.dir)
        check_same_inputs(self.inputs, self.dir)


def lock_experiment_dir(experiment_dir: Path) -> int:
    """Take the experiment's exclusive lock without waiting; returns the descriptor that holds it (not inherited by
    the processes Ray starts, so a lost driver's lock goes with it). Raises ExperimentInUse when another holds it."""
    path = Path(experiment_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ExperimentInUse(f"{experiment_dir} is in use: another lorasweep run holds it (lock {path}); wait for "
                              f"that run to end, or set output.name=<new name> for a new sweep") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_same_sweep(config, experiment_dir: Path) -> None:
    """Resuming is only safe into a sweep of the same config: refuse one that changes results, naming the keys."""
    import yaml

    saved_path = experiment_dir / CONFIG_FILE
    if not saved_path.is_file():
        return
    saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
    current = _flatten(config.to_dict())
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k) and changes_results(k))
    if changed:
        raise ConfigError(f"{experiment_dir} holds a sweep with a different config (changed: {', '.join(changed)}); "
                          f"set output.name=<new name> for a new sweep, or remove that directory")


def changes_results(key: str) -> bool:
    """Whether a dotted config key changes what the trials compute (a rerun that changes it cannot resume)."""
    return key in RESULT_CHANGING or not key.startswith(RESULT_NEUTRAL_PREFIXES)


def check_same_precision(precision: str, experiment_dir: Path) -> None:
    """The trials of an experiment train in one precision: a resume whose trials would get no GPU where they had
    one (or the reverse) would continue 4-bit checkpoints on a bf16 base. Refuse it, naming the keys to set."""
    saved = read_json(experiment_dir / PLAN_FILE)
    before = saved.get("precision") if isinstance(saved, dict) else None
    if before and before != precision:
        raise ConfigError(f"{experiment_dir} was trained on a {before} base and this run would train on a {precision} "
                          f"one (the trials' device changed: resources.gpus_per_trial, or the cluster's GPUs); "
                          f"resume it where the trials get the same device, or set output.name=<new name> for a "
                          f"new sweep")


def check_same_inputs(inputs: dict, experiment_dir: Path) -> None:
    """The same config can point at other data or another model than the experiment was started with: a resume
    would then score the old adapters on the new data. Refuse, naming what changed."""
    saved = read_json(experiment_dir / INPUTS_FILE)
    if not isinstance(saved, dict):
        return  # an experiment from before fingerprints (or copied without it): nothing to compare with
    changed = [_describe_change(key, saved.get(key), inputs.get(key))
               for key in sorted(set(saved) | set(inputs)) if saved.get(key) != inputs.get(key)]
    if changed:
        raise ConfigError(f"{experiment_dir} was started on other inputs: {'; '.join(changed)}; set "
                          f"output.name=<new name> for a new sweep on these inputs, or put the old ones back to resume")


def _describe_change(key: str, before, now) -> str:
    if before is None:
        return f"{key} is new"
    if now is None or now.get("missing"):
        return f"{key} is gone (it no longer exists)"
    return f"{key} changed ({', '.join(k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k))})"


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix.startswith("sweep"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------- fingerprint


def input_fingerprint(config) -> dict[str, dict]:
    """{"data file <path>" / "model file <path>": the file's size and content hash (or mtime when large)} for the
    local files the config points at. Hub ids are in the config itself. Never raises: a missing path is recorded
    as missing, and the checks that follow say what is wrong with it."""
    entries: dict[str, dict] = {}
    for path in data_paths(config.data):
        entries[f"data file {path}"] = file_fingerprint(path)
    for path in model_paths(config.model.model_name_or_path):
        entries[f"model file {path}"] = file_fingerprint(path)
    return entries


def data_paths(data) -> list[Path]:
    """The local files lorasweep reads the data from (sweeps/data_loading.read_splits reads the same ones)."""
    from sweeps.data_loading import FILE_TYPES, SPLITS

    explicit = [data.train_file, data.validation_file, data.test_file]
    if any(explicit):
        return [Path(p).expanduser().resolve() for p in explicit if p]
    path = Path(data.dataset_name).expanduser()
    if path.is_file():
        return [path.resolve()]
    if not path.is_dir():
        return []  # a hub id: its name is in the config
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        return sorted(p.resolve() for p in path.rglob("*") if p.is_file())  # a save_to_disk directory
    return [(path / f"{split}{suffix}").resolve() for split in SPLITS for suffix in FILE_TYPES
            if (path / f"{split}{suffix}").is_file()]


def model_paths(model_name_or_path: str) -> list[Path]:
    """The base model's local files that identify it: a GGUF file, or a directory's config.json and weights."""
    from trainables.model_loading import BUNDLED_PREFIX, ModelError, bundled_gguf_path

    if model_name_or_path.startswith(BUNDLED_PREFIX):
        try:
            return [bundled_gguf_path(model_name_or_path[len(BUNDLED_PREFIX):])]
        except ModelError:
            return []  # resolve_model_dir says what is missing
    path = Path(model_name_or_path).expanduser()
    if path.is_file():
        return [path.resolve()]
    if path.is_dir():
        files = [path / "config.json", *sorted(path.glob("*.safetensors")), *sorted(path.glob("*.safetensors.index.json"))]
        return [f.resolve() for f in files if f.is_file()]
    return []  # a hub id


def file_fingerprint(path: Path) -> dict:
    try:
        stat = path.stat()
    except OSError:
        return {"missing": True}
    if stat.st_size > HASH_LIMIT_BYTES:
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return {"size": stat.st_size, "sha256": digest.hexdigest()}

