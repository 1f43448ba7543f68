"""Attention over packed examples, told where each example starts: the engine's attention implementation.

An engine row packs a slot's examples end to end (trainables/step_layout.py): for a study of short examples, ~1,300
tokens of ~38-token examples per row. Attention over the row with a mask of its examples (transformers' way for
packed position ids) computes every pair of positions of the row and masks nearly all of them; on an H200 that was
3.0 ms per layer, forward and backward, for 16 SmolLM2-shaped rows, where variable-length flash attention over
the examples themselves took 1.3 ms (2026-12-03, a probe at the engine's shapes). Each example is then a sequence of
its own: no score, not even a masked one, crosses from one example (or one adapter's row) to another, so a diverging
adapter's inf or NaN stays in its own examples.

The sequences arrive as `cu_seq_lens_q` (the flattened positions where each sequence starts, then the total: int32)
and `max_length_q` (an upper bound of a sequence's length), the names transformers gives these for its flash
attention, passed through the model's forward to every attention call. On CPU, or without PyTorch's varlen attention,
the same sequences become the block-diagonal causal mask for scaled_dot_product_attention: the reference the CPU
tests compare with transformers' own attention and PEFT."""

from __future__ import annotations

import inspect

import torch

PACKED_ATTENTION = "lorasweep_packed"

try:  # PyTorch's flash attention over variable-length sequences (torch.nn.attention.varlen, recent releases)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older PyTorch: the reference below, on CUDA too
    varlen_attn = None


def use_packed_attention(model) -> None:
    """Make `model` attend with packed_attention (registered with transformers' AttentionInterface). A model whose
    attention does not go through that interface cannot be trained by the engine: the error says so."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    model.set_attn_implementation(PACKED_ATTENTION)
    if model.config._attn_implementation != PACKED_ATTENTION:
        raise RuntimeError(f"{type(model).__name__} does not take an attention function through transformers' "
                           f"AttentionInterface, which the shared-base engine needs for its packed examples; train "
                           f"this model with resources.engine=per_process")


def packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     dropout: float = 0.0, scaling: float | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                     max_length_q: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, H, L, D], key and value [B, H_kv, L, D]; returns
    [B, L, H, D]. Causal within each sequence of `cu_seq_lens_q`; `attention_mask` is not read (None here: a custom
    implementation has no mask made for it)."""
    if cu_seq_lens_q is None:
        raise ValueError("packed_attention needs cu_seq_lens_q and max_length_q: the engine's forward passes them")
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    window = kwargs.get("sliding_window")  # a position sees the `window` positions up to itself (Mistral, Qwen2)
    # What the varlen kernel does not take (attention dropout, logit soft-capping, attention sinks) runs as the
    # reference does.
    plain = dropout == 0.0 and kwargs.get("softcap") is None and kwargs.get("s_aux") is None \
        and (scaling is None or "scale" in _VARLEN_PARAMETERS or abs(scaling - dim ** -0.5) < 1e-12)
    if query.is_cuda and varlen_attn is not None and plain:
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
        if dtype not in (torch.bfloat16, torch.float16):
            dtype = torch.bfloat16  # flash kernels take half precision only
        q, k, v = (_tokens_major(t, dtype) for t in (query, key, value))
        output = _varlen(q, k, v, cu_seq_lens_q, max_length_q, groups, scaling, window)
        return output.view(batch, length, heads, dim), None
    mask = packed_causal_mask(cu_seq_lens_q, batch, length, window)
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=groups > 1)
    return output.transpose(1, 2).contiguous(), None


def _tokens_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, L, D] as the [B * L, H, D] the varlen kernel takes, in `dtype` (one copy for the cast and the layout)."""
    return t.transpose(1, 2).to(dtype).reshape(-1, t.shape[1], t.shape[3])


def _varlen(q, k, v, cu, longest: int, groups: int, scaling: float | None, window: int | None) -> torch.Tensor:
    options = {"window_size": (window - 1, 0) if window else (-1, 0)}  # causal, within the window
    if "scale" in _VARLEN_PARAMETERS:
        options["scale"] = scaling
    if groups > 1:
        if "enable_gqa" in _VARLEN_PARAMETERS:
            options["enable_gqa"] = True
        else:  # older releases' kernel wants as many key and value heads as query heads: transformers' repeat_kv
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, longest, longest, **options)


_VARLEN_PARAMETERS = set(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else set()


def packed_causal_mask(cu_seq_lens: torch.Tensor, rows: int, width: int, window: int | None = None) -> torch.Tensor:
    """[rows, 1, width, width] booleans over rows of `width` flattened positions: a position attends to itself and the
    positions before it in its own sequence (the last `window` of them, with a sliding window). Made on the device,
    reading no value (a CUDA graph can hold it)."""
    positions = torch.arange(rows * width, device=cu_seq_lens.device, dtype=cu_seq_lens.dtype)
    sequence = torch.searchsorted(cu_seq_lens, positions, right=True).view(rows, width)
    causal = torch.ones(width, width, dtype=torch.bool, device=cu_seq_lens.device).tril()
    if window:
        causal = causal.triu(1 - window)
    return ((sequence[:, :, None] == sequence[:, None, :]) & causal)[:, None]
