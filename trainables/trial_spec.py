"""What one trial is given: the training settings (the config's `training` section, one field list for the
config, the search space and the trial) and the frozen base it trains on. Standard library only: the config
imports this module, and `--dry-run` must stay quick."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal


# A trial's Tune checkpoint: the PEFT adapter and tokenizer, our metrics (TRIAL_STATE_FILE), and what resuming it
# needs: transformers' Trainer state on the per-process path, the engine's state on the shared-base path. The
# evaluation stage copies the adapter without the RESUME_FILES.
TRIAL_STATE_FILE = "lorasweep_trial_state.json"
ENGINE_STATE_FILE = "lorasweep_engine_state.pt"
RESUME_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", ENGINE_STATE_FILE)


class TrialSpecError(ValueError):
    """Tune handed a trial a value that is not a training setting."""


@dataclass(frozen=True)
class TrainingConfig:
    """One trial's settings, named as TRL names them; any of them can be searched in sweep.parameters."""

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = "all_linear"
    learning_rate: float = 2.0e-4
    max_steps: int = 16
    eval_steps: int = 8
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    lr_scheduler_type: Literal["linear", "constant", "cosine", "constant_with_warmup"] = "linear"
    weight_decay: float = 0.0
    # Off: recomputing activations costs a third more time per step (TRL turns it on by default); the GPU
    # share per trial is sized from the memory the activations need (resources.gpus_per_trial=-1).
    gradient_checkpointing: bool = False
    # Batches as one flat sequence without pad tokens (TRL's padding_free): BENCHMARKS.md measures what it pays.
    padding_free: bool = True
    seed: int = 42


TRAINING_KEYS = tuple(f.name for f in dataclasses.fields(TrainingConfig))


@dataclass(frozen=True)
class BaseModelSpec:
    """The frozen base, as the driver decided it once for every trial and the evaluation stage."""

    model_dir: str
    precision: Literal["4bit", "bf16"]  # trainables.model_loading.choose_precision decides it
    device: Literal["cuda", "cpu"]
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    trust_remote_code: bool = False


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial needs: the training section with Tune's sampled values laid over it, the base, and
    data.max_length (enforced by TRL only for padded batches; the driver already cut the rows to it)."""

    training: TrainingConfig
    base: BaseModelSpec
    max_length: int

    @classmethod
    def from_tune_config(cls, training: TrainingConfig, sampled: dict[str, Any], base: BaseModelSpec,
                         max_length: int) -> "TrialSpec":
        """The training section overlaid by Tune's sampled values; a key that is no training setting fails."""
        unknown = sorted(set(sampled) - set(TRAINING_KEYS))
        if unknown:
            raise TrialSpecError(f"the trial's sampled config has {unknown}, which are not training settings; "
                                 f"valid: {', '.join(TRAINING_KEYS)}")
        return cls(training=dataclasses.replace(training, **sampled), base=base, max_length=max_length)

    def with_training(self, **changes) -> "TrialSpec":
        return dataclasses.replace(self, training=dataclasses.replace(self.training, **changes))
