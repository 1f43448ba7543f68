"""AdamW over stacked LoRA slots: every adapter keeps its own learning rate and schedule, weight decay, step count
(bias correction), gradient clipping and failure, while one update serves all the slots that are due. torch's
AdamW would need one parameter group, and so one leaf tensor, per adapter and module (../shared/research/
multi-lora.md, section 4); here a slot is a row of each stacked leaf, and the per-slot settings are vectors
broadcast over it. The update is the one torch.optim.AdamW (decoupled weight decay) and the Trainer's
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
    """State per stacked parameter (slot dimension first): exp_avg and exp_avg_sq; per slot: the step count."""

    def __init__(self, params: list[torch.nn.Parameter], slots: int):
        self.params = params
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = [0] * slots

    def reset_slot(self, slot: int) -> None:
        """A new adapter in the slot starts with fresh moments and step count."""
        for m, v in zip(self.exp_avg, self.exp_avg_sq):
            m[slot].zero_()
            v[slot].zero_()
        self.steps[slot] = 0

    def grad_norms(self) -> torch.Tensor:
        """Each slot's gradient norm over all its parameters, [S]."""
        total = None
        for p in self.params:
            if p.grad is None:
                continue
            squares = p.grad.float().pow(2).flatten(1).sum(1)
            total = squares if total is None else total + squares
        return total.sqrt()

    @torch.no_grad()
    def step(self, due: list[int], lrs: dict[int, float], weight_decay: dict[int, float]) -> dict[int, float]:
        """Clip (per slot, to MAX_GRAD_NORM) and update the `due` slots; zero their gradients. Returns each due
        slot's gradient norm before clipping (non-finite: the caller fails that slot; it is not updated)."""
        if not due:
            return {}
        norms = self.grad_norms()
        reported = {slot: float(norms[slot]) for slot in due}
        due = [slot for slot in due if math.isfinite(reported[slot])]
        if due:
            self._update(due, norms, lrs, weight_decay)
        self.zero_grad(list(reported))
        return reported

    def _update(self, due: list[int], norms: torch.Tensor, lrs: dict[int, float], weight_decay: dict[int, float]):
        device = self.params[0].device
        index = torch.tensor(due, device=device)
        for slot in due:
            self.steps[slot] += 1
        beta1, beta2 = BETAS
        steps = torch.tensor([self.steps[s] for s in due], dtype=torch.float64)
        lr = torch.tensor([lrs[s] for s in due], dtype=torch.float64)
        decay = torch.tensor([weight_decay[s] for s in due], dtype=torch.float64)
        step_size = (lr / (1 - beta1 ** steps)).to(torch.float32)
        bias2_sqrt = (1 - beta2 ** steps).sqrt().to(torch.float32)
        keep = (1 - lr * decay).to(torch.float32)
        clip = (MAX_GRAD_NORM / (norms[index].float() + 1e-6)).clamp(max=1.0)
        for p, m_all, v_all in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            grad = p.grad[index] * clip.view(shape)
            m = m_all[index].mul_(beta1).add_(grad, alpha=1 - beta1)
            v = v_all[index].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            m_all[index] = m
            v_all[index] = v
            denom = (v.sqrt() / bias2_sqrt.to(device).view(shape)).add_(EPS)
            updated = p[index] * keep.to(device).view(shape) - step_size.to(device).view(shape) * m / denom
            p[index] = updated

    def zero_grad(self, slots: list[int]) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad[slots] = 0

    def slot_state(self, slot: int) -> dict:
        """What a checkpoint holds of the optimizer for one adapter."""
        return {"step": self.steps[slot], "exp_avg": [m[slot].detach().cpu().clone() for m in self.exp_avg],
                "exp_avg_sq": [v[slot].detach().cpu().clone() for v in self.exp_avg_sq]}

    def load_slot_state(self, slot: int, state: dict) -> None:
        self.steps[slot] = state["step"]
        with torch.no_grad():
            for m, saved in zip(self.exp_avg, state["exp_avg"]):
                m[slot].copy_(saved)
            for v, saved in zip(self.exp_avg_sq, state["exp_avg_sq"]):
                v[slot].copy_(saved)
