"""A self-contained HTML report of an experiment directory, finished or interrupted: the leaderboard, eval-loss
curves, hyperparameter views, held-out generations, cost per trial, the merge check, the resolved config and
library versions. CSS, JS and SVG are inline (the SVG is drawn here), so the page opens offline from any copy
of the directory."""

from __future__ import annotations

import html
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from eval.leaderboard import METRIC_COLUMNS, build_rows
from eval.stage import BASE_ROW_ID

REPORT_NAME = "report.html"
LIBRARIES = ("torch", "transformers", "peft", "trl", "ray", "optuna")
GENERATIONS_SHOWN = 20
MIN_TRIALS_FOR_IMPORTANCE = 4
# Tableau 10: distinct on screen and in print; trial i keeps colour i in every plot.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]
_NON_PARAM_COLUMNS = {"rank", "trial_id", "status", "winner", *METRIC_COLUMNS}
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
    config: dict
    search_space: dict[str, dict]
    param_names: list[str]
    columns: list[str]
    rows: list[dict]
    from_leaderboard: bool
    curves: dict[str, list[dict]] | None  # trial id -> its result.json lines; None without tune/
    generations: dict[str, list[dict]] | None  # "base" or trial id -> generations; None without eval/
    merge_check: dict | None


def is_experiment_dir(path: Path) -> bool:
    """True when the directory holds a lorasweep config, leaderboard or Tune directory."""
    return path.is_dir() and any((path / name).exists() for name in ("config.yaml", "leaderboard.json", "tune"))


def write_report(experiment_dir: Path) -> Path:
    """Write <experiment_dir>/report.html (to a temp file, then renamed) and return its path."""
    experiment_dir = Path(experiment_dir)
    page = render_report(load_experiment(experiment_dir))
    target = experiment_dir / REPORT_NAME
    handle, partial = tempfile.mkstemp(dir=experiment_dir, prefix=".report-", suffix=".partial")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(page)
        os.chmod(partial, 0o644)  # mkstemp creates 0600; the report is as readable as the leaderboard
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return target


# ---------------------------------------------------------------------------------------------- reading


def load_experiment(experiment_dir: Path) -> Experiment:
    """Read everything the report needs; every path is relative to the directory, so a copied one works."""
    if not is_experiment_dir(experiment_dir):
        raise NotAnExperimentDir(f"{experiment_dir} is not a lorasweep experiment directory "
                                 f"(expected config.yaml, leaderboard.json or tune/ in it)")
    config_text = _read_text(experiment_dir / "config.yaml")
    config = _parse_yaml(config_text)
    search_space = _read_json(experiment_dir / "search_space.json") or {}
    tune_trials = _read_tune_trials(experiment_dir / "tune") if (experiment_dir / "tune").is_dir() else None
    board = _read_json(experiment_dir / "leaderboard.json")
    from_leaderboard = bool(board and board.get("rows"))
    if from_leaderboard:
        rows = board["rows"]
        param_names = [c for c in board.get("columns", []) if c not in _NON_PARAM_COLUMNS] or list(search_space)
        columns = board.get("columns") or _default_columns(param_names)
        title = board.get("title") or f"lorasweep report: {experiment_dir.name}"
    else:
        trials = tune_trials or {}
        param_names = list(search_space) or sorted({k for t in trials.values() for k in t["params"]})
        asha = _asha_settings(experiment_dir / "config.yaml")
        maximize = _goal(config) == "maximize"
        records = [_trial_record(trial_id, t, param_names, asha, maximize) for trial_id, t in trials.items()]
        rows = build_rows(records, {}, param_names, None, "exact_match")
        columns = _default_columns(param_names)
        title = f"lorasweep report: {experiment_dir.name} (no leaderboard yet)"
    eval_dir = experiment_dir / "eval"
    generations = None
    if eval_dir.is_dir():
        generations = {p.stem.removeprefix("generations_"): _read_jsonl(p)
                       for p in sorted(eval_dir.glob("generations_*.jsonl"))}
    return Experiment(
        name=experiment_dir.name, title=title, config_text=config_text, config=config, search_space=search_space,
        param_names=param_names, columns=columns, rows=rows, from_leaderboard=from_leaderboard,
        curves=None if tune_trials is None else {tid: t["results"] for tid, t in tune_trials.items()},
        generations=generations, merge_check=_read_json(experiment_dir / "merge_check.json"),
    )


def _default_columns(param_names: list[str]) -> list[str]:
    """The leaderboard's column order (eval/leaderboard.py), for rows rebuilt without it."""
    return ["rank", "trial_id", *param_names, "status", *METRIC_COLUMNS, "winner"]


def _goal(config: dict) -> str:
    return ((config.get("sweep") or {}).get("metric") or {}).get("goal", "minimize")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _read_json(path: Path):
    text = _read_text(path)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
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


def _parse_yaml(text: str | None) -> dict:
    try:
        loaded = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _read_tune_trials(tune_dir: Path) -> dict[str, dict]:
    """{trial id: {params, results, error}} from each trial directory Tune wrote."""
    trials = {}
    for trial_dir in sorted(p for p in tune_dir.iterdir() if (p / "params.json").is_file() or (p / "result.json").is_file()):
        results = _read_jsonl(trial_dir / "result.json")
        match = _TRIAL_DIR_ID.search(trial_dir.name)
        trial_id = results[-1].get("trial_id") if results else None
        trial_id = trial_id or (match.group(1) if match else trial_dir.name)
        params = _read_json(trial_dir / "params.json") or (results[-1].get("config", {}) if results else {})
        error_lines = [l for l in (_read_text(trial_dir / "error.txt") or "").splitlines() if l.strip()]
        trials[trial_id] = {"params": params, "results": results, "error": error_lines[-1] if error_lines else None}
    return trials


