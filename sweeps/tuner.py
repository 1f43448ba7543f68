"""Build the Ray Tune Tuner (OptunaSearch + ASHA + the trial function and the trackers the config turns on),
run or restore it, and read the ResultGrid back as one plain record per trial."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import optuna
from ray import tune
from ray.air.integrations.wandb import WANDB_ENV_VAR, WandbLoggerCallback
from ray.tune.search.optuna import OptunaSearch

from sweeps.config import ConfigError, LorasweepConfig
from sweeps.search_space import asha_settings, build_search_alg, metric_and_mode, to_tune_space
from trainables.qlora_trial import train_qlora_trial

TUNE_DIR_NAME = "tune"
OPTUNA_DB = "optuna.db"
MLFLOW_DB = "mlflow.db"


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


class LorasweepWandbCallback(WandbLoggerCallback):
    """Ray's W&B callback (one run per trial, logged from a small actor), with two changes: the logging actors'
    runtime env does not carry WANDB_API_KEY, which Ray's runtime_env_agent.log prints in clear (the actors get
    it as every Ray worker gets its environment: from the local Ray instance started in this process, or from
    the job's runtime env); and an interrupted sweep ends the runs of the trials it cut short."""

    def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
        key = os.environ.pop(WANDB_ENV_VAR, None)
        try:
            super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)
        finally:
            if key is not None:
                os.environ[WANDB_ENV_VAR] = key

    def on_experiment_end(self, trials, **info):
        # Trials stopped by Ctrl-C never reach log_trial_end; Ray's callback would then wait its upload timeout
        # (30 minutes) for their actors. Ask those to finish their runs, as a trial's end does.
        for trial in list(self._trial_logging_actors):
            self._signal_logging_actor_stop(trial)
        super().on_experiment_end(trials, **info)


class StoredStudyOptunaSearch(OptunaSearch):
    """OptunaSearch with its study in a database, which runs ahead of Tune's snapshots of the searcher (the study
    is pickled by URL only). On a resume from an older snapshot, the database already holds what came after it."""

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        # Trials asked for after the snapshot belong to Tune trials that the resume will not see again.
        known = {ot_trial.number for ot_trial in self._ot_trials.values()}
        for orphan in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if orphan.number not in known:
                self._ot_study.tell(orphan.number, state=optuna.trial.TrialState.FAIL)

    def on_trial_result(self, trial_id: str, result: dict):
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # a trial that ended after the snapshot reports its last result again; the study has it


def build_trainable(settings: dict, splits: dict[str, list[dict]], cpus: float, gpus: float):
    """The trial function with its data in Ray's object store (every node reads it from there)."""
    with_data = tune.with_parameters(train_qlora_trial, settings=settings, train_rows=splits["train"],
                                     eval_rows=splits["validation"])
    return tune.with_resources(with_data, {"cpu": cpus, "gpu": gpus})


def run_sweep(config: LorasweepConfig, parsed: dict, trainable, experiment_dir: Path):
    """Run the sweep, or continue it from Tune's snapshot when one exists (finished trials are kept)."""
    tune_path = experiment_dir / TUNE_DIR_NAME
    announce_trackers(config, experiment_dir)
    if config.tracking.wandb:
        # Ray's callback looks for a key in this process unless WANDB_MODE says offline (also on a resume).
        os.environ["WANDB_MODE"] = wandb_mode()
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
            search_alg=build_search_alg(config, parsed, optuna_storage_url(config, experiment_dir)),
            scheduler=scheduler,
            # A grid runs each combination once; run_cap counts samples otherwise (W&B semantics).
            num_samples=1 if grid else config.sweep.run_cap,
            max_concurrent_trials=config.sweep.max_concurrent_trials,
            # A new trial runs in a finished trial's process, keeping its imports and loaded base model
            # (trainables/base_model_cache.py).
            reuse_actors=config.resources.reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR_NAME,
            storage_path=str(experiment_dir),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                                    checkpoint_score_order=mode),
            # Retries from the trial's last checkpoint after a lost node or worker (diverged trials end
            # as failed without raising, so they do not spend these).
            failure_config=tune.FailureConfig(max_failures=config.resources.max_failures),
            callbacks=[TrialProgress(), *tracker_callbacks(config, experiment_dir)],
            verbose=1,
        ),
    )
    return tuner.fit()


