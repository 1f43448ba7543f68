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


def test_cuda_oom_retries_once_with_half_the_micro_batch(tiny_model_dir, tiny_data_dir, tmp_path):
    """A real CUDA out-of-memory: the process's memory cap is set between what micro-batch B/2 needs and
    what B needs, measured here first; the trial must finish with B/2 x 2 accumulation and say so."""
    from transformers import TrainerCallback

    from trainables.qlora_trial import train_with_micro_batch_fallback

    rows = tokenized_rows(tiny_model_dir, tiny_data_dir)
    big = 512
    train_rows = (rows["train"] * 20)[: big * 2]

    def peak_bytes(batch: int) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        spec = make_spec(tiny_model_dir, per_device_train_batch_size=batch, max_steps=2, eval_steps=2)
        build_trainer(spec, train_rows, rows["validation"], output_dir=str(tmp_path / f"probe{batch}")).train()
        return torch.cuda.max_memory_allocated()

    half, full = peak_bytes(big // 2), peak_bytes(big)
    assert full > half * 1.3, (half, full)  # the cap below must separate the two
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((half + (full - half) * 0.4) / total)

    class Steps(TrainerCallback):
        tokenizer = None
        note = ""
        seen: list = []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append((args.per_device_train_batch_size, args.gradient_accumulation_steps))

    spec = make_spec(tiny_model_dir, per_device_train_batch_size=big, max_steps=2, eval_steps=2)
    try:
        note = train_with_micro_batch_fallback(spec, train_rows, rows["validation"], str(tmp_path / "run"), Steps())
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert note == f"CUDA out of memory at micro-batch {big}; retried with {big // 2} x 2 accumulation"
    assert Steps.seen == [(big // 2, 2), (big // 2, 2)]


@pytest.mark.parametrize("options", [{}, {"dequantized_base": True},
                                     {"dequantized_base": True, "compile_backend": "inductor"},
                                     {"dequantized_base": True, "cuda_graphs": True}],
                         ids=["4bit-per-matmul", "dequantized-once", "compiled-layers", "cuda-graphs"])
def test_the_engine_on_cuda_trains_an_adapter_beside_others_as_alone_and_contains_a_divergence(options, tiny_model_dir,
                                                                                              tiny_data_dir):
    """The shared-base engine's CUDA path (4-bit NF4 base, batched LoRA; also dequantized once, with the decoder
    layers compiled by Inductor, and with the steps captured as CUDA graphs): the subject's losses beside three
    neighbours match its losses alone within bf16 noise (no dropout: CUDA masks come from the CUDA generator), and a
    neighbour whose learning rate blows up fails without touching it."""
    from test_engine import NEIGHBOURS, SUBJECT, train, train_queued

    from trainables.engine import LoraEngine
    from trainables.trial_spec import BaseModelSpec, TrainingConfig

    rows = tokenized_rows(tiny_model_dir, tiny_data_dir)
    base = BaseModelSpec(model_dir=str(tiny_model_dir), precision="4bit", device="cuda")
    subject = TrainingConfig(**{**SUBJECT.__dict__, "lora_dropout": 0.0})
    together = LoraEngine(base, slots=4, max_rank=16, **options)
    together.add("n1", TrainingConfig(**{**NEIGHBOURS[0].__dict__, "learning_rate": 1e30}), rows["train"],
                 rows["validation"])
    slot = together.add("subject", subject, rows["train"], rows["validation"])
    for config in NEIGHBOURS[1:]:
        together.add(f"n{config.seed}", config, rows["train"], rows["validation"])
    losses = train(together)
    alone = LoraEngine(base, slots=1, max_rank=16, **options)
    alone.add("subject", subject, rows["train"], rows["validation"])
    assert losses[slot] == pytest.approx(train(alone)[0], rel=2e-2)
    assert together.adapters[0].failure and together.adapters[slot].failure is None
    assert together.evaluate(slot) == pytest.approx(alone.evaluate(0), rel=2e-2)
    if options.get("cuda_graphs"):  # buckets met more than once were captured and replayed
        assert any(bucket.graph is not None for bucket in together.graphed.buckets.values())
        # Steps queued ahead of their reading (as the engine actor runs them): the figures come back through pinned
        # memory once the device gets there, and the same divergence fails alone.
        queued = LoraEngine(base, slots=4, max_rank=16, **options)
        for adapter in together.adapters.values():  # the same adapters in the same slots
            queued.add(adapter.name, adapter.training, rows["train"], rows["validation"])
        train_queued(queued)
        assert queued.adapters[0].failure and queued.adapters[slot].failure is None
        assert queued.evaluate(slot) == pytest.approx(together.evaluate(slot), rel=1e-2)
    from trainables.base_layers import FusedRMSNorm

    assert any(isinstance(module, FusedRMSNorm) for module in together.model.modules())  # norms fused on CUDA


def test_packed_attention_on_cuda_gives_the_reference_and_keeps_a_nan_in_its_example():
    """The engine's attention on CUDA (PyTorch's varlen flash attention over the packed examples) against its
    reference (scaled_dot_product_attention with the examples' mask, in fp32), forward and backward, with grouped
    key and value heads; a NaN in one example's values reaches no other example."""
    from trainables.packed_attention import packed_attention, varlen_attn

    if varlen_attn is None:
        pytest.skip("this PyTorch has no torch.nn.attention.varlen")
    rows, width, heads, groups, dim = 2, 64, 4, 2, 32
    starts = torch.tensor([0, 5, 30, 64, 100, 128], dtype=torch.int32)  # 3 + 2 sequences, the last row padding
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, n, width, dim, generator=generator) for n in (heads, heads // groups, heads // groups))

    def attend(device, dtype, values=v):
        inputs = [t.detach().to(device, dtype).requires_grad_() for t in (q, k, values)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            out, _ = packed_attention(None, *inputs, None, cu_seq_lens_q=starts.to(device), max_length_q=width)
        out.float().pow(2).sum().backward()
        return out.float().cpu(), [t.grad.float().cpu() for t in inputs]

    expected, expected_grads = attend("cpu", torch.float32)
    out, grads = attend("cuda", torch.float32)
    assert torch.allclose(out, expected, rtol=2e-2, atol=2e-2)
    for grad, reference in zip(grads, expected_grads):
        assert torch.allclose(grad, reference, rtol=5e-2, atol=5e-2)
    poisoned = v.clone()
    poisoned[0, :, 7] = float("nan")  # row 0, position 7: the second example (positions 5-29)
    out, _ = attend("cuda", torch.float32, values=poisoned)
    nan_positions = set(torch.isnan(out).any(-1).any(-1).flatten().nonzero().flatten().tolist())
    # Its example's later positions see it; its earlier ones may too (the kernel multiplies the masked-out scores'
    # 0 by the values: 0 * NaN, seen on the H200), but no position outside the example.
    assert set(range(7, 30)) <= nan_positions <= set(range(5, 30)), sorted(nan_positions)


def test_the_base_and_lora_node_on_cuda_gives_what_autograds_composition_gives():
    """On CUDA a module's base product and LoRA term are summed in fp32 by the matmuls themselves (torch.mm's and
    torch.baddbmm's out_dtype, multi_lora._BaseAndLora): the output and gradients of the composition it replaces (the
    bf16 matmul and cast, the bf16 LoRA product, their fp32 sum), up to bf16 rounding, for adapters held as strided
    views of one tensor as Routing.assign hands them."""
    from trainables.multi_lora import _BaseAndLora

    torch.manual_seed(0)
    rows, length, d_in, d_out, rank = 4, 37, 96, 160, 8
    weight = torch.randn(d_out, d_in, device="cuda").to(torch.bfloat16)
    bias = torch.randn(d_out, device="cuda").to(torch.bfloat16)
    adapters = torch.randn(rows, d_in * rank + rank * d_out + 5, device="cuda").to(torch.bfloat16) * 0.1
    compute = torch.randn(rows, length, d_in, device="cuda").to(torch.bfloat16)
    scale = torch.tensor([0.5, 2.0, 1.0, 0.0], device="cuda", dtype=torch.bfloat16).view(rows, 1, 1)
    results = []
    for fused in (True, False):
        leaf_adapters, leaf_compute = adapters.clone().requires_grad_(), compute.clone().requires_grad_()
        a_t = leaf_adapters[:, :d_in * rank].view(rows, d_in, rank)
        b_t = leaf_adapters[:, d_in * rank:d_in * rank + rank * d_out].view(rows, rank, d_out)
        if fused:
            out = _BaseAndLora.apply(leaf_compute, None, weight, bias, a_t, b_t, scale, torch.float32)
        else:
            out = torch.nn.functional.linear(leaf_compute, weight, bias).float() \
                + torch.bmm(torch.bmm(leaf_compute, a_t) * scale, b_t)
        out.backward(torch.ones_like(out).normal_(generator=torch.Generator("cuda").manual_seed(1)))
        results.append((out, leaf_compute.grad, leaf_adapters.grad))
    for fused, composed in zip(*results):
        assert fused.dtype == composed.dtype
        assert (fused.float() - composed.float()).abs().max() <= 1e-2 * composed.float().abs().max()
