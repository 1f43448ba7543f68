"""Run a QLoRA hyperparameter sweep end to end: trials -> held-out evaluation -> merge -> leaderboard.

    python sweeps/lora_search.py [--config FILE] [key=value ...] [--dry-run] [--smoke-test] [key=value ...]
    ray job submit --working-dir . -- python sweeps/lora_search.py [--config FILE] [key=value ...]

Running the same command again after an interruption resumes the sweep in the same experiment directory.
Exit codes: 0 done, 1 every trial failed or the merge failed, 2 bad config or data, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# `python sweeps/lora_search.py` puts sweeps/ on sys.path, not the project root that holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.config import PROJECT_ROOT, ConfigError, check_tracker_packages, given_keys, load_config  # noqa: E402
from sweeps.secrets_check import SecretInConfig, check_argument  # noqa: E402
from trainables.model_loading import ModelError  # noqa: E402

SMOKE_OVERRIDES = [
    "sweep.run_cap=2", "sweep.max_concurrent_trials=2", "training.max_steps=4", "training.eval_steps=2",
    "training.per_device_train_batch_size=4", "data.num_targets=3", "data.max_train_rows=48",
    "data.max_validation_rows=12", "data.max_test_rows=12", "eval.top_k=1",
    "eval.merge_check_prompts=8",
]
# --smoke-test runs in <output.name>-smoke: its tiny study is another config, which would otherwise make the main
# command refuse the experiment directory afterwards.
SMOKE_SUFFIX = "-smoke"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lora_search", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (sections: model, data, training, sweep, resources, eval, output)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_steps=20 sweep.run_cap=8")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and search space; start nothing")
    parser.add_argument("--smoke-test", action="store_true",
                        help=f"a tiny study (2 trials, 4 steps, 3 labels) in <output.name>{SMOKE_SUFFIX}")
    # Overrides may come before, between and after the flags (`a=1 --smoke-test b=2`).
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        for argument in argv:  # before argparse, whose errors repeat the arguments they cannot parse
            check_argument(argument)
        args = parse_args(argv)
        config, plan = resolve(args)
        if args.dry_run:
            check_cheaply(config, plan)
            print_plan(config, plan, given_keys(args.config, smoke_and_user_overrides(args)))
            return 0
    except (ConfigError, ModelError, SecretInConfig) as err:
        print(f"lora_search: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora_search: interrupted before anything started; run the same command again", file=sys.stderr)
        return 130
    from sweeps.experiment import Experiment

    experiment = Experiment(config, config.experiment_dir)
    try:
        return run(config, plan, experiment)
    except (ConfigError, ModelError) as err:
        print(f"lora_search: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lora_search: interrupted; run the same command again to resume from {config.experiment_dir}",
              file=sys.stderr)
        return 130
    finally:
        experiment.release()


def smoke_and_user_overrides(args: argparse.Namespace) -> list[str]:
    return (SMOKE_OVERRIDES if args.smoke_test else []) + list(args.overrides)


def resolve(args: argparse.Namespace):
    """Config and the sweep's plan, fully checked; nothing is started or written."""
    from sweeps.search_space import plan_sweep

    config = load_config(args.config, smoke_and_user_overrides(args))
    if args.smoke_test:
        config.output.name += SMOKE_SUFFIX
    check_tracker_packages(config.tracking)
    return config, plan_sweep(config.sweep, config.training)


def check_cheaply(config, plan) -> None:
    """For --dry-run: every check run() makes before the sweep that costs no more than reading the inputs; not
    the GGUF conversion, the tokenized lengths or the cluster's resources. Nothing is locked or written."""
    from sweeps.data_loading import check_and_filter, read_splits
    from sweeps.experiment import Experiment
    from trainables.model_loading import check_target_modules, locate_model

    check_output_dir(config.output.dir, config.experiment_dir)
    Experiment(config, config.experiment_dir).check()
    raw, origin = read_splits(config.data)
    check_and_filter(raw, origin, config.data)
    source = locate_model(config.model.model_name_or_path)
    if not source.endswith(".gguf"):  # a GGUF's modules are known once it is converted
        check_target_modules(source, set(plan.values("lora_target_modules", config.training.lora_target_modules)),
                             config.model.trust_remote_code)
    if config.tracking.mlflow:  # one request with a short timeout (sweeps/trackers.py imports the trial's libraries)
        from sweeps.trackers import check_mlflow_server

        check_mlflow_server(config.tracking)


