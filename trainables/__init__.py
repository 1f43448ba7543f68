"""One QLoRA trial: load the base, attach LoRA, train with TRL's SFTTrainer, report to Ray Tune."""
