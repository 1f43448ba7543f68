"""The engine as a Ray actor, one per GPU, and the Ray Tune trial that is its client. Ray Tune, Optuna and ASHA
keep deciding what to try and when to stop; a trial registers its adapter with an engine, asks it to train to
its next evaluation, and reports the engine's eval_loss and a checkpoint to Tune exactly as a per-process trial
does (trainables/qlora_trial.py), so the leaderboard, the evaluation stage, the merge and the report read it the
same way.

The actor steps every adapter that has steps to go together (one micro-batch each per engine step), in a thread of
its own; the requests arrive on Ray's actor threads (`max_concurrency`) and wait on a condition. A trial hands the
engine its evaluation steps when it registers, and the engine trains through them: at each one it evaluates the
adapter, copies it off the device and queues the result, and goes on to the next evaluation while the trial
writes that checkpoint and reports it. So an adapter does not sit out engine steps while its trial reports (with
a trial asking for one evaluation at a time, the adapters took part in 3 of 8 possible slots per step, measured
in a CPU sweep). An adapter runs at most one evaluation ahead of its trial: ASHA's stop wastes little."""

from __future__ import annotations

import time

# As in trainables/qlora_trial.py: a trial's start-up counts from the import of the trial code.
MODULE_IMPORTED_AT = time.time()

import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

from trainables.trial_spec import TRIAL_STATE_FILE, BaseModelSpec, TrainingConfig, TrialSpec  # noqa: E402

ENGINE_NAME = "lorasweep-engine-{index}"
ENGINE_NAMESPACE = "lorasweep"
# Adapters at an evaluation wait for any adapter this many steps or fewer from its own (EngineServer._gathering).
GATHER_STEPS = 8
# A starting engine waits for more trials to register until all its slots are full or none has come for this long
# (EngineServer._starting).
REGISTRATION_QUIET_S = 0.5