def _asha_settings(config_path: Path) -> dict | None:
    """The sweep's ASHA rungs from its saved config, or None when it cannot be read with this version."""
    from sweeps.config import ConfigError, load_config
    from sweeps.search_space import asha_settings

    if not config_path.is_file():
        return None
    try:
        return asha_settings(load_config(str(config_path)))
    except (ConfigError, ValueError, TypeError):
        return None


def _trial_record(trial_id: str, trial: dict, param_names: list[str], asha: dict | None, maximize: bool) -> dict:
    """A trial as sweeps.tuner.trial_records describes it, rebuilt from Tune's files alone."""
    results = trial["results"]
    last = results[-1] if results else {}
    losses = [r["eval_loss"] for r in results if _is_number(r.get("eval_loss")) and math.isfinite(r["eval_loss"])]
    return {
        "trial_id": trial_id,
        "params": {name: trial["params"].get(name) for name in param_names},
        "status": _status_from_results(trial, asha),
        "best_eval_loss": (max(losses) if maximize else min(losses)) if losses else None,
        "steps": last.get("step"),
        "tokens": last.get("tokens"),
        "wall_time_s": last.get("wall_time_s"),
        "peak_memory_mb": last.get("peak_memory_mb"),
    }


def _status_from_results(trial: dict, asha: dict | None) -> str:
    """The leaderboard's status wording (sweeps/tuner.py); `unfinished` for a trial the interruption cut."""
    if trial["error"]:
        return "failed: " + trial["error"][:300]
    if not trial["results"]:
        return "unfinished: no evaluation reported"
    last = trial["results"][-1]
    evaluation = last.get("evaluation", 0)
    of = f" of {asha['max_t']}" if asha else ""
    if asha and evaluation >= asha["max_t"]:
        return "completed"
    if not last.get("done"):
        return f"unfinished: interrupted after evaluation {evaluation}{of}"
    if asha and asha["enabled"] and evaluation in asha["rungs"]:
        return f"stopped by ASHA at rung {asha['rungs'].index(evaluation)} (evaluation {evaluation}{of})"
    return f"stopped after evaluation {evaluation}{of}"


# -------------------------------------------------------------------------------------------- analysis


def param_importances(exp: Experiment) -> tuple[dict[str, float] | None, str]:
    """Optuna's importance of each searched parameter for best eval loss over completed trials, or None and why."""
    completed = [r for r in _trial_rows(exp) if r["status"] == "completed" and _finite(r.get("best_eval_loss"))]
    names = _searched_params(exp)
    if len(completed) < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (f"Parameter importance needs at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials; "
                      f"this sweep has {len(completed)}.")
    if not names:
        return None, "Parameter importance: no parameter varies in this sweep."
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize" if _goal(exp.config) == "maximize" else "minimize")
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
    if all(_is_number(v) for v in observed) and min(observed) < max(observed):
        return FloatDistribution(min(observed), max(observed))
    return CategoricalDistribution(sorted(set(observed), key=str))


def _trial_rows(exp: Experiment) -> list[dict]:
    return [r for r in exp.rows if r["trial_id"] != BASE_ROW_ID]


def _searched_params(exp: Experiment) -> list[str]:
    """Parameters that vary: constants in the search space (or one value over all trials) have nothing to show."""
    names = []
    for name in exp.param_names:
        spec = exp.search_space.get(name)
        if spec is not None and spec.get("kind") != "constant":
            names.append(name)
        elif spec is None and len({json.dumps(r.get(name), default=str) for r in _trial_rows(exp)}) > 1:
            names.append(name)
    return names


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    return _is_number(value) and math.isfinite(value)


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# ------------------------------------------------------------------------------------------------- SVG


class _Scale:
    """Maps data values to pixels along one axis: linear, log10, or evenly spaced categories."""

    def __init__(self, kind: str, values: list, start: float, end: float, bounds: tuple | None = None,
                 categories: list | None = None):
        self.kind, self.start, self.end = kind, start, end
        if kind == "category":
            self.categories = []
            for value in list(categories or []) + list(values):
                if value not in self.categories:
                    self.categories.append(value)
            return
        lo, hi = bounds or (min(values), max(values))
        if kind == "log":
            lo, hi = math.log10(lo), math.log10(hi)
        if not bounds:  # a margin so that points do not sit on the frame
            pad = (hi - lo) * 0.06 or (abs(lo) * 0.1 or 1.0)
            lo, hi = lo - pad, hi + pad
        self.lo, self.hi = lo, hi

    def __call__(self, value) -> float:
        if self.kind == "category":
            slot = (self.end - self.start) / len(self.categories)
            return self.start + (self.categories.index(value) + 0.5) * slot
        position = math.log10(value) if self.kind == "log" else value
        return self.start + (position - self.lo) / (self.hi - self.lo) * (self.end - self.start)

    def ticks(self) -> list[tuple[float, str]]:
        """(pixel, label) pairs: each category, 1-2-5 steps per decade on a log axis, round steps otherwise."""
        if self.kind == "category":
            return [(self(c), _short(c)) for c in self.categories]
        if self.kind == "log":
            values = [m * 10.0**e for e in range(math.floor(self.lo), math.ceil(self.hi) + 1) for m in (1, 2, 5)]
            values = [v for v in values if self.lo - 1e-9 <= math.log10(v) <= self.hi + 1e-9]
            if len(values) > 8:  # many decades: label the powers of ten only
                values = [v for v in values if math.isclose(math.log10(v), round(math.log10(v)))]
            return [(self(v), f"{v:.3g}") for v in values]
        raw_step = (self.hi - self.lo) / 5
        magnitude = 10.0 ** math.floor(math.log10(raw_step))
        step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
        first = math.ceil(self.lo / step)
        values = [round(i * step, 12) for i in range(first, math.floor(self.hi / step) + 1)]
        return [(self(v), f"{v:.4g}") for v in values]


