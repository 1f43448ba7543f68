"""The shared-base engine: one frozen base per GPU, and the LoRA adapters of every trial placed there trained
together, one micro-batch of each active adapter per engine step (trainables/multi_lora.py computes them). Each
adapter trains as if alone: its own data order, loss normalization over its own completion tokens, gradient
accumulation, clipping, AdamW state and step count, learning-rate schedule, dropout masks and seed
(trainables/slot_optimizer.py); a NaN or inf fails its own adapter only.

This module is the engine itself, in one process and without Ray: Ray Tune's trials become its clients through
an actor around it. Checkpoints are PEFT adapters (what the evaluation stage, the merge and the report read),
plus the adapter's optimizer state and data position."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainables.base_layers import dequantize_linear_layers, fuse_rms_norms
from trainables.graphed_step import GraphedSteps
from trainables.lora_presets import TARGET_MODULE_PRESETS
from trainables.multi_lora import kaiming_a, shared_dropout_rate, wrap_linear_layers
from trainables.packed_attention import use_packed_attention
from trainables.slot_optimizer import SlotAdamW, lr_multiplier
from trainables.step_layout import Layout, flat_layout, row_length, target_count, to_device
from trainables.trial_spec import ENGINE_STATE_FILE, BaseModelSpec, TrainingConfig

# The memory one evaluation pass may take: without gradients it holds about one layer's activations and the logits
# at the positions with a loss (LoraEngine.eval_rows_per_pass). Mostly less than the estimate reserves for a training
# step's activations and logits (trainables/memory_estimate.estimate_engine_memory), which are freed between steps;
# where it is too much, a pass that runs out of memory is retried with half (LoraEngine.evaluate_many).
EVAL_PASS_BYTES = 4 * 2**30


class EngineFull(RuntimeError):
    """Every slot of the engine holds an adapter."""


@dataclass
class Adapter:
    """One trial's adapter in a slot: its settings, data, position and progress."""

    name: str
    training: TrainingConfig
    train_rows: list[dict]
    eval_rows: list[dict]
    targets: set[str]  # names of the wrapped modules it adapts
    generator: torch.Generator  # the adapter's own data order
    order: list[int] = field(default_factory=list)
    cursor: int = 0
    epoch: int = 0
    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches done in the current accumulation window
    window: list[list[dict]] = field(default_factory=list)  # the window's micro-batches not yet run
    window_targets: int = 0  # completion tokens over the whole window: the loss is divided by this
    tokens_seen: int = 0
    loss_sum: float = 0.0  # training loss since the last evaluation, for reporting
    loss_steps: int = 0
    failure: str | None = None

    @property
    def loss_divisor(self) -> int:
        """What a micro-batch's summed token losses are divided by: the window's completion tokens (at least 1)."""
        return max(1, self.window_targets)


def study_step_options(device: str, compile_layers: bool, cuda_graphs: bool) -> dict:
    """LoraEngine's compile_backend and cuda_graphs for a study's resources.engine_compile and engine_cuda_graphs on
    `device`: CUDA only. On CPU the engine is the reference, Inductor would need a C++ compiler, and there are no
    launches to save (the CPU tests turn both on by hand, with CPU backends)."""
    cuda = device == "cuda"
    return {"compile_backend": "inductor" if compile_layers and cuda else None, "cuda_graphs": cuda_graphs and cuda}


