"""Run a QLoRA hyperparameter sweep end to end: trials -> held-out evaluation -> merge -> leaderboard.

    python sweeps/lora_search.py [--config FILE] [key=value ...] [--dry-run] [--smoke-test]
    ray job submit --working-dir . -- python sweeps/lora_search.py [--config FILE] [key=value ...]

Running the same command again after an interruption resumes the sweep in the same experiment directory.
Exit codes: 0 done, 1 every trial failed or the merge failed, 2 bad config or data, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# `python sweeps/lora_search.py` puts sweeps/ on sys.path, not the project root that holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.config import PROJECT_ROOT, ConfigError, check_tracker_packages, load_config  # noqa: E402
from trainables.model_loading import ModelError  # noqa: E402

SMOKE_OVERRIDES = [
    "sweep.run_cap=2", "sweep.max_concurrent_trials=2", "training.max_steps=4", "training.eval_steps=2",
    "training.per_device_train_batch_size=4", "data.num_targets=3", "data.max_train_rows=48",
    "data.max_validation_rows=12", "data.max_test_rows=12", "eval.top_k=1",
    "eval.merge_check_prompts=8",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lora_search", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (sections: model, data, training, sweep, resources, eval, output)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_steps=20 sweep.run_cap=8")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and search space; start nothing")
    parser.add_argument("--smoke-test", action="store_true", help="a tiny study (2 trials, 4 steps, 3 labels)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, parsed = resolve(args)
    except ConfigError as err:
        print(f"lora_search: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(config, parsed)
        return 0
    try:
        return run(config, parsed)
    except (ConfigError, ModelError) as err:
        print(f"lora_search: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lora_search: interrupted; run the same command again to resume from {config.experiment_dir}",
              file=sys.stderr)
        return 130


def resolve(args: argparse.Namespace):
    """Config and search space, fully checked; nothing is started or written."""
    from sweeps.search_space import asha_settings, metric_and_mode, parse_parameters

    overrides = (SMOKE_OVERRIDES if args.smoke_test else []) + list(args.overrides)
    config = load_config(args.config, overrides)
    check_tracker_packages(config)
    parsed = parse_parameters(config.sweep.parameters, config.sweep.method)
    metric_and_mode(config)
    asha_settings(config)
    return config, parsed


def print_plan(config, parsed) -> None:
    import yaml

    from sweeps.search_space import asha_settings

    print(yaml.safe_dump(config.to_dict(), sort_keys=False))
    print("search space:", json.dumps(parsed, indent=2))
    asha = asha_settings(config)
    print(f"ASHA: grace_period={asha['grace_period']} reduction_factor={asha['reduction_factor']} "
          f"max_t={asha['max_t']} evaluations, rungs at evaluations {asha['rungs']}")
    ranks = [v for v in parsed.get("lora_r", {}).get("values", [config.training.lora_r])]
    print(f"vLLM: serve the adapters with --enable-lora --max-lora-rank {max(ranks)}")
    print(f"experiment directory: {config.experiment_dir}")


def run(config, parsed) -> int:
    """Check everything that can be checked without Ray, then start it."""
    import ray

    from sweeps.data import check_and_filter, prepare_splits, read_splits
    from trainables.model_loading import check_target_modules, load_tokenizer, resolve_model_dir

    experiment_dir = config.experiment_dir
    check_output_dir(config.output.dir, experiment_dir)
    check_same_sweep(config, experiment_dir)
    raw, origin = read_splits(config.data)  # file and line errors surface here, before any model work
    raw = check_and_filter(raw, origin, config.data)
    model_dir = resolve_model_dir(config.model.model_name_or_path)
    check_target_modules(model_dir, searched_presets(config, parsed), config.model.trust_remote_code)
    tokenizer = load_tokenizer(model_dir, config.model.trust_remote_code)
    splits = prepare_splits(config.data, raw, tokenizer, log=lambda line: print(line, flush=True))
    print(f"[lorasweep] data: {len(splits['train'])} train, {len(splits['validation'])} validation, "
          f"{len(splits['test'])} held-out test rows, tokenized once for all trials", flush=True)
    from sweeps.tuner import check_optuna_study  # here, after the quick checks: it imports the trial's libraries

    check_optuna_study(config, experiment_dir)

    if not os.environ.get("RAY_ADDRESS") and str(PROJECT_ROOT) not in os.environ.get("PYTHONPATH", ""):
        # A local Ray instance started here: its workers inherit this environment and find the packages.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    # Tune snapshots the experiment at every checkpoint (num_to_keep=1) so that a resume loses nothing;
    # its warning about frequent snapshots is about remote storage and only adds noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
    try:
        return sweep_and_evaluate(config, parsed, experiment_dir, model_dir, splits)
    finally:
        ray.shutdown()  # main() can be called again in the same process (tests, notebooks)


def sweep_and_evaluate(config, parsed, experiment_dir: Path, model_dir: str, splits: dict) -> int:
    """Everything that needs Ray: resources check, the sweep, the evaluation stage, the leaderboard."""
    import ray

    from eval.leaderboard import atomic_write, build_rows, write_leaderboard
    from eval.report import write_report
    from eval.stage import run_evaluation_stage
    from sweeps.config import save_config
    from sweeps.gpu_share import choose_gpus_per_trial, longest_row_tokens
    from sweeps.search_space import grid_size
    from sweeps.tuner import build_trainable, log_generations_to_wandb, run_sweep, trial_records
    from trainables.model_loading import choose_precision, hub_id_for_card

    # Sized for the path trials take on a GPU; without a GPU share the estimate is not used.
    gpus, why = choose_gpus_per_trial(config, parsed, model_dir, "4bit" if config.model.load_in_4bit else "bf16",
                                      longest_row_tokens(splits))
    if config.model.load_in_4bit and gpus == 0 and config.model.cpu_fallback == "refuse":
        raise ConfigError("model.load_in_4bit=true needs CUDA, the trials get no GPU and model.cpu_fallback=refuse; "
                          "set model.cpu_fallback=bf16 (LoRA on a bf16 base) or 4bit (bitsandbytes on CPU)")
    precision, path_line = choose_precision(config.model.load_in_4bit, config.model.cpu_fallback, gpus > 0)
    print(f"[lorasweep] trials: {path_line}; GPU share per trial {gpus:g} ({why})", flush=True)

    experiment_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, experiment_dir / "config.yaml")
    (experiment_dir / "search_space.json").write_text(json.dumps(parsed, indent=2))
    settings = {**vars(config.training), **vars(config.model), "model_dir": model_dir,
                "max_length": config.data.max_length}
    trainable = build_trainable(settings, splits, config.resources.cpus_per_trial, gpus)
    sweep_started = time.time()
    result_grid = run_sweep(config, parsed, trainable, experiment_dir)
    # This run's time in Tune (a resumed sweep counts only the part after the resume).
    timings = {"sweep_seconds": round(time.time() - sweep_started, 2), "gpus_per_trial": gpus}
    expected = grid_size(parsed) if config.sweep.method == "grid" else config.sweep.run_cap
    if result_grid.num_terminated + result_grid.num_errors < expected:
        # Tune returns normally after Ctrl-C with its state saved; evaluating half a sweep would mislead.
        print(f"lora_search: the sweep was interrupted ({result_grid.num_terminated + result_grid.num_errors} of "
              f"{expected} trials ended); run the same command again to resume", file=sys.stderr)
        return 130

    param_names = list(parsed)
    trials = trial_records(result_grid, config, param_names)
    scored = sorted((t for t in trials if t["checkpoint_dir"] and not t["status"].startswith("failed")),
                    key=lambda t: t["best_eval_loss"])
    candidates = [{"trial_id": t["trial_id"], "checkpoint_dir": t["checkpoint_dir"]} for t in scored[: config.eval.top_k]]
    title = f"lorasweep leaderboard: {config.output.name}"
    if not candidates:
        write_leaderboard(build_rows(trials, {}, param_names, None, config.eval.select_by), param_names, experiment_dir, title)
        print(f"lora_search: every trial failed; see {experiment_dir / 'leaderboard.md'}", file=sys.stderr)
        return 1

    print(f"[lorasweep] evaluation stage: base model and {len(candidates)} trial(s) on "
          f"{len(splits['test'])} held-out prompts", flush=True)
    eval_options = {**vars(config.eval)}
    stage = ray.remote(run_evaluation_stage).options(num_cpus=config.resources.eval_cpus, num_gpus=1 if gpus else 0)
    outcome = ray.get(stage.remote(model_dir, precision, candidates, splits["test"], eval_options, str(experiment_dir),
                                   hub_id_for_card(config.model.model_name_or_path), config.eval.merge,
                                   config.model.bnb_4bit_quant_type, config.model.bnb_4bit_use_double_quant,
                                   config.model.trust_remote_code))
    timings["evaluation_seconds"] = round(time.time() - sweep_started - timings["sweep_seconds"], 2)
    timings["evaluation_seconds_per_model"] = {row_id: scored["seconds"] for row_id, scored in outcome["results"].items()}
    atomic_write(experiment_dir / "timings.json", json.dumps(timings, indent=2))
    rows = build_rows(trials, outcome["results"], param_names, outcome["winner"], config.eval.select_by)
    paths = write_leaderboard(rows, param_names, experiment_dir, title)
    paths["html"] = write_report(experiment_dir)
    if config.tracking.wandb:
        log_generations_to_wandb(config, experiment_dir, outcome["results"])
    print_summary(rows, paths, outcome, experiment_dir)
    return 1 if outcome["merge_error"] or (outcome["merge_check"] and not outcome["merge_check"]["passed"]) else 0


def searched_presets(config, parsed: dict) -> set[str]:
    """Every target-module preset a trial may use."""
    spec = parsed.get("lora_target_modules")
    if spec is None:
        return {config.training.lora_target_modules}
    return set(spec["values"]) if spec["kind"] == "choice" else {spec["value"]}


def check_output_dir(output_dir: str, experiment_dir: Path) -> None:
    """Fail before any work when the results could not be written, or would land where no one finds them."""
    if "://" in output_dir:
        raise ConfigError(f"output.dir: {output_dir!r} is a URI; lorasweep writes to a filesystem path: use a path "
                          f"that every node mounts (NFS, EFS, a FUSE-mounted bucket)")
    if not Path(output_dir).expanduser().is_absolute() and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # A job's working directory is a temporary copy on the head node: results there would be lost.
        raise ConfigError(f"output.dir: {output_dir!r} is relative, and this is a Ray job whose working directory "
                          f"is a temporary copy; give an absolute path on storage every node reaches")
    existing = experiment_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output.dir: {existing} is a file, not a directory; choose another output.dir")
    try:  # os.access says yes to root even on read-only mounts: try for real, leaving nothing behind
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as err:
        raise ConfigError(f"output.dir: {existing} is not writable ({err.strerror}); choose another output.dir") from None


def check_same_sweep(config, experiment_dir: Path) -> None:
    """Resuming is only safe into a sweep of the same config: refuse a different one, naming the keys."""
    import yaml

    saved_path = experiment_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
    current = _flatten(config.to_dict())
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        raise ConfigError(f"{experiment_dir} holds a sweep with a different config (changed: {', '.join(changed)}); "
                          f"set output.name=<new name> for a new sweep, or remove that directory")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix.startswith("sweep"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def print_summary(rows: list[dict], paths: dict, outcome: dict, experiment_dir: Path) -> None:
    print("\n[lorasweep] top of the leaderboard:")
    trial_rows = [r for r in rows if r["trial_id"] != "base"]
    for row in trial_rows[:5] + [r for r in rows if r["trial_id"] == "base"]:
        em = "" if row["exact_match"] is None else f"exact_match={row['exact_match']:.3f} "
        loss = "" if row["best_eval_loss"] is None else f"eval_loss={row['best_eval_loss']:.4f} "
        print(f"  {row['rank'] or '-':>2} {row['trial_id']:<14} {em}{loss}{row['status']}")
    print(f"\nleaderboard:  {paths['md']}\n              {paths['csv']}\n              {paths['json']}\n"
          f"report:       {paths['html']}")
    if outcome["winner"] and (experiment_dir / "best_adapter").is_dir():
        print(f"best adapter: {experiment_dir / 'best_adapter'}  (trial {outcome['winner']})")
    if outcome["merge_check"]:
        check = outcome["merge_check"]
        print(f"merged model: {experiment_dir / 'merged_model'}  (merge check "
              f"{'passed' if check['passed'] else 'FAILED'}: exact match adapter {check['adapter_exact_match']:.3f} "
              f"vs merged {check['merged_exact_match']:.3f} on {check['prompts']} prompts)")
    if outcome["merge_error"]:
        print(f"merge FAILED: {outcome['merge_error']}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
