"""W&B sweep parameters -> Ray Tune distributions, and ASHA settings from early_terminate."""

import pytest
from ray import tune

from sweeps.config import ConfigError, load_config
import dataclasses

from sweeps.search_space import parse_parameters, plan_sweep, to_tune_space
from trainables.lora_presets import target_modules_for


def space(parameters, method="bayes"):
    return to_tune_space(parse_parameters(parameters, method), method)


def test_mapping_to_tune_distributions():
    s = space({
        "lora_r": {"values": [8, 16, 32]},
        "learning_rate": {"distribution": "log_uniform_values", "min": "1e-4", "max": 1.0e-3},
        "lora_dropout": {"min": 0.0, "max": 0.1},
        "lora_alpha": {"min": 8, "max": 32},
        "seed": {"value": 7},
    })
    assert s["lora_r"].categories == [8, 16, 32]
    assert isinstance(s["learning_rate"].get_sampler(), tune.search.sample.LogUniform)
    assert (s["learning_rate"].lower, s["learning_rate"].upper) == (1e-4, 1e-3)
    assert isinstance(s["lora_dropout"], tune.search.sample.Float)
    # W&B's integer max is inclusive, tune.randint's upper bound is not.
    assert (s["lora_alpha"].lower, s["lora_alpha"].upper) == (8, 33)
    assert s["seed"] == 7


def test_grid_uses_grid_search():
    s = space({"learning_rate": {"values": [1e-3, 1e-4]}}, method="grid")
    assert s["learning_rate"] == {"grid_search": [1e-3, 1e-4]}
    with pytest.raises(ConfigError, match="grid needs `values` lists"):
        space({"learning_rate": {"min": 1e-4, "max": 1e-3}}, method="grid")


@pytest.mark.parametrize("parameters, message", [
    ({}, "search space is empty"),
    ({"lora_r": {"values": []}}, "must be a non-empty list"),
    ({"lora_r": {"values": [0, 8]}}, "lora_r must be positive, got 0"),
    ({"lora_alpha": {"values": [-16]}}, "lora_alpha must be positive"),
    ({"learning_rate": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-4}}, "must be below max"),
    ({"learning_rate": {"distribution": "log_uniform_values", "min": 0, "max": 1e-4}}, "must be positive"),
    ({"learning_rate": {"distribution": "log_uniform", "min": -9, "max": -6}}, "use distribution: log_uniform_values"),
    ({"lora_target_modules": {"values": ["attention"]}}, "preset 'attention' is unknown; valid presets: attn_qv"),
    ({"lr": {"values": [1e-3]}}, "'lr' is not a training key"),
    ({"lora_r": {"values": [8], "step": 2}}, r"unknown key\(s\) \['step'\]"),
])
def test_bad_parameters_fail_clearly(parameters, message):
    with pytest.raises(ConfigError, match=message):
        parse_parameters(parameters, "bayes")


def test_presets_map_to_module_lists():
    assert target_modules_for("attn_qv") == ["q_proj", "v_proj"]
    assert target_modules_for("all_linear") == "all-linear"


def test_asha_rungs_follow_min_iter_and_eta():
    config = load_config(None, ["training.max_steps=80", "training.eval_steps=10",
                                "sweep.early_terminate={type: hyperband, min_iter: 1, eta: 2}"])
    asha = plan_sweep(config.sweep, config.training).asha
    assert dataclasses.asdict(asha) == {"enabled": True, "grace_period": 1, "reduction_factor": 2, "max_t": 8, "rungs": [1, 2, 4]}
    with pytest.raises(ConfigError, match=r"min_iter: must be an integer in \[1, 8\]"):
        bad = load_config(None, ["training.max_steps=80", "training.eval_steps=10", "sweep.early_terminate={min_iter: 9}"])
        plan_sweep(bad.sweep, bad.training)


def test_tpe_is_set_for_many_trials_in_flight():
    from sweeps.tuner import tpe_sampler

    config = load_config(None, ["sweep.run_cap=16", "sweep.max_concurrent_trials=16"])
    sampler = tpe_sampler(plan_sweep(config.sweep, config.training))
    # Running trials count as bad for later proposals; parameters modelled together; 4 random trials, not 10.
    assert sampler._constant_liar and sampler._multivariate and sampler._n_startup_trials == 4
    small = load_config(None, [])
    assert tpe_sampler(plan_sweep(small.sweep, small.training))._n_startup_trials == 2
