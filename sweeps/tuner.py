"""Build the Ray Tune Tuner (OptunaSearch + ASHA + the trial function), run or restore it, and read the
ResultGrid back as one plain record per trial."""

from __future__ import annotations

import math
from pathlib import Path

from ray import tune

from sweeps.config import LorasweepConfig
from sweeps.search_space import asha_settings, build_search_alg, metric_and_mode, to_tune_space
from trainables.qlora_trial import train_qlora_trial

TUNE_DIR_NAME = "tune"


class TrialProgress(tune.Callback):
    """One line per trial event (Ray's own table stays; a custom CLIReporter is ignored since Ray 2.6)."""

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
        print(f"[lorasweep] trial {trial.trial_id} started: {params}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(f"[lorasweep] trial {trial.trial_id} step {result.get('step')}: eval_loss={result.get('eval_loss'):.4f} "
              f"({result.get('wall_time_s')}s)", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        print(f"[lorasweep] trial {trial.trial_id} ended after {trial.last_result.get('step')} steps", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[lorasweep] trial {trial.trial_id} FAILED: {_first_line(trial.error_file)}", flush=True)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _first_line(error_file) -> str:
    try:
        lines = [l for l in Path(error_file).read_text().splitlines() if l.strip()]
        return lines[-1] if lines else "unknown error"
    except (OSError, TypeError):
        return "unknown error"


def build_trainable(settings: dict, splits: dict[str, list[dict]], cpus: float, gpus: float):
    """The trial function with its data in Ray's object store (every node reads it from there)."""
    with_data = tune.with_parameters(train_qlora_trial, settings=settings, train_rows=splits["train"],
                                     eval_rows=splits["validation"])
    return tune.with_resources(with_data, {"cpu": cpus, "gpu": gpus})


def run_sweep(config: LorasweepConfig, parsed: dict, trainable, experiment_dir: Path):
    """Run the sweep, or continue it from Tune's snapshot when one exists (finished trials are kept)."""
    tune_path = experiment_dir / TUNE_DIR_NAME
    if tune.Tuner.can_restore(str(tune_path)):
        print(f"[lorasweep] resuming the sweep in {tune_path}", flush=True)
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True, resume_errored=False)
        return tuner.fit()
    metric, mode = metric_and_mode(config)
    asha = asha_settings(config)
    scheduler = None
    if asha["enabled"]:
        scheduler = tune.schedulers.ASHAScheduler(time_attr="evaluation", max_t=asha["max_t"],
                                                  grace_period=asha["grace_period"],
                                                  reduction_factor=asha["reduction_factor"])
    grid = config.sweep.method == "grid"
    tuner = tune.Tuner(
        trainable,
        param_space=to_tune_space(parsed, config.sweep.method),
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode,
            search_alg=build_search_alg(config, parsed),
            scheduler=scheduler,
            # A grid runs each combination once; run_cap counts samples otherwise (W&B semantics).
            num_samples=1 if grid else config.sweep.run_cap,
            max_concurrent_trials=config.sweep.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR_NAME,
            storage_path=str(experiment_dir),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                                    checkpoint_score_order=mode),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[TrialProgress()],
            verbose=1,
        ),
    )
    return tuner.fit()


def trial_records(result_grid, config: LorasweepConfig, param_names: list[str]) -> list[dict]:
    """One plain dict per trial: params, status (completed / stopped by ASHA at rung k / failed), metrics."""
    metric, mode = metric_and_mode(config)
    asha = asha_settings(config)
    records = []
    for result in result_grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        iterations = metrics.get("evaluation", 0)
        history = result.metrics_dataframe
        losses = [] if history is None or metric not in history else [v for v in history[metric] if math.isfinite(v)]
        best_loss = (min(losses) if mode == "min" else max(losses)) if losses else None
        if result.error is not None:
            status = "failed: " + (str(result.error).strip().splitlines() or ["unknown error"])[-1][:300]
        elif iterations >= asha["max_t"]:
            status = "completed"
        elif asha["enabled"] and iterations in asha["rungs"]:
            status = f"stopped by ASHA at rung {asha['rungs'].index(iterations)} (evaluation {iterations} of {asha['max_t']})"
        else:
            status = f"stopped after evaluation {iterations} of {asha['max_t']}"
        checkpoint = result.get_best_checkpoint(metric, mode) if losses else None
        records.append({
            "trial_id": trial_id,
            "params": {name: result.config.get(name) for name in param_names},
            "status": status,
            "best_eval_loss": best_loss,
            "steps": metrics.get("step"),
            "tokens": metrics.get("tokens"),
            "wall_time_s": metrics.get("wall_time_s"),
            "peak_memory_mb": metrics.get("peak_memory_mb"),
            "checkpoint_dir": checkpoint.path if checkpoint else None,
        })
    return records