class LoraEngine:
    """A frozen base with `slots` adapter slots of rank up to `max_rank`."""

    def __init__(self, base: BaseModelSpec, slots: int, max_rank: int, gradient_checkpointing: bool = False,
                 dequantized_base: bool = False, compile_backend: str | None = None, cuda_graphs: bool = False):
        from trainables.model_loading import load_base_for_training

        self.base_spec = base
        self.model = load_base_for_training(base, gradient_checkpointing)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.routing, self.modules, weights = wrap_linear_layers(self.model, slots, max_rank)
        if dequantized_base:
            dequantize_linear_layers(self.modules.values())
        if base.device == "cuda":  # on CPU, transformers' norms stay: the reference the tests compare with
            fuse_rms_norms(self.model)
        # Keyed dropout masks (exact beside any neighbours) on CPU, the CPU tests' reference; the device generator's
        # on CUDA, and in bucketed steps (keyed masks need each row's key on the CPU).
        self.routing.exact_dropout = base.device != "cuda" and not cuda_graphs
        # The dtype of the LoRA matmuls: bf16 under the engine's CUDA autocast (_token_losses); fp32 on CPU.
        self.compute_dtype = torch.bfloat16 if base.device == "cuda" else None
        # The output head only where a completion token is predicted (a fifth of the positions for short labels):
        # full logits were the largest tensors of a step (16 SmolLM2 adapters x 32 rows: 11k positions x 49k
        # vocabulary in fp32), and the loss reads only those positions. Used where the model's logits are its head
        # applied to its decoder's last hidden state, as checked here (models that scale or cap logits are not).
        self.head_alone = _head_alone_gives_the_logits(self.model)
        # Attention within each packed example, told where they start (trainables/packed_attention.py): after the
        # check above, which runs the model on one plain sequence.
        use_packed_attention(self.model)
        if compile_backend:
            compile_decoder_layers(self.model, compile_backend, gradient_checkpointing)
        self.max_rank = max_rank
        self.adapters: dict[int, Adapter] = {}
        self.free = list(range(slots))
        self.pieces = 1  # each micro-batch runs in this many pieces (raised on CUDA out-of-memory errors)
        self.queued: list[_QueuedStep] = []  # steps whose losses and gradient norms are not read yet (settle)
        self.eval_pass_bytes = EVAL_PASS_BYTES  # lowered to half a pass's need on its CUDA out-of-memory error
        params = [p for module in self.modules.values() for p in (module.lora_A, module.lora_B)]
        self.optimizer = SlotAdamW(weights, params)
        # CUDA graphs of the step over bucketed shapes (trainables/graphed_step.py); on CPU the same bucketed step
        # runs eagerly (what the tests check).
        self.graphed = GraphedSteps(self) if cuda_graphs else None

    # ------------------------------------------------------------------------------------------- slots

    def add(self, name: str, training: TrainingConfig, train_rows: list[dict], eval_rows: list[dict]) -> int:
        """Put a new adapter in a free slot, initialized from its seed as LoRA initializes it (A random, B zero)."""
        if not self.free:
            raise EngineFull(f"all {len(self.adapters)} slots hold adapters")
        if training.lora_r > self.max_rank:
            raise ValueError(f"lora_r={training.lora_r} is above the engine's max rank {self.max_rank}")
        slot = self.free.pop(0)
        preset = TARGET_MODULE_PRESETS[training.lora_target_modules]
        targets = {n for n in self.modules if preset == "all-linear" or n.rsplit(".", 1)[-1] in preset}
        init = torch.Generator().manual_seed(training.seed)
        for module_name, module in self.modules.items():
            targeted = module_name in targets
            module.set_slot(slot, training.lora_r, training.lora_alpha / training.lora_r if targeted else 0.0,
                            kaiming_a(init, training.lora_r, module.in_features) if targeted else None)
        self.routing.dropout[slot] = training.lora_dropout
        self.optimizer.reset_slot(slot)
        self.optimizer.zero_grad([slot])
        self.adapters[slot] = Adapter(name, training, train_rows, eval_rows, targets,
                                      torch.Generator().manual_seed(training.seed))
        return slot

    def remove(self, slot: int) -> None:
        """Free the slot (a finished, failed or stopped trial); its adapter is gone."""
        self.settle()  # a queued step's figures belong to the adapter that ran it, not to the slot's next one
        self.adapters.pop(slot)
        for module in self.modules.values():
            module.set_slot(slot, 0, 0.0, None)
        self.routing.dropout[slot] = 0.0
        self.free.append(slot)
        self.free.sort()

    def active(self) -> list[int]:
        """Slots whose adapter still has optimizer steps to go and has not failed."""
        return [s for s, a in sorted(self.adapters.items()) if a.failure is None and a.step < a.training.max_steps]

    # -------------------------------------------------------------------------------------------- training

    def step(self, slots: list[int] | None = None) -> dict[int, float]:
        """One micro-batch of each given active slot through one forward and backward; adapters whose
        accumulation window is complete take their optimizer step. Returns each slot's micro-batch loss (its
        share of the window's loss, as the Trainer's step loss is), or inf for an adapter that failed now."""
        self.queue_step(slots)
        return self.settle()

    def queue_step(self, slots: list[int] | None = None) -> None:
        """step() without waiting for the device: the step's work is queued, its losses and gradient norms are read
        by a later settle(). A loop that queues a step and then settles the one before keeps the device busy while
        the CPU lays out the next batch (the step of a few small adapters is mostly that CPU work: BENCHMARKS.md).
        Until then, an adapter whose loss or gradient norm is not finite counts as stepped: its optimizer update
        was left out on the device (trainables/slot_optimizer.py), and settle() fails it."""
        active = self.active()
        slots = active if slots is None else [s for s in slots if s in active]
        if not slots:
            return
        self.model.train()
        batches = {s: self._next_micro_batch(self.adapters[s]) for s in slots}
        losses = self._forward_backward(batches)
        due, ran = [], {}
        for slot in slots:
            adapter = self.adapters[slot]
            adapter.micro_step += 1
            ran[slot] = adapter.step + 1
            if adapter.micro_step == adapter.training.gradient_accumulation_steps:
                due.append(slot)
        lrs = {s: self._learning_rate(self.adapters[s]) for s in due}
        with torch.profiler.record_function("lorasweep: optimizer"):
            norms = self.optimizer.step(due, lrs, {s: self.adapters[s].training.weight_decay for s in due})
        for slot in due:
            self.adapters[slot].micro_step = 0
            self.adapters[slot].step += 1
        self.queued.append(_QueuedStep(ran, due, _to_host(losses), None if norms is None else _to_host(norms),
                                       torch.cuda.Event() if losses.is_cuda else None))
        if self.queued[-1].done is not None:
            self.queued[-1].done.record()

    def settle(self, leave: int = 0) -> dict[int, float]:
        """Read the queued steps' losses and gradient norms, all but the last `leave` (waiting for the device where it
        has not finished them): an adapter with a non-finite one fails. Returns the last settled step's losses, as
        step() does."""
        losses: dict[int, float] = {}
        while len(self.queued) > leave:
            queued = self.queued.pop(0)
            if queued.done is not None:
                queued.done.synchronize()
            losses = dict(zip(queued.ran, queued.losses.tolist()))
            norms = {} if queued.norms is None else dict(zip(queued.due, queued.norms.tolist()))
            for slot, step in queued.ran.items():
                adapter = self.adapters[slot]
                reason = None
                if not math.isfinite(losses[slot]):
                    reason = f"loss is {losses[slot]} at step {step}"
                elif slot in queued.due and not math.isfinite(norms[slot]):
                    reason, losses[slot] = f"gradient norm is {norms[slot]} at step {step}", math.inf
                else:
                    adapter.loss_sum += losses[slot]
                    adapter.loss_steps += 1
                if reason and adapter.failure is None:  # a later queued step may show the same adapter's failure
                    self.fail(slot, reason)
        return losses

    def _learning_rate(self, adapter: Adapter) -> float:
        t = adapter.training
        return t.learning_rate * lr_multiplier(t.lr_scheduler_type, adapter.step, t.max_steps, t.warmup_steps)

    def fail(self, slot: int, reason: str) -> None:
        """The adapter failed (its trial is told at its next result); its gradients are dropped."""
        self.adapters[slot].failure = reason
        self.optimizer.zero_grad([slot])

    def _next_micro_batch(self, adapter: Adapter) -> list[dict]:
        """The next micro-batch; at a window's start, draw the whole window to know its completion tokens."""
        if not adapter.window:
            t = adapter.training
            adapter.window = [self._draw_rows(adapter, t.per_device_train_batch_size)
                              for _ in range(t.gradient_accumulation_steps)]
            adapter.window_targets = sum(target_count(row) for batch in adapter.window for row in batch)
        return adapter.window.pop(0)

    def _draw_rows(self, adapter: Adapter, count: int) -> list[dict]:
        """Rows in the adapter's own shuffled order, a new permutation each epoch (as a sampler would)."""
        rows = []
        while len(rows) < count:
            if adapter.cursor >= len(adapter.order):
                adapter.order = torch.randperm(len(adapter.train_rows), generator=adapter.generator).tolist()
                adapter.cursor = 0
                adapter.epoch += 1
            rows.append(adapter.train_rows[adapter.order[adapter.cursor]])
            adapter.cursor += 1
        return rows

    def _forward_backward(self, batches: dict[int, list[dict]]) -> dict[int, float]:
        """Forward and backward of every slot's micro-batch; each slot's loss (its share of its window's loss).
        A CUDA out-of-memory error retries the step in smaller pieces: each adapter's micro-batch split into 2, 4,
        ... parts run one after the other, their gradients summed, which is the same gradient (the loss is
        divided by the window's completion tokens, not the piece's). The split stays for later steps. The
        gradients of earlier micro-batches of a window are set aside meanwhile, so a failed attempt's partial
        backward is dropped, not added to them."""
        earlier = self.optimizer.set_aside_gradients()
        while True:
            try:
                losses = self._pieces_forward_backward(batches)
                break
            except torch.OutOfMemoryError:
                self.optimizer.drop_gradients()
                largest = max(len(rows) for rows in batches.values())
                if self.pieces >= largest:  # one row per adapter and still out of memory: give up
                    self.optimizer.take_back_gradients(earlier)
                    raise
                self.pieces = min(2 * self.pieces, largest)
                torch.cuda.empty_cache()
                print(f"[lorasweep] engine: CUDA out of memory; micro-batches now run in {self.pieces} pieces "
                      f"(the same effective batch)", flush=True)
        self.optimizer.take_back_gradients(earlier)
        for slot, examples in batches.items():
            self.adapters[slot].tokens_seen += row_length(examples)
        # Every slot's gradients now hold this micro-batch: one whose loss was not finite left it out of the backward
        # and fails at settle(), which drops its gradients.
        self.optimizer.accumulated(list(batches))
        return losses

    def _pieces_forward_backward(self, batches: dict[int, list[dict]]) -> torch.Tensor:
        """Each slot's loss, [len(batches)] in their order on the device, summed over the micro-batch's pieces."""
        order = {slot: position for position, slot in enumerate(batches)}
        losses = None
        for piece in range(self.pieces):
            part = {slot: rows[piece::self.pieces] for slot, rows in batches.items()}
            part = {slot: rows for slot, rows in part.items() if rows}
            if not part:
                continue
            if self.graphed is not None:
                piece_losses = self.graphed.losses_and_backward(part)
            else:
                with torch.profiler.record_function("lorasweep: batch layout"):
                    layout = flat_layout(part, self.model.device)
                rates = [self.adapters[s].training.lora_dropout for s in part]
                self.routing.set(list(part), [(self.adapters[s].training.seed, self._micro_index(s)) for s in part],
                                 self.model.device, any(rates), self.compute_dtype, shared_dropout_rate(rates))
                try:  # the routing stays set through backward: gradient checkpointing runs the forward again there
                    piece_losses = self._losses_and_backward(layout)
                finally:
                    self.routing.clear()
            if losses is None:
                losses = torch.zeros(len(batches), device=piece_losses.device, dtype=piece_losses.dtype)
            # Added at once, in the stream's order: a graph's losses are a view of its output buffer, which the next
            # replay overwrites.
            losses.index_add_(0, to_device([order[slot] for slot in part], losses.device), piece_losses)
        return losses

    def _losses_and_backward(self, layout: Layout) -> torch.Tensor:
        """The layout's slots' losses (one row each, in the layout's order), their backward queued."""
        slots = [slot for slot, _, _ in layout.segments if slot >= 0]
        # The record_function labels name the step's phases in a profile (sweeps/engine_benchmark.py); free otherwise.
        with torch.profiler.record_function("lorasweep: forward and loss"):
            sums = self._token_losses(layout).view(len(slots), -1).sum(dim=1)  # a row's padding has no targets
            divisors = to_device([self.adapters[slot].loss_divisor for slot in slots], sums.device)
            losses = sums / divisors
        # A non-finite loss is left out of the backward (its adapter fails at settle()).
        with torch.profiler.record_function("lorasweep: backward"):
            losses.masked_fill(~torch.isfinite(losses.detach()), 0.0).sum().backward()
        return losses.detach()

    def _micro_index(self, slot: int) -> int:
        adapter = self.adapters[slot]
        return adapter.step * adapter.training.gradient_accumulation_steps + adapter.micro_step

    def _token_losses(self, layout: Layout) -> torch.Tensor:
        """Cross-entropy of every flattened position against its target (0 where it has none)."""
        # bf16 autocast on CUDA, as the Trainer runs the per-process path (bf16=True): prepare_model_for_kbit_training
        # leaves norms, embeddings and the head in fp32, and without autocast attention and the head ran in fp32
        # (fp32 attention kernels seen in the H200 profile). No cache: a step has no use for one.
        # The autocast cache is off: it holds casts of weights that need gradients, which the base's do not, and a
        # CUDA graph cannot capture it. Attention runs within each packed example, given where they start.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=layout.input_ids.is_cuda, cache_enabled=False):
            inputs = {"input_ids": layout.input_ids, "position_ids": layout.position_ids, "use_cache": False,
                      "cu_seq_lens_q": layout.sequence_starts, "max_length_q": layout.longest_sequence}
            if self.head_alone:
                hidden = self.model.get_decoder()(**inputs).last_hidden_state
                logits = self.model.get_output_embeddings()(hidden.flatten(0, 1).index_select(0, layout.kept))
            else:
                logits = self.model(**inputs).logits.flatten(0, 1).index_select(0, layout.kept)
        losses = torch.nn.functional.cross_entropy(logits.float(), layout.kept_targets, reduction="none")
        # Added rather than copied in: a CUDA graph's kept positions are padded with position 0, whose target is none
        # (-100, a loss of 0), so position 0 may appear more than once.
        return torch.zeros(layout.length, device=losses.device, dtype=losses.dtype).index_add(0, layout.kept, losses)

    # -------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, slot: int) -> float:
        """Mean loss per completion token over the adapter's evaluation rows (no dropout)."""
        return self.evaluate_many([slot])[slot]

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")
    def evaluate_many(self, slots: list[int]) -> dict[int, float]:
        """evaluate() for several adapters at once: one forward per evaluation batch for all of them, each adapter's
        batch in its own row (adapters reaching an evaluation together, as a study's do, share the passes)."""
        self.settle()
        self.model.eval()
        groups: dict[int, list[int]] = {}
        for slot in slots:  # adapters with the same evaluation rows go through together
            groups.setdefault(id(self.adapters[slot].eval_rows), []).append(slot)
        nll = {slot: 0.0 for slot in slots}
        count = {slot: 0 for slot in slots}
        for group in groups.values():
            rows = self.adapters[group[0]].eval_rows
            # Rows per pass: as many as fit the memory budget. Each pass runs the layers eagerly, its launches a
            # fixed cost: batches of 32 short rows made evaluation a quarter of the engine's time in an 8B sweep, and
            # passes of 16k tokens 7 of a SmolLM2 study's 40 s (BENCHMARKS.md).
            size = self.eval_rows_per_pass(rows, len(group))
            start = 0
            while start < len(rows):
                batch = rows[start:start + size]
                layout = flat_layout({slot: batch for slot in group}, self.model.device)
                self.routing.set(group, None, self.model.device, any_dropout=False, compute_dtype=self.compute_dtype)
                try:
                    token_losses = self._token_losses(layout)
                except torch.OutOfMemoryError:
                    if size == 1:
                        raise
                    # The budget was too much for this GPU (the rest of the engine's memory, or another process):
                    # what half the pass takes, for this pass and later evaluations.
                    size = max(1, len(batch) // 2)
                    self.eval_pass_bytes = size * self._eval_bytes_per_row(rows, len(group))
                    torch.cuda.empty_cache()
                    print(f"[lorasweep] engine: CUDA out of memory in an evaluation pass; passes now take {size} "
                          f"rows per adapter", flush=True)
                    continue
                finally:
                    self.routing.clear()
                sums = token_losses.view(len(group), -1).sum(dim=1)  # a row per adapter; padding has no targets
                targets = sum(target_count(row) for row in batch)  # the same rows in every adapter's row
                for slot, value in zip(group, sums.tolist()):
                    nll[slot] += value
                    count[slot] += targets
                start += len(batch)
        return {slot: nll[slot] / count[slot] if count[slot] else math.nan for slot in slots}

    def eval_rows_per_pass(self, rows: list[dict], adapters: int) -> int:
        """How many of `rows` each of `adapters` adapters can put through one evaluation pass in eval_pass_bytes."""
        return max(1, int(self.eval_pass_bytes / self._eval_bytes_per_row(rows, adapters)))

    def _eval_bytes_per_row(self, rows: list[dict], adapters: int) -> float:
        """An evaluation pass's memory per row of `rows` (each of `adapters` adapters has it): per token about one
        layer's activations in bf16 (the fp32 residual, norm, attention's projections, the MLP's), and the logits
        where a completion token is predicted (bf16, their fp32 upcast and the loss's log-softmax; at every
        position where the model computes the head over all of them)."""
        text = self.model.config.get_text_config()
        hidden = text.hidden_size
        intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
        tokens = max(1, row_length(rows))
        with_logits = sum(target_count(row) for row in rows) / tokens if self.head_alone else 1.0
        per_token = 14 * hidden + 8 * intermediate + with_logits * 10 * text.vocab_size
        return per_token * tokens / max(1, len(rows)) * adapters

    def take_train_loss(self, slot: int) -> float:
        """The mean training loss since the last call (what the Trainer logs per logging window)."""
        self.settle()
        adapter = self.adapters[slot]
        # A micro-batch's loss is its share of its window's loss: a step's loss is the sum over its window.
        mean = (adapter.loss_sum * adapter.training.gradient_accumulation_steps / adapter.loss_steps
                if adapter.loss_steps else math.nan)
        adapter.loss_sum, adapter.loss_steps = 0.0, 0
        return mean

    # -------------------------------------------------------------------------------------------- checkpoints

    def snapshot(self, slot: int) -> "Snapshot":
        """The adapter and what resuming it needs, its copy off the device started: the engine's lock is held only
        while the copy is queued; the wait for it and the writing happen outside (Snapshot.write)."""
        from peft import LoraConfig

        self.settle()
        adapter = self.adapters[slot]
        if adapter.micro_step:
            raise RuntimeError("a checkpoint is taken between optimizer steps, not inside an accumulation window")
        t = adapter.training
        preset = TARGET_MODULE_PRESETS[t.lora_target_modules]
        config = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                            target_modules=preset if isinstance(preset, str) else list(preset), task_type="CAUSAL_LM",
                            base_model_name_or_path=self.base_spec.model_dir)
        names = sorted(adapter.targets)
        # In PEFT's layout: the engine holds A and B transposed (trainables/multi_lora.wrap_linear_layers).
        weights = [piece for name in names for piece in (self.modules[name].lora_A[slot, :t.lora_r],
                                                         self.modules[name].lora_B[slot, :, :t.lora_r])]
        moments = self.optimizer.slot_moments(slot, self._trained_parts(adapter))
        state = {"step": adapter.step, "order": list(adapter.order), "cursor": adapter.cursor, "epoch": adapter.epoch,
                 "tokens_seen": adapter.tokens_seen, "generator": adapter.generator.get_state()}
        return Snapshot(config, names, [piece is not None for piece in moments["exp_avg"]], self.optimizer.steps[slot],
                        state, PiecesOffDevice(weights + [piece for key in ("exp_avg", "exp_avg_sq")
                                                          for piece in moments[key] if piece is not None]))

    def _trained_parts(self, adapter: Adapter) -> list[tuple | None]:
        """Per optimizer parameter (each module's A, then its B), the part of a slot's row the adapter trains."""
        rank = adapter.training.lora_r
        parts = []
        for name, module in self.modules.items():
            targeted = name in adapter.targets
            parts += [(slice(0, rank),) if targeted else None, (slice(None), slice(0, rank)) if targeted else None]
        return parts

    def save_adapter(self, slot: int, directory: Path) -> None:
        """The adapter in PEFT's layout (adapter_config.json + adapter_model.safetensors), loadable with
        PeftModel.from_pretrained on the same base, and the engine's state for resuming it."""
        self.snapshot(slot).write(Path(directory))

    def resume(self, slot: int, directory: Path) -> None:
        """Load an adapter saved by save_adapter into the slot `add` gave it."""
        from safetensors.torch import load_file

        adapter = self.adapters[slot]
        weights = load_file(str(Path(directory) / "adapter_model.safetensors"))
        rank = adapter.training.lora_r
        with torch.no_grad():
            for name in adapter.targets:
                self.modules[name].lora_A[slot, :rank].copy_(weights[f"base_model.model.{name}.lora_A.weight"])
                self.modules[name].lora_B[slot, :, :rank].copy_(weights[f"base_model.model.{name}.lora_B.weight"])
        state = torch.load(Path(directory) / ENGINE_STATE_FILE, weights_only=False)
        self.optimizer.load_slot_state(slot, state["optimizer"], self._trained_parts(adapter))
        adapter.step, adapter.order, adapter.cursor = state["step"], state["order"], state["cursor"]
        adapter.epoch, adapter.tokens_seen = state["epoch"], state["tokens_seen"]
        adapter.generator.set_state(state["generator"])