def wandb_mode() -> str:
    """W&B's mode: the user's WANDB_MODE, else online when WANDB_API_KEY is set, else offline (nothing is sent)."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def mlflow_tracking_uri(config: LorasweepConfig, experiment_dir: Path) -> str:
    """tracking.mlflow_tracking_uri, or an SQLite store in the experiment directory."""
    return config.tracking.mlflow_tracking_uri or f"sqlite:///{experiment_dir / MLFLOW_DB}"


def optuna_storage_url(config: LorasweepConfig, experiment_dir: Path) -> str:
    """The database URL of the stored Optuna study, or "" when the study stays in memory."""
    storage = config.tracking.optuna_storage
    return f"sqlite:///{experiment_dir / OPTUNA_DB}" if storage == "default" else storage


def tracker_callbacks(config: LorasweepConfig, experiment_dir: Path) -> list[tune.Callback]:
    """Ray's own logger callbacks for W&B and MLflow, as the config asks (TensorBoard is Tune's default)."""
    callbacks: list[tune.Callback] = []
    if config.tracking.wandb:
        # The extra keywords go to wandb.init in each trial's logging actor, which does not see this process's
        # later changes to its environment, so the mode travels with them. No key is passed (it would be pickled
        # into tune/tuner.pkl): W&B reads WANDB_API_KEY itself. Silent: the lines above say where the runs are.
        # reinit: the name W&B 0.31 gives Ray's reinit=True, which it warns about in every trial.
        callbacks.append(LorasweepWandbCallback(project=config.tracking.wandb_project, group=config.output.name,
                                                dir=str(experiment_dir), mode=wandb_mode(),
                                                settings={"silent": True}, reinit="finish_previous"))
    if config.tracking.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=mlflow_tracking_uri(config, experiment_dir),
                                              experiment_name=config.output.name))
    return callbacks


def announce_trackers(config: LorasweepConfig, experiment_dir: Path) -> None:
    """Say where each tracker writes and how to open it."""
    name = config.output.name
    print(f"[lorasweep] TensorBoard: tensorboard --logdir {experiment_dir / TUNE_DIR_NAME}", flush=True)
    if config.tracking.wandb:
        mode = wandb_mode()
        upload = ", upload later with `wandb sync <run dir>`" if mode == "offline" else ""
        print(f"[lorasweep] W&B ({mode}): project {config.tracking.wandb_project}, group {name}; "
              f"runs in {experiment_dir / 'wandb'}{upload}", flush=True)
    if config.tracking.mlflow:
        print(f"[lorasweep] MLflow: experiment {name} in {mlflow_tracking_uri(config, experiment_dir)}", flush=True)
    url = optuna_storage_url(config, experiment_dir)
    if url:
        print(f"[lorasweep] Optuna study {name} in {url}: optuna-dashboard {url}", flush=True)


def check_optuna_study(config: LorasweepConfig, experiment_dir: Path) -> None:
    """A new sweep starts a new stored study: refuse a study name already taken in a shared database, and drop
    a default database left by a run that stopped before Tune's first snapshot (nothing there can resume)."""
    url = optuna_storage_url(config, experiment_dir)
    if not url or tune.Tuner.can_restore(str(experiment_dir / TUNE_DIR_NAME)):
        return
    if config.tracking.optuna_storage == "default":
        (experiment_dir / OPTUNA_DB).unlink(missing_ok=True)
        return
    import optuna

    try:
        names = optuna.get_all_study_names(storage=url)
    except Exception as err:  # a missing driver, an unreachable server, bad credentials: all stop the sweep here
        raise ConfigError(f"tracking.optuna_storage: cannot open {url}: {type(err).__name__}: {err}") from None
    if config.output.name in names:
        raise ConfigError(f"tracking.optuna_storage: {url} already holds an Optuna study {config.output.name!r} that "
                          f"this new sweep would mix with; set output.name=<new name>, or delete it with "
                          f"`optuna delete-study --storage {url} --study-name {config.output.name}`")


def log_generations_to_wandb(config: LorasweepConfig, experiment_dir: Path, results: dict[str, dict]) -> None:
    """One W&B run in the sweep's group: every evaluated model's held-out generations as a table, and its scores."""
    import wandb

    table = wandb.Table(columns=["model", "prompt", "target", "generation", "exact_match"])
    for row_id in results:
        for line in (experiment_dir / "eval" / f"generations_{row_id}.jsonl").read_text().splitlines():
            row = json.loads(line)
            table.add_data(row_id, row["prompt"], row["target"], row["generation"], row["exact_match"])
    with wandb.init(project=config.tracking.wandb_project, group=config.output.name, name="evaluation",
                    job_type="evaluation", dir=str(experiment_dir), mode=wandb_mode(), config=config.to_dict(),
                    settings={"silent": True}) as run:
        run.log({"generations": table})
        run.summary.update({f"{row_id}/{key}": value for row_id, scores in results.items()
                            for key, value in scores.items()})
    print(f"[lorasweep] W&B: held-out generations logged as a table in {Path(run.dir).parent}", flush=True)


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
        elif metrics.get("failure"):
            status = f"failed: {metrics['failure']}"
        elif iterations >= asha["max_t"]:
            status = "completed"
        elif asha["enabled"] and iterations in asha["rungs"]:
            status = f"stopped by ASHA at rung {asha['rungs'].index(iterations)} (evaluation {iterations} of {asha['max_t']})"
        else:
            status = f"stopped after evaluation {iterations} of {asha['max_t']}"
        if metrics.get("retry_note"):
            status += f" ({metrics['retry_note']})"
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
            "startup_s": metrics.get("startup_s"),
            "trial_in_process": metrics.get("trial_in_process"),
            "train_seconds": metrics.get("train_seconds"),
            "checkpoint_dir": checkpoint.path if checkpoint else None,
        })
    return records