def _attrs(**attrs) -> str:
    return "".join(f' {k.rstrip("_").replace("_", "-")}="{html.escape(str(v))}"' for k, v in attrs.items() if v is not None)


def _svg_open(width: int, height: int, svg_id: str, label: str) -> str:
    return f'<svg{_attrs(id=svg_id, class_="plot", viewBox=f"0 0 {width} {height}", width=width, height=height, role="img", aria_label=label)}>'


def _text(x: float, y: float, text: str, anchor: str = "middle", css: str = "tick", rotate: bool = False) -> str:
    transform = f"rotate(-90 {x:.1f} {y:.1f})" if rotate else None
    return f'<text{_attrs(x=f"{x:.1f}", y=f"{y:.1f}", text_anchor=anchor, class_=css, transform=transform)}>{html.escape(text)}</text>'


def _frame(xs: _Scale, ys: _Scale, x_label: str, y_label: str) -> list[str]:
    """Grid lines, tick labels, axes and axis titles of a 2-D plot."""
    left, right, bottom, top = xs.start, xs.end, ys.start, ys.end
    parts = []
    for px, label in ys.ticks():
        parts.append(f'<line class="grid" x1="{left:.1f}" x2="{right:.1f}" y1="{px:.1f}" y2="{px:.1f}"/>')
        parts.append(_text(left - 6, px + 4, label, anchor="end"))
    for px, label in xs.ticks():
        parts.append(f'<line class="grid" x1="{px:.1f}" x2="{px:.1f}" y1="{top:.1f}" y2="{bottom:.1f}"/>')
        parts.append(_text(px, bottom + 16, label))
    parts.append(f'<path class="axis" d="M{left:.1f},{top:.1f}V{bottom:.1f}H{right:.1f}"/>')
    parts.append(_text((left + right) / 2, bottom + 34, x_label, css="axis-label"))
    parts.append(_text(14, (top + bottom) / 2, y_label, css="axis-label", rotate=True))
    return parts


def _cross(x: float, y: float, size: float = 5) -> str:
    return f"M{x - size:.1f},{y - size:.1f}L{x + size:.1f},{y + size:.1f}M{x - size:.1f},{y + size:.1f}L{x + size:.1f},{y - size:.1f}"


def _loss_curves_svg(exp: Experiment, colors: dict[str, str]) -> str:
    """Eval loss against step for every trial on one plot; a cross where a trial stopped early or failed."""
    series = {}
    for row in _trial_rows(exp):
        points = [(r["step"], r["eval_loss"]) for r in (exp.curves or {}).get(row["trial_id"], [])
                  if _finite(r.get("step")) and _finite(r.get("eval_loss"))]
        if points:
            series[row["trial_id"]] = (row, points)
    if not series:
        return _note("No trial reported an evaluation yet: no curves to draw.")
    width, height = 760, 380
    steps = [s for _, points in series.values() for s, _ in points]
    losses = [l for _, points in series.values() for _, l in points]
    xs = _Scale("linear", steps, 64, width - 20, bounds=(0, max(steps) or 1))
    ys = _Scale("linear", losses, height - 46, 14)
    parts = [_svg_open(width, height, "loss-curves", "eval loss against training step, one line per trial")]
    parts += _frame(xs, ys, "training step", "eval loss")
    for trial_id, (row, points) in series.items():
        color = colors[trial_id]
        coords = [(xs(s), ys(l)) for s, l in points]
        d = "M" + "L".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        parts.append(f'<g{_attrs(class_="series", data_trial=trial_id)}>')
        parts.append(f'<path class="curve" d="{d}" stroke="{color}"><title>{html.escape(trial_id)}: '
                     f'{html.escape(row["status"])}</title></path>')
        for (x, y), (step, loss) in zip(coords, points):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"><title>'
                         f'{html.escape(trial_id)} step {step}: eval loss {loss:.4g}</title></circle>')
        status_class = _status_class(row["status"])
        if status_class in ("stopped", "failed"):
            x, y = coords[-1]
            stroke = "#c0392b" if status_class == "failed" else color
            parts.append(f'<path class="stop-mark" d="{_cross(x, y, 6)}" stroke="{stroke}"><title>'
                         f'{html.escape(trial_id)}: {html.escape(row["status"])}</title></path>')
        parts.append("</g>")
    parts.append("</svg>")
    legend = "".join(f'<span class="chip"{_attrs(data_trial=tid)}><i style="background:{colors[tid]}"></i>'
                     f'{html.escape(tid)} <small>{html.escape(_short_status(row["status"]))}</small></span>'
                     for tid, (row, _) in series.items())
    return ("".join(parts) + f'<div class="legend">{legend}</div><p class="hint">One line per trial, a point per '
            f'evaluation; ✕ where ASHA stopped a trial (red: failed). Hover a trial to highlight it in every plot.</p>')


