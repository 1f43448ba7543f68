"""The engine as a Ray actor, one per GPU, and the Ray Tune trial that is its client. Ray Tune, Optuna and ASHA
keep deciding what to try and when to stop; a trial registers its adapter with an engine, asks it to train to
its next evaluation, and reports the engine's eval_loss and a checkpoint to Tune exactly as a per-process trial
does (trainables/qlora_trial.py), so the leaderboard, the evaluation stage, the merge and the report read it the
same way.

The actor steps every adapter that has a pending request together (one micro-batch each per engine step), in a
thread of its own; the requests arrive on Ray's actor threads (`max_concurrency`) and wait on a condition."""

from __future__ import annotations

import time

# As in trainables/qlora_trial.py: a trial's start-up counts from the import of the trial code.
MODULE_IMPORTED_AT = time.time()

import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from trainables.trial_spec import TRIAL_STATE_FILE, BaseModelSpec, TrainingConfig, TrialSpec  # noqa: E402

ENGINE_NAME = "lorasweep-engine-{index}"
ENGINE_NAMESPACE = "lorasweep"


class EngineServer:
    """Owns a LoraEngine and the stepping thread; every public method is safe to call from many threads."""

    def __init__(self, base: BaseModelSpec, slots: int, max_rank: int, gradient_checkpointing: bool,
                 train_rows: list[dict], eval_rows: list[dict]):
        from trainables.engine import LoraEngine
        from trainables.model_loading import load_tokenizer

        started = time.time()
        self.engine = LoraEngine(base, slots, max_rank, gradient_checkpointing)
        self.tokenizer = load_tokenizer(base.model_dir, base.trust_remote_code)
        self.startup_s = round(time.time() - started, 2)
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.slots: dict[str, int] = {}  # trial id -> slot
        self.targets: dict[int, int] = {}  # slot -> the optimizer step its client waits for
        self.results: dict[int, dict] = {}  # slot -> the evaluation at its target
        self.train_seconds = 0.0
        self.steps_run = 0
        self.condition = threading.Condition()
        threading.Thread(target=self._loop, name="engine-steps", daemon=True).start()

    def free_slots(self) -> int:
        with self.condition:
            return len(self.engine.free)

    def register(self, trial_id: str, training: TrainingConfig, checkpoint: dict[str, bytes] | None) -> int:
        """A slot for the trial's adapter (fresh, or its checkpoint's files); a trial seen before (a retry on the
        same engine) gets a fresh slot, the old one is dropped."""
        from trainables.engine import EngineFull

        with self.condition:
            if trial_id in self.slots:
                self._drop(trial_id)
            if not self.engine.free:
                raise EngineFull(f"no free slot for trial {trial_id}")
            slot = self.engine.add(trial_id, training, self.train_rows, self.eval_rows)
            if checkpoint:
                with tempfile.TemporaryDirectory(prefix="lorasweep-resume-") as directory:
                    for name, data in checkpoint.items():
                        (Path(directory) / name).write_bytes(data)
                    self.engine.resume(slot, Path(directory))
            self.slots[trial_id] = slot
            return slot

    def release(self, trial_id: str) -> None:
        """The trial ended (completed, stopped by ASHA, failed): its slot is free for the next trial at once."""
        with self.condition:
            if trial_id in self.slots:
                self._drop(trial_id)

    def _drop(self, trial_id: str) -> None:
        slot = self.slots.pop(trial_id)
        self.targets.pop(slot, None)
        self.results.pop(slot, None)
        self.engine.remove(slot)
        self.condition.notify_all()

    def train_to(self, trial_id: str, step: int) -> dict:
        """Block until the trial's adapter has taken `step` optimizer steps (or failed); its evaluation there."""
        with self.condition:
            slot = self.slots[trial_id]
            self.targets[slot] = step
            self.condition.notify_all()
            while slot not in self.results:
                self.condition.wait()
                if self.slots.get(trial_id) != slot:
                    raise RuntimeError(f"trial {trial_id} was released while it waited")
            return self.results.pop(slot)

    def checkpoint(self, trial_id: str) -> dict[str, bytes]:
        """The adapter (PEFT layout, with the tokenizer, as a per-process trial's checkpoint) and the engine's
        state for it, as file contents: Ray carries them to the trial, wherever it runs. Only the copy off the
        device holds the engine's lock; serializing hundreds of MB under it stalled every adapter's steps."""
        with self.condition:
            snapshot = self.engine.snapshot(self.slots[trial_id])
        with tempfile.TemporaryDirectory(prefix="lorasweep-engine-ckpt-") as directory:
            snapshot.write(Path(directory))
            self.tokenizer.save_pretrained(directory)
            return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}

    def figures(self) -> dict:
        """The engine's own figures: start-up, time inside steps, steps run, peak memory."""
        return {"engine_startup_s": self.startup_s, "engine_train_seconds": round(self.train_seconds, 2),
                "engine_steps": self.steps_run, "engine_peak_memory_mb": round(_peak_memory_mb(), 1)}

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self._pending():
                    self.condition.wait()
                pending = self._pending()
                began = time.time()
                try:
                    self.engine.step(pending)
                except Exception as err:  # an error of the step itself fails the adapters in it, not the engine
                    for slot in pending:
                        self.engine.adapters[slot].failure = f"{type(err).__name__}: {err}"
                self.train_seconds += time.time() - began
                self.steps_run += 1
                arrived = [slot for slot in pending if self.engine.adapters[slot].failure
                           or self.engine.adapters[slot].step >= self.targets[slot]]
                self.results.update(self._results(arrived))
                for slot in arrived:
                    del self.targets[slot]
                self.condition.notify_all()

    def _pending(self) -> list[int]:
        active = set(self.engine.active())
        return [slot for slot, target in sorted(self.targets.items())
                if slot in active and slot not in self.results and self.engine.adapters[slot].step < target]

    def _results(self, slots: list[int]) -> dict[int, dict]:
        """The evaluation of every adapter that reached its target in this step, in shared forward passes."""
        adapters = self.engine.adapters
        healthy = [slot for slot in slots if not adapters[slot].failure]
        losses = self.engine.evaluate_many(healthy) if healthy else {}
        results = {}
        for slot in slots:
            adapter = adapters[slot]
            if adapter.failure:
                results[slot] = {"step": adapter.step, "failure": adapter.failure, "tokens": adapter.tokens_seen}
            else:
                results[slot] = {"step": adapter.step, "eval_loss": losses[slot],
                                 "train_loss": self.engine.take_train_loss(slot), "tokens": adapter.tokens_seen}
        return results


