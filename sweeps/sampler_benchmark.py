"""How good a model each sampler finds when many trials are in flight: the study's search space and budget, its
trials trained for real (held-out loss after training.max_steps) on one shared-base engine, `--in-flight` of them
at once, over several seeds. It compares what the samplers propose, so it leaves Ray out and early stopping off:
every trial trains to the end, and a new wave of trials is asked for as the last one finishes, as a study whose
trials all train in parallel asks for them.

    python sweeps/sampler_benchmark.py --config sweeps/configs/gpu.yaml --budget 40 --in-flight 16 --seeds 5 \\
        training.max_steps=60

Samplers: random search; TPE with Optuna 4's defaults (independent parameters, no constant liar, 10 random
start-up trials); TPE as lorasweep sets it (sweeps/tuner.tpe_sampler). Writes nothing but what it prints (and
--json FILE). BENCHMARKS.md keeps the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.config import load_config_for_script  # noqa: E402

SAMPLERS = ("random", "TPE, Optuna 4 defaults", "TPE, as lorasweep sets it")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sampler_benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the study (its data, search space and training): a lora_search.py config")
    parser.add_argument("--budget", type=int, default=40, help="trials per study")
    parser.add_argument("--in-flight", type=int, default=16, help="trials training at once")
    parser.add_argument("--seeds", type=int, default=5, help="studies per sampler, with sampler seeds 0, 1, ...")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides before, between and after the flags
    if min(args.budget, args.in_flight, args.seeds) < 1:
        parser.error("--budget, --in-flight and --seeds must be at least 1")
    config = load_config_for_script("sampler_benchmark", args.config, args.overrides)
    if config is None:
        return 2
    figures = measure(config, args.budget, args.in_flight, args.seeds)
    print(render(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


def make_sampler(name: str, plan, seed: int, budget: int):
    import optuna

    from sweeps.tuner import tpe_sampler

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "TPE, Optuna 4 defaults":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=False, multivariate=False, n_startup_trials=10)
    return tpe_sampler(dataclasses.replace(plan, seed=seed, expected_trials=budget))


def measure(config, budget: int, in_flight: int, seeds: int) -> dict:
    import optuna
    import torch
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.benchmark import prepared_data
    from sweeps.search_space import plan_sweep, to_tune_space
    from trainables.engine import LoraEngine, study_step_options
    from trainables.model_loading import choose_precision
    from trainables.trial_spec import BaseModelSpec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    splits, model_dir = prepared_data(config)
    plan = plan_sweep(config.sweep, config.training)
    # The same conversion Ray's OptunaSearch makes of the Tune space the sweep runs.
    distributions = OptunaSearch.convert_search_space(to_tune_space(plan.parameters, "random"))
    discrete = {n for n, d in distributions.items() if not isinstance(d, optuna.distributions.FloatDistribution)}
    cuda = torch.cuda.is_available()
    precision, path = choose_precision(config.model.load_in_4bit, config.model.cpu_fallback, cuda)
    base = BaseModelSpec(model_dir=model_dir, precision=precision, device="cuda" if cuda else "cpu",
                         bnb_4bit_quant_type=config.model.bnb_4bit_quant_type,
                         bnb_4bit_use_double_quant=config.model.bnb_4bit_use_double_quant)
    engine = LoraEngine(base, slots=in_flight, max_rank=max(plan.values("lora_r", config.training.lora_r)),
                        dequantized_base=config.resources.engine_dequantize_base,
                        **study_step_options(base.device, config.resources.engine_compile,
                                             config.resources.engine_cuda_graphs))
    studies = []
    for name in SAMPLERS:
        for seed in range(seeds):
            began = time.time()
            study = optuna.create_study(direction="minimize", sampler=make_sampler(name, plan, seed, budget))
            run_study(study, engine, distributions, config.training, splits, budget)
            losses = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            # How spread out the proposals are: distinct combinations of the discrete choices (rank, alpha,
            # targets), which a TPE without the liar repeats when it proposes many trials from the same results.
            configurations = {tuple((k, v) for k, v in sorted(t.params.items()) if k in discrete)
                              for t in study.trials}
            studies.append({"sampler": name, "seed": seed, "best_eval_loss": min(losses, default=math.inf),
                            "completed": len(losses), "failed": budget - len(losses),
                            "distinct_discrete_choices": len(configurations), "seconds": round(time.time() - began, 1)})
            print(f"[sampler_benchmark] {name}, seed {seed}: best eval_loss {studies[-1]['best_eval_loss']:.4f} "
                  f"({len(losses)} of {budget} trials completed, {len(configurations)} distinct discrete choices)",
                  flush=True)
    return {"model": model_dir, "path": path, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "budget": budget, "in_flight": in_flight, "seeds": seeds, "max_steps": config.training.max_steps,
            "parameters": plan.param_names, "date": time.strftime("%Y-%m-%d"), "studies": studies}


def run_study(study, engine, distributions: dict, training, splits: dict, budget: int) -> None:
    """`budget` trials through the engine: its free slots filled with new trials from the sampler (asked while the
    others run, as Ray's OptunaSearch asks), each trial's held-out loss told to the study as it finishes."""
    import optuna

    running: dict[int, optuna.trial.Trial] = {}
    asked = 0
    while asked < budget or running:
        while engine.free and asked < budget:
            trial = study.ask(distributions)
            asked += 1
            settings = dataclasses.replace(training, **trial.params)
            running[engine.add(f"trial{trial.number}", settings, splits["train"], splits["validation"])] = trial
        engine.step()
        active = set(engine.active())
        for slot in [s for s in running if s not in active]:  # trained to the end, or failed
            adapter = engine.adapters[slot]
            if adapter.failure:
                study.tell(running.pop(slot), state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(running.pop(slot), engine.evaluate(slot))
            engine.remove(slot)


def render(figures: dict) -> str:
    lines = [f"{figures['model']} ({figures['path']}) on {figures['device']}, {figures['date']}: "
             f"{figures['budget']} trials per study, {figures['in_flight']} in flight, {figures['max_steps']} steps "
             f"each, {figures['seeds']} studies per sampler; searched: {', '.join(figures['parameters'])}", "",
             "| sampler | best eval loss, mean over studies | its range | studies where it is the best of the three "
             "| distinct choices of the discrete parameters (mean) |",
             "| --- | --- | --- | --- | --- |"]
    by_seed: dict[int, dict[str, float]] = {}
    for study in figures["studies"]:
        by_seed.setdefault(study["seed"], {})[study["sampler"]] = study["best_eval_loss"]
    for name in SAMPLERS:
        studies = [s for s in figures["studies"] if s["sampler"] == name]
        best = [s["best_eval_loss"] for s in studies]
        wins = sum(1 for seed in by_seed.values() if seed[name] == min(seed.values()))
        lines.append(f"| {name} | {statistics.mean(best):.4f} | {min(best):.4f} to {max(best):.4f} | "
                     f"{wins} of {len(studies)} | "
                     f"{statistics.mean(s['distinct_discrete_choices'] for s in studies):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