def _param_scale(spec: dict, values: list, start: float, end: float) -> _Scale:
    """Listed values as categories (numbers too), ranges on their own linear or log axis."""
    kind = spec.get("kind")
    if kind == "choice" or not all(_is_number(v) for v in values):
        return _Scale("category", values, start, end, categories=spec.get("values"))
    if kind == "log_uniform":
        return _Scale("log", values, start, end, bounds=(spec["min"], spec["max"]))
    if kind in ("uniform", "int_uniform"):
        return _Scale("linear", values, start, end, bounds=(spec["min"], spec["max"]))
    return _Scale("linear", values, start, end)


def _scatter_svg(exp: Experiment, name: str, metric: str, colors: dict[str, str]) -> str:
    """One metric against one parameter, a point per trial (jittered within a category), base model as a line."""
    rows = [r for r in _trial_rows(exp) if r.get(name) is not None and _finite(r.get(metric))]
    if not rows:
        return _note(f"No trial with a {name} value has {metric}.")
    width, height = 360, 250
    # The axis spans every trial's value, so that a parameter's plots for both metrics line up.
    tried = [r[name] for r in _trial_rows(exp) if r.get(name) is not None]
    xs = _param_scale(exp.search_space.get(name, {}), tried, 64, width - 16)
    if metric == "exact_match":
        ys = _Scale("linear", [], height - 46, 12, bounds=(0.0, 1.0))
    else:
        ys = _Scale("linear", [r[metric] for r in rows], height - 46, 12)
    parts = [_svg_open(width, height, f"scatter-{metric}-{name}", f"{metric} against {name}")]
    parts += _frame(xs, ys, name, metric)
    base = next((r for r in exp.rows if r["trial_id"] == BASE_ROW_ID and _finite(r.get(metric))), None)
    if base is not None:
        y = ys(base[metric])
        parts.append(f'<line class="base-line" x1="{xs.start:.1f}" x2="{xs.end:.1f}" y1="{y:.1f}" y2="{y:.1f}">'
                     f'<title>base model: {base[metric]:.4g}</title></line>')
        parts.append(_text(xs.end - 2, y - 4, "base", anchor="end", css="tick"))
    # Trials that share a category are spread side by side around it so that each point stays visible.
    keys = [json.dumps(r[name], default=str) if xs.kind == "category" else "" for r in rows]
    seen: dict[str, int] = {}
    for row, key in zip(rows, keys):
        x = xs(row[name])
        if xs.kind == "category":
            seen[key] = seen.get(key, 0) + 1
            slot_width = min(7.0, (xs.end - xs.start) / len(xs.categories) / (keys.count(key) + 1))
            x += (seen[key] - 1 - (keys.count(key) - 1) / 2) * slot_width
        parts.append(f'<circle{_attrs(data_trial=row["trial_id"])} cx="{x:.1f}" cy="{ys(row[metric]):.1f}" r="5" '
                     f'fill="{colors[row["trial_id"]]}"><title>{html.escape(row["trial_id"])}: {html.escape(name)}='
                     f'{html.escape(_short(row[name]))}, {metric}={row[metric]:.4g}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def _loss_color(loss, lo: float, hi: float) -> str:
    """Green for the lowest loss through yellow to red for the highest; grey without a loss."""
    if not _finite(loss):
        return "#aaaaaa"
    share = (loss - lo) / (hi - lo) if hi > lo else 0.0
    return f"hsl({120 * (1 - share):.0f}, 70%, 40%)"


def _parallel_svg(exp: Experiment, names: list[str]) -> str:
    """Parallel coordinates: one axis per searched parameter, then best eval loss and exact match."""
    rows = _trial_rows(exp)
    metrics = [m for m in ("best_eval_loss", "exact_match") if any(_finite(r.get(m)) for r in rows)]
    axes = names + metrics
    if len(axes) < 2 or not rows:
        return _note("Too few axes or trials for parallel coordinates.")
    width, height, top, bottom = max(600, 150 * len(axes)), 340, 34, 300
    xs = [70 + i * (width - 140) / (len(axes) - 1) for i in range(len(axes))]
    scales = {}
    for axis in axes:
        values = [r[axis] for r in rows if (r.get(axis) is not None if axis in names else _finite(r.get(axis)))]
        if not values:
            continue
        if axis == "exact_match":
            scales[axis] = _Scale("linear", values, bottom, top, bounds=(0.0, 1.0))
        elif axis in names:
            scales[axis] = _param_scale(exp.search_space.get(axis, {}), values, bottom, top)
        else:
            scales[axis] = _Scale("linear", values, bottom, top)
    losses = [r["best_eval_loss"] for r in rows if _finite(r.get("best_eval_loss"))]
    lo, hi = (min(losses), max(losses)) if losses else (0.0, 0.0)
    parts = [_svg_open(width, height, "parallel-coordinates", "parallel coordinates of parameters and metrics")]
    for x, axis in zip(xs, axes):
        parts.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}"/>')
        parts.append(_text(x, top - 14, axis, css="axis-label"))
        for px, label in (scales[axis].ticks() if axis in scales else []):
            parts.append(_text(x - 5, px + 4, label, anchor="end"))
    for row in rows:
        d, pen_down = "", False
        for x, axis in zip(xs, axes):
            value = row.get(axis)
            present = axis in scales and (value is not None if axis in names else _finite(value))
            if present:  # a missing value (e.g. exact match of an unevaluated trial) breaks the line there
                d += f"{'L' if pen_down else 'M'}{x:.1f},{scales[axis](value):.1f}"
            pen_down = present
        if not d:
            continue
        summary = ", ".join(f"{a}={_short(row.get(a))}" for a in axes)
        dashed = ' stroke-dasharray="4 3"' if _status_class(row["status"]) != "completed" else ""
        parts.append(f'<path{_attrs(data_trial=row["trial_id"])} class="pc-line" d="{d}" '
                     f'stroke="{_loss_color(row.get("best_eval_loss"), lo, hi)}"{dashed}><title>'
                     f'{html.escape(row["trial_id"])} ({html.escape(row["status"])}): {html.escape(summary)}</title></path>')
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ HTML


