"""Many LoRA adapters on one frozen base, computed in one forward: every linear layer of the base (but the output
head) is wrapped in a MultiLoraLinear that holds a slot per adapter, and each step's tokens arrive grouped by
slot. Written here rather than taken from PEFT because PEFT trains one active adapter at a time (its mixed-adapter
batches are inference-only, peft#2749); PEFT stays the checkpoint format (trainables/engine.py exports to it).

Layout (../shared/research/multi-lora.md, section 4): every module's adapters live in one slot-major tensor
(wrap_linear_layers), per module A^T [S, d_in, R] and B^T [S, R, d_out], transposed as the matmuls take them
(MultiLoraLinear.lora_A and lora_B are the [S, R, d_in] and [S, d_out, R] views in PEFT's layout), with R the
largest rank of the study and slot s using rows/columns [:r_s]; a slot that does not target a module has scale 0
there. Padding is exact: the padded rows and columns start at zero and their gradients are zero, so they stay
zero. The base matmul runs once over all slots' tokens.

Dropout on CPU (the tests' reference) is drawn from a counter-based hash of (slot seed, slot step, module, token
position within the slot, feature), not from the global RNG, so that an adapter's masks do not depend on which
neighbours share its step: an adapter trained beside others sees exactly what it would see alone. On CUDA the
masks come from the device generator, for all rows at once (MultiLoraLinear._dropout)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trainables.base_layers import DequantizedLinear
from trainables.step_layout import to_device

_MASK32 = 0xFFFFFFFF


@dataclass
class Routing:
    """What every MultiLoraLinear of a model shares: the adapters' weights (`weights`, slot-major, every module's A
    and B side by side), the slots' settings (each module's scale per slot, each slot's dropout) and the current
    step's adapters. The batch has one row per slot (its micro-batch packed into that row), in the order of the slots
    given to `set`, and `dropout_keys` holds each row's dropout key (the adapter's seed and its own micro-step); no
    key: no dropout (evaluation)."""

    weights: nn.Parameter  # [slots, every module's R * d_in + d_out * R]: the one leaf the optimizer updates
    modules: list  # the MultiLoraLinear wrappers, in the order of their pieces of `weights`
    scales: torch.Tensor  # [modules, slots]: lora_alpha / r where the slot adapts the module, else 0
    dropout: torch.Tensor  # [slots]
    dropout_keys: list[tuple[int, int]] | None = None
    # Keyed masks (exact beside any neighbours) or the device generator's: see _dropout.
    exact_dropout: bool = True
    step_dropout: torch.Tensor | None = None  # [rows, 1, 1]
    any_dropout: bool = False
    # The one dropout rate of every row of the step, where they share one and the masks come from the device
    # generator: then one fused kernel draws and applies a module's mask, rescaling included (MultiLoraLinear._dropout).
    fused_dropout: float | None = None
    # The last input cast to the compute dtype, and its cast: q, k and v (gate and up) read one input (_cast_once).
    cast_source: torch.Tensor | None = None
    cast: torch.Tensor | None = None

    def set(self, slots: list[int], dropout_keys: list[tuple[int, int]] | None, device, any_dropout: bool,
            compute_dtype: torch.dtype | None = None, shared_dropout: float | None = None) -> None:
        """Give every module its adapters for the step's slots, once for all modules: the slots' rows of `weights`
        (a view when they are consecutive, the usual case with every slot busy, else one gather), cast once to the
        compute dtype (bf16 under the engine's CUDA autocast, as the per-process path's autocast runs the LoRA
        matmuls; the adapters themselves stay fp32), and split into each module's A and B, scale and dropout. Per
        module and step that left no kernels of its own to launch, forward or backward (the split's backward is one
        concatenation): a small model's step is bound by launches."""
        self.dropout_keys = dropout_keys
        index = to_device(slots, device)
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        rows = slice(slots[0], slots[0] + len(slots))
        weights = self.weights[rows] if consecutive else self.weights.index_select(0, index)
        scales = self.scales[:, rows] if consecutive else self.scales.index_select(1, index)
        dropout = self.dropout[rows] if consecutive else self.dropout.index_select(0, index)
        self.assign(weights, scales, dropout, any_dropout and dropout_keys is not None, compute_dtype, shared_dropout)

    def assign(self, weights: torch.Tensor, scales: torch.Tensor, dropout: torch.Tensor, any_dropout: bool,
               compute_dtype: torch.dtype | None, shared_dropout: float | None = None) -> None:
        """The step's rows of `weights` [rows, N], `scales` [modules, rows] and `dropout` [rows], cast and split into
        every module's step tensors. Tensor operations only, no values read: a CUDA graph can capture it
        (trainables/graphed_step.py). `shared_dropout`: the rows' one dropout rate, if they share one."""
        self.any_dropout = any_dropout
        self.step_dropout = dropout.view(-1, 1, 1)
        self.fused_dropout = shared_dropout if any_dropout and not self.exact_dropout else None
        if self.any_dropout and self.fused_dropout is None:
            # Inverted dropout's 1 / (1 - p), on every module's scale at once (MultiLoraLinear._dropout).
            scales = scales / (1.0 - dropout)
        if compute_dtype is not None:
            weights, scales = weights.to(compute_dtype), scales.to(compute_dtype)
        pieces = weights.split([size for module in self.modules for size in module.piece_sizes], dim=1)
        module_scales = scales.split(1, dim=0)
        count = weights.shape[0]
        for number, module in enumerate(self.modules):
            module.step_a_t = pieces[2 * number].view(count, module.in_features, -1)
            module.step_b_t = pieces[2 * number + 1].view(count, -1, module.out_features)
            module.step_scale = module_scales[number].view(count, 1, 1)

    def clear(self) -> None:
        self.dropout_keys, self.step_dropout, self.any_dropout, self.fused_dropout = None, None, False, None
        self.cast_source = self.cast = None
        for module in self.modules:
            module.step_a_t = module.step_b_t = module.step_scale = None


