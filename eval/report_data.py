"""What the report shows, read from an experiment directory (finished, interrupted or copied elsewhere) and
analysed: the leaderboard rows (rebuilt from Tune's files when there is no leaderboard yet), loss curves,
generations, the merge check, the saved plan, and Optuna's parameter importances. Every path is relative to
the directory, and nothing here imports sweeps/: the plan comes from plan.json."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from eval.artifacts import (CONFIG_FILE, EVAL_DIR, MERGE_CHECK_FILE, PLAN_FILE, SEARCH_SPACE_FILE, TIMINGS_FILE,
                            TUNE_DIR, read_json)
from eval.leaderboard import METRIC_COLUMNS, build_rows, leaderboard_columns
from eval.outcomes import BASE_ROW_ID, trial_record, trial_status

MIN_TRIALS_FOR_IMPORTANCE = 4
# peak_memory_mb: the column's name in leaderboards written before it said MiB.
_NON_PARAM_COLUMNS = {"rank", "trial_id", "status", "winner", "tied_with_winner", "adapter_path", "peak_memory_mb",
                      *METRIC_COLUMNS}
# Ray names trial directories <trainable>_<trial id>_<index>_<params>_<date>; ids are 8 hex digits from a
# searcher, or <5 hex>_<5 digits> from the grid's variant generator.
_TRIAL_DIR_ID = re.compile(r"_([0-9a-f]{5}_\d{5}|[0-9a-f]{8})_\d+_")


class NotAnExperimentDir(ValueError):
    """The path holds none of the files a lorasweep run writes."""


@dataclass
class Experiment:
    """What the report shows, read from an experiment directory; None where the files are missing."""

    name: str
    title: str
    config_text: str | None
    search_space: dict[str, dict]
    param_names: list[str]
    columns: list[str]
    rows: list[dict]
    from_leaderboard: bool
    curves: dict[str, list[dict]] | None  # trial id -> its result.json lines; None without tune/
    generations: dict[str, list[dict]] | None  # "base" or trial id -> generations; None without eval/
    merge_check: dict | None
    mode: str  # "min" or "max": how the plan compares eval losses
    gpus_per_trial: float | None  # the GPU share the trials got (plan.json), None when not recorded
    selection_notes: list[str]  # eval/outcomes.py's sentences on the winner (leaderboard.json); [] without
    metadata: dict | None  # versions, date and config hash of the run (leaderboard.json), None without


def is_experiment_dir(path: Path) -> bool:
    """True when the directory holds a lorasweep config, leaderboard or Tune directory."""
    return path.is_dir() and any((path / name).exists() for name in (CONFIG_FILE, "leaderboard.json", TUNE_DIR))


def load_experiment(experiment_dir: Path) -> Experiment:
    """Read everything the report needs; every path is relative to the directory, so a copied one works."""
    if not is_experiment_dir(experiment_dir):
        raise NotAnExperimentDir(f"{experiment_dir} is not a lorasweep experiment directory "
                                 f"(expected config.yaml, leaderboard.json or tune/ in it)")
    plan = read_json(experiment_dir / PLAN_FILE) or {}
    search_space = read_json(experiment_dir / SEARCH_SPACE_FILE) or {}
    tune_trials = _read_tune_trials(experiment_dir / TUNE_DIR) if (experiment_dir / TUNE_DIR).is_dir() else None
    board = read_json(experiment_dir / "leaderboard.json")
    from_leaderboard = bool(board and board.get("rows"))
    if from_leaderboard:
        rows = board["rows"]
        param_names = [c for c in board.get("columns", []) if c not in _NON_PARAM_COLUMNS] or list(search_space)
        columns = board.get("columns") or leaderboard_columns(param_names)
        title = board.get("title") or f"lorasweep report: {experiment_dir.name}"
    else:
        trials = tune_trials or {}
        param_names = list(search_space) or sorted({k for t in trials.values() for k in t["params"]})
        records = [_trial_record(trial_id, t, param_names, plan) for trial_id, t in trials.items()]
        rows = build_rows(records, {}, param_names, None, "exact_match")
        columns = leaderboard_columns(param_names)
        title = f"lorasweep report: {experiment_dir.name} (no leaderboard yet)"
    eval_dir = experiment_dir / EVAL_DIR
    generations = None
    if eval_dir.is_dir():
        generations = {p.stem.removeprefix("generations_"): _read_jsonl(p)
                       for p in sorted(eval_dir.glob("generations_*.jsonl"))}
    # Experiments written before plan.json kept the share in timings.json.
    gpus = plan.get("gpus_per_trial", (read_json(experiment_dir / TIMINGS_FILE) or {}).get("gpus_per_trial"))
    return Experiment(
        name=experiment_dir.name, title=title, config_text=_read_text(experiment_dir / CONFIG_FILE),
        search_space=search_space, param_names=param_names, columns=columns, rows=rows,
        from_leaderboard=from_leaderboard,
        curves=None if tune_trials is None else {tid: t["results"] for tid, t in tune_trials.items()},
        generations=generations, merge_check=read_json(experiment_dir / MERGE_CHECK_FILE),
        mode=plan.get("mode", "min"), gpus_per_trial=gpus if is_number(gpus) else None,
        selection_notes=list((board or {}).get("selection_notes") or []), metadata=(board or {}).get("metadata"),
    )


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    """The parseable lines: an interrupted writer can leave a partial last line."""
    lines = []
    for line in (_read_text(path) or "").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [line for line in lines if isinstance(line, dict)]


def _read_tune_trials(tune_dir: Path) -> dict[str, dict]:
    """{trial id: {params, results, error}} from each trial directory Tune wrote."""
    trials = {}
    for trial_dir in sorted(p for p in tune_dir.iterdir() if (p / "params.json").is_file() or (p / "result.json").is_file()):
        results = _read_jsonl(trial_dir / "result.json")
        match = _TRIAL_DIR_ID.search(trial_dir.name)
        trial_id = results[-1].get("trial_id") if results else None
        trial_id = trial_id or (match.group(1) if match else trial_dir.name)
        params = read_json(trial_dir / "params.json") or (results[-1].get("config", {}) if results else {})
        error_lines = [l for l in (_read_text(trial_dir / "error.txt") or "").splitlines() if l.strip()]
        trials[trial_id] = {"params": params, "results": results, "error": error_lines[-1] if error_lines else None}
    return trials


def _trial_record(trial_id: str, trial: dict, param_names: list[str], plan: dict) -> dict:
    """A trial as the driver records it (eval/outcomes.py), rebuilt from Tune's files and plan.json alone."""
    results = trial["results"]
    last = results[-1] if results else {}
    asha = plan.get("asha") or {}
    status = trial_status(error=trial["error"], last=last, done=bool(last.get("done")),
                          max_evaluations=asha.get("max_t"),
                          asha_rungs=asha.get("rungs", []) if asha.get("enabled") else [])
    losses = [r["eval_loss"] for r in results if is_number(r.get("eval_loss"))]
    return trial_record(trial_id, {name: trial["params"].get(name) for name in param_names}, status, losses, last)


