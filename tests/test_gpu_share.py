"""The memory estimate that decides how many trials share a GPU (no weights are loaded: a config is enough)."""

import pytest
from transformers import LlamaConfig

from sweeps.config import load_config
from sweeps.gpu_share import largest_trial_memory
from sweeps.search_space import plan_sweep
from trainables.memory_estimate import estimate_trial_memory


@pytest.fixture(scope="module")
def smollm2_shape(tmp_path_factory) -> str:
    """SmolLM2-135M's shape, config only."""
    out = tmp_path_factory.mktemp("smollm2-shape")
    LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, tie_word_embeddings=True).save_pretrained(out)
    return str(out)


def test_the_estimate_covers_the_peak_measured_on_an_h100(smollm2_shape):
    """BENCHMARKS.md, 2026-11-23: the largest trial of the 16-trial study (r=64, all linear layers, batch 32, longest
    example 50 tokens) peaked at 1,259 MiB in PyTorch's allocator, plus a CUDA context of about 600 MiB."""
    memory = estimate_trial_memory(smollm2_shape, "4bit", lora_r=64, target_modules="all-linear", batch_size=32,
                                   eval_batch_size=64, seq_len=50, gradient_checkpointing=False)
    assert memory.total_mib > 1259 + 600


def test_the_estimate_grows_with_rank_targets_and_batch_and_shrinks_with_checkpointing(smollm2_shape):
    def total(**changes):
        settings = dict(precision="4bit", lora_r=8, target_modules=["q_proj", "v_proj"], batch_size=8,
                        eval_batch_size=8, seq_len=64, gradient_checkpointing=False)
        settings.update(changes)
        return estimate_trial_memory(smollm2_shape, **settings).total_mib

    small = total()
    assert total(lora_r=64) > small and total(target_modules="all-linear") > small and total(batch_size=32) > small
    assert total(gradient_checkpointing=True) < small
    assert total(precision="bf16") > small  # 2-byte weights instead of half a byte


def test_the_gpu_share_is_sized_for_the_largest_corner_of_the_search_space(smollm2_shape):
    config = load_config(None, ["sweep.parameters={lora_r: {values: [8, 64]}, lora_target_modules: "
                                "{values: [attn_qv, all_linear]}, learning_rate: {values: [1.0e-3]}}"])
    plan = plan_sweep(config.sweep, config.training)
    largest = largest_trial_memory(plan, config.training, smollm2_shape, "4bit", longest_example=50)
    corner = estimate_trial_memory(smollm2_shape, "4bit", 64, "all-linear", config.training.per_device_train_batch_size,
                                   config.training.per_device_eval_batch_size, 50, False)
    assert largest.total_mib == pytest.approx(corner.total_mib)


@pytest.mark.parametrize("shape, slots, batch, measured_mib", [
    # Allocator peaks of the engine with every slot busy, one H200, 2026-12-02 (BENCHMARKS.md, the engine's step).
    ("smollm2-135m", 16, 32, 20_661),
    ("llama-3-8b", 8, 16, 66_818),
])
def test_the_engine_estimate_covers_the_measured_peak_without_doubling_it(shape, slots, batch, measured_mib, tmp_path):
    from sweeps.benchmark import SHAPES
    from trainables.memory_estimate import estimate_engine_memory

    LlamaConfig(vocab_size=49152, **SHAPES[shape]).save_pretrained(tmp_path)
    # ~20 tokens per CLINC150 row with the SmolLM2 tokenizer; rank up to 64 (gpu.yaml's space), base dequantized once.
    estimate = estimate_engine_memory(str(tmp_path), "4bit", True, slots, 64, batch, 20, False)
    assert measured_mib <= estimate.total_mib <= 2 * measured_mib
    # More slots or a 4-bit base kept in 4 bits move it the right way.
    assert estimate_engine_memory(str(tmp_path), "4bit", True, 2 * slots, 64, batch, 20, False).total_mib > estimate.total_mib
    assert estimate_engine_memory(str(tmp_path), "4bit", False, slots, 64, batch, 20, False).base_mib < estimate.base_mib
    accumulating = estimate_engine_memory(str(tmp_path), "4bit", True, slots, 64, batch, 20, False,
                                          gradient_accumulation=True)
    assert accumulating.adapter_mib == pytest.approx(estimate.adapter_mib * 22 / 18)


@pytest.mark.parametrize("shape, slots, batch, reserved_mib", [
    # What the engine's process reserved at most with CUDA graphs (allocator and the graphs' pool), one H200,
    # 2026-12-02, commit bb2adeb (BENCHMARKS.md, "CUDA graphs of the engine's step").
    ("smollm2-135m", 16, 32, 51_818),
    ("llama-3-8b", 8, 16, 142_158),
])
def test_with_cuda_graphs_the_engine_estimate_covers_what_the_process_reserved(shape, slots, batch, reserved_mib,
                                                                                tmp_path):
    from sweeps.benchmark import SHAPES
    from trainables.memory_estimate import estimate_engine_memory

    LlamaConfig(vocab_size=49152, **SHAPES[shape]).save_pretrained(tmp_path)
    graphed = estimate_engine_memory(str(tmp_path), "4bit", True, slots, 64, batch, 20, False, cuda_graphs=True)
    assert reserved_mib <= graphed.total_mib <= 2 * reserved_mib
    plain = estimate_engine_memory(str(tmp_path), "4bit", True, slots, 64, batch, 20, False)
    assert plain.graph_pool_mib == 0 and graphed.graph_pool_mib == pytest.approx(plain.activations_mib
                                                                                + plain.logits_mib)


def test_cuda_graphs_are_dropped_where_the_engine_fits_only_without_them():
    from sweeps.gpu_share import engine_fits_gpu
    from trainables.memory_estimate import TrialMemory

    def estimate(graphs: bool) -> TrialMemory:  # 8B-shaped engine, 8 slots (figures of the estimate above)
        return TrialMemory(base_mib=14_849, adapter_mib=38_400 if graphs else 23_040, activations_mib=31_040,
                           logits_mib=1_200, context_mib=768, graph_pool_mib=32_240 if graphs else 0.0)

    h200, tight = 143_771, 70_000
    assert engine_fits_gpu(estimate, True, 200_000)[:2] == (True, True)  # room for the graphs: kept
    fits, graphs, why = engine_fits_gpu(estimate, True, h200)
    assert (fits, graphs) == (True, False)
    assert why.startswith("CUDA graphs off: with them the engine needs about 147,929 MiB") and "pool 32,240" in why
    assert engine_fits_gpu(estimate, False, h200)[:2] == (True, False)  # never asked for: never turned on
    fits, graphs, why = engine_fits_gpu(estimate, True, tight)  # no fit either way: the least it needs is reported
    assert not fits and why.startswith("the engine needs about 88,429 MiB") and f"of {tight:,} MiB" in why
