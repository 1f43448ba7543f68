"""The plain Ray Tune + TRL sweep that BENCHMARKS.md measures lorasweep against: OptunaSearch + ASHA, one trial
per GPU, each trial loading and quantizing its base and tokenizing its data (trainables/baseline_trial.py).

    python sweeps/baseline_sweep.py --config sweeps/configs/benchmark.yaml output.dir=/tmp/bench

It reads the same config as lora_search.py, so the model, data rows, search space, sampler seed, ASHA rungs,
trial count, steps and evaluation schedule are the same. Writes Tune's results to <output.dir>/<output.name>/tune
and the sweep's time and best trial to <output.dir>/<output.name>/baseline.json."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.config import PROJECT_ROOT, load_config_for_script  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="baseline_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the same YAML config lora_search.py takes")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sweep.run_cap=4")
    args = parser.parse_intermixed_args(argv)  # overrides before, between and after the flags
    config = load_config_for_script("baseline_sweep", args.config, args.overrides)
    if config is None:
        return 2
    summary = run_baseline(config)
    print(f"[baseline] {json.dumps(summary)}", flush=True)
    return 0


def run_baseline(config) -> dict:
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.data_loading import check_and_filter, prepare_splits, read_splits
    from sweeps.search_space import plan_sweep, to_tune_space
    from trainables.baseline_trial import train_baseline_trial
    from trainables.model_loading import load_tokenizer, resolve_model_dir

    plan = plan_sweep(config.sweep, config.training)
    model_dir = resolve_model_dir(config.model.model_name_or_path)
    raw, origin = read_splits(config.data)
    # The same rows as lorasweep's sweep; the trials get their text and tokenize it themselves, as TRL does.
    splits = prepare_splits(config.data, check_and_filter(raw, origin, config.data), load_tokenizer(model_dir))
    text = {name: [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows] for name, rows in splits.items()}
    settings = {**dataclasses.asdict(config.training), "model_dir": model_dir, "max_length": config.data.max_length}

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(include_dashboard=False, configure_logging=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        trainable = tune.with_resources(
            tune.with_parameters(train_baseline_trial, settings=settings, train_rows=text["train"],
                                 eval_rows=text["validation"]),
            {"cpu": config.resources.cpus_per_trial, "gpu": 1 if gpus else 0})
        asha = plan.asha
        experiment_dir = config.experiment_dir
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune_space(plan.parameters, plan.method),
            tune_config=tune.TuneConfig(
                metric="eval_loss", mode="min", num_samples=config.sweep.run_cap,
                search_alg=ConcurrencyLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=config.sweep.seed)),
                                              max_concurrent=int(gpus) or 1),
                scheduler=ASHAScheduler(time_attr="evaluation", max_t=asha.max_t, grace_period=asha.grace_period,
                                        reduction_factor=asha.reduction_factor),
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(experiment_dir), verbose=1,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1,
                                                                              checkpoint_score_attribute="eval_loss",
                                                                              checkpoint_score_order="min")),
        )
        started = time.time()
        results = tuner.fit()
        sweep_seconds = round(time.time() - started, 2)
    finally:
        ray.shutdown()
    best = results.get_best_result(metric="eval_loss", mode="min", scope="all")
    summary = {"sweep_seconds": sweep_seconds, "best_trial": best.metrics["trial_id"],
               "best_checkpoint": best.get_best_checkpoint("eval_loss", "min").path}
    (experiment_dir / "baseline.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    sys.exit(main())
