"""Merge the winning adapter into a bf16 base (never into 4-bit weights) and check the merged model."""

from __future__ import annotations

from pathlib import Path

from eval.artifacts import directory_written_atomically


def merge_adapter(base_dir: str, adapter_dir: Path, out_dir: Path, card, trust_remote_code: bool = False):
    """Reload the base in bf16, merge_and_unload, save sharded safetensors + tokenizer + `card` (a
    huggingface_hub.ModelCard, eval/model_card.py) atomically."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainables.model_loading import drop_quantization_config

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, trust_remote_code=trust_remote_code,
                                                use_safetensors=True)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    with directory_written_atomically(out_dir) as partial:
        merged.save_pretrained(partial, max_shard_size="2GB")
        tokenizer.save_pretrained(partial)
        drop_quantization_config(partial)
        card.save(partial / "README.md")
    return merged