def _note(text: str, css: str = "note") -> str:
    return f'<p class="{css}">{html.escape(text)}</p>'


def _short(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _cell_text(column: str, value) -> str:
    if column == "exact_match" and _finite(value):
        return f"{value:.1%}"
    if column == "winner":
        return "★" if value else ""
    return _short(value)


def _status_class(status: str) -> str:
    for prefix, css in (("completed", "completed"), ("stopped", "stopped"), ("failed", "failed"),
                        ("unfinished", "unfinished"), ("base", "base")):
        if status.startswith(prefix):
            return css
    return "other"


def _short_status(status: str) -> str:
    match = re.match(r"stopped by ASHA at rung (\d+)", status)
    if match:
        return f"ASHA rung {match.group(1)}"
    return status.split(":")[0]


def _sort_value(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if _is_number(value):
        return repr(value) if math.isfinite(value) else ""
    return "" if value is None else str(value)


def _leaderboard_html(exp: Experiment, colors: dict[str, str]) -> str:
    columns = exp.columns
    head = "".join(f'<th title="sort by {html.escape(c)}">{html.escape(c)}</th>' for c in columns)
    body = []
    for row in exp.rows:
        status_class = _status_class(str(row.get("status", "")))
        cells = []
        for column in columns:
            value = row.get(column)
            if column == "status":  # the badge says what happened, a failure's reason goes below it
                status = str(value or "")
                failed = status_class == "failed"
                reason = f'<div class="reason">{html.escape(status.removeprefix("failed:").strip())}</div>' if failed else ""
                cells.append(f'<td data-v="{html.escape(status)}"><span class="badge {status_class}">'
                             f'{html.escape("failed" if failed else status)}</span>{reason}</td>')
            elif column == "trial_id":
                swatch = f'<i class="swatch" style="background:{colors[value]}"></i>' if value in colors else ""
                cells.append(f'<td data-v="{html.escape(str(value))}">{swatch}{html.escape(str(value))}</td>')
            else:
                numeric = " class=num" if _is_number(value) else ""
                cells.append(f'<td{numeric} data-v="{html.escape(_sort_value(value))}">{html.escape(_cell_text(column, value))}</td>')
        winner = " winner" if row.get("winner") else ""
        body.append(f'<tr{_attrs(class_=f"row-{status_class}{winner}", data_trial=row["trial_id"])}>{"".join(cells)}</tr>')
    source = ("" if exp.from_leaderboard else
              _note("No leaderboard.json: the sweep was interrupted or is still running. These rows come from "
                    "tune/*/result.json alone; held-out exact match and loss are not measured yet.", css="warn"))
    return (f'{source}<div class="scroll"><table id="leaderboard" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>'
            f'<p class="hint">Click a column header to sort (again to reverse); empty cells stay last. '
            f'best_eval_loss is the validation loss ASHA saw; exact_match and heldout_loss are measured on held-out '
            f'test prompts for the top-k trials and the base model only.</p>')


def _hyperparameters_html(exp: Experiment, colors: dict[str, str]) -> str:
    names = _searched_params(exp)
    constants = [n for n in exp.param_names if n not in names]
    parts = []
    if constants:
        parts.append(_note("Not varied in this sweep: " + ", ".join(constants) + "."))
    if not names:
        return "".join(parts) + _note("No searched parameter varies: nothing to plot.")
    parts.append("<h3>Metrics against each parameter</h3>")
    metrics = [m for m in ("exact_match", "best_eval_loss") if any(_finite(r.get(m)) for r in _trial_rows(exp))]
    if metrics:
        parts.append('<div class="grid">')
        for name in names:
            plots = "".join(_scatter_svg(exp, name, metric, colors) for metric in metrics)
            parts.append(f'<div class="pair"><h4>{html.escape(name)}</h4>{plots}</div>')
        parts.append("</div>")
    else:
        parts.append(_note("No trial has an eval loss or exact match yet."))
    parts.append('<h3>Parallel coordinates</h3><p class="hint">One line per trial; colour: best eval loss '
                 '(green lowest, red highest, grey none); dashed: not completed.</p><div class="scroll">')
    parts.append(_parallel_svg(exp, names) + "</div>")
    parts.append("<h3>Parameter importance</h3>")
    importances, explanation = param_importances(exp)
    if importances is None:
        parts.append(_note(explanation))
    else:
        bars = "".join(f'<div class="imp"><span class="imp-name">{html.escape(name)}</span><span class="imp-bar">'
                       f'<span style="width:{100 * share:.1f}%"></span></span><span class="num">{share:.3f}</span></div>'
                       for name, share in importances.items())
        parts.append(f'<div id="importance">{bars}</div><p class="hint">{html.escape(explanation)}</p>')
    return "".join(parts)


def _generations_html(exp: Experiment) -> str:
    if exp.generations is None:
        return _note("No eval/ directory: the evaluation stage has not run (the sweep was interrupted, or every trial failed).")
    ranked = [r["trial_id"] for r in sorted(_trial_rows(exp), key=lambda r: r.get("rank") or math.inf)
              if r["trial_id"] in exp.generations]
    winner = next((r["trial_id"] for r in _trial_rows(exp) if r.get("winner")), None)
    winner = winner if winner in exp.generations else (ranked[0] if ranked else None)
    runner_up = next((t for t in ranked if t != winner), None)
    shown = [(label, key) for label, key in (("base model", BASE_ROW_ID), ("winner", winner), ("runner-up", runner_up))
             if key is not None and key in exp.generations]
    if not shown:
        return _note("eval/ holds no generations files.")
    head = "".join(f"<th>{html.escape(label)}<br><small>{html.escape(key)} · {_exact_match_summary(exp.generations[key])}"
                   f"</small></th>" for label, key in shown)
    count = min(GENERATIONS_SHOWN, max(len(exp.generations[key]) for _, key in shown))
    lines = []
    for index in range(count):
        reference = next(exp.generations[key][index] for _, key in shown if index < len(exp.generations[key]))
        cells = []
        for _, key in shown:
            entry = exp.generations[key][index] if index < len(exp.generations[key]) else None
            if entry is None:
                cells.append("<td></td>")
                continue
            ok = bool(entry.get("exact_match"))
            cells.append(f'<td class="{"ok" if ok else "bad"}"><b>{"✓" if ok else "✗"}</b> '
                         f'<span class="gen">{html.escape(str(entry.get("generation", "")))}</span></td>')
        lines.append(f'<tr><td class="num">{index + 1}</td><td class="gen">{html.escape(str(reference.get("prompt", "")))}</td>'
                     f'<td class="gen">{html.escape(str(reference.get("target", "")))}</td>{"".join(cells)}</tr>')
    missing = "" if winner else _note("No evaluated trial has generations: only the base model is shown.")
    return (f'{missing}<div class="scroll"><table id="generations"><thead><tr><th>#</th><th>prompt</th><th>target</th>{head}'
            f'</tr></thead><tbody>{"".join(lines)}</tbody></table></div>'
            f'<p class="hint">The first {count} held-out prompts; ✓ exact match after the sweep\'s normalization. '
            f'The header counts all prompts in each file.</p>')


def _exact_match_summary(entries: list[dict]) -> str:
    hits = sum(bool(e.get("exact_match")) for e in entries)
    return f"{hits}/{len(entries)} exact" if entries else "no prompts"


def _cost_html(exp: Experiment) -> str:
    rows = _trial_rows(exp)
    if not rows:
        return _note("No trials.")
    gpus = (exp.config.get("resources") or {}).get("gpus_per_trial")
    gpu_seconds = {}
    for row in rows:
        if _finite(row.get("gpu_seconds")):
            gpu_seconds[row["trial_id"]] = row["gpu_seconds"]
        elif _finite(row.get("wall_time_s")) and _is_number(gpus) and gpus > 0:
            gpu_seconds[row["trial_id"]] = row["wall_time_s"] * gpus
    max_wall = max((r["wall_time_s"] for r in rows if _finite(r.get("wall_time_s"))), default=0) or 1
    max_memory = max((r["peak_memory_mb"] for r in rows if _finite(r.get("peak_memory_mb"))), default=0) or 1
    head = ["trial_id", "status", "wall time (s)", "tokens", "tokens/s"] + (["GPU-seconds"] if gpu_seconds else []) + ["peak memory (MB)"]
    lines = []
    for row in rows:
        wall, tokens, memory = row.get("wall_time_s"), row.get("tokens"), row.get("peak_memory_mb")
        rate = tokens / wall if _finite(tokens) and _finite(wall) and wall > 0 else None
        # (sort value, cell HTML) per column
        cells = [(row["trial_id"], html.escape(row["trial_id"])), (row["status"], html.escape(_short_status(row["status"]))),
                 (wall, _bar(wall, max_wall)), (tokens, html.escape(_short(tokens))), (rate, html.escape(_short(rate)))]
        if gpu_seconds:
            cells.append((gpu_seconds.get(row["trial_id"]), html.escape(_short(gpu_seconds.get(row["trial_id"])))))
        cells.append((memory, _bar(memory, max_memory)))
        lines.append(f'<tr{_attrs(data_trial=row["trial_id"])}>' + "".join(
            f'<td data-v="{html.escape(_sort_value(value))}">{content}</td>' for value, content in cells) + "</tr>")
    total_wall = sum(r["wall_time_s"] for r in rows if _finite(r.get("wall_time_s")))
    total_tokens = sum(r["tokens"] for r in rows if _finite(r.get("tokens")))
    totals = [f"{total_wall:,.1f}", f"{total_tokens:,}", ""] + ([f"{sum(gpu_seconds.values()):,.1f}"] if gpu_seconds else []) + [""]
    foot = "<tr><th>all trials</th><th></th>" + "".join(f"<th>{t}</th>" for t in totals) + "</tr>"
    if gpu_seconds:
        explanation = (f"GPU-seconds: wall time × resources.gpus_per_trial ({gpus:g}) unless a trial recorded its own.")
    else:
        explanation = (f"GPU-seconds were not recorded (resources.gpus_per_trial={_short(gpus) or 'unknown'}: none, or "
                       f"one per trial only when the cluster had GPUs); wall time is the cost measure here.")
    return ('<div class="scroll"><table id="cost" class="sortable"><thead><tr>'
            + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + f'</tr></thead><tbody>{"".join(lines)}</tbody><tfoot>{foot}</tfoot></table></div>'
            f'<p class="hint">{html.escape(explanation)} Peak memory is CUDA memory on a GPU, the process\'s '
            f'resident memory on CPU. The evaluation stage and the merge are not included.</p>')


def _bar(value, maximum: float) -> str:
    if not _finite(value):
        return ""
    return (f'<span class="bar"><span style="width:{100 * value / maximum:.1f}%"></span></span>'
            f'<span class="num">{html.escape(_short(value))}</span>')


def _merge_html(exp: Experiment) -> str:
    check = exp.merge_check
    if check is None:
        return _note("No merge_check.json: the merge did not run (eval.merge=false, the sweep was interrupted or every "
                     "trial failed) or it failed; the driver's output says which.")
    passed = check.get("passed")
    verdict = (f'<p><span class="badge {"completed" if passed else "failed"}">{"passed" if passed else "FAILED"}</span> '
               f'the merged bf16 model answers as the adapter does, within the tolerance.</p>')
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_short(v))}</td></tr>" for k, v in check.items())
    return f'{verdict}<table id="merge-check" class="kv">{rows}</table>'


