"""The engine's cheaper base layers and its attention over packed examples compute what they replace: fused RMS
norms give transformers' norms (and a norm of another form is left alone), and attention told where the packed
examples start gives transformers' attention over the same rows, whose mask it makes from the position ids."""

import torch

from trainables.base_layers import FusedRMSNorm, fuse_rms_norms
from trainables.packed_attention import use_packed_attention
from trainables.step_layout import flat_layout


def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def packed_rows(vocab: int):
    """Two rows of three and two examples of different lengths, as the engine packs them."""
    generator = torch.Generator().manual_seed(0)

    def example(length):
        return {"input_ids": torch.randint(1, vocab, (length,), generator=generator).tolist(),
                "completion_mask": [0] + [1] * (length - 1)}

    return flat_layout({0: [example(5), example(9), example(3)], 1: [example(12), example(4)]}, "cpu")


def test_fused_rms_norms_give_what_transformers_norms_give(tiny_model_dir):
    model = tiny_model(tiny_model_dir)
    for norm in model.modules():  # trained-looking weights, not the ones of a fresh norm
        if type(norm).__name__.endswith("RMSNorm"):
            norm.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(1, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    replaced = fuse_rms_norms(model)
    assert replaced == 2 * model.config.num_hidden_layers + 1  # two per layer and the final one
    assert sum(isinstance(m, FusedRMSNorm) for m in model.modules()) == replaced
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_a_norm_of_another_form_is_left_alone():
    class GemmaLikeRMSNorm(torch.nn.Module):  # scales by 1 + weight
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(8))
            self.eps = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    model = torch.nn.Sequential(GemmaLikeRMSNorm())
    assert fuse_rms_norms(model) == 0 and isinstance(model[0], GemmaLikeRMSNorm)


def test_attention_told_the_examples_starts_gives_transformers_attention_on_packed_rows(tiny_model_dir):
    """The engine's attention (its reference, on CPU) against transformers' sdpa attention, which finds the packed
    examples in the position ids: the same logits and the same input gradients."""
    reference, packed = tiny_model(tiny_model_dir), tiny_model(tiny_model_dir)
    use_packed_attention(packed)
    layout = packed_rows(reference.config.vocab_size)
    results = []
    for model, extra in ((reference, {}), (packed, {"cu_seq_lens_q": layout.sequence_starts,
                                                    "max_length_q": layout.longest_sequence})):
        embeddings = model.get_input_embeddings()(layout.input_ids).detach().requires_grad_()
        # No cache: with one, transformers does not look for packed examples in the position ids.
        logits = model(inputs_embeds=embeddings, position_ids=layout.position_ids, use_cache=False, **extra).logits
        logits.float().pow(2).mean().backward()
        results.append((logits.detach(), embeddings.grad))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