def compile_decoder_layers(model, backend: str, gradient_checkpointing: bool) -> int:
    """torch.compile each decoder layer for training steps: in eager mode a small model's step is bound by the CPU
    launching ~40k operators (BENCHMARKS.md); compiled, a layer's elementwise work (casts, norms, rotary, the LoRA
    scales and sums) runs as a few fused kernels, forward and backward. Dynamic shapes: the number of slots in a
    step and the rows' width change from step to step. Evaluation runs the layers eagerly (LoraEngine.evaluate_many):
    one compiled variant less to build, for a small share of the time. Returns the number of layers compiled."""
    layers = getattr(model.get_decoder(), "layers", None)
    if gradient_checkpointing or not isinstance(layers, torch.nn.ModuleList):
        # A checkpointed layer re-runs its forward in the backward, outside the compiled graph.
        why = "gradient checkpointing is on" if gradient_checkpointing else "the decoder has no list of layers"
        print(f"[lorasweep] engine: decoder layers not compiled: {why}", flush=True)
        return 0
    # The variants a study meets: the first layer's input needs no gradient (the others' do), with and without
    # dropout, one slot or several, each first with static then with dynamic shapes.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    print(f"[lorasweep] engine: {len(layers)} decoder layers compiled with torch.compile ({backend}); the first "
          f"steps take longer while it compiles", flush=True)
    return len(layers)