class EngineServer:
    """Owns a LoraEngine and the stepping thread; every public method is safe to call from many threads."""

    def __init__(self, base: BaseModelSpec, slots: int, max_rank: int, gradient_checkpointing: bool,
                 dequantized_base: bool, compile_layers: bool, cuda_graphs: bool, train_rows: list[dict],
                 eval_rows: list[dict]):
        from trainables.engine import LoraEngine, study_step_options
        from trainables.model_loading import load_tokenizer

        started = time.time()
        self.engine = LoraEngine(base, slots, max_rank, gradient_checkpointing, dequantized_base,
                                 **study_step_options(base.device, compile_layers, cuda_graphs))
        self.tokenizer = load_tokenizer(base.model_dir, base.trust_remote_code)
        self.startup_s = round(time.time() - started, 2)
        self.incarnation = uuid.uuid4().hex  # a restarted engine has a new one, and none of the old adapters
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.slots: dict[str, int] = {}  # trial id -> slot
        self.schedule: dict[int, list[int]] = {}  # slot -> the evaluation steps still to reach
        self.results: dict[int, list[dict]] = {}  # slot -> evaluations reached, not yet taken by the trial
        self.snapshots: dict[int, dict] = {}  # slot -> {step: Snapshot} of evaluations taken, not yet written
        self.train_seconds = 0.0  # inside engine steps
        self.eval_seconds = 0.0  # inside evaluations
        self.evaluations_run = 0  # evaluations, each of the adapters at theirs together (_gathering)
        self.adapter_evaluations = 0
        self.idle_seconds = 0.0  # no adapter had a pending request
        # Of idle_seconds: waits while an adapter with steps to go was held back until its trial took an evaluation
        # (at most one evaluation ahead: _pending), and the adapter-steps left out of engine steps so. What the
        # trials' reporting (checkpoint writes, tune.report) costs the engine, apart from waiting for registrations.
        self.held_seconds = 0.0
        self.held_adapter_steps = 0
        self.steps_run = 0
        self.adapter_steps = 0  # micro-batches over all engine steps: adapter_steps / steps_run adapters per step
        self.started_at = time.time()
        self.registered_at = 0.0  # the last registration
        self.progress_at = time.time()
        self.condition = threading.Condition()
        # Client calls waiting for the lock. Python's lock is not fair: the stepping loop, releasing it and taking
        # it again at once, kept registrations and result pick-ups waiting for tens of seconds (38 s median
        # start-up, 6 of 16 adapters per step in a SmolLM2 sweep on the H200), so the loop lets them in first.
        self.waiting_clients = 0
        self.waiting_lock = threading.Lock()
        threading.Thread(target=self._loop, name="engine-steps", daemon=True).start()

    def free_slots(self) -> int:
        with self._client_turn():
            return len(self.engine.free)

    @contextlib.contextmanager
    def _client_turn(self):
        with self.waiting_lock:
            self.waiting_clients += 1
        try:
            self.condition.acquire()
        finally:
            with self.waiting_lock:
                self.waiting_clients -= 1
        try:
            yield
        finally:
            self.condition.release()

    def incarnation_id(self) -> str:
        return self.incarnation

    def node_id(self) -> str:
        return _node_id()

    def register(self, trial_id: str, training: TrainingConfig, checkpoint: dict[str, bytes] | None,
                 evaluations: list[int]) -> int | None:
        """A slot for the trial's adapter (fresh, or its checkpoint's files), trained from now on through the
        `evaluations` (optimizer steps) still ahead of it; a trial seen before (a retry on the same engine) gets a
        fresh slot, the old one is dropped. None when every slot is taken: not an exception, whose class the client
        would have to import (with torch) to recognize."""
        with self._client_turn():
            if trial_id in self.slots:
                self._drop(trial_id)
            if not self.engine.free:
                return None
            slot = self.engine.add(trial_id, training, self.train_rows, self.eval_rows)
            if checkpoint:
                with tempfile.TemporaryDirectory(prefix="lorasweep-resume-") as directory:
                    for name, data in checkpoint.items():
                        (Path(directory) / name).write_bytes(data)
                    self.engine.resume(slot, Path(directory))
            self.slots[trial_id] = slot
            self.schedule[slot] = sorted(evaluations)
            self.results[slot], self.snapshots[slot] = [], {}
            self.registered_at = time.time()
            self.condition.notify_all()
            return slot

    def release(self, trial_id: str) -> None:
        """The trial ended (completed, stopped by ASHA, failed): its slot is free for the next trial at once."""
        with self._client_turn():
            if trial_id in self.slots:
                self._drop(trial_id)

    def _drop(self, trial_id: str) -> None:
        slot = self.slots.pop(trial_id)
        for table in (self.schedule, self.results, self.snapshots):
            table.pop(slot, None)
        self.engine.remove(slot)
        self.condition.notify_all()

    def next_result(self, trial_id: str) -> dict:
        """Block until the trial's adapter reaches its next evaluation (or fails); that evaluation. Taking it lets the
        adapter go on towards the one after."""
        with self._client_turn():
            slot = self.slots[trial_id]
            while not self.results.get(slot):
                self.condition.wait()
                if self.slots.get(trial_id) != slot:
                    raise RuntimeError(f"trial {trial_id} was released while it waited")
            result = self.results[slot].pop(0)
            if "snapshot" in result:
                self.snapshots[slot][result["step"]] = result.pop("snapshot")
            self.condition.notify_all()
            return result

    def write_checkpoint(self, trial_id: str, step: int, directory: str | None) -> dict[str, bytes] | None:
        """The adapter as it was at evaluation `step` (PEFT layout, with the tokenizer, as a per-process trial's
        checkpoint) and the engine's state for it: written into `directory` when the trial runs on this node,
        else returned as file contents for Ray to carry. Outside the engine's lock: the copy off the device was
        taken at the evaluation, and writing hundreds of MB under the lock stalled every adapter's steps."""
        with self._client_turn():
            snapshot = self.snapshots[self.slots[trial_id]].pop(step)
        if directory is not None:
            snapshot.write(Path(directory))
            self.tokenizer.save_pretrained(directory)
            return None
        with tempfile.TemporaryDirectory(prefix="lorasweep-engine-ckpt-") as scratch:
            snapshot.write(Path(scratch))
            self.tokenizer.save_pretrained(scratch)
            return {p.name: p.read_bytes() for p in Path(scratch).iterdir() if p.is_file()}

    def figures(self) -> dict:
        """The engine's own figures: start-up, time inside steps, steps run, peak memory."""
        with self._client_turn():
            steps = max(1, self.steps_run)
            graphed = self.engine.graphed if self.engine.graphed is not None and self.engine.graphed.capture else None
            return {"engine_startup_s": self.startup_s, "engine_train_seconds": round(self.train_seconds, 2),
                    "engine_eval_seconds": round(self.eval_seconds, 2), "engine_idle_seconds": round(self.idle_seconds, 2),
                    "engine_held_seconds": round(self.held_seconds, 2), "engine_held_adapter_steps": self.held_adapter_steps,
                    "engine_evaluations": self.evaluations_run, "engine_adapter_evaluations": self.adapter_evaluations,
                    "engine_steps": self.steps_run, "engine_adapters_per_step": round(self.adapter_steps / steps, 2),
                    "engine_step_ms": round(1000 * self.train_seconds / steps, 1), "engine_pid": os.getpid(),
                    "engine_uptime_s": round(time.time() - self.started_at, 1),
                    "engine_peak_memory_mib": round(_peak_memory_mib(), 1),
                    # CUDA graphs: shape buckets met, and the stepping time spent in their first steps and captures
                    "engine_graph_shapes": len(graphed.buckets) if graphed else 0,
                    "engine_capture_seconds": round(graphed.capture_seconds, 2) if graphed else 0.0}

    def _loop(self) -> None:
        while True:
            try:
                self._turn()
            except Exception as err:  # nothing may end this thread: trials would wait for their results for good
                traceback.print_exc()
                with self.condition:
                    for slot in self.schedule:
                        if self.engine.adapters[slot].failure is None:
                            self.engine.fail(slot, f"engine: {type(err).__name__}: {err}")
                    self.condition.notify_all()

    def _turn(self) -> None:
        """One step of the adapters that have steps to go, and the evaluations of those at one (or a wait)."""
        with self.condition:  # the loop's own turn
            waited, held = time.time(), False
            while (not self._pending() and not self._arrived()) or self._starting():
                held = held or bool(self._held())
                self.engine.settle()  # nothing left in flight while the engine waits
                self.condition.wait(REGISTRATION_QUIET_S if self._starting() else None)
            self.idle_seconds += time.time() - waited
            if held:
                self.held_seconds += time.time() - waited
            pending = self._pending()
            self.held_adapter_steps += len(self._held()) if pending else 0
            if pending:
                began = time.time()
                try:
                    # The step is queued and the one before it read: the device works on this step while the
                    # next one is laid out (LoraEngine.queue_step).
                    self.engine.queue_step(pending)
                    self.engine.settle(leave=1)
                except Exception as err:  # an error of the step itself fails the adapters in it, not the engine
                    for slot in pending:
                        self.engine.fail(slot, f"{type(err).__name__}: {err}")
                self.train_seconds += time.time() - began
                self.steps_run += 1
                self.adapter_steps += len(pending)
            arrived = self._arrived()
            if arrived and self._gathering():
                arrived = []
            began = time.time()
            if arrived:  # evaluations read the adapters as this step left them, failures included
                self.engine.settle()
                arrived = self._arrived()
                self.evaluations_run += 1
                self.adapter_evaluations += len(arrived)
            for slot, result in self._results(arrived).items():
                self.results[slot].append(result)
                self.schedule[slot] = [] if "failure" in result else self.schedule[slot][1:]
            self.eval_seconds += time.time() - began
            if arrived:  # wake the waiting trials only when there is something for them
                self.condition.notify_all()
                # A woken trial must take the lock again to pick its result up: give it a moment (a trial
                # that is busy reporting picks up later; its adapter waits, at most one evaluation ahead).
                deadline = time.time() + 0.05
                while time.time() < deadline and any(self.results.get(slot) for slot in arrived):
                    self.condition.wait(0.002)
            while self.waiting_clients:  # let the clients queued for the lock in before the next step
                self.condition.wait(0.001)
        self._print_progress()

    def _print_progress(self) -> None:
        """Every 30 s, one line of where the engine's time goes (Ray forwards it to the driver's console)."""
        if time.time() - self.progress_at < 30:
            return
        self.progress_at = time.time()
        print(progress_line(self.figures()), flush=True)

    def _pending(self) -> list[int]:
        """Adapters with an evaluation ahead, not at it yet, and no evaluation waiting for their trial (at most one
        ahead)."""
        active = set(self.engine.active())
        adapters = self.engine.adapters
        return [slot for slot, steps in sorted(self.schedule.items())
                if steps and slot in active and not self.results[slot] and adapters[slot].step < steps[0]]

    def _held(self) -> list[int]:
        """Adapters with steps to go, held back because their trial has not taken their last evaluation yet."""
        active = set(self.engine.active())
        return [slot for slot, steps in self.schedule.items() if steps and slot in active and self.results[slot]]

    def _arrived(self) -> list[int]:
        """Adapters at their next evaluation, or failed, whose trial has not been told yet."""
        adapters = self.engine.adapters
        return [slot for slot, steps in sorted(self.schedule.items()) if steps and not self.results[slot]
                and (adapters[slot].failure or adapters[slot].step >= steps[0])]

    def _starting(self) -> bool:
        """Whether the engine waits for more trials before its first step: no adapter has trained yet, a slot is
        free, and a trial registered less than REGISTRATION_QUIET_S ago. A study's trials register over a second or
        so; stepping the first ones alone met a new step shape with nearly every registration (1, 2, 4, 8, 12, 16
        rows), each a first step and a CUDA graph capture of ~0.7 s on the H200 (BENCHMARKS.md), and had them reach
        their evaluations apart."""
        adapters = self.engine.adapters.values()
        return bool(adapters) and bool(self.engine.free) and time.time() - self.registered_at < REGISTRATION_QUIET_S \
            and all(adapter.step == 0 and adapter.micro_step == 0 for adapter in adapters)

    def _gathering(self) -> bool:
        """Whether adapters at their evaluation wait for others: while an adapter still stepping is at most
        GATHER_STEPS from its own. An evaluation pass costs about the same for one adapter as for sixteen (its
        launches), and trials that registered a few steps apart reached each evaluation apart: a SmolLM2 study on
        the H200 spent 5 of its 38 s evaluating (BENCHMARKS.md). Waiting costs the waiting adapters a few steps
        once; evaluated together, they then step and reach their later evaluations together."""
        adapters = self.engine.adapters
        return any(self.schedule[slot][0] - adapters[slot].step <= GATHER_STEPS for slot in self._pending())

    def _results(self, slots: list[int]) -> dict[int, dict]:
        """The evaluation of every adapter that reached its target in this step, in shared forward passes. An error of
        the evaluation fails the adapters in it, not the engine (the stepping thread goes on)."""
        adapters = self.engine.adapters
        healthy = [slot for slot in slots if not adapters[slot].failure]
        try:
            losses = self.engine.evaluate_many(healthy) if healthy else {}
        except Exception as err:
            for slot in healthy:
                self.engine.fail(slot, f"evaluation: {type(err).__name__}: {err}")
        results = {}
        for slot in slots:
            adapter = adapters[slot]
            if not adapter.failure:
                try:
                    results[slot] = {"step": adapter.step, "eval_loss": losses[slot],
                                     "train_loss": self.engine.take_train_loss(slot), "tokens": adapter.tokens_seen,
                                     "snapshot": self.engine.snapshot(slot)}
                    continue
                except Exception as err:  # the copy off the device
                    self.engine.fail(slot, f"checkpoint: {type(err).__name__}: {err}")
            results[slot] = {"step": adapter.step, "failure": adapter.failure, "tokens": adapter.tokens_seen}
        return results


