"""The W&B-style `sweep` section -> the sweep's plan, validated and computed once: the parsed search space,
metric and mode, ASHA's settings and rungs, the number of trials. The Tuner (sweeps/tuner.py), the GPU share,
the driver and --dry-run all read the plan instead of the config."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from sweeps.config import ConfigError, SweepConfig, coerce_float, training_range_error
from trainables.lora_presets import TARGET_MODULE_PRESETS
from trainables.trial_spec import TrainingConfig

SEARCHABLE = {f for f in TrainingConfig.__dataclass_fields__}
INT_KEYS = {k for k, f in TrainingConfig.__dataclass_fields__.items() if f.type in ("int", int)}
FLOAT_KEYS = {k for k, f in TrainingConfig.__dataclass_fields__.items() if f.type in ("float", float)}
_SPEC_KEYS = {"values", "value", "distribution", "min", "max"}
_HINTS = typing.get_type_hints(TrainingConfig)
BOOL_KEYS = {k for k, hint in _HINTS.items() if hint is bool}
CHOICES = {k: typing.get_args(hint) for k, hint in _HINTS.items() if typing.get_origin(hint) is Literal}


def parse_parameters(parameters: dict, method: str) -> dict[str, dict]:
    """Check every W&B parameter spec; return them normalized as {name: {kind, ...}}."""
    if not parameters:
        raise ConfigError("sweep.parameters: the search space is empty; add at least one parameter, e.g. "
                          "learning_rate: {distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-3}")
    parsed = {}
    for name, spec in parameters.items():
        where = f"sweep.parameters.{name}"
        if name not in SEARCHABLE:
            raise ConfigError(f"{where}: {name!r} is not a training key; searchable keys: {', '.join(sorted(SEARCHABLE))}")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping such as {{values: [...]}}, got {spec!r}")
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(_SPEC_KEYS)}")
        parsed[name] = _parse_one(name, where, spec)
        if method == "grid" and parsed[name]["kind"] not in ("choice", "constant"):
            raise ConfigError(f"{where}: sweep.method=grid needs `values` lists, got a {parsed[name]['kind']} range")
    return parsed


def _parse_one(name: str, where: str, spec: dict) -> dict:
    if "value" in spec:
        return {"kind": "constant", "value": _check_value(name, where, spec["value"])}
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.values: must be a non-empty list, got {values!r}")
        return {"kind": "choice", "values": [_check_value(name, f"{where}.values", v) for v in values]}
    distribution = spec.get("distribution")
    if distribution == "log_uniform":
        raise ConfigError(f"{where}: distribution log_uniform takes natural-log bounds in W&B; "
                          f"use distribution: log_uniform_values with min/max as plain values")
    if "min" not in spec or "max" not in spec:
        raise ConfigError(f"{where}: give `values`, `value`, or `min` and `max` (got keys {sorted(spec)})")
    if distribution not in (None, "log_uniform_values", "uniform", "int_uniform"):
        raise ConfigError(f"{where}.distribution: {distribution!r} is not supported; valid: "
                          "log_uniform_values, uniform, int_uniform")
    is_int = distribution == "int_uniform" or (distribution is None and name in INT_KEYS)
    if is_int:
        low, high = spec["min"], spec["max"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
            raise ConfigError(f"{where}: integer min/max expected for {name}, got {low!r}, {high!r}")
    else:
        if name not in FLOAT_KEYS:
            raise ConfigError(f"{where}: {name} takes integer or listed values, not a float range")
        low, high = coerce_float(f"{where}.min", spec["min"]), coerce_float(f"{where}.max", spec["max"])
    for end, value in (("min", low), ("max", high)):
        problem = training_range_error(name, value)
        if problem:
            raise ConfigError(f"{where}.{end}: {name} {problem}, got {value!r}")
    if low >= high if not is_int else low > high:
        raise ConfigError(f"{where}: min ({low!r}) must be below max ({high!r}); swap them")
    if distribution == "log_uniform_values" and low <= 0:
        raise ConfigError(f"{where}.min: log_uniform_values needs min > 0, got {low!r}")
    kind = "int_uniform" if is_int else ("log_uniform" if distribution == "log_uniform_values" else "uniform")
    return {"kind": kind, "min": low, "max": high}


def _check_value(name: str, where: str, value: Any) -> Any:
    if name == "lora_target_modules":
        if value not in TARGET_MODULE_PRESETS:
            raise ConfigError(f"{where}: target-module preset {value!r} is unknown; valid presets: "
                              f"{', '.join(TARGET_MODULE_PRESETS)}")
        return value
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{where}: {value!r} is not a valid {name}; valid: {', '.join(CHOICES[name])}")
    if name in BOOL_KEYS and not isinstance(value, bool):
        raise ConfigError(f"{where}: {name} takes true or false, got {value!r}")
    if name in INT_KEYS:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: {name} takes integers, got {value!r}")
    elif name in FLOAT_KEYS:
        value = coerce_float(where, value)
    problem = training_range_error(name, value)
    if problem:
        raise ConfigError(f"{where}: {name} {problem}, got {value!r}")
    return value


def to_tune_space(parsed: dict[str, dict], method: str) -> dict:
    """Ray Tune distributions for the parsed parameters (W&B's inclusive int max -> randint's exclusive)."""
    from ray import tune

    space = {}
    for name, p in parsed.items():
        if p["kind"] == "constant":
            space[name] = p["value"]
        elif p["kind"] == "choice":
            space[name] = tune.grid_search(p["values"]) if method == "grid" else tune.choice(p["values"])
        elif p["kind"] == "log_uniform":
            space[name] = tune.loguniform(p["min"], p["max"])
        elif p["kind"] == "uniform":
            space[name] = tune.uniform(p["min"], p["max"])
        else:
            space[name] = tune.randint(p["min"], p["max"] + 1)
    return space


@dataclass(frozen=True)
class AshaPlan:
    """ASHA in evaluations (its time unit): a trial reaching max_t evaluations has finished."""

    enabled: bool
    grace_period: int
    reduction_factor: float
    max_t: int
    rungs: list[int]


@dataclass(frozen=True)
class SweepPlan:
    method: str
    parameters: dict[str, dict]  # name -> {kind, values | value | min, max}, as parse_parameters returns them
    metric: str
    mode: str
    asha: AshaPlan
    expected_trials: int  # run_cap, or the grid's size
    max_concurrent_trials: int
    seed: int

    @property
    def param_names(self) -> list[str]:
        return list(self.parameters)

    @property
    def asha_rungs(self) -> list[int]:
        """The rungs at which ASHA stops trials; none when it is off."""
        return self.asha.rungs if self.asha.enabled else []

    def values(self, name: str, fixed) -> list:
        """Every value a parameter can take (a distribution's bounds), or [fixed] when it is not searched."""
        spec = self.parameters.get(name)
        if spec is None:
            return [fixed]
        if spec["kind"] == "choice":
            return list(spec["values"])
        if spec["kind"] == "constant":
            return [spec["value"]]
        return [spec["min"], spec["max"]]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def plan_sweep(sweep: SweepConfig, training: TrainingConfig) -> SweepPlan:
    """Check the sweep section against the training section and compute everything the sweep needs of it."""
    parameters = parse_parameters(sweep.parameters, sweep.method)
    metric, mode = _metric_and_mode(sweep.metric)
    return SweepPlan(
        method=sweep.method, parameters=parameters, metric=metric, mode=mode,
        asha=_asha_plan(sweep.early_terminate, training.max_steps // training.eval_steps),
        # A grid runs each combination once; run_cap counts samples otherwise (W&B semantics).
        expected_trials=grid_size(parameters) if sweep.method == "grid" else sweep.run_cap,
        max_concurrent_trials=sweep.max_concurrent_trials, seed=sweep.seed,
    )


def _metric_and_mode(metric: dict) -> tuple[str, str]:
    unknown = set(metric) - {"name", "goal"}
    if unknown:
        raise ConfigError(f"sweep.metric: unknown key(s) {sorted(unknown)}; valid: name, goal")
    name, goal = metric.get("name", "eval_loss"), metric.get("goal", "minimize")
    if name != "eval_loss":
        raise ConfigError(f"sweep.metric.name: trials report 'eval_loss' at each evaluation, got {name!r}")
    if goal != "minimize":
        raise ConfigError(f"sweep.metric.goal: eval_loss is minimized, got {goal!r}; use goal: minimize")
    return name, "min"


def _asha_plan(early_terminate: dict, max_t: int) -> AshaPlan:
    """ASHA's grace period, reduction factor, max_t and rung milestones (in evaluations) from early_terminate."""
    et = dict(early_terminate)
    unknown = set(et) - {"type", "min_iter", "eta"}
    if unknown:
        raise ConfigError(f"sweep.early_terminate: unknown key(s) {sorted(unknown)}; valid: type, min_iter, eta")
    if et.get("type", "hyperband") not in ("hyperband", "none"):
        raise ConfigError(f"sweep.early_terminate.type: {et.get('type')!r} is not one of ['hyperband', 'none']")
    grace, eta = et.get("min_iter", 1), et.get("eta", 2)
    if not isinstance(grace, int) or grace < 1 or grace > max_t:
        raise ConfigError(f"sweep.early_terminate.min_iter: must be an integer in [1, {max_t}] (evaluations "
                          f"per trial = training.max_steps / training.eval_steps), got {grace!r}")
    if not isinstance(eta, (int, float)) or eta <= 1:
        raise ConfigError(f"sweep.early_terminate.eta: must be a number > 1, got {eta!r}")
    # Ray's ASHA places rungs at grace * eta^k below max_t; a trial reaching max_t has finished.
    rungs = [grace * eta**k for k in range(int(math.log(max_t / grace, eta) + 1e-9) + 1) if grace * eta**k < max_t]
    return AshaPlan(enabled=et.get("type", "hyperband") == "hyperband", grace_period=grace, reduction_factor=eta,
                    max_t=max_t, rungs=rungs)


def grid_size(parsed: dict[str, dict]) -> int:
    size = 1
    for p in parsed.values():
        if p["kind"] == "choice":
            size *= len(p["values"])
    return size