@dataclass
class _QueuedStep:
    """A step queued on the device whose figures the CPU has not read yet (LoraEngine.queue_step, settle)."""

    ran: dict[int, int]  # slot -> the optimizer step its micro-batch belongs to (1-based), in the step's order
    due: list[int]  # slots that took their optimizer step
    losses: torch.Tensor  # [len(ran)] on the host, written when `done` has passed
    norms: torch.Tensor | None  # [len(due)]: the due slots' gradient norms, None when no slot was due
    done: "torch.cuda.Event | None"


def _to_host(values: torch.Tensor) -> torch.Tensor:
    """A copy on the host that the device writes when it gets there (pinned memory: the copy does not wait)."""
    if not values.is_cuda:
        return values.clone()
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    return host.copy_(values, non_blocking=True)


@dataclass
class Snapshot:
    """An adapter on its way off the device: its PEFT config, the names of the modules it adapts, which optimizer
    parameters it trains, and the engine's state for resuming it; the tensors arrive in `pieces` (each module's A and
    B, then the moments of the trained parameters: exp_avg, then exp_avg_sq)."""

    config: object  # peft.LoraConfig
    names: list[str]
    trained: list[bool]  # per optimizer parameter (each module's A, then its B)
    optimizer_step: int
    state: dict
    pieces: "PiecesOffDevice"

    def write(self, directory: Path) -> None:
        from safetensors.torch import save_file

        tensors = iter(self.pieces.tensors())
        weights = {}
        for name in self.names:
            weights[f"base_model.model.{name}.lora_A.weight"] = next(tensors)
            weights[f"base_model.model.{name}.lora_B.weight"] = next(tensors)
        optimizer = {"step": self.optimizer_step}
        for key in ("exp_avg", "exp_avg_sq"):
            optimizer[key] = [next(tensors) if trained else None for trained in self.trained]
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(directory))
        save_file(weights, str(directory / "adapter_model.safetensors"))
        torch.save({"optimizer": optimizer, **self.state}, directory / ENGINE_STATE_FILE)


