"""The CUDA path: a 4-bit NF4 base with double quantization and bf16 compute (QLoRA). Runs on a GPU
machine only; skipped, and not counted as passing, on CPU."""

import pytest
import torch

from test_trial_training import make_spec, tokenized_rows
from trainables.qlora_trial import build_trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_qlora_nf4_on_cuda_trains_the_adapter_only(tiny_model_dir, tiny_data_dir, tmp_path):
    import bitsandbytes as bnb

    rows = tokenized_rows(tiny_model_dir, tiny_data_dir)
    trainer = build_trainer(make_spec(tiny_model_dir), rows["train"], rows["validation"], output_dir=str(tmp_path))
    layers = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers)
    assert layers[0].weight.quant_state.quant_type == "nf4" and layers[0].weight.quant_state.nested  # double quant
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < loss_before
    assert any(not torch.equal(lora_before[n], p) for n, p in trainer.model.named_parameters() if n in lora_before)
