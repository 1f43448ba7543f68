"""AdamW over stacked LoRA slots: every adapter keeps its own learning rate and schedule, weight decay, step count
(bias correction), gradient clipping and failure. torch's AdamW would need one parameter group, and so one leaf
tensor, per adapter and module (../shared/research/multi-lora.md, section 4); here a slot is a row of one slot-major
tensor of every module's weights, updated by PyTorch's fused AdamW kernel with that slot's settings. The update is the
one torch.optim.AdamW (decoupled weight decay) and the Trainer's clip_grad_norm_ do, checked against them in
tests/test_engine.py."""

from __future__ import annotations

import math

import torch

from trainables.step_layout import to_device

# transformers' Trainer defaults, which the per-process path trains with (TrainingArguments).
BETAS = (0.9, 0.999)
EPS = 1e-8
MAX_GRAD_NORM = 1.0


def lr_multiplier(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """transformers.get_scheduler's factor for the `step`-th optimizer step (0-based), for the schedules the
    config offers."""
    if step < warmup_steps and schedule != "constant":
        return step / max(1, warmup_steps)
    if schedule in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


class SlotAdamW:
    """AdamW over the engine's slot-major weight leaf `weights` [S, N] (every module's stacked A and B side by side:
    trainables/multi_lora.wrap_linear_layers); `params` are each module's A and B as views of it. State: exp_avg
    and exp_avg_sq of the same shape (with the same per-parameter views, for checkpoints) and each slot's step
    count; the gradient is the leaf's own.

    One update is a norm kernel over the due slots' rows and PyTorch's fused AdamW kernel on each due slot's row (a
    row is contiguous: every module's A and B of that slot): the kernels per step depend on neither the mix of
    ranks and targets nor the number of modules, slots that are not due are not read, and no slot is gathered or
    scattered."""

    def __init__(self, weights: torch.nn.Parameter, params: list[torch.Tensor]):
        self.weights = weights
        self.moment1 = torch.zeros_like(weights, requires_grad=False)
        self.moment2 = torch.zeros_like(weights, requires_grad=False)
        self.exp_avg = [self._view_of(self.moment1, p) for p in params]
        self.exp_avg_sq = [self._view_of(self.moment2, p) for p in params]
        self.steps = [0] * weights.shape[0]
        self.accumulating: set[int] = set()  # slots whose gradients hold micro-batches not yet stepped

    def _view_of(self, state: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        return state.as_strided(param.shape, param.stride(),
                                state.storage_offset() + param.storage_offset() - self.weights.storage_offset())

    def reset_slot(self, slot: int) -> None:
        """A new adapter in the slot starts with fresh moments and step count."""
        with torch.no_grad():
            self.moment1[slot].zero_()
            self.moment2[slot].zero_()
        self.steps[slot] = 0

    @torch.no_grad()
    def step(self, due: list[int], lrs: dict[int, float], weight_decay: dict[int, float]) -> torch.Tensor | None:
        """Clip (per slot, to MAX_GRAD_NORM) and update the `due` slots, then zero their gradients. Returns their
        gradient norms before clipping, [len(due)] in `due`'s order on the device (None when none is due), without
        reading them: a slot whose norm is not finite is left as it was (the caller fails it when it reads the norms),
        so the step need not wait for its kernels before the next one is queued."""
        if not due or self.weights.grad is None:
            return None
        grads = [self.weights.grad[slot] for slot in due]
        norms = torch.stack(torch._foreach_norm(grads))
        # clip_grad_norm_'s factor, min(1, max_norm / (norm + 1e-6)), as the fused kernel's gradient scale (which it
        # divides by); its found_inf flag skips a slot whose norm is not finite.
        scales = norms.add(1e-6).div_(MAX_GRAD_NORM).clamp_(min=1.0)
        skipped = torch.isfinite(norms).logical_not_().float()
        for slot in due:
            self.steps[slot] += 1
        counts = to_device([float(self.steps[slot]) for slot in due], self.weights.device)
        # PyTorch's fused AdamW (what torch.optim.AdamW(fused=True) runs), one slot's row per call for the slot's own
        # learning rate, weight decay and step: one pass over the row's weights, gradient and moments, where the
        # update written out of whole-tensor operations took ~15 passes over every slot, due or not (~10 of a
        # 124 ms step for 16 SmolLM2-shaped adapters on the H200, BENCHMARKS.md).
        beta1, beta2 = BETAS
        for index, slot in enumerate(due):
            torch._fused_adamw_([self.weights[slot]], [grads[index]], [self.moment1[slot]], [self.moment2[slot]], [],
                                [counts[index]], amsgrad=False, lr=lrs[slot], beta1=beta1, beta2=beta2,
                                weight_decay=weight_decay[slot], eps=EPS, maximize=False,
                                grad_scale=scales[index], found_inf=skipped[index])
        self.zero_grad(due)
        return norms

    def accumulated(self, slots: list[int]) -> None:
        """The slots whose micro-batches a backward pass just added to the gradients."""
        self.accumulating.update(slots)

    def zero_grad(self, slots: list[int]) -> None:
        self.accumulating.difference_update(slots)
        if not self.accumulating:  # nothing left to keep: drop the gradient instead of writing zeros
            self.weights.grad = None
        elif self.weights.grad is not None:
            with torch.no_grad():
                self.weights.grad[slots] = 0

    def set_aside_gradients(self) -> torch.Tensor | None:
        """Before a backward that may fail midway (a CUDA out-of-memory error): the gradients of earlier micro-batches
        of open accumulation windows, taken out of the way (None when there are none), so that a failed attempt's
        partial gradients can be dropped whole. take_back_gradients adds them back."""
        kept, self.weights.grad = self.weights.grad, None
        return kept

    def drop_gradients(self) -> None:
        self.weights.grad = None

    def take_back_gradients(self, kept: torch.Tensor | None) -> None:
        if kept is not None:
            self.weights.grad = kept if self.weights.grad is None else self.weights.grad.add_(kept)

    def slot_moments(self, slot: int, parts: list[tuple | None]) -> dict:
        """What a checkpoint holds of the optimizer for one adapter (its step count is steps[slot]): per parameter, the
        moments of its part of the slot (`parts[i]` indexes parameter i's slot row: the adapter's rank, not the padded
        one), or None where the adapter does not train that parameter. A rank-8 adapter of two modules then saves its
        own few MB, not the moments of every module at the study's largest rank (~230 MB for SmolLM2 at rank 64).
        Views of the device state: the caller copies them (trainables/engine.PiecesOffDevice)."""
        def part(tensor, index):
            return None if index is None else tensor[slot][index]

        return {"exp_avg": [part(m, i) for m, i in zip(self.exp_avg, parts)],
                "exp_avg_sq": [part(v, i) for v, i in zip(self.exp_avg_sq, parts)]}

    def load_slot_state(self, slot: int, state: dict, parts: list[tuple | None]) -> None:
        self.reset_slot(slot)
        self.steps[slot] = state["step"]
        with torch.no_grad():
            for moments, key in ((self.exp_avg, "exp_avg"), (self.exp_avg_sq, "exp_avg_sq")):
                for tensor, saved, index in zip(moments, state[key], parts):
                    if index is not None:
                        tensor[slot][index].copy_(saved)