def print_plan(config, plan, given: set[str]) -> None:
    import yaml

    print(yaml.safe_dump(config.to_dict(), sort_keys=False))
    print("search space:", json.dumps(plan.parameters, indent=2))
    asha = plan.asha
    print(f"ASHA: grace_period={asha.grace_period} reduction_factor={asha.reduction_factor} "
          f"max_t={asha.max_t} evaluations, rungs at evaluations {asha.rungs}")
    print(f"vLLM: serve the adapters with --enable-lora --max-lora-rank {max(plan.values('lora_r', config.training.lora_r))}")
    # A training value that is also searched is never used: the sampled value replaces it in every trial.
    print(f"searched (their training.* values are not used): {', '.join(plan.param_names)}")
    for name in plan.param_names:
        if f"training.{name}" in given:
            print(f"WARNING: training.{name}={getattr(config.training, name)!r} is set but sweep.parameters.{name} "
                  f"also searches it: every trial uses a searched value; drop one of the two")
    print(f"experiment directory: {config.experiment_dir}")


def run(config, plan, experiment) -> int:
    """Check everything that can be checked without Ray, then start it. `experiment` (sweeps/experiment.py) locks
    the experiment directory and refuses one started with another config or other inputs."""
    import ray

    from sweeps.data_loading import check_and_filter, prepare_splits, read_splits
    from trainables.model_loading import check_target_modules, load_tokenizer, resolve_model_dir

    experiment_dir = config.experiment_dir
    check_output_dir(config.output.dir, experiment_dir)
    experiment.claim()
    raw, origin = read_splits(config.data)  # file and line errors surface here, before any model work
    raw = check_and_filter(raw, origin, config.data)
    model_dir = resolve_model_dir(config.model.model_name_or_path)
    check_target_modules(model_dir, set(plan.values("lora_target_modules", config.training.lora_target_modules)),
                         config.model.trust_remote_code)
    tokenizer = load_tokenizer(model_dir, config.model.trust_remote_code)
    splits = prepare_splits(config.data, raw, tokenizer, log=lambda line: print(line, flush=True))
    print(f"[lorasweep] data: {len(splits['train'])} train, {len(splits['validation'])} validation, "
          f"{len(splits['test'])} held-out test rows, tokenized once for all trials", flush=True)
    # Here, after the quick checks: these import the trial's libraries.
    from sweeps.trackers import check_mlflow_server, check_optuna_study
    from sweeps.tuner import can_resume

    check_optuna_study(config.tracking, config.output.name, experiment_dir, can_resume(experiment_dir))
    check_mlflow_server(config.tracking)

    if not os.environ.get("RAY_ADDRESS") and str(PROJECT_ROOT) not in os.environ.get("PYTHONPATH", ""):
        # A local Ray instance started here: its workers inherit this environment and find the packages.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    # Tune snapshots the experiment at every checkpoint (num_to_keep=1) so that a resume loses nothing;
    # its warning about frequent snapshots is about remote storage and only adds noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    try:
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
        return sweep_and_evaluate(config, plan, experiment, model_dir, splits)
    finally:
        ray.shutdown()  # main() can be called again in the same process (tests, notebooks)