def progress_line(figures: dict) -> str:
    """Where an engine's time went, in one line (EngineServer.figures): printed every 30 s while it runs, and by the
    driver when the sweep ends, which is the only line a sweep shorter than 30 s gets."""
    f = figures
    return (f"[lorasweep] engine: {f['engine_steps']} steps, {f['engine_adapters_per_step']} adapters per step, "
            f"{f['engine_step_ms']} ms per step; of {f['engine_uptime_s']:.0f} s since its base was loaded: "
            f"{f['engine_train_seconds']:.0f} s stepping, {f['engine_eval_seconds']:.0f} s evaluating "
            f"({f['engine_evaluations']} evaluations of {f['engine_adapter_evaluations']} adapters), "
            f"{f['engine_idle_seconds']:.0f} s waiting for requests ({f['engine_held_seconds']:.0f} s of it with an "
            f"adapter held until its trial took an evaluation; {f['engine_held_adapter_steps']} adapter-steps left out "
            f"so)"
            + (f"; CUDA graphs of {f['engine_graph_shapes']} step shapes, {f['engine_capture_seconds']:.0f} s of the "
               f"stepping in their first steps and captures" if f.get("engine_graph_shapes") else ""))


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _peak_memory_mib() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_rows_kept_for_restarts: list = []  # in the driver: the engines' constructor arguments, for their restarts


