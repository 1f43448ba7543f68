"""Merge the winning adapter into a bf16 base (never into 4-bit weights) and check the merged model."""

from __future__ import annotations

from pathlib import Path

from eval.artifacts import directory_written_atomically


def write_adapter_card(adapter_dir: Path, base_model_id: str, summary: str) -> None:
    (adapter_dir / "README.md").write_text(
        f"---\nlibrary_name: peft\nbase_model: {base_model_id}\ntags:\n- lora\n- lorasweep\n---\n\n"
        f"# LoRA adapter chosen by lorasweep\n\n{summary}\n"
    )


def merge_adapter(base_dir: str, adapter_dir: Path, out_dir: Path, base_model_id: str, summary: str,
                  trust_remote_code: bool = False):
    """Reload the base in bf16, merge_and_unload, save sharded safetensors + tokenizer + card atomically."""
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
        (partial / "README.md").write_text(
            f"---\nlibrary_name: transformers\nbase_model: {base_model_id}\nbase_model_relation: finetune\n"
            f"tags:\n- lorasweep\n---\n\n# Merged model chosen by lorasweep\n\n{summary}\n"
        )
    return merged
