"""Greedy generation pads on the left and gives the tokenizer back as it found it, also when it fails midway (the
same tokenizer then pads the held-out loss batches and the merge check on the right)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval.generation import generate_greedy


class StopAfterFirstBatch:
    """A progress bar that fails when the first batch is done, as a Ctrl-C or a full disk would."""

    def update(self, count):
        raise KeyboardInterrupt


def test_padding_side_is_restored_after_generation_and_after_a_failure(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = ["Query: set an alarm\nIntent:", "Query: what is my balance please\nIntent:"]
    assert tokenizer.padding_side == "right"

    outputs = generate_greedy(model, tokenizer, prompts, max_new_tokens=3, batch_size=2)
    assert len(outputs) == 2 and tokenizer.padding_side == "right"

    with pytest.raises(KeyboardInterrupt):
        generate_greedy(model, tokenizer, prompts, max_new_tokens=3, batch_size=1, progress=StopAfterFirstBatch())
    assert tokenizer.padding_side == "right"
