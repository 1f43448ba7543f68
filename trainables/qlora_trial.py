"""One trial: base model (4-bit on CUDA) -> LoRA -> TRL SFTTrainer -> tune.report at every evaluation."""

from __future__ import annotations

import time

# When this process began importing the trial code: a trial's start-up (to its first optimizer step)
# counts the imports for the first trial in a process, not for later trials on a reused Ray actor.
MODULE_IMPORTED_AT = time.time()

import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

from trainables.lora_presets import target_modules_for  # noqa: E402
from trainables.step_timer import StepTimer  # noqa: E402
from trainables.trial_spec import TRIAL_STATE_FILE, BaseModelSpec, TrainingConfig, TrialSpec  # noqa: E402

_trials_in_process = 0  # trials this process has started: more than one on a reused Ray actor
TOKEN_COLUMNS = ("input_ids", "completion_mask")


def train_qlora_trial(tune_config: dict, training: TrainingConfig, base: BaseModelSpec, max_length: int,
                      train_rows: list[dict], eval_rows: list[dict]) -> None:
    """The Ray Tune function trainable: `tune_config` holds the sampled values; the training section, the base,
    data.max_length and the rows arrive through tune.with_parameters."""
    from ray import tune

    global _trials_in_process
    started = MODULE_IMPORTED_AT if _trials_in_process == 0 else time.time()
    _trials_in_process += 1
    _reset_peak_memory()  # a reused actor's peak would otherwise be its earlier trials'
    spec = TrialSpec.from_tune_config(training, tune_config, base, max_length)
    checkpoint = tune.get_checkpoint()
    # Nothing is saved in the trainer's own directory (checkpoints go to Tune), but it wants one.
    with tempfile.TemporaryDirectory(prefix="lorasweep-trial-") as scratch:
        resume_dir = None
        if checkpoint is not None:  # a retry after a lost node, or a sweep resumed after a lost driver
            resume_dir = Path(scratch) / "resume"
            checkpoint.to_directory(str(resume_dir))
            state = json.loads((resume_dir / TRIAL_STATE_FILE).read_text())
            if state["step"] >= spec.training.max_steps:
                # It had finished before Tune's snapshot recorded it: report the final metrics again
                # instead of training it again.
                tune.report(state)
                return
            print(f"[lorasweep] trial resumes from its checkpoint at step {state['step']}", flush=True)
        train_with_micro_batch_fallback(spec, train_rows, eval_rows, scratch, _ReportToTune(started), resume_dir)


def train_with_micro_batch_fallback(spec: TrialSpec, train_rows: list[dict], eval_rows: list[dict], output_dir: str,
                                    callback, resume_dir: Path | None = None) -> str | None:
    """Train; on CUDA out-of-memory, retry once with half the micro-batch and twice the gradient
    accumulation (the same effective batch). Returns what was retried, or None."""
    import gc

    import torch

    trainer = build_trainer(spec, train_rows, eval_rows, output_dir=output_dir)
    trainer.add_callback(callback)
    resume = str(resume_dir) if resume_dir else None
    try:
        trainer.train(resume_from_checkpoint=resume)
        return None
    except torch.OutOfMemoryError:
        if spec.training.per_device_train_batch_size == 1:
            raise
    # Out of the except block, so that the exception's frames no longer hold the failed step's tensors.
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    training = spec.training
    smaller = spec.with_training(per_device_train_batch_size=training.per_device_train_batch_size // 2,
                                 gradient_accumulation_steps=training.gradient_accumulation_steps * 2)
    note = (f"CUDA out of memory at micro-batch {training.per_device_train_batch_size}; retried with "
            f"{smaller.training.per_device_train_batch_size} x {smaller.training.gradient_accumulation_steps} "
            f"accumulation")
    print(f"[lorasweep] {note}", flush=True)
    callback.note = note
    trainer = build_trainer(smaller, train_rows, eval_rows, output_dir=output_dir)
    trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    return note