def start_engines(count: int, gpus_each: float, cpus_each: float, base: BaseModelSpec, slots: int, max_rank: int,
                  gradient_checkpointing: bool, train_rows: list[dict], eval_rows: list[dict], restarts: int,
                  dequantized_base: bool = True, compile_layers: bool = False, cuda_graphs: bool = False) -> list:
    """`count` named engine actors (one per GPU), their bases loaded; returns their handles. An engine whose
    process is lost (killed, its node gone) is started again by Ray up to `restarts` times, under the same name
    and with an empty slot table: its trials fail with the engine, and Tune's FailureConfig retries each from its
    last checkpoint on the fresh engine (tests/test_failures.py)."""
    import ray

    actor = ray.remote(EngineServer)
    rows = ray.put(train_rows), ray.put(eval_rows)
    # Ray starts a lost engine again from the same constructor arguments: their objects must outlive this call
    # (ray#53727: once the references are gone, the restart fails with a reference-counting error).
    _rows_kept_for_restarts.append(rows)
    engines = [actor.options(name=ENGINE_NAME.format(index=i), namespace=ENGINE_NAMESPACE, num_gpus=gpus_each,
                             num_cpus=cpus_each, max_concurrency=4 * slots + 8,
                             max_restarts=restarts).remote(
                                 base, slots, max_rank, gradient_checkpointing, dequantized_base, compile_layers,
                                 cuda_graphs, *rows)
               for i in range(count)]
    ray.get([engine.free_slots.remote() for engine in engines])  # every base loaded before the first trial
    return engines


