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

    @property
    def total_mib(self) -> float:
        used = self.base_mib + self.adapter_mib + self.activations_mib + self.logits_mib
        return used * ALLOCATOR_SLACK + self.context_mib


def estimate_trial_memory(model_dir: str, precision: str, lora_r: int, target_modules: list[str] | str,
                          batch_size: int, eval_batch_size: int, seq_len: int, gradient_checkpointing: bool,
                          trust_remote_code: bool = False) -> TrialMemory:
    """Peak GPU memory of one training trial, in MiB, erring high. `seq_len` is the longest training example;
    `target_modules` a PEFT target_modules value ("all-linear" or module names)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config()
    layers = text.num_hidden_layers
    hidden = text.hidden_size
    intermediate = getattr(text, "intermediate_size", 4 * hidden)
    vocab = text.vocab_size

    output_head = model.get_output_embeddings()
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output_head]
    linear_params = sum(m.in_features * m.out_features for _, m in linears)
    other_params = sum(p.numel() for p in model.parameters()) - linear_params
    targeted = [m for name, m in linears
                if target_modules == "all-linear" or name.rsplit(".", 1)[-1] in target_modules]

    if precision == "4bit":
        # NF4 weights (half a byte) with their block scales; peft's prepare_model_for_kbit_training keeps the
        # embeddings, norms and output head in fp32.
        base = linear_params * 0.5 * 1.1 + other_params * 4
    else:
        base = (linear_params + other_params) * 2
    lora_params = sum(lora_r * (m.in_features + m.out_features) for m in targeted)
    adapter = lora_params * 16  # weights, gradients and two AdamW moments, fp32 at most

    tokens = batch_size * seq_len
    lora_inputs_per_layer = sum(m.in_features for m in targeted) / layers  # dropout keeps a copy of each input
    # Tensors autograd keeps per token and layer (bf16): norms, q/k/v/o, attention output, the MLP's gate/up/act
    # and product, residuals (after Korthikanti et al. 2022, with memory-efficient attention: no seq^2 term).
    per_token_layer = 2 * (18 * hidden + 6 * intermediate + lora_inputs_per_layer)
    if gradient_checkpointing:
        activations = tokens * (layers * 2 * hidden + per_token_layer)  # layer inputs, plus one layer recomputed
    else:
        activations = tokens * layers * per_token_layer
    # Logits in bf16, their fp32 upcast for the loss and for TRL's entropy/accuracy metrics, and the gradient;
    # an evaluation batch has no gradient but may be larger.
    logits = max(tokens * 18, eval_batch_size * seq_len * 10) * vocab
    return TrialMemory(base_mib=base / MIB, adapter_mib=adapter / MIB, activations_mib=activations / MIB,
                       logits_mib=logits / MIB, context_mib=CUDA_CONTEXT_MIB)