def _peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_engines(count: int, gpus_each: float, cpus_each: float, base: BaseModelSpec, slots: int, max_rank: int,
                  gradient_checkpointing: bool, train_rows: list[dict], eval_rows: list[dict]) -> list:
    """`count` named engine actors (one per GPU), their bases loaded; returns their handles."""
    import ray

    actor = ray.remote(EngineServer)
    rows = ray.put(train_rows), ray.put(eval_rows)
    engines = [actor.options(name=ENGINE_NAME.format(index=i), namespace=ENGINE_NAMESPACE, num_gpus=gpus_each,
                             num_cpus=cpus_each, max_concurrency=4 * slots + 8).remote(
                                 base, slots, max_rank, gradient_checkpointing, *rows)
               for i in range(count)]
    ray.get([engine.free_slots.remote() for engine in engines])  # every base loaded before the first trial
    return engines


def train_engine_trial(tune_config: dict, training: TrainingConfig, base: BaseModelSpec, max_length: int,
                       engine_names: list[str]) -> None:
    """The Ray Tune function trainable of the engine path: a thin client of an engine."""
    import ray
    from ray import tune

    started = time.time()
    spec = TrialSpec.from_tune_config(training, tune_config, base, max_length)
    t = spec.training
    trial_id = tune.get_context().get_trial_id()
    checkpoint_files = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retry after a lost engine or node, or a sweep resumed after a lost driver
        with checkpoint.as_directory() as directory:
            checkpoint_files = {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}
    engine = _register(engine_names, trial_id, t, checkpoint_files)
    print(f"[lorasweep] trial path: shared-base engine, {base.precision} base on {base.device}", flush=True)
    try:
        step = 0
        if checkpoint_files:
            state = json.loads(checkpoint_files[TRIAL_STATE_FILE])
            step = state["step"]
            if step >= t.max_steps:
                tune.report(state)  # it had finished before Tune's snapshot recorded it
                return
        while step < t.max_steps:
            result = ray.get(engine.train_to.remote(trial_id, min(step + t.eval_steps, t.max_steps)))
            step = result["step"]
            figures = ray.get(engine.figures.remote())
            report = {"evaluation": step // t.eval_steps, "step": step, "tokens": result["tokens"],
                      "wall_time_s": round(time.time() - started, 2), "peak_memory_mb": figures["engine_peak_memory_mb"],
                      "startup_s": figures["engine_startup_s"], "trial_in_process": 1,
                      "train_seconds": figures["engine_train_seconds"], "retry_note": ""}
            if result.get("failure") or not math.isfinite(result["eval_loss"]):
                reason = result.get("failure") or f"eval_loss is {result['eval_loss']} at step {step}"
                tune.report({**report, "eval_loss": math.inf, "train_loss": math.nan, "failure": reason})
                return
            report.update(eval_loss=result["eval_loss"], train_loss=result["train_loss"])
            files = ray.get(engine.checkpoint.remote(trial_id))
            with tempfile.TemporaryDirectory(prefix="lorasweep-adapter-") as directory:
                for name, data in files.items():
                    (Path(directory) / name).write_bytes(data)
                (Path(directory) / TRIAL_STATE_FILE).write_text(json.dumps(report))
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(directory))
    finally:
        engine.release.remote(trial_id)


def _register(engine_names: list[str], trial_id: str, training: TrainingConfig, checkpoint_files):
    """The engine with the most free slots takes the adapter; when all are full (a stopped trial's slot is being
    freed), wait a moment and ask again."""
    import ray

    from trainables.engine import EngineFull

    engines = [ray.get_actor(name, namespace=ENGINE_NAMESPACE) for name in engine_names]
    deadline = time.time() + 600
    while True:
        free = ray.get([engine.free_slots.remote() for engine in engines])
        order = sorted(range(len(engines)), key=lambda i: -free[i])
        for index in order:
            if free[index] <= 0:
                continue
            try:
                ray.get(engines[index].register.remote(trial_id, training, checkpoint_files))
                return engines[index]
            except ray.exceptions.RayTaskError as err:
                if not isinstance(err.cause, EngineFull):
                    raise
        if time.time() > deadline:
            raise RuntimeError(f"no engine had a free slot for trial {trial_id} in 600 s")
        time.sleep(0.2)
