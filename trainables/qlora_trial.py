"""One trial: base model (4-bit on CUDA) -> LoRA -> TRL SFTTrainer -> tune.report at every evaluation."""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from trainables.lora_presets import target_modules_for

TRIAL_STATE_FILE = "lorasweep_trial_state.json"
TOKEN_COLUMNS = ("input_ids", "completion_mask")


@dataclass
class TrialSpec:
    """Everything one trial needs, flat: the sweep's fixed settings overlaid by the searched values."""

    model_dir: str
    load_in_4bit: bool
    bnb_4bit_quant_type: str
    bnb_4bit_use_double_quant: bool
    cpu_fallback: str
    trust_remote_code: bool
    max_length: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: str
    learning_rate: float
    max_steps: int
    eval_steps: int
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    gradient_accumulation_steps: int
    warmup_steps: int
    lr_scheduler_type: str
    weight_decay: float
    gradient_checkpointing: bool
    seed: int

    @classmethod
    def from_tune_config(cls, settings: dict, tune_config: dict) -> "TrialSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        merged = {**settings, **tune_config}
        return cls(**{k: v for k, v in merged.items() if k in names})


def train_qlora_trial(tune_config: dict, settings: dict, train_rows: list[dict], eval_rows: list[dict]) -> None:
    """The Ray Tune function trainable; `settings` and the rows arrive through tune.with_parameters."""
    from ray import tune

    started = time.time()
    spec = TrialSpec.from_tune_config(settings, tune_config)
    final = _finished_state(tune.get_checkpoint(), spec.max_steps)
    if final is not None:
        # The trial had finished when the driver was lost, before Tune's snapshot recorded it: report its
        # final metrics again instead of training it again. (An unfinished trial starts over.)
        tune.report(final)
        return
    # Nothing is saved in the trainer's own directory (checkpoints go to Tune), but it wants one.
    with tempfile.TemporaryDirectory(prefix="lorasweep-trial-") as scratch:
        trainer = build_trainer(spec, train_rows, eval_rows, output_dir=scratch)
        trainer.add_callback(_ReportToTune(trainer.processing_class, started))
        trainer.train()


def _finished_state(checkpoint, max_steps: int) -> dict | None:
    """The metrics saved with a checkpoint taken at the last step, or None."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state_path = Path(directory) / TRIAL_STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    return state if state.get("step", 0) >= max_steps else None


def build_trainer(spec: TrialSpec, train_rows: list[dict], eval_rows: list[dict], output_dir: str):
    """Base model (4-bit on CUDA, the configured fallback on CPU) + LoRA + a TRL SFTTrainer on
    prompt/completion rows with the loss on completions only."""
    import torch
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar as disable_datasets_progress_bars
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import PrinterCallback, set_seed
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    from trainables.model_loading import choose_precision, load_base_model, load_tokenizer

    # One line per evaluation from Tune, not a scroll of library warnings and progress bars per trial.
    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_datasets_progress_bars()
    cuda = torch.cuda.is_available()
    precision, path_line = choose_precision(spec.load_in_4bit, spec.cpu_fallback, cuda)
    print(f"[lorasweep] trial path: {path_line}", flush=True)

    # Seeds before the adapter exists: LoRA's A matrices are drawn from the global RNG.
    set_seed(spec.seed)
    tokenizer = load_tokenizer(spec.model_dir, spec.trust_remote_code)
    model = load_base_model(spec.model_dir, precision, spec.bnb_4bit_quant_type, spec.bnb_4bit_use_double_quant,
                            spec.trust_remote_code, device="cuda" if cuda else "cpu")
    if precision == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    lora = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                      target_modules=target_modules_for(spec.lora_target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)

    args = SFTConfig(
        output_dir=output_dir,
        max_steps=spec.max_steps,
        eval_strategy="steps",
        eval_steps=spec.eval_steps,
        save_strategy="no",
        logging_steps=spec.eval_steps,
        per_device_train_batch_size=spec.per_device_train_batch_size,
        per_device_eval_batch_size=spec.per_device_eval_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate,
        warmup_steps=spec.warmup_steps,
        lr_scheduler_type=spec.lr_scheduler_type,
        weight_decay=spec.weight_decay,
        gradient_checkpointing=spec.gradient_checkpointing,
        # The CPU path already holds bf16 weights; autocast there costs time and buys nothing.
        bf16=cuda,
        use_cpu=not cuda,
        max_length=spec.max_length,
        completion_only_loss=True,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        seed=spec.seed,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        # Rows arrive tokenized (once per sweep, by the driver): TRL sees input_ids and skips its tokenization.
        train_dataset=Dataset.from_list([{k: r[k] for k in TOKEN_COLUMNS} for r in train_rows]),
        eval_dataset=Dataset.from_list([{k: r[k] for k in TOKEN_COLUMNS} for r in eval_rows]),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)  # Tune's callback prints the metrics that matter
    return trainer


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _ReportToTune(TrainerCallback):
    """At each evaluation: save the adapter and hand it to Tune with the metrics (ASHA decides here)."""

    def __init__(self, tokenizer, started: float):
        self.tokenizer = tokenizer
        self.started = started
        self.last_train_loss = float("nan")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_train_loss = float(logs["loss"])

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        from ray import tune

        eval_loss = float(metrics["eval_loss"])
        if not math.isfinite(eval_loss):
            raise FloatingPointError(f"eval_loss is {eval_loss} at step {state.global_step}")
        report = {
            "eval_loss": eval_loss,
            # ASHA's time unit: the evaluation's index, which a restarted trial counts again from 1.
            "evaluation": state.global_step // args.eval_steps,
            "train_loss": self.last_train_loss,
            "step": state.global_step,
            "tokens": int(state.num_input_tokens_seen),
            "wall_time_s": round(time.time() - self.started, 2),
            "peak_memory_mb": round(_peak_memory_mb(), 1),
        }
        with tempfile.TemporaryDirectory(prefix="lorasweep-adapter-") as adapter_dir:
            model.save_pretrained(adapter_dir)
            self.tokenizer.save_pretrained(adapter_dir)
            (Path(adapter_dir) / TRIAL_STATE_FILE).write_text(json.dumps(report))
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(adapter_dir))