class MultiLoraLinear(nn.Module):
    """A frozen base linear (nn.Linear or bitsandbytes Linear4bit) plus S LoRA slots of rank up to R. Every row's
    LoRA term is computed by two batched matmuls over the step's slots, whatever the number of slots: a fixed
    number of kernels per layer (a loop over adapters would launch kernels per adapter, which is what keeps small
    models' steps launch-bound). Plain autograd: a hand-written backward measured slower on the H200
    (BENCHMARKS.md)."""

    def __init__(self, base: nn.Module, module_index: int, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 routing: Routing):
        super().__init__()
        self.base = base
        self.module_index = module_index  # keys this module's dropout masks and its row of routing.scales
        self.in_features, self.out_features = base.in_features, base.out_features
        # [S, R, d_in] and [S, d_out, R] as PEFT has them: views of routing.weights, which holds them transposed
        # (what the matmuls take as they are), for giving a slot its adapter and for reading it back (checkpoints);
        # outside autograd, whose path to the weights is the step's split (Routing.set).
        self.lora_A, self.lora_B = lora_a, lora_b
        self.piece_sizes = (lora_a[0].numel(), lora_b[0].numel())
        # The step's A^T [rows, d_in, R], B^T [rows, R, d_out] and scales [rows, 1, 1], in the compute dtype: set
        # for every module by Routing.set. Plain tensor attributes, which a compiled layer takes as inputs (an integer
        # attribute would be a constant of the compiled code, and each layer would compile its own).
        self.step_a_t = self.step_b_t = self.step_scale = None
        self.routing = routing
        # bitsandbytes' Linear4bit and DequantizedLinear return their input's dtype; a plain linear under autocast
        # returns bf16 (forward: the base takes its input already cast).
        self.base_output_in_input_dtype = type(base) is not nn.Linear

    def set_slot(self, slot: int, rank: int, scale: float, lora_a: torch.Tensor | None) -> None:
        """Give a slot its adapter: A's first `rank` rows (B starts at zero, as in LoRA), or scale 0 to leave this
        module untouched by the slot."""
        with torch.no_grad():
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            if lora_a is not None:
                self.lora_A[slot, :rank].copy_(lora_a)
            self.routing.scales[self.module_index, slot] = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_a_t is None:
            return self.base(x)
        if not x.is_cuda:  # on CPU everything is fp32
            result = self.base(x)
            rows = self._dropout(x) if self.routing.any_dropout else x
            return result + self._lora(rows.float()).to(result.dtype)
        # On CUDA the input cast to bf16 once for the base and LoRA matmuls of every module that reads it, where
        # autocast would cast it for each matmul (an fp32 input: the norms run in fp32, as in the per-process path).
        compute = self._cast_once(x)
        rows = self._dropout(compute) if self.routing.any_dropout else None  # training steps only
        # The sum written in x's dtype by the matmuls themselves. Compiled layers keep autograd's composition below:
        # Inductor fuses its sums and casts, and Dynamo cannot trace baddbmm's out_dtype (torch 2.11, seen on an H200).
        if isinstance(self.base, DequantizedLinear) and not torch.compiler.is_compiling():
            return _BaseAndLora.apply(compute, rows, self.base.weight, self.base.bias, self.step_a_t, self.step_b_t,
                                      self.step_scale, x.dtype)
        result = self.base(compute)
        if self.base_output_in_input_dtype:
            result = result.to(x.dtype)  # what the base returns given x itself: the sum below stays in fp32
        return result + self._lora(compute if rows is None else rows)

    def _lora(self, rows: torch.Tensor) -> torch.Tensor:
        # The scale rides on the [rows, L, R] product, the smallest one.
        return torch.bmm(torch.bmm(rows, self.step_a_t) * self.step_scale, self.step_b_t)

    def _cast_once(self, x: torch.Tensor) -> torch.Tensor:
        """x in the compute dtype; the cast is made once for the modules that read the same x (q, k and v; gate and
        up), and each gets its own autograd node, so their input gradients are still cast and summed in fp32 as
        autocast's casts would have them."""
        dtype = self.step_a_t.dtype
        if x.dtype == dtype:
            return x
        routing = self.routing
        if routing.cast_source is not x:
            routing.cast_source, routing.cast = x, x.detach().to(dtype)
        return _SharedCast.apply(x, routing.cast)

    def _dropout(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows with each slot's dropout mask applied. With one rate shared by all rows, one fused kernel draws,
        applies and rescales; otherwise the rescaling by 1 / (1 - p) is in the step's scale (Routing.assign), one kernel
        for all modules instead of one per module, forward and backward."""
        if self.routing.fused_dropout is not None:
            return torch.nn.functional.dropout(rows, self.routing.fused_dropout, training=True)
        p = self.routing.step_dropout
        if self.routing.exact_dropout:
            keep = torch.cat([keyed_keep_mask(rows.shape[1:], float(p_i), seed, step, self.module_index, rows.device)
                              for p_i, (seed, step) in zip(p.flatten().tolist(), self.routing.dropout_keys)])
        else:
            # The device generator, for all rows at once: each adapter's masks have the distribution of its own,
            # but depend on the step's neighbours. The keyed masks above are exact, and what the CPU tests check,
            # but cost a dozen passes over the activations without a fused kernel: the CUDA default. Uniform numbers
            # compared with each row's p rather than bernoulli_ with a tensor of probabilities: that one is a slow
            # kernel of its own, 14 ms of a compiled 8B-shape step on the H200 (BENCHMARKS.md), where Inductor can fuse
            # the draw, the comparison and the product. fp32 draws whatever the rows' dtype: the rate stays exact.
            return rows * (torch.rand_like(rows, dtype=torch.float32) >= p)
        return rows * keep


class _BaseAndLora(torch.autograd.Function):
    """A module's base product and LoRA term, summed by the matmuls themselves: x W^T + b written in `out_dtype` by
    the base's matmul, then (rows A^T * scale) B^T added to it by a batched matmul that takes it as its input
    (baddbmm), both accumulating in fp32 and writing `out_dtype` (fp32 beside the fp32 residual stream that k-bit
    preparation keeps: torch.mm's and torch.baddbmm's out_dtype, CUDA only). Autograd's composition of the same (the
    base's matmul, a bf16 LoRA product, an fp32 sum of the two) wrote the module's output three times, and its
    backward cast the output's gradient to bf16 once per branch and summed the branches' input gradients in a kernel
    of its own: here one cast serves both branches, and the LoRA's input gradient is added by a batched matmul that
    takes the base's as its input. Written by hand because the out_dtype matmuls have no autograd formula (torch
    2.11), and because autograd cannot share the cast. The LoRA term is summed without its rounding to bf16: slightly
    more precise than the per-process path (PEFT's bf16 LoRA output added to the fp32 base output).

    `compute` [rows, L, d_in] is the input in the compute dtype, `rows` the LoRA's input where dropout gave it one
    of its own (None: `compute`), `weight` [d_out, d_in] the frozen base's (compute dtype), `a_t` [rows, d_in, R],
    `b_t` [rows, R, d_out] and `scale` [rows, 1, 1] the step's adapters (Routing.assign). On CPU (the tests; the
    engine's CPU path does not come here) the same sums run in `out_dtype` on upcast inputs."""

    @staticmethod
    def forward(ctx, compute: torch.Tensor, rows: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                a_t: torch.Tensor, b_t: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        lora_input = compute if rows is None else rows
        count, length, d_in = compute.shape
        with torch.autocast(compute.device.type, enabled=False):  # the inputs are in the compute dtype already
            hidden = torch.bmm(lora_input, a_t) * scale  # [rows, L, R]: the scale on the smallest product
            out = _wide_mm(compute.reshape(-1, d_in), weight.t(), out_dtype)
            if bias is not None:
                out += bias
            out = _add_batched_product_(out.view(count, length, -1), hidden, b_t)
        ctx.save_for_backward(lora_input, hidden, weight, a_t, b_t, scale)
        ctx.lora_input_is_compute = rows is None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lora_input, hidden, weight, a_t, b_t, scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_compute = grad_rows = grad_a_t = grad_b_t = None
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.to(weight.dtype)  # the one cast of the output's gradient, for both branches
            grad_hidden = torch.bmm(g, b_t.transpose(1, 2)) * scale
            if needs[5]:
                grad_b_t = torch.bmm(hidden.transpose(1, 2), g)
            if needs[4]:
                grad_a_t = torch.bmm(lora_input.transpose(1, 2), grad_hidden)
            if needs[0]:
                count, length, d_out = g.shape
                grad_compute = torch.mm(g.reshape(-1, d_out), weight).view(count, length, -1)
                if ctx.lora_input_is_compute:  # the LoRA's input gradient added by its matmul
                    _add_batched_product_(grad_compute, grad_hidden, a_t.transpose(1, 2))
            if needs[1]:
                grad_rows = torch.bmm(grad_hidden, a_t.transpose(1, 2))
        return grad_compute, grad_rows, None, None, grad_a_t, grad_b_t, None, None


def _wide_mm(left: torch.Tensor, right: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """left @ right of half-precision matrices, accumulated and written in `out_dtype` (torch.mm's out_dtype, CUDA
    only; on CPU over upcast matrices)."""
    if left.dtype == out_dtype:
        return torch.mm(left, right)
    if left.is_cuda:
        return torch.mm(left, right, out_dtype=out_dtype)
    return torch.mm(left.to(out_dtype), right.to(out_dtype))


def _add_batched_product_(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """total += left @ right per batch, written into `total` itself: a fresh output would first be a copy of `total`
    (a memcpy per module and step on the H200, 3.8 ms of a 16-adapter step). `total` may be wider than the factors
    (fp32 beside half-precision factors: baddbmm's out_dtype, CUDA only; on CPU over upcast factors)."""
    if left.dtype == total.dtype:
        return total.baddbmm_(left, right)
    if total.is_cuda:
        return torch.baddbmm(total, left, right, out_dtype=total.dtype, out=total)
    return total.baddbmm_(left.to(total.dtype), right.to(total.dtype))


class _SharedCast(torch.autograd.Function):
    """Gives a consumer of x the cast of x made once (MultiLoraLinear._cast_once), with the backward of its own cast:
    the consumer's gradient cast back to x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
        ctx.dtype = x.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


def shared_dropout_rate(rates: list[float]) -> float | None:
    """The rows' one dropout rate, where they share one (a fused kernel serves them all), else None."""
    return rates[0] if rates and all(rate == rates[0] for rate in rates) else None


def keyed_keep_mask(shape: tuple[int, int], p: float, seed: int, step: int, module_index: int, device) -> torch.Tensor:
    """[1, L, d] booleans, True with probability 1 - p, depending only on the key and each element's position
    (token within the adapter's micro-batch, feature): the same beside any neighbours."""
    n, d = shape
    if p == 0:
        return torch.ones(1, n, d, dtype=torch.bool, device=device)
    positions = torch.arange(n, device=device, dtype=torch.int64)[:, None] * d \
        + torch.arange(d, device=device, dtype=torch.int64)[None, :]
    return (_uniform(positions, _salt(seed, step, module_index)) >= p)[None]


def _salt(*values: int) -> int:
    salt = 0x243F6A88
    for value in values:
        salt = _mix32((salt ^ (value & _MASK32)) * 0x9E3779B1)
    return salt


def _mix32(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _uniform(keys: torch.Tensor, salt: int) -> torch.Tensor:
    """A uniform [0, 1) number per int64 key: the 32-bit lowbias hash, vectorized (no product leaves int64)."""
    x = ((keys & _MASK32) ^ salt) * 0x9E3779B1 & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x.to(torch.float32) * (1.0 / 2**32)


def wrap_linear_layers(model: nn.Module, slots: int, max_rank: int) \
        -> tuple[Routing, dict[str, MultiLoraLinear], torch.Tensor]:
    """Replace every linear layer but the output head with a MultiLoraLinear (in place). Returns the shared
    routing, {module name: wrapper} in the model's module order (which keys dropout and PEFT's names), and the
    [slots, all adapter weights] tensor that every wrapper's A and B are views of.

    One slot-major leaf rather than a leaf per module: the optimizer updates every module of every slot in a few
    whole-tensor kernels (trainables/slot_optimizer.py), where per-leaf multi-tensor ops with per-slot factors fall
    back to a kernel per leaf and operation, and a step gathers, casts and splits the adapters once for all modules
    (Routing.set) instead of per module, forward and backward (measured on CPU: BENCHMARKS.md). fp32 adapters, as
    PEFT keeps them (autocast_adapter_dtype) beside a bf16 or 4-bit base."""
    output_head = model.get_output_embeddings()
    targets = [(name, module) for name, module in model.named_modules()
               if _is_linear(module) and module is not output_head]
    device = targets[0][1].weight.device
    total = sum(max_rank * (module.in_features + module.out_features) for _, module in targets)
    weights = nn.Parameter(torch.zeros(slots, total, device=device))
    routing = Routing(weights=weights, modules=[], scales=torch.zeros(len(targets), slots, device=device),
                      dropout=torch.zeros(slots, device=device))
    wrappers, offset = {}, 0
    for index, (name, module) in enumerate(targets):
        a_size, b_size = max_rank * module.in_features, module.out_features * max_rank
        lora_a = weights.detach()[:, offset:offset + a_size].view(slots, module.in_features, max_rank).transpose(1, 2)
        lora_b = weights.detach()[:, offset + a_size:offset + a_size + b_size].view(slots, max_rank, module.out_features) \
            .transpose(1, 2)
        offset += a_size + b_size
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiLoraLinear(module, index, lora_a, lora_b, routing)
        setattr(parent, child, wrapper)
        wrappers[name] = wrapper
        routing.modules.append(wrapper)
    return routing, wrappers, weights


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def kaiming_a(generator: torch.Generator, rank: int, in_features: int) -> torch.Tensor:
    """LoRA's A initialization (PEFT's: kaiming_uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), drawn
    from the adapter's own generator."""
    bound = 1.0 / math.sqrt(in_features)
    return torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator)