def param_importances(exp: Experiment) -> tuple[dict[str, float] | None, str]:
    """Optuna's importance of each searched parameter for best eval loss over completed trials, or None and why."""
    completed = [r for r in trial_rows(exp) if r["status"] == "completed" and finite(r.get("best_eval_loss"))]
    names = searched_params(exp)
    if len(completed) < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (f"Parameter importance needs at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials; "
                      f"this sweep has {len(completed)}.")
    if not names:
        return None, "Parameter importance: no parameter varies in this sweep."
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize" if exp.mode == "max" else "minimize")
        distributions = {name: _optuna_distribution(exp.search_space.get(name, {}), [r[name] for r in completed])
                         for name in names}
        for row in completed:
            study.add_trial(optuna.trial.create_trial(params={n: row[n] for n in names}, distributions=distributions,
                                                      value=row["best_eval_loss"]))
        # fANOVA (Optuna's default) needs scikit-learn, which lorasweep does not install; PED-ANOVA does not.
        if importlib.util.find_spec("sklearn"):
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        else:
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except Exception as err:  # the rest of the report matters more than this one view
        return None, f"Parameter importance could not be computed: {type(err).__name__}: {err}"
    return dict(importances), (f"{type(evaluator).__name__} over {len(completed)} completed trials, objective: "
                               f"best eval loss. With few trials this is a hint, not a measurement.")


def _optuna_distribution(spec: dict, observed: list):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    kind = spec.get("kind")
    if kind == "log_uniform":
        return FloatDistribution(spec["min"], spec["max"], log=True)
    if kind == "uniform":
        return FloatDistribution(spec["min"], spec["max"])
    if kind == "int_uniform":
        return IntDistribution(spec["min"], spec["max"])
    if kind == "choice":
        return CategoricalDistribution(spec["values"])
    # No search_space.json: numbers as a range over what was tried, anything else as categories.
    if all(is_number(v) for v in observed) and min(observed) < max(observed):
        return FloatDistribution(min(observed), max(observed))
    return CategoricalDistribution(sorted(set(observed), key=str))


def trial_rows(exp: Experiment) -> list[dict]:
    return [r for r in exp.rows if r["trial_id"] != BASE_ROW_ID]


def searched_params(exp: Experiment) -> list[str]:
    """Parameters that vary: constants in the search space (or one value over all trials) have nothing to show."""
    names = []
    for name in exp.param_names:
        spec = exp.search_space.get(name)
        if spec is not None and spec.get("kind") != "constant":
            names.append(name)
        elif spec is None and len({json.dumps(r.get(name), default=str) for r in trial_rows(exp)}) > 1:
            names.append(name)
    return names


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value) -> bool:
    return is_number(value) and math.isfinite(value)