def _config_html(exp: Experiment) -> str:
    parts = []
    if exp.config_text is None:
        parts.append(_note("No config.yaml in the experiment directory."))
    else:
        parts.append(f"<h3>config.yaml</h3><pre>{html.escape(exp.config_text)}</pre>")
    if exp.search_space:
        parts.append(f"<h3>search_space.json</h3><pre>{html.escape(json.dumps(exp.search_space, indent=2))}</pre>")
    versions = {"python": platform.python_version(), **_library_versions()}
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in versions.items())
    parts.append(f'<h3>Library versions</h3><table id="versions" class="kv">{rows}</table>'
                 f'<p class="hint">Of the Python environment that wrote this report, which may differ from the '
                 f'one that ran the sweep.</p>')
    return "".join(parts)


def _summary_html(exp: Experiment) -> str:
    trials = _trial_rows(exp)
    counts: dict[str, int] = {}
    for row in trials:
        counts[_status_class(row["status"])] = counts.get(_status_class(row["status"]), 0) + 1
    pieces = [f"{len(trials)} trials"] + [f"{n} {name}" for name, n in counts.items()]
    lines = [f"<p>{html.escape(', '.join(pieces))}.</p>"]
    winner = next((r for r in trials if r.get("winner")), None)
    base = next((r for r in exp.rows if r["trial_id"] == BASE_ROW_ID), None)
    if winner:
        params = ", ".join(f"{n}={_short(winner.get(n))}" for n in exp.param_names)
        text = (f"Winner: {winner['trial_id']} ({params}): exact match {_cell_text('exact_match', winner.get('exact_match'))}, "
                f"held-out loss {_short(winner.get('heldout_loss'))}")
        if base:
            text += (f"; base model: exact match {_cell_text('exact_match', base.get('exact_match'))}, "
                     f"held-out loss {_short(base.get('heldout_loss'))}")
        lines.append(f'<p class="winner-line">★ {html.escape(text)}.</p>')
    else:
        lines.append(_note("No winner: the evaluation stage has not picked one."))
    return "".join(lines)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#fafafa}