def sweep_and_evaluate(config, plan, experiment, model_dir: str, splits: dict) -> int:
    """Everything that needs Ray: resources check, the sweep, the evaluation stage, the leaderboard."""
    import ray

    from eval.artifacts import PLAN_FILE, SEARCH_SPACE_FILE, TIMINGS_FILE, write_json_atomically
    from eval.leaderboard import build_rows, write_leaderboard
    from eval.outcomes import evaluation_candidates
    from eval.report import write_report
    from sweeps.gpu_share import (check_cpus_fit, choose_gpus_per_trial, engine_fits, largest_engine_memory,
                                  largest_trial_memory, longest_row_tokens, mean_row_tokens)
    from sweeps.trackers import log_generations_to_wandb
    from sweeps.tuner import build_trainable, run_sweep, trial_records
    from eval.model_card import StudyFacts, base_reference
    from trainables.model_loading import choose_precision
    from trainables.trial_spec import BaseModelSpec

    experiment_dir = experiment.dir
    model, training = config.model, config.training
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    engine = choose_engine(config.resources.engine, cluster_gpus)
    cuda_graphs = config.resources.engine_cuda_graphs  # the engine's steps as CUDA graphs, where memory allows
    if engine == "shared" and cluster_gpus >= 1:
        gpu_precision, _ = choose_precision(model.load_in_4bit, model.cpu_fallback, cuda=True)
        fits, cuda_graphs, why = engine_fits(lambda graphs: largest_engine_memory(
            plan, training, model_dir, gpu_precision, config.resources.engine_dequantize_base,
            engine_slot_count(config.resources, plan, cluster_gpus), mean_row_tokens(splits),
            model.trust_remote_code, graphs), config.resources.engine_cuda_graphs)
        if fits and cuda_graphs != config.resources.engine_cuda_graphs:
            print(f"[lorasweep] engine: {why}", flush=True)
        if not fits and config.resources.engine == "shared":
            raise ConfigError(f"resources.engine=shared: {why}; lower sweep.max_concurrent_trials (or "
                              f"resources.engine_slots), training.per_device_train_batch_size or the searched "
                              f"lora_r, or use resources.engine=per_process")
        if not fits:  # auto: per-process trials, whose GPU share is sized from their own memory
            print(f"[lorasweep] trials: per-process, not the shared-base engine: {why}", flush=True)
            engine = "per_process"
    shared = engine == "shared"
    if shared:
        gpus = 0.0  # the engines hold the GPUs; the trials are their clients
        cuda = ray.cluster_resources().get("GPU", 0) >= 1
        precision, path_line = choose_precision(model.load_in_4bit, model.cpu_fallback, cuda=cuda)
    else:
        # The GPU share is sized for the path the trials take on a GPU.
        gpu_precision, _ = choose_precision(model.load_in_4bit, model.cpu_fallback, cuda=True)
        gpus, why = choose_gpus_per_trial(config.resources, lambda: largest_trial_memory(
            plan, training, model_dir, gpu_precision, longest_row_tokens(splits), model.trust_remote_code))
        cuda = gpus > 0
        precision, path_line = choose_precision(model.load_in_4bit, model.cpu_fallback, cuda=cuda)
        print(f"[lorasweep] trials: {path_line}; GPU share per trial {gpus:g} ({why})", flush=True)
    base = BaseModelSpec(model_dir=model_dir, precision=precision, device="cuda" if cuda else "cpu",
                         bnb_4bit_quant_type=model.bnb_4bit_quant_type,
                         bnb_4bit_use_double_quant=model.bnb_4bit_use_double_quant,
                         trust_remote_code=model.trust_remote_code)
    # A shared-base engine takes a whole GPU with the trial's CPUs; the evaluation stage a GPU when there is one.
    check_cpus_fit(config.resources, (1.0 if cuda else 0.0) if shared else gpus, 1.0 if cuda else 0.0)

    experiment.create(precision)  # the first write: locked, config.yaml and the inputs' fingerprint
    write_json_atomically(experiment_dir / SEARCH_SPACE_FILE, plan.parameters)
    engines = []
    if shared:
        engines, trainable, callbacks, engine_gpus = start_shared_engines(config, plan, base, splits, path_line,
                                                                           cuda_graphs)
    else:
        trainable = build_trainable(training, base, config.data.max_length, splits, config.resources.cpus_per_trial,
                                    gpus)
        callbacks, engine_gpus = [], 0.0
    # What the report needs of the plan, saved once: eval/ reads it instead of rebuilding it from config.yaml.
    write_json_atomically(experiment_dir / PLAN_FILE, {**plan.to_json(), "gpus_per_trial": gpus, "precision": precision,
                                                       "engine": engine, "engines": len(engines),
                                                       "gpus_per_engine": engine_gpus})
    sweep_started = time.time()
    try:
        result_grid = run_sweep(plan, trainable, experiment_dir, config.output.name, config.tracking,
                                config.resources.reuse_actors, config.resources.max_failures, callbacks)
        print_engine_figures(engines)
    finally:
        for engine in engines:  # their GPU memory goes back before the evaluation stage starts
            ray.kill(engine)
    # This run's time in Tune (a resumed sweep counts only the part after the resume).
    timings = {"sweep_seconds": round(time.time() - sweep_started, 2)}
    ended = result_grid.num_terminated + result_grid.num_errors
    if ended < plan.expected_trials:
        # Tune returns normally after Ctrl-C with its state saved; evaluating half a sweep would mislead.
        print(f"lora_search: the sweep was interrupted ({ended} of {plan.expected_trials} trials ended); "
              f"run the same command again to resume", file=sys.stderr)
        return 130

    trials = trial_records(result_grid, plan)
    candidates = evaluation_candidates(trials, config.eval.top_k)
    title = f"lorasweep leaderboard: {config.output.name}"
    if not candidates:
        write_leaderboard(build_rows(trials, {}, plan.param_names, None, config.eval.select_by, experiment_dir),
                          plan.param_names, experiment_dir, title)
        print(f"lora_search: every trial failed; see {experiment_dir / 'leaderboard.md'}", file=sys.stderr)
        return 1

    print(f"[lorasweep] evaluation stage: base model and {len(candidates)} trial(s) on "
          f"{len(splits['test'])} held-out prompts", flush=True)
    stage = ray.remote(EvaluationStage).options(num_cpus=config.resources.eval_cpus, num_gpus=1 if cuda else 0).remote()
    sections = config.to_dict()
    study = StudyFacts(study=config.output.name, base=base_reference(model.model_name_or_path, model.trust_remote_code),
                       precision=precision, data=sections["data"], rows={s: len(rows) for s, rows in splits.items()},
                       training=sections["training"])  # what the model cards say beside the winner's figures
    stage_candidates = [{"trial_id": c["trial_id"], "checkpoint_dir": c["checkpoint_dir"], "params": c["params"],
                         "steps": c["steps"]} for c in candidates]
    outcome = run_or_stop(stage, (base, stage_candidates, splits["test"], config.eval, str(experiment_dir), study),
                          experiment_dir)
    timings["evaluation_seconds"] = round(time.time() - sweep_started - timings["sweep_seconds"], 2)
    timings["evaluation_seconds_per_model"] = {row_id: scored["seconds"] for row_id, scored in outcome["results"].items()}
    write_json_atomically(experiment_dir / TIMINGS_FILE, timings)
    rows = build_rows(trials, outcome["results"], plan.param_names, outcome["selection"], config.eval.select_by,
                      experiment_dir)
    paths = write_leaderboard(rows, plan.param_names, experiment_dir, title, outcome["selection"], outcome["results"])
    paths["html"] = write_report(experiment_dir)
    if config.tracking.wandb:
        log_generations_to_wandb(config.tracking, config.output.name, experiment_dir, config.to_dict(),
                                 outcome["results"], outcome["generations"])
    print_summary(rows, paths, outcome, experiment_dir)
    return 1 if outcome["merge_error"] or (outcome["merge_check"] and not outcome["merge_check"]["passed"]) else 0


