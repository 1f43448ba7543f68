"""Start-up and step time of one trial, measured the same way for lorasweep's trials and the baseline's
(BENCHMARKS.md compares them)."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """startup_s: from `started` to the end of the first optimizer step; train_seconds: time inside optimizer
    steps, without evaluations and checkpoints."""

    def __init__(self, started: float):
        self.started = started
        self.startup_s = None
        self.train_seconds = 0.0
        self.step_began = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_began = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.time()
        self.train_seconds += now - self.step_began
        if self.startup_s is None:
            self.startup_s = round(now - self.started, 2)
