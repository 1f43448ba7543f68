"""The engine's frozen base made cheaper to run, layer by layer, computing what the layers it replaces compute: 4-bit
linears dequantized once, RMS norms as PyTorch's fused kernel. The engine holds one base per GPU for all its
trials, so it can afford both; the per-process path keeps the layers as transformers and PEFT load them."""

from __future__ import annotations

import torch


class DequantizedLinear(torch.nn.Module):
    """A frozen linear layer holding a 4-bit layer's weight dequantized once, computing as that layer does: the
    input cast to the compute dtype, the output cast back to the input's dtype (bitsandbytes' Linear4bit.forward)."""

    def __init__(self, layer):
        import bitsandbytes as bnb

        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        dtype = layer.compute_dtype or torch.float32
        self.register_buffer("weight", bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
                             .to(dtype))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T + b in x's dtype, from x cast to the compute dtype. MultiLoraLinear computes the training steps'
        sum of this and the LoRA term in one autograd node of its own (multi_lora._BaseAndLora)."""
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def dequantize_linear_layers(modules) -> int:
    """Replace each 4-bit base linear by a DequantizedLinear: the same numbers as the 4-bit layer's matmul uses
    (bitsandbytes dequantizes the NF4 weight to the compute dtype before every matmul, forward and backward), without
    the two dequantizations and bitsandbytes' per-call work in every step. Four times the base's 4-bit memory,
    affordable because the engine holds one base per GPU, not one per trial. Returns the number of layers replaced."""
    import bitsandbytes as bnb

    replaced = 0
    for module in modules:
        if isinstance(module.base, bnb.nn.Linear4bit):
            module.base = DequantizedLinear(module.base)
            replaced += 1
    return replaced


class FusedRMSNorm(torch.nn.Module):
    """An RMS norm as torch.nn.functional.rms_norm, one fused kernel forward and one backward on CUDA, where
    transformers' Llama-family norm runs five elementwise kernels forward (fp32 cast, square, mean, rsqrt and
    product, weight) and more backward: on an H200, 0.27 against 0.64 ms forward and backward for a [22k, 576] fp32
    input (2026-12-03); a SmolLM2-shaped step has 61 of them."""

    def __init__(self, norm: torch.nn.Module, eps: float):
        super().__init__()
        self.weight = norm.weight
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Replace the model's RMS norms (a module class named *RMSNorm with a vector weight and an epsilon) by
    FusedRMSNorm where, tried on an input in the norm's weight's dtype (the residual stream's, fp32 after k-bit
    preparation), the fused kernel gives what the norm gives: not, for example, Gemma's norm, which scales by
    1 + weight. Returns the number of norms replaced."""
    agrees: dict[type, bool] = {}
    replaced = 0
    for name, norm in list(model.named_modules()):
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        weight = getattr(norm, "weight", None)
        if not type(norm).__name__.endswith("RMSNorm") or not isinstance(eps, float) \
                or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            continue
        if type(norm) not in agrees:
            agrees[type(norm)] = _fused_gives_what_the_norm_gives(norm, eps)
        if agrees[type(norm)]:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, FusedRMSNorm(norm, eps))
            replaced += 1
    return replaced


@torch.no_grad()
def _fused_gives_what_the_norm_gives(norm: torch.nn.Module, eps: float) -> bool:
    weight = norm.weight
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(2, 7, weight.shape[0], device=weight.device, dtype=weight.dtype, generator=generator) * 3
    saved = weight.detach().clone()
    try:  # a weight of random values: an untrained norm's ones would hide a 1 + weight form
        weight.copy_(torch.rand(weight.shape, device=weight.device, generator=generator).to(weight.dtype) + 0.5)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            expected, fused = norm(x), torch.nn.functional.rms_norm(x, weight.shape, weight, eps)
    finally:
        weight.copy_(saved)
    return expected.dtype == fused.dtype and torch.allclose(expected, fused, rtol=1e-4, atol=1e-5)
