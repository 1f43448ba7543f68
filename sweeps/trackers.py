"""Experiment trackers the `tracking` section turns on: Ray's own W&B and MLflow logger callbacks (TensorBoard is
Tune's default), the Optuna study stored in a database, and the evaluation stage's generations as a W&B table.
Each function takes the tracking section and the experiment's name and directory, not the whole config."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import optuna
from ray import tune
from ray.air.integrations.wandb import WANDB_ENV_VAR, WandbLoggerCallback
from ray.tune.search.optuna import OptunaSearch

from sweeps.config import ConfigError, TrackingConfig

OPTUNA_DB = "optuna.db"
MLFLOW_DB = "mlflow.db"
# How long the check before the sweep waits for an MLflow tracking server (MLflow's own default is 120 s, 7 times).
MLFLOW_CHECK_TIMEOUT_S = 10


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


def wandb_mode() -> str:
    """W&B's mode: the user's WANDB_MODE, else online when WANDB_API_KEY is set, else offline (nothing is sent)."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def mlflow_tracking_uri(tracking: TrackingConfig, experiment_dir: Path) -> str:
    """tracking.mlflow_tracking_uri, or an SQLite store in the experiment directory."""
    return tracking.mlflow_tracking_uri or f"sqlite:///{experiment_dir / MLFLOW_DB}"


def optuna_storage_url(tracking: TrackingConfig, experiment_dir: Path) -> str:
    """The database URL of the stored Optuna study, or "" when the study stays in memory."""
    storage = tracking.optuna_storage
    return f"sqlite:///{experiment_dir / OPTUNA_DB}" if storage == "default" else storage


def tracker_callbacks(tracking: TrackingConfig, name: str, experiment_dir: Path) -> list[tune.Callback]:
    """Ray's own logger callbacks for W&B and MLflow, as the config asks (TensorBoard is Tune's default)."""
    callbacks: list[tune.Callback] = []
    if tracking.wandb:
        # The extra keywords go to wandb.init in each trial's logging actor, which does not see this process's
        # later changes to its environment, so the mode travels with them. No key is passed (it would be pickled
        # into tune/tuner.pkl): W&B reads WANDB_API_KEY itself. Silent: the lines above say where the runs are.
        # reinit: the name W&B 0.31 gives Ray's reinit=True, which it warns about in every trial.
        callbacks.append(LorasweepWandbCallback(project=tracking.wandb_project, group=name,
                                                dir=str(experiment_dir), mode=wandb_mode(),
                                                settings={"silent": True}, reinit="finish_previous"))
    if tracking.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=mlflow_tracking_uri(tracking, experiment_dir),
                                              experiment_name=name))
    return callbacks


def announce_trackers(tracking: TrackingConfig, name: str, experiment_dir: Path, tune_dir: Path) -> None:
    """Say where each tracker writes and how to open it."""
    print(f"[lorasweep] TensorBoard: tensorboard --logdir {tune_dir}", flush=True)
    if tracking.wandb:
        mode = wandb_mode()
        upload = ", upload later with `wandb sync <run dir>`" if mode == "offline" else ""
        print(f"[lorasweep] W&B ({mode}): project {tracking.wandb_project}, group {name}; "
              f"runs in {experiment_dir / 'wandb'}{upload}", flush=True)
    if tracking.mlflow:
        print(f"[lorasweep] MLflow: experiment {name} in {mlflow_tracking_uri(tracking, experiment_dir)}", flush=True)
    url = optuna_storage_url(tracking, experiment_dir)
    if url:
        print(f"[lorasweep] Optuna study {name} in {url}: optuna-dashboard {url}", flush=True)


def check_optuna_study(tracking: TrackingConfig, name: str, experiment_dir: Path, resumable: bool) -> None:
    """A new sweep starts a new stored study: refuse a study name already taken in a shared database, and drop
    a default database left by a run that stopped before Tune's first snapshot (nothing there can resume)."""
    url = optuna_storage_url(tracking, experiment_dir)
    if not url or resumable:
        return
    if tracking.optuna_storage == "default":
        (experiment_dir / OPTUNA_DB).unlink(missing_ok=True)
        return
    try:
        names = optuna.get_all_study_names(storage=url)
    except Exception as err:  # a missing driver, an unreachable server, bad credentials: all stop the sweep here
        raise ConfigError(f"tracking.optuna_storage: cannot open {url}: {type(err).__name__}: {err}") from None
    if name in names:
        raise ConfigError(f"tracking.optuna_storage: {url} already holds an Optuna study {name!r} that "
                          f"this new sweep would mix with; set output.name=<new name>, or delete it with "
                          f"`optuna delete-study --storage {url} --study-name {name}`")


def check_mlflow_server(tracking: TrackingConfig) -> None:
    """With tracking.mlflow on and an http(s) tracking URI, ask the server once, with a short timeout and no
    retries, before anything is written: Ray's callback would otherwise retry for minutes once the sweep has started,
    then fail with a traceback. (The default SQLite store is created inside the experiment directory.)"""
    uri = tracking.mlflow_tracking_uri
    if not tracking.mlflow or urlsplit(uri).scheme not in ("http", "https"):
        return
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT
    from mlflow.tracking import MlflowClient

    # MLflow reads both at each request; they are set for this one request only.
    limits = {MLFLOW_HTTP_REQUEST_TIMEOUT.name: str(MLFLOW_CHECK_TIMEOUT_S), MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: "0"}
    saved = {name: os.environ.get(name) for name in limits}
    os.environ.update(limits)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # no server, a server that does not answer, a proxy's error page, refused credentials
        text = str(err)
        if "ReadTimeout" in text or "timed out" in text:
            what = f"did not answer within {MLFLOW_CHECK_TIMEOUT_S} s"
        elif "NewConnectionError" in text or "Connection refused" in text or "NameResolution" in text:
            what = "cannot be reached (connection refused or unknown host)"
        else:
            what = f"refused the request ({type(err).__name__}: {text.splitlines()[0][:160] if text else 'no detail'})"
        raise ConfigError(f"tracking.mlflow_tracking_uri: the MLflow server at {uri} {what}; start it, fix the URI "
                          f"(credentials go in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), or set "
                          f"tracking.mlflow=false") from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def log_generations_to_wandb(tracking: TrackingConfig, name: str, experiment_dir: Path, config: dict,
                             results: dict[str, dict], generations: dict[str, list[dict]]) -> None:
    """One W&B run in the sweep's group: every evaluated model's held-out generations as a table, and its scores.
    `generations` are the evaluation stage's own (row id -> prompt, target, generation, exact_match)."""
    import wandb

    table = wandb.Table(columns=["model", "prompt", "target", "generation", "exact_match"])
    for row_id in results:
        for row in generations[row_id]:
            table.add_data(row_id, row["prompt"], row["target"], row["generation"], row["exact_match"])
    with wandb.init(project=tracking.wandb_project, group=name, name="evaluation", job_type="evaluation",
                    dir=str(experiment_dir), mode=wandb_mode(), config=config, settings={"silent": True}) as run:
        run.log({"generations": table})
        run.summary.update({f"{row_id}/{key}": value for row_id, scores in results.items()
                            for key, value in scores.items()})
    print(f"[lorasweep] W&B: held-out generations logged as a table in {Path(run.dir).parent}", flush=True)