class PiecesOffDevice:
    """Copies of tensors (a slot's parts of the adapter weights and optimizer moments: strided views of the slot-major
    storage) on their way to the CPU: joined on the device and copied off in one asynchronous transfer into pinned
    memory, split (and waited for) only when `tensors` is called, by the trial that writes the snapshot, outside the
    engine's lock. A snapshot is ~1,300 such pieces per adapter. For a rank-64 adapter of every SmolLM2-shaped module
    on an H200, copied in one synchronous transfer and split under the lock, a snapshot took 144-153 ms; queued so,
    38-39 ms to the transfer's end (BENCHMARKS.md, 2026-12-03)."""

    def __init__(self, pieces: list[torch.Tensor]):
        self.shapes = [piece.shape for piece in pieces]
        joined = torch.cat([piece.detach().reshape(-1) for piece in pieces]) if pieces else torch.zeros(0)
        self.done = None
        if joined.is_cuda:
            # Freeing `joined` after queueing the copy is safe: its memory is reused only by later work on this stream.
            self.host = _to_host(joined)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = joined  # the join was the copy

    def tensors(self) -> list[torch.Tensor]:
        if self.done is not None:
            self.done.synchronize()
        parts = self.host.split([shape.numel() for shape in self.shapes])
        # Cloned: tensors sharing one storage cannot be saved side by side (safetensors refuses them).
        return [part.view(shape).clone() for part, shape in zip(parts, self.shapes)]


@torch.no_grad()
def _head_alone_gives_the_logits(model) -> bool:
    """Whether the model's logits are its output head applied to its decoder's last hidden state (true of Llama,
    Qwen, Mistral and most causal LMs; not of those that scale or soft-cap their logits), tried on a few tokens."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, ValueError, NotImplementedError):
        return False
    if decoder is None or head is None:
        return False
    device = next(model.parameters()).device
    ids = torch.arange(1, 9, device=device)[None] % model.config.get_text_config().vocab_size
    was_training = model.training
    model.eval()
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.is_cuda):
            full = model(input_ids=ids, use_cache=False).logits
            alone = head(decoder(input_ids=ids, use_cache=False).last_hidden_state)
    finally:
        model.train(was_training)
    return full.shape == alone.shape and torch.allclose(full.float(), alone.float(), rtol=1e-3, atol=1e-3)

