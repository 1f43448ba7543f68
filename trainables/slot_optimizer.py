"""AdamW over stacked LoRA slots: every adapter keeps its own learning rate and schedule, weight decay, step count
(bias correction), gradient clipping and failure, while one update serves all the slots that are due. torch's
AdamW would need one parameter group, and so one leaf tensor, per adapter and module (../shared/research/
multi-lora.md, section 4); here a slot is a row of one slot-major tensor of every module's weights, and the
per-slot settings are vectors broadcast over it. The update is the one torch.optim.AdamW (decoupled weight decay) and the Trainer's
clip_grad_norm_ do, checked against them in tests/test_engine.py."""

from __future__ import annotations

import math

import torch

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

    One update is a few whole-tensor kernels with per-slot factors broadcast over the slot dimension (a slot that
    is not due gets weight 0, so its moments and weights stay as they are): the number of kernel launches per step
    depends on neither the number of slots, nor their mix, nor the number of modules, and no slot is gathered or
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

    def grad_norms(self) -> torch.Tensor:
        """Each slot's gradient norm over all its parameters, [S]."""
        return torch.linalg.vector_norm(self.weights.grad, dim=1)

    @torch.no_grad()
    def step(self, due: list[int], lrs: dict[int, float], weight_decay: dict[int, float]) -> torch.Tensor | None:
        """Clip (per slot, to MAX_GRAD_NORM) and update the `due` slots, then zero their gradients. Returns every
        slot's gradient norm before clipping, [S] on the device (None when no slot is due), without reading it: a due
        slot whose norm is not finite is left as it was on the device (the caller fails it when it reads the norms),
        so the step need not wait for its kernels before the next one is queued."""
        if not due or self.weights.grad is None:
            return None
        norms = self.grad_norms()
        self._update(due, norms, lrs, weight_decay)
        self.zero_grad(due)
        return norms

    def _update(self, due: list[int], norms: torch.Tensor, lrs: dict[int, float], weight_decay: dict[int, float]):
        beta1, beta2 = BETAS
        slots = len(self.steps)
        moment1, moment2, step_size, bias2_sqrt, keep = [0.0] * slots, [0.0] * slots, [0.0] * slots, [1.0] * slots, \
            [1.0] * slots
        for slot in due:
            self.steps[slot] += 1
            step, lr = self.steps[slot], lrs[slot]
            moment1[slot], moment2[slot] = 1 - beta1, 1 - beta2
            step_size[slot] = lr / (1 - beta1 ** step)
            bias2_sqrt[slot] = math.sqrt(1 - beta2 ** step)
            keep[slot] = 1 - lr * weight_decay[slot]
        w1, w2, size, bias2, decay = (torch.tensor(v, device=self.weights.device, dtype=torch.float32).view(-1, 1)
                                      for v in (moment1, moment2, step_size, bias2_sqrt, keep))
        # A slot whose norm is not finite: weights 0 and a zero gradient (a weight of 0 alone keeps a NaN: 0 * NaN).
        finite = torch.isfinite(norms).view(-1, 1)
        w1, w2, size, decay = w1 * finite, w2 * finite, size * finite, torch.where(finite, decay, 1.0)
        clip = (MAX_GRAD_NORM / (norms + 1e-6)).clamp(max=1.0).view(-1, 1)
        grads = torch.where(finite, self.weights.grad * clip, 0.0)
        self.moment1.lerp_(grads, w1)  # AdamW's exp_avg.lerp_(grad, 1 - beta1); weight 0: unchanged
        self.moment2.lerp_(grads.mul_(grads), w2)
        update = self.moment1 / self.moment2.sqrt().div_(bias2).add_(EPS)
        self.weights.mul_(decay)  # decoupled weight decay, as torch.optim.AdamW
        self.weights.sub_(update.mul_(size))

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