def choose_engine(setting: str, cluster_gpus: float) -> str:
    """resources.engine as it runs: auto is the shared-base engine on a cluster with GPUs, per-process trials
    without (the engine was measured faster on an H200 at equal exact match; on CPUs the per-process path stays the
    reference)."""
    if setting != "auto":
        return setting
    return "shared" if cluster_gpus >= 1 else "per_process"


def engine_slot_count(resources, plan, cluster_gpus: float) -> int:
    """Adapters one engine trains at once: resources.engine_slots, or the concurrent trials spread over the GPUs."""
    import math

    return resources.engine_slots or math.ceil(plan.max_concurrent_trials / max(1, int(cluster_gpus)))


def start_shared_engines(config, plan, base, splits: dict, path_line: str, cuda_graphs: bool):
    """One engine per GPU (one on a cluster without GPUs), each with enough slots for its share of the concurrent
    trials, its steps as CUDA graphs if `cuda_graphs` (resources.engine_cuda_graphs where the engine fits with them);
    returns (engine handles, the trial function, the Tune callbacks, GPUs per engine)."""

    import ray
    from ray import tune

    from sweeps.tuner import ReleaseEngineSlots
    from trainables.engine_actor import ENGINE_NAME, start_engines, train_engine_trial

    resources = config.resources
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    count = max(1, cluster_gpus)
    slots = engine_slot_count(resources, plan, cluster_gpus)
    max_rank = max(plan.values("lora_r", config.training.lora_r))
    gpus_each = 1.0 if cluster_gpus else 0.0
    print(f"[lorasweep] trials: {path_line}; shared-base engine: {count} engine(s) x {slots} adapter slots "
          f"(rank up to {max_rank}), {gpus_each:g} GPU each; the trials are their clients", flush=True)
    engines = start_engines(count, gpus_each, resources.cpus_per_trial, base, slots, max_rank,
                            config.training.gradient_checkpointing, splits["train"], splits["validation"],
                            restarts=resources.max_failures, dequantized_base=resources.engine_dequantize_base,
                            compile_layers=resources.engine_compile, cuda_graphs=cuda_graphs)
    names = [ENGINE_NAME.format(index=i) for i in range(count)]
    trainable = tune.with_resources(
        tune.with_parameters(train_engine_trial, training=config.training, base=base,
                             max_length=config.data.max_length, engine_names=names),
        # A client only waits on its engine: a small CPU share, so that the trials never wait for CPUs.
        {"cpu": 0.1, "gpu": 0})
    return engines, trainable, [ReleaseEngineSlots(names)], gpus_each


