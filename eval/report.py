"""The report page: one self-contained HTML file of an experiment directory, finished or interrupted, with the
leaderboard, eval-loss curves, hyperparameter views, held-out generations, cost per trial, the merge check, the
resolved config and library versions. The data comes from eval/report_data.py, the SVG from eval/report_plots.py,
and the CSS and JS from eval/report_assets/, inlined so that the page opens offline from any copy."""

from __future__ import annotations

import colorsys
import html
import json
import math
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from eval.artifacts import write_text_atomically
from eval.leaderboard import SCORE_COLUMNS, format_cell, library_versions
from eval.outcomes import BASE_ROW_ID, short_status, status_kind
from eval.report_data import (Experiment, finite, is_number, load_experiment,
                              param_importances, searched_params, trial_rows)
from eval.report_plots import attrs, loss_curves_svg, note, parallel_svg, scatter_svg, short

REPORT_NAME = "report.html"
# Tableau 10: distinct on screen and in print; trial i keeps colour i in every plot.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]
# Held-out targets that repeat this often on average make classification data: accuracy per label is shown.
MIN_PROMPTS_PER_LABEL = 2


def trial_colors(trial_ids: list[str]) -> dict[str, str]:
    """A distinct colour per trial: Tableau 10 for the first ten, then hues a golden angle apart at alternating
    lightness, so that no two trials share a colour however many there are."""
    colors = {}
    for i, trial_id in enumerate(trial_ids):
        if i < len(PALETTE):
            colors[trial_id] = PALETTE[i]
            continue
        k = i - len(PALETTE)
        hue = (k * 0.381966) % 1.0
        red, green, blue = colorsys.hls_to_rgb(hue, (0.35, 0.5, 0.65)[k % 3], 0.65)
        colors[trial_id] = f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"
    return colors


def write_report(experiment_dir: Path) -> Path:
    """Write <experiment_dir>/report.html (to a temp file, then renamed) and return its path."""
    experiment_dir = Path(experiment_dir)
    target = experiment_dir / REPORT_NAME
    write_text_atomically(target, render_report(load_experiment(experiment_dir)))
    return target


def _asset(name: str) -> str:
    return (resources.files("eval") / "report_assets" / name).read_text(encoding="utf-8")


def _cell_text(column: str, value) -> str:
    if column in SCORE_COLUMNS and finite(value):
        return format_cell(column, value)  # the leaderboard files' unit and decimals
    if column == "winner":
        return "★" if value else ""
    return short(value)