header{background:#24323f;color:#fff;padding:14px 28px}header h1{margin:0;font-size:20px}header p{margin:4px 0 0;color:#c8d3dd}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:6px 28px;z-index:2}
nav a{margin-right:14px;color:#24539a;text-decoration:none}
main{padding:4px 28px 40px;max-width:1500px}section{margin-top:22px}
h2{font-size:17px;border-bottom:2px solid #24323f;padding-bottom:3px}h3{font-size:15px;margin:18px 0 6px}h4{margin:4px 0;font-size:13px}
table{border-collapse:collapse;background:#fff}th,td{border:1px solid #ddd;padding:4px 7px;text-align:left;vertical-align:top}
thead th{background:#eef1f4;position:relative}table.sortable thead th{cursor:pointer;user-select:none}
th[data-dir=asc]::after{content:" ▲"}th[data-dir=desc]::after{content:" ▼"}
td.num,.num{text-align:right;font-variant-numeric:tabular-nums}
tr.winner td{background:#fff8dc}tr.row-base td{background:#f1f1f1;font-style:italic}tr.hl td{background:#e3f0ff}
.scroll{overflow-x:auto}.swatch,.chip i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;color:#fff;background:#888}
.badge.completed{background:#2e7d32}.badge.stopped{background:#b26a00}.badge.failed{background:#c0392b}
.badge.unfinished{background:#1f6fb2}.reason{white-space:normal;max-width:380px;color:#a33;font-size:12px}
#leaderboard td,#cost td{white-space:nowrap}
.note{color:#555;font-style:italic}.warn{background:#fff3cd;border:1px solid #e0c36a;padding:6px 10px}
.hint{color:#666;font-size:12px;max-width:1000px}
svg.plot{background:#fff;border:1px solid #ddd;display:block;margin:4px 0}
svg .grid{stroke:#eee}svg .axis{stroke:#444;fill:none}svg .tick{font-size:11px;fill:#555}
svg .axis-label{font-size:12px;fill:#222;text-anchor:middle}svg .curve{fill:none;stroke-width:2}
svg .stop-mark{stroke-width:2.5;fill:none}svg .pc-line{fill:none;stroke-width:2;opacity:.85}
svg .base-line{stroke:#555;stroke-dasharray:5 4}svg circle{stroke:#fff;stroke-width:1}
.focus svg [data-trial]:not(.hl){opacity:.12}
.legend{margin:4px 0}.chip{display:inline-block;margin:2px 10px 2px 0;cursor:default}.chip small{color:#777}
.grid{display:flex;flex-wrap:wrap;gap:10px}.pair{background:#fff;border:1px solid #e4e4e4;padding:6px}
.imp{display:flex;align-items:center;gap:8px;margin:3px 0}.imp-name{width:200px}
.imp-bar,.bar{display:inline-block;background:#eef1f4;height:10px;vertical-align:middle}.imp-bar{width:320px}.bar{width:120px;margin-right:6px}
.imp-bar span,.bar span{display:block;height:100%;background:#4e79a7}
td.gen,span.gen{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
td.ok b{color:#2e7d32}td.bad b{color:#c0392b}#generations td{max-width:360px}
pre{background:#fff;border:1px solid #ddd;padding:10px;overflow:auto;max-height:480px;font-size:12px}
table.kv th{background:#eef1f4;font-weight:normal}
"""

# The error hook comes first, in <head>, so that it also sees errors in the main script.
_ERROR_HOOK = """
window.addEventListener('error', function (event) {
  // Recorded on <html data-js-errors> for headless checks of the page (tests/test_report.py).
  var data = document.documentElement.dataset;
  data.jsErrors = (data.jsErrors || '') + event.message + '\\n';
});
"""

_SCRIPT = """
function compareCells(a, b, ascending) {
  if (a === '' || b === '') return (a === '') - (b === '');  // empty cells last in both directions
  var x = Number(a), y = Number(b);
  var order = (!isNaN(x) && !isNaN(y)) ? x - y : a.localeCompare(b);
  return ascending ? order : -order;
}
function sortTable(th) {
  var table = th.closest('table'), body = table.tBodies[0], column = th.cellIndex;
  var ascending = th.dataset.dir !== 'asc';
  table.querySelectorAll('thead th').forEach(function (h) { delete h.dataset.dir; });
  th.dataset.dir = ascending ? 'asc' : 'desc';
  var key = function (row) { var cell = row.cells[column]; return cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent; };
  Array.from(body.rows).sort(function (a, b) { return compareCells(key(a), key(b), ascending); })
    .forEach(function (row) { body.appendChild(row); });
}
document.querySelectorAll('table.sortable thead th').forEach(function (th) {
  th.addEventListener('click', function () { sortTable(th); });
});
// Hovering a trial anywhere (plot, legend, table row) highlights it everywhere and dims the other trials' marks.
var focused = null;
document.addEventListener('mouseover', function (event) {
  var element = event.target.closest ? event.target.closest('[data-trial]') : null;
  var trial = element ? element.dataset.trial : null;
  if (trial === focused) return;
  focused = trial;
  document.querySelectorAll('.hl').forEach(function (e) { e.classList.remove('hl'); });
  document.body.classList.toggle('focus', trial !== null);
  if (trial !== null) {
    document.querySelectorAll('[data-trial="' + CSS.escape(trial) + '"]').forEach(function (e) { e.classList.add('hl'); });
  }
});
document.documentElement.dataset.jsReady = 'true';  // the script ran to its end (checked headlessly)
"""


def render_report(exp: Experiment) -> str:
    """The whole page as one HTML string."""
    colors = {row["trial_id"]: PALETTE[i % len(PALETTE)] for i, row in enumerate(_trial_rows(exp))}
    if exp.curves is None:
        curves = _note("No tune/ directory (not copied, or the sweep never started): no eval-loss curves.")
    else:
        curves = _loss_curves_svg(exp, colors)
    sections = [
        ("summary", "Summary", _summary_html(exp)),
        ("leaderboard", "Leaderboard", _leaderboard_html(exp, colors)),
        ("curves", "Eval-loss curves", curves),
        ("hyperparameters", "Hyperparameters", _hyperparameters_html(exp, colors)),
        ("generations", "Held-out generations", _generations_html(exp)),
        ("cost", "Cost per trial", _cost_html(exp)),
        ("merge", "Merge check", _merge_html(exp)),
        ("config", "Config and versions", _config_html(exp)),
    ]
    nav = "".join(f'<a href="#{key}">{html.escape(title)}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{html.escape(title)}</h2>{content}</section>' for key, title, content in sections)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(exp.title)}</title><style>{_CSS}</style><script>{_ERROR_HOOK}</script></head>"
            f"<body><header><h1>{html.escape(exp.title)}</h1><p>experiment directory {html.escape(exp.name)} · "
            f"report written {generated}</p></header><nav>{nav}</nav><main>{body}</main>"
            f"<script>{_SCRIPT}</script></body></html>\n")
