"""The report's SVG plotting kit, drawn in Python so that the page needs no plotting library and opens offline:
axis scales, frames, the eval-loss curves, the metric-against-parameter scatters and parallel coordinates; plus
the few markup helpers that the plots and the page share."""

from __future__ import annotations

import html
import json
import math

from eval.outcomes import BASE_ROW_ID, short_status, status_kind
from eval.report_data import Experiment, finite, is_number, trial_rows


def attrs(**attributes) -> str:
    """HTML/SVG attributes, escaped; a trailing underscore and underscores in names: class_ -> class, data_trial -> data-trial."""
    return "".join(f' {k.rstrip("_").replace("_", "-")}="{html.escape(str(v))}"' for k, v in attributes.items()
                   if v is not None)


def note(text: str, css: str = "note") -> str:
    return f'<p class="{css}">{html.escape(text)}</p>'


def short(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


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
            return [(self(c), short(c)) for c in self.categories]
        if self.kind == "log":
            values = [m * 10.0**e for e in range(math.floor(self.lo), math.ceil(self.hi) + 1) for m in (1, 2, 5)]
            values = [v for v in values if self.lo - 1e-9 <= math.log10(v) <= self.hi + 1e-9]
            if len(values) < 3:  # less than a decade: every integer multiple
                values = [m * 10.0**e for e in range(math.floor(self.lo), math.ceil(self.hi) + 1) for m in range(1, 10)]
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


def _svg_open(width: int, height: int, svg_id: str, label: str) -> str:
    return f'<svg{attrs(id=svg_id, class_="plot", viewBox=f"0 0 {width} {height}", width=width, height=height, role="img", aria_label=label)}>'


def _text(x: float, y: float, text: str, anchor: str = "middle", css: str = "tick", rotate: bool = False) -> str:
    transform = f"rotate(-90 {x:.1f} {y:.1f})" if rotate else None
    return f'<text{attrs(x=f"{x:.1f}", y=f"{y:.1f}", text_anchor=anchor, class_=css, transform=transform)}>{html.escape(text)}</text>'


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


def loss_curves_svg(exp: Experiment, colors: dict[str, str]) -> str:
    """Eval loss against step for every trial on one plot, the loss on a log axis (contenders that differ near 0 stay
    apart); a cross where a trial stopped early or failed."""
    series = {}
    for row in trial_rows(exp):
        points = [(r["step"], r["eval_loss"]) for r in (exp.curves or {}).get(row["trial_id"], [])
                  if finite(r.get("step")) and finite(r.get("eval_loss"))]
        if points:
            series[row["trial_id"]] = (row, points)
    if not series:
        return note("No trial reported an evaluation yet: no curves to draw.")
    width, height = 760, 380
    steps = [s for _, points in series.values() for s, _ in points]
    losses = [l for _, points in series.values() for _, l in points]
    xs = _Scale("linear", steps, 64, width - 20, bounds=(0, max(steps) or 1))
    log = all(loss > 0 for loss in losses)  # a cross-entropy is; anything else is drawn as it is
    ys = _Scale("log" if log else "linear", losses, height - 46, 14)
    parts = [_svg_open(width, height, "loss-curves", "eval loss against training step, one line per trial")]
    parts += _frame(xs, ys, "training step", "eval loss (log scale)" if log else "eval loss")
    for trial_id, (row, points) in series.items():
        color = colors[trial_id]
        coords = [(xs(s), ys(l)) for s, l in points]
        d = "M" + "L".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        parts.append(f'<g{attrs(class_="series", data_trial=trial_id)}>')
        parts.append(f'<path class="curve" d="{d}" stroke="{color}"><title>{html.escape(trial_id)}: '
                     f'{html.escape(row["status"])}</title></path>')
        for (x, y), (step, loss) in zip(coords, points):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"><title>'
                         f'{html.escape(trial_id)} step {step}: eval loss {loss:.4g}</title></circle>')
        status_class = status_kind(row["status"])
        if status_class in ("stopped", "failed"):
            x, y = coords[-1]
            stroke = "#c0392b" if status_class == "failed" else color
            parts.append(f'<path class="stop-mark" d="{_cross(x, y, 6)}" stroke="{stroke}"><title>'
                         f'{html.escape(trial_id)}: {html.escape(row["status"])}</title></path>')
        parts.append("</g>")
    parts.append("</svg>")
    legend = "".join(f'<span class="chip"{attrs(data_trial=tid)}><i style="background:{colors[tid]}"></i>'
                     f'{html.escape(tid)} <small>{html.escape(short_status(row["status"]))}</small></span>'
                     for tid, (row, _) in series.items())
    return ("".join(parts) + f'<div class="legend">{legend}</div><p class="hint">One line per trial, a point per '
            f'evaluation; ✕ where ASHA stopped a trial (red: failed). Hover a trial to highlight it in every plot.</p>')