def build_trainer(spec: TrialSpec, train_rows: list[dict], eval_rows: list[dict], output_dir: str):
    """The base of spec.base (4-bit or bf16, on the device the driver chose) + LoRA + a TRL SFTTrainer on
    prompt/completion rows with the loss on completions only."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar as disable_datasets_progress_bars
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, set_seed
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    from trainables.base_model_cache import acquire_base_model, remember_adapter
    from trainables.model_loading import load_base_for_training, load_tokenizer

    # One line per evaluation from Tune, not a scroll of library warnings and progress bars per trial.
    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_datasets_progress_bars()
    base, t = spec.base, spec.training
    cuda = base.device == "cuda"

    model, reused = acquire_base_model((base, t.gradient_checkpointing),
                                       lambda: load_base_for_training(base, t.gradient_checkpointing))
    print(f"[lorasweep] trial path: {base.precision} base on {base.device}"
          + ("; base model reused from this worker's previous trial" if reused else ""), flush=True)
    tokenizer = load_tokenizer(base.model_dir, base.trust_remote_code)
    # Seeds right before the adapter exists (LoRA's A matrices are drawn from the global RNG), so that a
    # reused base and a freshly loaded one give the same adapter.
    set_seed(t.seed)
    lora = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                      target_modules=target_modules_for(t.lora_target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    remember_adapter(model)

    args = SFTConfig(
        output_dir=output_dir,
        max_steps=t.max_steps,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        save_strategy="no",
        logging_steps=t.eval_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        gradient_checkpointing=t.gradient_checkpointing,
        # The CPU path already holds bf16 weights; autocast there costs time and buys nothing.
        bf16=cuda,
        use_cpu=not cuda,
        # Padding-free: each batch is one flat sequence with position_ids restarting per example, so no compute
        # goes to pad tokens; transformers' attention masks keep the examples apart (also with SDPA). Rows are
        # already cut to data.max_length by the driver, and TRL refuses a max_length it would not enforce.
        padding_free=t.padding_free,
        max_length=None if t.padding_free else spec.max_length,
        completion_only_loss=True,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        seed=t.seed,
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


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _ReportToTune(StepTimer):
    """At each evaluation: save the adapter and hand it to Tune with the metrics (ASHA decides here)."""

    def __init__(self, started: float):
        # started: the trial's start (its imports, for a process's first trial)
        super().__init__(started)
        self.last_train_loss = float("nan")
        self.note = ""  # what was retried (an out-of-memory fallback), shown in the leaderboard

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_train_loss = float(logs["loss"])

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, optimizer=None,
                    lr_scheduler=None, **kwargs):
        from ray import tune

        eval_loss = float(metrics["eval_loss"])
        report = {
            "eval_loss": eval_loss,
            # ASHA's time unit: the evaluation's index, which a restarted trial counts again from 1.
            "evaluation": state.global_step // args.eval_steps,
            "train_loss": self.last_train_loss,
            "step": state.global_step,
            "tokens": int(state.num_input_tokens_seen),
            "wall_time_s": round(time.time() - self.started, 2),
            "peak_memory_mib": round(_peak_memory_mib(), 1),
            "startup_s": self.startup_s,
            "trial_in_process": _trials_in_process,  # 1 for a new worker process, more on a reused actor
            "train_seconds": round(self.train_seconds, 2),
            "retry_note": self.note,
        }
        if not math.isfinite(eval_loss):
            # A diverged trial ends here as failed, reporting the worst loss so that the searcher steers away
            # from its region. It does not raise: a raise would spend FailureConfig retries, which are for
            # lost nodes, on a failure that would only repeat.
            report.update(eval_loss=math.inf, failure=f"eval_loss is {eval_loss} at step {state.global_step}")
            control.should_training_stop = True
            tune.report(report)
            return control
        with tempfile.TemporaryDirectory(prefix="lorasweep-adapter-") as checkpoint_dir:
            save_trial_checkpoint(Path(checkpoint_dir), model, processing_class, state, optimizer, lr_scheduler,
                                  report)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
        return control


def save_trial_checkpoint(directory: Path, model, tokenizer, state, optimizer, lr_scheduler, report: dict) -> None:
    """Adapter + tokenizer (PEFT layout) + what Trainer.train(resume_from_checkpoint=...) needs + our metrics."""
    import torch

    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    state.save_to_json(str(directory / "trainer_state.json"))
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), directory / "scheduler.pt")
    (directory / TRIAL_STATE_FILE).write_text(json.dumps(report))
