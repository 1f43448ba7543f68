"""An upper estimate of one trial's GPU memory, from the model's config (no weights are loaded): how many
trials can share a GPU without running it out of memory. BENCHMARKS.md compares it with measured peaks."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20
# A CUDA context with cuBLAS/cuDNN handles and workspaces: outside PyTorch's allocator, so not in
# torch.cuda.max_memory_allocated, but it takes GPU memory in every trial process.
CUDA_CONTEXT_MIB = 768
# The caching allocator rounds blocks up and keeps freed ones: what a process reserves exceeds what it uses.
ALLOCATOR_SLACK = 1.25


@dataclass
class TrialMemory:
    base_mib: float
    adapter_mib: float
    activations_mib: float
    logits_mib: float
    context_mib: float
    graph_pool_mib: float = 0.0  # an engine's CUDA graphs: their memory pool (estimate_engine_memory)

    @property
    def total_mib(self) -> float:
        used = self.base_mib + self.adapter_mib + self.activations_mib + self.logits_mib + self.graph_pool_mib
        return used * ALLOCATOR_SLACK + self.context_mib


@dataclass
class _Shapes:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    linears: list  # (name, nn.Linear on the meta device) for every linear layer but the output head
    other_params: int  # embeddings, norms, the head


def _shapes(model_dir: str, trust_remote_code: bool) -> _Shapes:
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config()
    output_head = model.get_output_embeddings()
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output_head]
    linear_params = sum(m.in_features * m.out_features for _, m in linears)
    return _Shapes(text.num_hidden_layers, text.hidden_size, getattr(text, "intermediate_size", 4 * text.hidden_size),
                   text.vocab_size, linears, sum(p.numel() for p in model.parameters()) - linear_params)


def _activations(shapes: _Shapes, tokens: int, lora_inputs_per_layer: float, gradient_checkpointing: bool) -> float:
    """Bytes autograd keeps for `tokens` tokens: per token and layer (bf16) norms, q/k/v/o, attention output, the
    MLP's gate/up/act and product, residuals (after Korthikanti et al. 2022, with memory-efficient attention: no
    seq^2 term), and each LoRA input."""
    per_token_layer = 2 * (18 * shapes.hidden + 6 * shapes.intermediate + lora_inputs_per_layer)
    if gradient_checkpointing:
        return tokens * (shapes.layers * 2 * shapes.hidden + per_token_layer)  # layer inputs, plus one layer recomputed
    return tokens * shapes.layers * per_token_layer


def estimate_trial_memory(model_dir: str, precision: str, lora_r: int, target_modules: list[str] | str,
                          batch_size: int, eval_batch_size: int, seq_len: int, gradient_checkpointing: bool,
                          trust_remote_code: bool = False) -> TrialMemory:
    """Peak GPU memory of one training trial, in MiB, erring high. `seq_len` is the longest training example;
    `target_modules` a PEFT target_modules value ("all-linear" or module names)."""
    shapes = _shapes(model_dir, trust_remote_code)
    linear_params = sum(m.in_features * m.out_features for _, m in shapes.linears)
    targeted = [m for name, m in shapes.linears
                if target_modules == "all-linear" or name.rsplit(".", 1)[-1] in target_modules]
    if precision == "4bit":
        # NF4 weights (half a byte) with their block scales; peft's prepare_model_for_kbit_training keeps the
        # embeddings, norms and output head in fp32.
        base = linear_params * 0.5 * 1.1 + shapes.other_params * 4
    else:
        base = (linear_params + shapes.other_params) * 2
    lora_params = sum(lora_r * (m.in_features + m.out_features) for m in targeted)
    adapter = lora_params * 16  # weights, gradients and two AdamW moments, fp32 at most
    activations = _activations(shapes, batch_size * seq_len, sum(m.in_features for m in targeted) / shapes.layers,
                               gradient_checkpointing)
    # Logits in bf16, their fp32 upcast for the loss and for TRL's entropy/accuracy metrics, and the gradient;
    # an evaluation batch has no gradient but may be larger.
    logits = max(batch_size * seq_len * 18, eval_batch_size * seq_len * 10) * shapes.vocab
    return TrialMemory(base_mib=base / MIB, adapter_mib=adapter / MIB, activations_mib=activations / MIB,
                       logits_mib=logits / MIB, context_mib=CUDA_CONTEXT_MIB)


def estimate_engine_memory(model_dir: str, precision: str, dequantized_base: bool, slots: int, max_rank: int,
                           batch_size: int, seq_len: int, gradient_checkpointing: bool,
                           trust_remote_code: bool = False, gradient_accumulation: bool = False,
                           cuda_graphs: bool = False) -> TrialMemory:
    """Peak GPU memory of a shared-base engine (trainables/engine.py) with every slot busy, in MiB, erring high:
    one base; every linear layer's stacked slots at the largest rank, whatever each adapter targets (the engine
    allocates them so): fp32 weights, gradients and two moments, the step's bf16 copy of the weights (Routing.set),
    and with gradient accumulation the gradients set aside during a backward (SlotAdamW.set_aside_gradients); with
    CUDA graphs the step's fp32 gather of the weights, its gradient and the graphs' output buffer (graphed_step), and
    the graphs' memory pool: a step's activations once more, kept beside the allocator's cache of the eager steps'
    (measured on an H200 for 8 adapters of the 8B shape: 142 GB reserved with graphs against 90 GB without, 14 GB of
    the difference allocated; BENCHMARKS.md); each slot's micro-batch of `batch_size` rows of `seq_len` tokens;
    logits only at completion positions, counted as if every position were one."""
    shapes = _shapes(model_dir, trust_remote_code)
    linear_params = sum(m.in_features * m.out_features for _, m in shapes.linears)
    if precision == "4bit" and not dequantized_base:
        base = linear_params * 0.5 * 1.1 + shapes.other_params * 4
    else:  # bf16 linears (dequantized once, or a bf16 base); fp32 embeddings and norms after k-bit preparation
        base = linear_params * 2 + shapes.other_params * 4
    adapter = slots * max_rank * sum(m.in_features + m.out_features for _, m in shapes.linears) * \
        ((22 if gradient_accumulation else 18) + (12 if cuda_graphs else 0))
    tokens = slots * batch_size * seq_len
    activations = _activations(shapes, tokens, sum(m.in_features for _, m in shapes.linears) / shapes.layers,
                               gradient_checkpointing)
    logits = tokens * 10 * shapes.vocab  # bf16 logits, their fp32 upcast, the gradient
    return TrialMemory(base_mib=base / MIB, adapter_mib=adapter / MIB, activations_mib=activations / MIB,
                       logits_mib=logits / MIB, context_mib=CUDA_CONTEXT_MIB,
                       graph_pool_mib=(activations + logits) / MIB if cuda_graphs else 0.0)