def _param_scale(spec: dict, values: list, start: float, end: float) -> _Scale:
    """Listed values as categories (numbers too), ranges on their own linear or log axis."""
    kind = spec.get("kind")
    if kind == "choice" or not all(is_number(v) for v in values):
        return _Scale("category", values, start, end, categories=spec.get("values"))
    if kind == "log_uniform":
        return _Scale("log", values, start, end, bounds=(spec["min"], spec["max"]))
    if kind in ("uniform", "int_uniform"):
        return _Scale("linear", values, start, end, bounds=(spec["min"], spec["max"]))
    return _Scale("linear", values, start, end)


def scatter_svg(exp: Experiment, name: str, metric: str, colors: dict[str, str]) -> str:
    """One metric against one parameter, a point per trial (jittered within a category), base model as a line."""
    rows = [r for r in trial_rows(exp) if r.get(name) is not None and finite(r.get(metric))]
    if not rows:
        return note(f"No trial with a {name} value has {metric}.")
    width, height = 360, 250
    # The axis spans every trial's value, so that a parameter's plots for both metrics line up.
    tried = [r[name] for r in trial_rows(exp) if r.get(name) is not None]
    xs = _param_scale(exp.search_space.get(name, {}), tried, 64, width - 16)
    if metric == "exact_match":
        ys = _Scale("linear", [], height - 46, 12, bounds=(0.0, 1.0))
    else:
        ys = _Scale("linear", [r[metric] for r in rows], height - 46, 12)
    parts = [_svg_open(width, height, f"scatter-{metric}-{name}", f"{metric} against {name}")]
    parts += _frame(xs, ys, name, metric)
    base = next((r for r in exp.rows if r["trial_id"] == BASE_ROW_ID and finite(r.get(metric))), None)
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
        parts.append(f'<circle{attrs(data_trial=row["trial_id"])} cx="{x:.1f}" cy="{ys(row[metric]):.1f}" r="5" '
                     f'fill="{colors[row["trial_id"]]}"><title>{html.escape(row["trial_id"])}: {html.escape(name)}='
                     f'{html.escape(short(row[name]))}, {metric}={row[metric]:.4g}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def _loss_color(loss, lo: float, hi: float) -> str:
    """Green for the lowest loss through yellow to red for the highest; grey without a loss."""
    if not finite(loss):
        return "#aaaaaa"
    share = (loss - lo) / (hi - lo) if hi > lo else 0.0
    return f"hsl({120 * (1 - share):.0f}, 70%, 40%)"


def parallel_svg(exp: Experiment, names: list[str]) -> str:
    """Parallel coordinates: one axis per searched parameter, then best eval loss and exact match."""
    rows = trial_rows(exp)
    metrics = [m for m in ("best_eval_loss", "exact_match") if any(finite(r.get(m)) for r in rows)]
    axes = names + metrics
    if len(axes) < 2 or not rows:
        return note("Too few axes or trials for parallel coordinates.")
    width, height, top, bottom = max(600, 150 * len(axes)), 340, 34, 300
    xs = [70 + i * (width - 140) / (len(axes) - 1) for i in range(len(axes))]
    scales = {}
    for axis in axes:
        values = [r[axis] for r in rows if (r.get(axis) is not None if axis in names else finite(r.get(axis)))]
        if not values:
            continue
        if axis == "exact_match":
            scales[axis] = _Scale("linear", values, bottom, top, bounds=(0.0, 1.0))
        elif axis in names:
            scales[axis] = _param_scale(exp.search_space.get(axis, {}), values, bottom, top)
        else:
            scales[axis] = _Scale("linear", values, bottom, top)
    losses = [r["best_eval_loss"] for r in rows if finite(r.get("best_eval_loss"))]
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
            present = axis in scales and (value is not None if axis in names else finite(value))
            if present:  # a missing value (e.g. exact match of an unevaluated trial) breaks the line there
                d += f"{'L' if pen_down else 'M'}{x:.1f},{scales[axis](value):.1f}"
            pen_down = present
        if not d:
            continue
        summary = ", ".join(f"{a}={short(row.get(a))}" for a in axes)
        dashed = ' stroke-dasharray="4 3"' if status_kind(row["status"]) != "completed" else ""
        parts.append(f'<path{attrs(data_trial=row["trial_id"])} class="pc-line" d="{d}" '
                     f'stroke="{_loss_color(row.get("best_eval_loss"), lo, hi)}"{dashed}><title>'
                     f'{html.escape(row["trial_id"])} ({html.escape(row["status"])}): {html.escape(summary)}</title></path>')
    parts.append("</svg>")
    return "".join(parts)

