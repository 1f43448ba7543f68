"""Build the Ray Tune Tuner from the sweep's plan (Optuna searcher, ASHA scheduler, the trial function, the
trackers the config turns on), run or restore it, and read the ResultGrid back as one record per trial."""

from __future__ import annotations

import math
import os
import signal
import threading
from pathlib import Path

from ray import tune

from eval.artifacts import TUNE_DIR
from eval.outcomes import trial_record, trial_status
from sweeps.config import TrackingConfig
from sweeps.search_space import SweepPlan, to_tune_space
from sweeps.trackers import (StoredStudyOptunaSearch, announce_trackers, optuna_storage_url, tracker_callbacks,
                             wandb_mode)
from trainables.qlora_trial import train_qlora_trial
from trainables.trial_spec import BaseModelSpec, TrainingConfig


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


def build_trainable(training: TrainingConfig, base: BaseModelSpec, max_length: int, splits: dict[str, list[dict]],
                    cpus: float, gpus: float):
    """The trial function with its settings and data in Ray's object store (every node reads them from there)."""
    with_data = tune.with_parameters(train_qlora_trial, training=training, base=base, max_length=max_length,
                                     train_rows=splits["train"], eval_rows=splits["validation"])
    return tune.with_resources(with_data, {"cpu": cpus, "gpu": gpus})


def build_search_alg(plan: SweepPlan, name: str, storage_url: str = ""):
    """Seeded Optuna TPE for bayes, Optuna's random sampler for random, Tune's grid for grid. With a storage_url
    the Optuna study, named `name` (output.name), lives in that database instead of in memory."""
    if plan.method == "grid":
        return None  # Tune's BasicVariantGenerator expands grid_search itself
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    sampler = tpe_sampler(plan) if plan.method == "bayes" else optuna.samplers.RandomSampler(seed=plan.seed)
    # metric and mode go in TuneConfig only: Tune refuses them set twice.
    if storage_url:
        searcher = StoredStudyOptunaSearch(sampler=sampler, study_name=name,
                                           storage=optuna.storages.RDBStorage(storage_url))
    else:
        searcher = OptunaSearch(sampler=sampler)
    return ConcurrencyLimiter(searcher, max_concurrent=plan.max_concurrent_trials)


def tpe_sampler(plan: SweepPlan):
    """TPE set for many trials in flight, explicitly (Optuna's defaults moved between 4.x and 5.0): the constant
    liar counts running trials as bad, so proposals made before their results spread out instead of piling up;
    multivariate TPE models the parameters together (rank and alpha interact); and only a quarter of the budget
    (2 to 10 trials) is drawn at random before TPE takes over, not a fixed 10 that a 16-trial study would spend
    almost whole on random draws."""
    import optuna

    return optuna.samplers.TPESampler(seed=plan.seed, constant_liar=True, multivariate=True,
                                      n_startup_trials=startup_trials(plan))


