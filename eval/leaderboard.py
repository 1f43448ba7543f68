"""The leaderboard: one row per trial plus the base model, written as Markdown, CSV and JSON (the JSON also holds
the selection, eval/outcomes.py's, and the run's metadata)."""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import io
import platform
from datetime import datetime, timezone
from pathlib import Path

from eval.artifacts import CONFIG_FILE, write_json_atomically, write_text_atomically
from eval.outcomes import BASE_ROW_ID, BASE_STATUS, describe_selection, leaderboard_key

# Task scores, all fractions in [0, 1] (exact match, its 95% Wilson interval, ROUGE-L F1, chrF / 100), shown with
# three decimals everywhere: the leaderboard, the console and the report.
SCORE_COLUMNS = ["exact_match", "exact_match_ci_low", "exact_match_ci_high", "rouge_l", "chrf"]
METRIC_COLUMNS = ["best_eval_loss", "heldout_loss", *SCORE_COLUMNS, "heldout_prompts", "steps", "tokens",
                  "wall_time_s", "startup_s", "peak_memory_mib"]
LIBRARIES = ("torch", "transformers", "peft", "trl", "ray", "optuna", "evaluate")


def build_rows(trials: list[dict], eval_results: dict[str, dict], param_names: list[str], selection: dict | None,
               select_by: str, experiment_dir: Path | None = None) -> list[dict]:
    """Rank: the winner, the other evaluated trials by the selection rule, then the rest by eval loss; the base row
    last. `selection` is eval.outcomes.select_winner's answer (None before the evaluation stage); adapter paths
    are relative to `experiment_dir` when they lie inside it, so that a copied experiment still finds them."""
    selection = selection or {}
    tied = set(selection.get("tied") or [])
    rows = []
    for trial in trials:
        trial_id = trial["trial_id"]
        scored = eval_results.get(trial_id)
        rows.append({
            "trial_id": trial_id,
            **{name: trial["params"].get(name) for name in param_names},
            "status": trial["status"],
            "best_eval_loss": trial.get("best_eval_loss"),
            **_scores(scored),
            "steps": trial.get("steps"),
            "tokens": trial.get("tokens"),
            "wall_time_s": trial.get("wall_time_s"),
            "startup_s": trial.get("startup_s"),
            "peak_memory_mib": trial.get("peak_memory_mib"),
            "tied_with_winner": (trial_id in tied) if scored else None,
            "winner": trial_id == selection.get("winner"),
            "adapter_path": _relative(trial.get("checkpoint_dir"), experiment_dir),
        })
    rows.sort(key=lambda row: leaderboard_key(row, select_by))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    if BASE_ROW_ID in eval_results:
        rows.append({"trial_id": BASE_ROW_ID, **{name: None for name in param_names}, "status": BASE_STATUS,
                     "best_eval_loss": None, **_scores(eval_results[BASE_ROW_ID]), "steps": 0, "tokens": 0,
                     "wall_time_s": None, "startup_s": None, "peak_memory_mib": None, "tied_with_winner": None,
                     "winner": False, "adapter_path": None, "rank": None})
    return rows


def _scores(scored: dict | None) -> dict:
    """A model's held-out figures as leaderboard columns (None for a trial the evaluation stage did not score)."""
    scored = scored or {}
    interval = scored.get("exact_match_ci") or (None, None)
    return {"heldout_loss": scored.get("heldout_loss"), "exact_match": scored.get("exact_match"),
            "exact_match_ci_low": interval[0], "exact_match_ci_high": interval[1], "rouge_l": scored.get("rouge_l"),
            "chrf": scored.get("chrf"), "heldout_prompts": scored.get("n")}


def _relative(path: str | None, root: Path | None) -> str | None:
    if path is None or root is None:
        return path
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return path


def leaderboard_columns(param_names: list[str]) -> list[str]:
    """The column order of every leaderboard file and of the report's table."""
    return ["rank", "trial_id", *param_names, "status", *METRIC_COLUMNS, "tied_with_winner", "winner", "adapter_path"]


def library_versions() -> dict[str, str]:
    """Python's and the main libraries' versions in this environment."""
    versions = {"python": platform.python_version()}
    for name in ("lorasweep", *LIBRARIES):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_metadata(experiment_dir: Path) -> dict:
    """What a leaderboard was made with: versions, the date, and the SHA-256 of the saved config.yaml (two
    leaderboards with the same hash come from the same resolved config)."""
    config = Path(experiment_dir) / CONFIG_FILE
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
    return {"written_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config_sha256": digest,
            "versions": library_versions()}


def write_leaderboard(rows: list[dict], param_names: list[str], experiment_dir: Path, title: str,
                      selection: dict | None = None, eval_results: dict | None = None) -> dict[str, Path]:
    """leaderboard.{md,csv,json} in the experiment directory, each written to a temp file and renamed."""
    columns = leaderboard_columns(param_names)
    paths = {ext: experiment_dir / f"leaderboard.{ext}" for ext in ("md", "csv", "json")}
    notes = describe_selection(selection, eval_results or {}) if selection else []
    write_json_atomically(paths["json"], {"title": title, "columns": columns, "rows": rows, "selection": selection,
                                          "selection_notes": notes, "metadata": run_metadata(experiment_dir)})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    write_text_atomically(paths["csv"], buffer.getvalue())
    write_text_atomically(paths["md"], render_markdown(rows, columns, title, notes))
    return paths


def render_markdown(rows: list[dict], columns: list[str], title: str, notes: list[str] = ()) -> str:
    """The leaderboard as a Markdown page: the selection's sentences (a warning first, in bold), then the table."""
    lines = [f"# {title}", ""]
    for note in notes:
        lines += [f"**{note}**" if note.startswith("WARNING") else note, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(c, row.get(c)) for c in columns) + " |")
    prompts = next((r["heldout_prompts"] for r in rows if r.get("heldout_prompts")), None)
    lines += ["", f"exact_match, rouge_l, chrf and heldout_loss are measured on {prompts or 'the'} held-out test "
              "prompts that no trial trained or was scheduled on; task scores are fractions in [0, 1], "
              "exact_match_ci_low/high its 95% Wilson interval; best_eval_loss is the validation loss ASHA saw. "
              "`base` is the model without an adapter."]
    return "\n".join(lines) + "\n"


def format_cell(column: str, value) -> str:
    """A leaderboard cell as text: task scores with three decimals, other floats with four significant digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "**yes**" if value else ""
    if column in SCORE_COLUMNS and isinstance(value, (int, float)):
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")