def _sort_value(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if is_number(value):
        return repr(value) if math.isfinite(value) else ""
    return "" if value is None else str(value)


def _leaderboard_html(exp: Experiment, colors: dict[str, str]) -> str:
    columns = exp.columns
    head = "".join(f'<th title="sort by {html.escape(c)}">{html.escape(c)}</th>' for c in columns)
    body = []
    for row in exp.rows:
        status_class = status_kind(str(row.get("status", "")))
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
                numeric = " class=num" if is_number(value) else ""
                cells.append(f'<td{numeric} data-v="{html.escape(_sort_value(value))}">{html.escape(_cell_text(column, value))}</td>')
        winner = " winner" if row.get("winner") else ""
        body.append(f'<tr{attrs(class_=f"row-{status_class}{winner}", data_trial=row["trial_id"])}>{"".join(cells)}</tr>')
    source = ("" if exp.from_leaderboard else
              note("No leaderboard.json: the sweep was interrupted or is still running. These rows come from "
                    "tune/*/result.json alone; held-out exact match and loss are not measured yet.", css="warn"))
    return (f'{source}<div class="scroll"><table id="leaderboard" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>'
            f'<p class="hint">Click a column header to sort (again to reverse); empty cells stay last. '
            f'best_eval_loss is the validation loss ASHA saw; exact_match and heldout_loss are measured on held-out '
            f'test prompts for the top-k trials and the base model only.</p>')


def _hyperparameters_html(exp: Experiment, colors: dict[str, str]) -> str:
    names = searched_params(exp)
    constants = [n for n in exp.param_names if n not in names]
    parts = []
    if constants:
        parts.append(note("Not varied in this sweep: " + ", ".join(constants) + "."))
    if not names:
        return "".join(parts) + note("No searched parameter varies: nothing to plot.")
    parts.append("<h3>Metrics against each parameter</h3>")
    metrics = [m for m in ("exact_match", "best_eval_loss") if any(finite(r.get(m)) for r in trial_rows(exp))]
    if metrics:
        parts.append('<div class="grid">')
        for name in names:
            plots = "".join(scatter_svg(exp, name, metric, colors) for metric in metrics)
            parts.append(f'<div class="pair"><h4>{html.escape(name)}</h4>{plots}</div>')
        parts.append("</div>")
    else:
        parts.append(note("No trial has an eval loss or exact match yet."))
    parts.append('<h3>Parallel coordinates</h3><p class="hint">One line per trial; colour: best eval loss '
                 '(green lowest, red highest, grey none); dashed: not completed.</p><div class="scroll">')
    parts.append(parallel_svg(exp, names) + "</div>")
    parts.append("<h3>Parameter importance</h3>")
    importances, explanation = param_importances(exp)
    if importances is None:
        parts.append(note(explanation))
    else:
        bars = "".join(f'<div class="imp"><span class="imp-name">{html.escape(name)}</span><span class="imp-bar">'
                       f'<span style="width:{100 * share:.1f}%"></span></span><span class="num">{share:.3f}</span></div>'
                       for name, share in importances.items())
        parts.append(f'<div id="importance">{bars}</div><p class="hint">{html.escape(explanation)}</p>')
    return "".join(parts)


def _generations_html(exp: Experiment) -> str:
    if exp.generations is None:
        return note("No eval/ directory: the evaluation stage has not run (the sweep was interrupted, or every trial failed).")
    ranked = [r["trial_id"] for r in sorted(trial_rows(exp), key=lambda r: r.get("rank") or math.inf)
              if r["trial_id"] in exp.generations]
    winner = next((r["trial_id"] for r in trial_rows(exp) if r.get("winner")), None)
    winner = winner if winner in exp.generations else (ranked[0] if ranked else None)
    runner_up = next((t for t in ranked if t != winner), None)
    shown = [(label, key) for label, key in (("base model", BASE_ROW_ID), ("winner", winner), ("runner-up", runner_up))
             if key is not None and key in exp.generations]
    if not shown:
        return note("eval/ holds no generations files.")
    head = "".join(f"<th>{html.escape(label)}<br><small>{html.escape(key)} · {_exact_match_summary(exp.generations[key])}"
                   f"</small></th>" for label, key in shown)
    judged = winner or shown[0][1]  # the filter shows the prompts this model got wrong
    count = max(len(exp.generations[key]) for _, key in shown)
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
        judged_lines = exp.generations[judged]
        error = index >= len(judged_lines) or not judged_lines[index].get("exact_match")
        lines.append(f'<tr{attrs(data_error="1" if error else "0")}><td class="num">{index + 1}</td>'
                     f'<td class="gen">{html.escape(str(reference.get("prompt", "")))}</td>'
                     f'<td class="gen">{html.escape(str(reference.get("target", "")))}</td>{"".join(cells)}</tr>')
    errors = sum('data-error="1"' in line for line in lines)
    missing = "" if winner else note("No evaluated trial has generations: only the base model is shown.")
    toggle = (f'<label class="filter"><input type="checkbox" id="errors-only" data-table="generations-table"> errors only: '
              f'the {errors} of {count} prompts the {"winner" if winner else "base model"} ({html.escape(judged)}) '
              f'did not answer exactly</label>')
    return (f'{missing}{toggle}<div class="scroll tall"><table id="generations-table"><thead><tr><th>#</th><th>prompt</th>'
            f'<th>target</th>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table></div>'
            f'<p class="hint">All {count} held-out prompts; ✓ exact match after the sweep\'s normalization.</p>'
            + _per_label_html(exp, shown))


def _per_label_html(exp: Experiment, shown: list[tuple[str, str]]) -> str:
    """Exact match per target label, for classification data (targets that repeat): which labels a model misses."""
    first = exp.generations[shown[0][1]]
    labels = sorted({str(g.get("target", "")).strip() for g in first})
    if not first or len(first) < MIN_PROMPTS_PER_LABEL * len(labels):
        return ""  # free-text targets: a label per prompt says nothing
    head = "".join(f"<th>{html.escape(label)} <small>{html.escape(key)}</small></th>" for label, key in shown)
    body = []
    for label in labels:
        cells = []
        for _, key in shown:
            entries = [g for g in exp.generations[key] if str(g.get("target", "")).strip() == label]
            hits = sum(bool(g.get("exact_match")) for g in entries)
            share = hits / len(entries) if entries else None
            cells.append(f'<td class="num" data-v="{"" if share is None else f"{share:.6f}"}">'
                         f'{"" if share is None else f"{share:.3f}"} <small>({hits}/{len(entries)})</small></td>')
        count = sum(str(g.get("target", "")).strip() == label for g in first)
        body.append(f'<tr><td data-v="{html.escape(label)}">{html.escape(label)}</td><td class="num" data-v="{count}">'
                    f'{count}</td>{"".join(cells)}</tr>')
    return (f'<h3>Exact match per label</h3><div class="scroll"><table id="per-label" class="sortable"><thead><tr>'
            f'<th>label</th><th>prompts</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
            f'<p class="hint">Shown because the {len(first)} held-out targets take {len(labels)} values (classification '
            f'data: at least {MIN_PROMPTS_PER_LABEL} prompts per label on average). Click a header to sort.</p>')


def _exact_match_summary(entries: list[dict]) -> str:
    hits = sum(bool(e.get("exact_match")) for e in entries)
    return f"{hits}/{len(entries)} exact" if entries else "no prompts"


def _cost_html(exp: Experiment) -> str:
    rows = trial_rows(exp)
    if not rows:
        return note("No trials.")
    gpus = exp.gpus_per_trial  # the share the trials got (plan.json), not the config's -1 for "auto"
    gpu_seconds = {}
    for row in rows:
        if finite(row.get("gpu_seconds")):
            gpu_seconds[row["trial_id"]] = row["gpu_seconds"]
        elif finite(row.get("wall_time_s")) and is_number(gpus) and gpus > 0:
            gpu_seconds[row["trial_id"]] = row["wall_time_s"] * gpus
    max_wall = max((r["wall_time_s"] for r in rows if finite(r.get("wall_time_s"))), default=0) or 1
    max_memory = max((r["peak_memory_mib"] for r in rows if finite(r.get("peak_memory_mib"))), default=0) or 1
    head = ["trial_id", "status", "wall time (s)", "tokens", "tokens/s"] + (["GPU-seconds"] if gpu_seconds else []) + ["peak memory (MiB)"]
    lines = []
    for row in rows:
        wall, tokens, memory = row.get("wall_time_s"), row.get("tokens"), row.get("peak_memory_mib")
        rate = tokens / wall if finite(tokens) and finite(wall) and wall > 0 else None
        # (sort value, cell HTML) per column
        cells = [(row["trial_id"], html.escape(row["trial_id"])), (row["status"], html.escape(short_status(row["status"]))),
                 (wall, _bar(wall, max_wall)), (tokens, html.escape(short(tokens))), (rate, html.escape(short(rate)))]
        if gpu_seconds:
            cells.append((gpu_seconds.get(row["trial_id"]), html.escape(short(gpu_seconds.get(row["trial_id"])))))
        cells.append((memory, _bar(memory, max_memory)))
        lines.append(f'<tr{attrs(data_trial=row["trial_id"])}>' + "".join(
            f'<td data-v="{html.escape(_sort_value(value))}">{content}</td>' for value, content in cells) + "</tr>")
    total_wall = sum(r["wall_time_s"] for r in rows if finite(r.get("wall_time_s")))
    total_tokens = sum(r["tokens"] for r in rows if finite(r.get("tokens")))
    totals = [f"{total_wall:,.1f}", f"{total_tokens:,}", ""] + ([f"{sum(gpu_seconds.values()):,.1f}"] if gpu_seconds else []) + [""]
    foot = "<tr><th>all trials</th><th></th>" + "".join(f"<th>{t}</th>" for t in totals) + "</tr>"
    if gpu_seconds:
        explanation = (f"GPU-seconds: wall time × the GPU share each trial got ({gpus:g}, from plan.json) unless a "
                       f"trial recorded its own.")
    else:
        explanation = (f"GPU-seconds were not recorded (GPU share per trial: {short(gpus) or 'unknown'}; none when "
                       f"the trials ran on CPUs); wall time is the cost measure here.")
    return ('<div class="scroll"><table id="cost" class="sortable"><thead><tr>'
            + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + f'</tr></thead><tbody>{"".join(lines)}</tbody><tfoot>{foot}</tfoot></table></div>'
            f'<p class="hint">{html.escape(explanation)} Peak memory is CUDA memory on a GPU, the process\'s '
            f'resident memory on CPU. The evaluation stage and the merge are not included.</p>')


def _bar(value, maximum: float) -> str:
    if not finite(value):
        return ""
    return (f'<span class="bar"><span style="width:{100 * value / maximum:.1f}%"></span></span>'
            f'<span class="num">{html.escape(short(value))}</span>')


def _merge_html(exp: Experiment) -> str:
    check = exp.merge_check
    if check is None:
        return note("No merge_check.json: the merge did not run (eval.merge=false, the sweep was interrupted or every "
                     "trial failed) or it failed; the driver's output says which.")
    passed = check.get("passed")
    verdict = (f'<p><span class="badge {"completed" if passed else "failed"}">{"passed" if passed else "FAILED"}</span> '
               f'the merged bf16 model answers as the adapter does, within the tolerance.</p>')
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(short(v))}</td></tr>" for k, v in check.items())
    return f'{verdict}<table id="merge-check" class="kv">{rows}</table>'


