"""The engine actor's stepping loop (trainables/engine_actor.EngineServer), in-process without Ray: trials that reach
their evaluations a few steps apart are evaluated together, each at its own step, with what it would get alone."""

import dataclasses
import math
import time

import pytest
import torch

from test_engine import SUBJECT
from test_trial_training import tokenized_rows
from trainables.engine import LoraEngine
from trainables.engine_actor import GATHER_STEPS, REGISTRATION_QUIET_S, EngineServer
from trainables.trial_spec import BaseModelSpec


@pytest.fixture(scope="module")
def rows(tiny_model_dir, tiny_data_dir):
    return tokenized_rows(tiny_model_dir, tiny_data_dir)


def server_for(tiny_model_dir, rows, slots: int) -> EngineServer:
    """An engine server on CPU with the tiny base, its stepping thread running (as Ray runs it in the actor)."""
    base = BaseModelSpec(model_dir=str(tiny_model_dir), precision="bf16", device="cpu")
    return EngineServer(base, slots=slots, max_rank=16, gradient_checkpointing=False, dequantized_base=False,
                        compile_layers=False, cuda_graphs=False, train_rows=rows["train"], eval_rows=rows["validation"])


def test_adapters_a_few_steps_apart_are_evaluated_together_each_at_its_own_step(tiny_model_dir, rows):
    server = server_for(tiny_model_dir, rows, slots=2)
    early = dataclasses.replace(SUBJECT, gradient_accumulation_steps=1, max_steps=4, seed=1)
    late = dataclasses.replace(early, max_steps=4 + GATHER_STEPS // 2, seed=2)
    server.register("early", early, None, [early.max_steps])
    server.register("late", late, None, [late.max_steps])
    first, second = server.next_result("early"), server.next_result("late")
    assert (first["step"], second["step"]) == (early.max_steps, late.max_steps)
    assert math.isfinite(first["eval_loss"]) and math.isfinite(second["eval_loss"])
    figures = server.figures()
    assert (figures["engine_evaluations"], figures["engine_adapter_evaluations"]) == (1, 2)

    # The early adapter waited for the late one at its own step: its loss is the one it has trained alone.
    alone = LoraEngine(server.engine.base_spec, slots=1, max_rank=16)
    slot = alone.add("early", early, rows["train"], rows["validation"])
    while alone.active():
        alone.step()
    assert first["eval_loss"] == pytest.approx(alone.evaluate(slot), rel=1e-4)


def test_a_starting_engine_waits_for_trials_registering_shortly_after_the_first(tiny_model_dir, rows):
    server = server_for(tiny_model_dir, rows, slots=3)
    config = dataclasses.replace(SUBJECT, gradient_accumulation_steps=1, max_steps=3)
    server.register("first", config, None, [config.max_steps])
    time.sleep(REGISTRATION_QUIET_S / 3)  # an engine stepping alone would have run steps of the first by now
    server.register("second", dataclasses.replace(config, seed=8), None, [config.max_steps])
    assert server.next_result("first")["step"] == server.next_result("second")["step"] == config.max_steps
    figures = server.figures()
    # Both trained in every step: the engine waited for the second (the third slot stays free).
    assert figures["engine_steps"] == config.max_steps and figures["engine_adapters_per_step"] == 2.0


@pytest.mark.parametrize("method, reason", [("evaluate_many", "evaluation"), ("snapshot", "checkpoint")])
def test_an_evaluation_that_fails_fails_its_trials_and_the_engine_goes_on(tiny_model_dir, rows, method, reason):
    server = server_for(tiny_model_dir, rows, slots=2)
    config = dataclasses.replace(SUBJECT, gradient_accumulation_steps=1, max_steps=2)
    working = getattr(server.engine, method)

    def out_of_memory_once(*args):
        setattr(server.engine, method, working)
        raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    setattr(server.engine, method, out_of_memory_once)
    server.register("unlucky", config, None, [config.max_steps])
    result = server.next_result("unlucky")
    assert result["failure"].startswith(f"{reason}: OutOfMemoryError") and "eval_loss" not in result
    server.release("unlucky")
    server.register("next", config, None, [config.max_steps])  # the stepping thread lives on
    assert math.isfinite(server.next_result("next")["eval_loss"])


def test_an_unexpected_error_in_the_stepping_loop_fails_the_trials_and_the_loop_goes_on(tiny_model_dir, rows, capsys):
    server = server_for(tiny_model_dir, rows, slots=1)
    config = dataclasses.replace(SUBJECT, gradient_accumulation_steps=1, max_steps=2)
    gathering = server._gathering

    def broken_once():
        server._gathering = gathering
        raise RuntimeError("a bug (injected by the test)")

    server._gathering = broken_once
    server.register("unlucky", config, None, [config.max_steps])
    assert server.next_result("unlucky")["failure"] == "engine: RuntimeError: a bug (injected by the test)"
    server.release("unlucky")
    server.register("next", config, None, [config.max_steps])
    assert math.isfinite(server.next_result("next")["eval_loss"])
    assert "a bug (injected by the test)" in capsys.readouterr().err  # the traceback, for the user


def test_the_engine_counts_what_a_trial_slow_to_take_its_evaluation_costs(tiny_model_dir, rows):
    """An adapter runs at most one evaluation ahead of its trial: while its trial has not taken an evaluation it is
    left out of the engine's steps, and the engine's figures count those adapter-steps and the time the engine waited
    with it held (what the trials' checkpoint writing and reporting cost the engine)."""
    server = server_for(tiny_model_dir, rows, slots=2)
    config = dataclasses.replace(SUBJECT, gradient_accumulation_steps=1, max_steps=4)
    # "prompt" is more than GATHER_STEPS from its evaluation when "slow" reaches its first: no gathering.
    long = dataclasses.replace(config, max_steps=GATHER_STEPS + 4, seed=5)
    server.register("slow", config, None, [1, 4])
    server.register("prompt", long, None, [long.max_steps])
    assert server.next_result("prompt")["step"] == long.max_steps  # "slow" held from its step 1 on
    time.sleep(0.3)  # the engine waits, "slow" held, nothing else to step
    assert [server.next_result("slow")["step"] for _ in range(2)] == [1, 4]
    figures = server.figures()
    assert figures["engine_held_adapter_steps"] == long.max_steps - 1
    assert 0.3 <= figures["engine_held_seconds"] <= figures["engine_idle_seconds"]