def train_engine_trial(tune_config: dict, training: TrainingConfig, base: BaseModelSpec, max_length: int,
                       engine_names: list[str]) -> None:
    """The Ray Tune function trainable of the engine path: a thin client of an engine."""
    global _trials_in_process
    import ray
    from ray import tune

    _trials_in_process += 1
    started = MODULE_IMPORTED_AT if _trials_in_process == 1 else time.time()
    spec = TrialSpec.from_tune_config(training, tune_config, base, max_length)
    t = spec.training
    trial_id = tune.get_context().get_trial_id()
    checkpoint_files, step = None, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retry after a lost engine or node, or a sweep resumed after a lost driver
        with checkpoint.as_directory() as directory:
            checkpoint_files = {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}
        state = json.loads(checkpoint_files[TRIAL_STATE_FILE])
        step = state["step"]
        print(f"[lorasweep] trial resumes from its checkpoint at step {step}", flush=True)
        if step >= t.max_steps:
            tune.report(state)  # it had finished before Tune's snapshot recorded it
            return
    evaluations = sorted({min(s, t.max_steps) for s in range(step + t.eval_steps, t.max_steps + t.eval_steps, t.eval_steps)})
    engine = _register(engine_names, trial_id, t, checkpoint_files, evaluations)
    startup_s = round(time.time() - started, 2)  # to the moment the engine trains the adapter
    incarnation = ray.get(engine.incarnation_id.remote())
    # The engine writes checkpoints straight into the trial's directory when both run on one node.
    same_node = ray.get(engine.node_id.remote()) == _node_id()
    print(f"[lorasweep] trial path: shared-base engine, {base.precision} base on {base.device}", flush=True)
    try:
        while step < t.max_steps:
            result = _wait_for_result(engine, trial_id, incarnation)
            step = result["step"]
            figures = ray.get(engine.figures.remote())
            report = {"evaluation": step // t.eval_steps, "step": step, "tokens": result["tokens"],
                      "wall_time_s": round(time.time() - started, 2), "peak_memory_mib": figures["engine_peak_memory_mib"],
                      "startup_s": startup_s, "trial_in_process": _trials_in_process,
                      "train_seconds": figures["engine_train_seconds"], "retry_note": "",
                      **{key: figures[key] for key in ("engine_startup_s", "engine_pid", "engine_steps",
                                                       "engine_adapters_per_step", "engine_step_ms",
                                                       "engine_eval_seconds", "engine_idle_seconds")}}
            if result.get("failure") or not math.isfinite(result["eval_loss"]):
                reason = result.get("failure") or f"eval_loss is {result['eval_loss']} at step {step}"
                tune.report({**report, "eval_loss": math.inf, "train_loss": math.nan, "failure": reason})
                return
            report.update(eval_loss=result["eval_loss"], train_loss=result["train_loss"])
            with tempfile.TemporaryDirectory(prefix="lorasweep-adapter-") as directory:
                files = ray.get(engine.write_checkpoint.remote(trial_id, step, directory if same_node else None))
                for name, data in (files or {}).items():
                    (Path(directory) / name).write_bytes(data)
                (Path(directory) / TRIAL_STATE_FILE).write_text(json.dumps(report))
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(directory))
    finally:
        engine.release.remote(trial_id)