def startup_trials(plan: SweepPlan) -> int:
    return max(2, min(10, plan.expected_trials // 4))


def tune_dir(experiment_dir: Path) -> Path:
    return experiment_dir / TUNE_DIR


def can_resume(experiment_dir: Path) -> bool:
    """True when Tune's snapshot of this experiment exists: the sweep continues instead of starting over."""
    return tune.Tuner.can_restore(str(tune_dir(experiment_dir)))


class ReleaseEngineSlots(tune.Callback):
    """With the shared-base engine: a trial that ends (completed, stopped by ASHA, failed) frees its engine slot
    at once, also when Tune stopped its process before the trial could say so itself."""

    def __init__(self, engine_names: list[str]):
        self.engine_names = engine_names

    def _release(self, trial) -> None:
        import ray

        from trainables.engine_actor import ENGINE_NAMESPACE

        for name in self.engine_names:
            try:
                ray.get_actor(name, namespace=ENGINE_NAMESPACE).release.remote(trial.trial_id)
            except ValueError:
                pass  # that engine is gone (the sweep is ending)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)


def run_sweep(plan: SweepPlan, trainable, experiment_dir: Path, name: str, tracking: TrackingConfig,
              reuse_actors: bool, max_failures: int, callbacks: list[tune.Callback] = ()):
    """Run the sweep, or continue it from Tune's snapshot when one exists (finished trials are kept)."""
    tune_path = tune_dir(experiment_dir)
    announce_trackers(tracking, name, experiment_dir, tune_path)
    if tracking.wandb:
        # Ray's callback looks for a key in this process unless WANDB_MODE says offline (also on a resume).
        os.environ["WANDB_MODE"] = wandb_mode()
    if can_resume(experiment_dir):
        print(f"[lorasweep] resuming the sweep in {tune_path}", flush=True)
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True, resume_errored=False)
        return fit_then_restore_signals(tuner)
    scheduler = None
    if plan.asha.enabled:
        scheduler = tune.schedulers.ASHAScheduler(time_attr="evaluation", max_t=plan.asha.max_t,
                                                  grace_period=plan.asha.grace_period,
                                                  reduction_factor=plan.asha.reduction_factor)
    tuner = tune.Tuner(
        trainable,
        param_space=to_tune_space(plan.parameters, plan.method),
        tune_config=tune.TuneConfig(
            metric=plan.metric, mode=plan.mode,
            search_alg=build_search_alg(plan, name, optuna_storage_url(tracking, experiment_dir)),
            scheduler=scheduler,
            # A grid runs each combination once (its size is the trial count); run_cap counts samples otherwise.
            num_samples=1 if plan.method == "grid" else plan.expected_trials,
            max_concurrent_trials=plan.max_concurrent_trials,
            # A new trial runs in a finished trial's process, keeping its imports and loaded base model
            # (trainables/base_model_cache.py).
            reuse_actors=reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(experiment_dir),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=plan.metric,
                                                    checkpoint_score_order=plan.mode),
            # Retries from the trial's last checkpoint after a lost node or worker (diverged trials end
            # as failed without raising, so they do not spend these).
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=[TrialProgress(), *callbacks, *tracker_callbacks(tracking, name, experiment_dir)],
            verbose=1,
        ),
    )
    return fit_then_restore_signals(tuner)


def fit_then_restore_signals(tuner):
    """Tuner.fit, with this process's own Ctrl-C handling back once it returns. Tune installs a SIGINT handler (the
    first Ctrl-C ends the sweep with its state saved, and puts the previous handler back) and, when no Ctrl-C came,
    leaves it installed: every Ctrl-C in the evaluation stage and the merge would then be swallowed. With the
    handler from before (Python's default_int_handler), Ctrl-C raises KeyboardInterrupt, which the driver turns
    into exit 130; a Ctrl-C that Tune caught raises it too, also one that came as the last trial was ending."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()  # Tune installs no handlers outside the main thread
    signals = [signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    before = {sig: signal.getsignal(sig) for sig in signals}
    tune_catches_sigint = not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
    try:
        result = tuner.fit()
        # Tune's handler puts the one from before back when it is called: then the sweep was interrupted.
        interrupted = tune_catches_sigint and signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        for sig, handler in before.items():
            if handler is not None:  # None: installed outside Python, nothing to put back
                signal.signal(sig, handler)
    if interrupted:
        raise KeyboardInterrupt
    return result


def trial_records(result_grid, plan: SweepPlan) -> list[dict]:
    """One record per trial of a finished sweep (eval/outcomes.py words its status)."""
    records = []
    for result in result_grid:
        last = result.metrics or {}
        history = result.metrics_dataframe
        losses = [] if history is None or plan.metric not in history else list(history[plan.metric])
        error = None
        if result.error is not None:
            error = (str(result.error).strip().splitlines() or ["unknown error"])[-1]
        # The sweep ended (an interrupted one never gets here), so every trial is done.
        status = trial_status(error=error, last=last, done=True, max_evaluations=plan.asha.max_t,
                              asha_rungs=plan.asha_rungs)
        checkpoint = result.get_best_checkpoint(plan.metric, plan.mode) if any(map(math.isfinite, losses)) else None
        records.append(trial_record(last.get("trial_id") or Path(result.path).name,
                                    {name: result.config.get(name) for name in plan.param_names}, status, losses,
                                    last, checkpoint.path if checkpoint else None))
    return records
