"""The leaderboard: one row per trial plus the base model, written as Markdown, CSV and JSON."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from eval.artifacts import write_json_atomically, write_text_atomically
from eval.outcomes import BASE_ROW_ID, BASE_STATUS, leaderboard_key

METRIC_COLUMNS = ["best_eval_loss", "heldout_loss", "exact_match", "steps", "tokens", "wall_time_s", "startup_s",
                  "peak_memory_mb"]


def build_rows(trials: list[dict], eval_results: dict[str, dict], param_names: list[str], winner: str | None,
               select_by: str) -> list[dict]:
    """Rank: evaluated trials by the selection rule, then the rest by eval loss; the base row last."""
    rows = []
    for trial in trials:
        scored = eval_results.get(trial["trial_id"], {})
        rows.append({
            "trial_id": trial["trial_id"],
            **{name: trial["params"].get(name) for name in param_names},
            "status": trial["status"],
            "best_eval_loss": trial.get("best_eval_loss"),
            "heldout_loss": scored.get("heldout_loss"),
            "exact_match": scored.get("exact_match"),
            "steps": trial.get("steps"),
            "tokens": trial.get("tokens"),
            "wall_time_s": trial.get("wall_time_s"),
            "startup_s": trial.get("startup_s"),
            "peak_memory_mb": trial.get("peak_memory_mb"),
            "winner": trial["trial_id"] == winner,
        })
    rows.sort(key=lambda row: leaderboard_key(row, select_by))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    if BASE_ROW_ID in eval_results:
        base = eval_results[BASE_ROW_ID]
        rows.append({"trial_id": BASE_ROW_ID, **{name: None for name in param_names}, "status": BASE_STATUS,
                     "best_eval_loss": None, "heldout_loss": base["heldout_loss"], "exact_match": base["exact_match"],
                     "steps": 0, "tokens": 0, "wall_time_s": None, "startup_s": None, "peak_memory_mb": None, "winner": False, "rank": None})
    return rows


def leaderboard_columns(param_names: list[str]) -> list[str]:
    return ["rank", "trial_id", *param_names, "status", *METRIC_COLUMNS, "winner"]


def write_leaderboard(rows: list[dict], param_names: list[str], experiment_dir: Path, title: str) -> dict[str, Path]:
    """leaderboard.{md,csv,json} in the experiment directory, each written to a temp file and renamed."""
    columns = leaderboard_columns(param_names)
    paths = {ext: experiment_dir / f"leaderboard.{ext}" for ext in ("md", "csv", "json")}
    write_json_atomically(paths["json"], {"title": title, "columns": columns, "rows": rows})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    write_text_atomically(paths["csv"], buffer.getvalue())
    write_text_atomically(paths["md"], render_markdown(rows, columns, title))
    return paths


def render_markdown(rows: list[dict], columns: list[str], title: str) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    lines += ["", "exact_match and heldout_loss are measured on held-out test prompts that no trial trained or was "
              "scheduled on; best_eval_loss is the validation loss ASHA saw. `base` is the model without an adapter."]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "**yes**" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")