def _wait_for_result(engine, trial_id: str, incarnation: str) -> dict:
    """The engine's next result for the trial. A lost engine fails the trial (Tune then retries it from its last
    checkpoint, on the engine Ray starts again). A call waiting on the lost process does not fail by itself when
    Ray cannot start the engine again (seen on CPU: it waited for good), so every few seconds the trial checks that
    its engine is the one it registered with."""
    import ray

    pending = engine.next_result.remote(trial_id)
    while True:
        done, _ = ray.wait([pending], timeout=5)
        if done:
            return ray.get(pending)
        try:
            alive = ray.get(engine.incarnation_id.remote(), timeout=60) == incarnation
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            alive = False
        if not alive:
            raise RuntimeError(f"the engine holding trial {trial_id}'s adapter was lost; Tune retries the trial "
                               f"from its last checkpoint")


_trials_in_process = 0  # trials this worker process has run (Tune reuses workers): start-up counts from the import


def _register(engine_names: list[str], trial_id: str, training: TrainingConfig, checkpoint_files,
              evaluations: list[int]):
    """The engine with the most free slots takes the adapter; when all are full (a stopped trial's slot is being
    freed), wait a moment and ask again."""
    import ray

    engines = [ray.get_actor(name, namespace=ENGINE_NAMESPACE) for name in engine_names]
    deadline = time.time() + 600
    while True:
        try:
            free = ray.get([engine.free_slots.remote() for engine in engines])
            for index in sorted(range(len(engines)), key=lambda i: -free[i]):
                if free[index] > 0 and ray.get(engines[index].register.remote(trial_id, training, checkpoint_files,
                                                                              evaluations)) is not None:
                    return engines[index]
        except ray.exceptions.RayActorError:  # an engine is being started again after a loss: ask again
            pass
        if time.time() > deadline:
            raise RuntimeError(f"no engine had a free slot for trial {trial_id} in 600 s")
        time.sleep(0.2)
