"""The trial of the plain approach that BENCHMARKS.md measures lorasweep against, written as users write it:
every trial loads and 4-bit quantizes the base itself, hands TRL the prompt/completion text to tokenize, and
keeps TRL's defaults (gradient checkpointing on, batches padded to their longest example). Not used by
lorasweep's own sweeps; `sweeps/baseline_sweep.py` runs it."""

from __future__ import annotations

import time

# As in trainables/qlora_trial.py: start-up is measured from the moment the worker imports the trial code.
MODULE_IMPORTED_AT = time.time()

import tempfile  # noqa: E402

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from ray import tune  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from trainables.lora_presets import target_modules_for  # noqa: E402
from trainables.step_timer import StepTimer  # noqa: E402


def train_baseline_trial(config: dict, settings: dict, train_rows: list[dict], eval_rows: list[dict]) -> None:
    """A Ray Tune function trainable; `config` holds the searched values, `settings` the fixed ones."""
    hp = {**settings, **config}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tokenizer = AutoTokenizer.from_pretrained(hp["model_dir"])
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    # 4-bit needs CUDA; on a CPU (the benchmark's own test) the same script trains on a bf16 base.
    model = AutoModelForCausalLM.from_pretrained(hp["model_dir"], dtype=torch.bfloat16,
                                                 quantization_config=quantization if cuda else None,
                                                 device_map="auto" if cuda else None)
    peft_config = LoraConfig(r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
                             target_modules=target_modules_for(hp["lora_target_modules"]), task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory(prefix="baseline-trial-") as output_dir:
        args = SFTConfig(
            output_dir=output_dir,
            max_steps=hp["max_steps"],
            eval_strategy="steps",
            eval_steps=hp["eval_steps"],
            save_strategy="no",
            logging_steps=hp["eval_steps"],
            per_device_train_batch_size=hp["per_device_train_batch_size"],
            per_device_eval_batch_size=hp["per_device_eval_batch_size"],
            gradient_accumulation_steps=hp["gradient_accumulation_steps"],
            learning_rate=hp["learning_rate"],
            warmup_steps=hp["warmup_steps"],
            lr_scheduler_type=hp["lr_scheduler_type"],
            weight_decay=hp["weight_decay"],
            max_length=hp["max_length"],
            bf16=cuda,
            use_cpu=not cuda,
            report_to="none",
            disable_tqdm=True,
            seed=hp["seed"],
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in train_rows]),
            eval_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in eval_rows]),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[ReportEachEvaluation(MODULE_IMPORTED_AT)],
        )
        trainer.train()


class ReportEachEvaluation(StepTimer):
    """tune.report at each evaluation with the adapter as the checkpoint, and the figures BENCHMARKS.md compares
    (the same keys as lorasweep's trials report, timed by the same StepTimer)."""

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kwargs):
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        report = {"eval_loss": float(metrics["eval_loss"]), "evaluation": state.global_step // args.eval_steps,
                  "step": state.global_step, "startup_s": self.startup_s, "train_seconds": round(self.train_seconds, 2),
                  "peak_memory_mib": round(peak, 1), "trial_in_process": 1}
        with tempfile.TemporaryDirectory(prefix="baseline-adapter-") as checkpoint_dir:
            model.save_pretrained(checkpoint_dir)
            processing_class.save_pretrained(checkpoint_dir)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