def print_engine_figures(engines: list) -> None:
    """Each engine's last word on where its time went (its progress line), before it is stopped: a sweep shorter
    than the engine's 30 s between progress lines gets no other."""
    import ray

    from trainables.engine_actor import progress_line

    for engine in engines:
        try:
            print(progress_line(ray.get(engine.figures.remote(), timeout=10)), flush=True)
        except (ray.exceptions.RayError, TimeoutError) as err:  # figures only: the sweep's results are in
            print(f"[lorasweep] engine: no figures ({type(err).__name__})", flush=True)


class EvaluationStage:
    """The evaluation stage's process: an actor rather than a task so that Ctrl-C ends it with ray.kill. ray.cancel
    on a task that is ending by itself at that moment (a terminal's Ctrl-C reaches it too) can crash the driver's Ray
    core worker ("Check failed: it != submissible_tasks_.end()", ray-project/ray#54846): seen in the Ctrl-C test."""

    def run(self, *args) -> dict:
        from eval.stage import run_evaluation_stage

        return run_evaluation_stage(*args)

    def process(self) -> tuple[str, int]:
        """The node and process id of the stage's process."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()


def run_or_stop(stage, args: tuple, experiment_dir: Path):
    """The stage's run(*args), and on Ctrl-C the stage's process is ended and the half-written `*.partial` files it
    may have left are removed (the finished ones were renamed into place whole)."""
    import ray

    node = pid = ref = None
    try:
        node, pid = ray.get(stage.process.remote())  # asked first: the actor runs one call at a time
        ref = stage.run.remote(*args)
        return ray.get(ref)
    except KeyboardInterrupt:
        ray.kill(stage, no_restart=True)
        if ref is not None:
            ray.wait([ref], timeout=30)  # resolves (to an error) once Ray counts the actor dead
        # Its process may still be writing for a moment after that: the Ctrl-C test once found merged_model.partial
        # left behind. Where it runs on this node, wait for it to be gone.
        if pid is not None and node == ray.get_runtime_context().get_node_id():
            _wait_until_gone(pid, seconds=30)
        for partial in experiment_dir.rglob("*.partial"):
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)
        raise


def _wait_until_gone(pid: int, seconds: float) -> None:
    """Until process `pid` of this node has exited (or is a zombie, which writes nothing), at most `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):  # gone (or no /proc to look in)
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)


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


def print_summary(rows: list[dict], paths: dict, outcome: dict, experiment_dir: Path) -> None:
    from eval.outcomes import describe_selection

    print("\n[lorasweep] top of the leaderboard:")
    trial_rows = [r for r in rows if r["trial_id"] != "base"]
    for row in trial_rows[:5] + [r for r in rows if r["trial_id"] == "base"]:
        em = "" if row["exact_match"] is None else (f"exact_match={row['exact_match']:.3f} [95% CI "
                                                    f"{row['exact_match_ci_low']:.3f}-{row['exact_match_ci_high']:.3f}] ")
        loss = "" if row["best_eval_loss"] is None else f"eval_loss={row['best_eval_loss']:.4f} "
        print(f"  {row['rank'] or '-':>2} {row['trial_id']:<14} {em}{loss}{row['status']}")
    for line in describe_selection(outcome["selection"], outcome["results"]):
        # The warning goes to stderr, where a scripted run's log keeps it apart from the progress lines.
        print(f"\n[lorasweep] {line}", file=sys.stderr if line.startswith("WARNING") else sys.stdout, flush=True)
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