def _config_html(exp: Experiment) -> str:
    parts = []
    if exp.config_text is None:
        parts.append(note("No config.yaml in the experiment directory."))
    else:
        parts.append(f"<h3>config.yaml</h3><pre>{html.escape(exp.config_text)}</pre>")
    if exp.search_space:
        parts.append(f"<h3>search_space.json</h3><pre>{html.escape(json.dumps(exp.search_space, indent=2))}</pre>")
    metadata = exp.metadata or {}
    versions = metadata.get("versions") or library_versions()
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in versions.items())
    where = (f"Of the run that wrote leaderboard.json ({metadata.get('written_utc')}; config.yaml SHA-256 "
             f"{metadata.get('config_sha256')})." if exp.metadata else
             "Of the Python environment that wrote this report (there is no leaderboard.json with the run's own).")
    parts.append(f'<h3>Library versions</h3><table id="versions" class="kv">{rows}</table>'
                 f'<p class="hint">{html.escape(where)}</p>')
    return "".join(parts)


def _summary_html(exp: Experiment) -> str:
    trials = trial_rows(exp)
    counts: dict[str, int] = {}
    for row in trials:
        counts[status_kind(row["status"])] = counts.get(status_kind(row["status"]), 0) + 1
    pieces = [f"{len(trials)} trials"] + [f"{n} {name}" for name, n in counts.items()]
    lines = [f"<p>{html.escape(', '.join(pieces))}.</p>"]
    winner = next((r for r in trials if r.get("winner")), None)
    base = next((r for r in exp.rows if r["trial_id"] == BASE_ROW_ID), None)
    if winner:
        params = ", ".join(f"{n}={short(winner.get(n))}" for n in exp.param_names)
        text = (f"Winner: {winner['trial_id']} ({params}): exact match {_cell_text('exact_match', winner.get('exact_match'))}"
                f"{_interval(winner)}, "
                f"held-out loss {short(winner.get('heldout_loss'))}")
        if base:
            text += (f"; base model: exact match {_cell_text('exact_match', base.get('exact_match'))}{_interval(base)}, "
                     f"held-out loss {short(base.get('heldout_loss'))}")
        lines.append(f'<p class="winner-line">★ {html.escape(text)}.</p>')
        for sentence in exp.selection_notes:  # eval/outcomes.py's words: the tie test and any warning
            css = "warn loud" if sentence.startswith("WARNING") else "hint"
            lines.append(f'<p class="{css}">{html.escape(sentence)}</p>')
    else:
        lines.append(note("No winner: the evaluation stage has not picked one."))
    return "".join(lines)


def _interval(row: dict) -> str:
    low, high = row.get("exact_match_ci_low"), row.get("exact_match_ci_high")
    return f" (95% CI {low:.3f}-{high:.3f})" if finite(low) and finite(high) else ""


def render_report(exp: Experiment) -> str:
    """The whole page as one HTML string."""
    colors = trial_colors([row["trial_id"] for row in trial_rows(exp)])
    if exp.curves is None:
        curves = note("No tune/ directory (not copied, or the sweep never started): no eval-loss curves.")
    else:
        curves = loss_curves_svg(exp, colors)
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
            f"<title>{html.escape(exp.title)}</title><style>\n{_asset('report.css')}</style><script>\n{_asset('error_hook.js')}</script></head>"
            f"<body><header><h1>{html.escape(exp.title)}</h1><p>experiment directory {html.escape(exp.name)} · "
            f"report written {generated}</p></header><nav>{nav}</nav><main>{body}</main>"
            f"<script>\n{_asset('report.js')}</script></body></html>\n")
