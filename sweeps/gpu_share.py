"""How much of a GPU one trial gets: resources.gpus_per_trial, or with -1 (auto) as many trials per GPU as
the largest trial of the search space fits in the GPU's memory (estimated from the model's config) and the
GPU node's CPUs can drive; and whether the CPU requests fit a node with such a GPU."""

from __future__ import annotations

import math

from typing import Callable

from sweeps.config import ConfigError, ResourcesConfig
from sweeps.search_space import SweepPlan
from trainables.lora_presets import target_modules_for
from trainables.memory_estimate import TrialMemory, estimate_engine_memory, estimate_trial_memory
from trainables.trial_spec import TrainingConfig

# Leave a tenth of the GPU for what the estimate cannot see (other processes, the evaluation stage's start).
USABLE_GPU_FRACTION = 0.9


def choose_gpus_per_trial(resources: ResourcesConfig, largest_trial: Callable[[], TrialMemory]) -> tuple[float, str]:
    """(the GPU share per trial, a line saying why). `largest_trial` estimates the memory of the search space's
    largest trial, asked only in auto mode on a cluster with GPUs. Needs a running Ray cluster."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    share = resources.gpus_per_trial
    if share != -1:
        if share > cluster_gpus:
            raise ConfigError(f"resources.gpus_per_trial={share} but the Ray cluster has {cluster_gpus:g} GPUs; "
                              f"trials would stay pending forever. Set resources.gpus_per_trial<={cluster_gpus:g}")
        return share, f"resources.gpus_per_trial={share:g}"
    if not cluster_gpus:
        return 0.0, "the Ray cluster has no GPU"

    memory = largest_trial()
    # Run where a GPU is, with the smallest share Ray accepts, so that it does not wait for a free GPU.
    gpu_mib = ray.get(ray.remote(num_cpus=0, num_gpus=0.0001)(_smallest_gpu_memory_mib).remote())
    limits = {"GPU memory": math.floor(gpu_mib * USABLE_GPU_FRACTION / memory.total_mib),
              "the GPU node's CPUs": math.floor(_cpus_per_gpu() / resources.cpus_per_trial),
              "resources.max_trials_per_gpu": resources.max_trials_per_gpu}
    limit = min(limits, key=limits.get)
    per_gpu = max(1, limits[limit])
    by_memory = limits["GPU memory"]
    why = (f"{per_gpu} trial(s) per GPU, limited by {limit}: the largest trial needs about "
           f"{memory.total_mib:,.0f} MiB (estimate) of {gpu_mib:,} MiB")
    if by_memory < 1:
        why += ("; more than the GPU has, so expect the out-of-memory retry with a smaller micro-batch, or lower "
                "training.per_device_train_batch_size, or set training.gradient_checkpointing=true")
    # Ray keeps four decimals of a resource: round down so that per_gpu shares never exceed one GPU.
    return math.floor(10_000 / per_gpu) / 10_000, why


def engine_fits(estimate: Callable[[bool], TrialMemory], cuda_graphs: bool) -> tuple[bool, bool, str]:
    """(whether a shared-base engine fits the cluster's smallest GPU, whether it runs its steps as CUDA graphs, a
    line saying why). `estimate(cuda_graphs)` is the engine's memory with or without graphs: asked for, they are
    dropped where the engine fits only without them (their memory pool holds a step's activations once more; the
    8B shape's engine on an H200 fits only so, and its steps were faster without graphs anyway: BENCHMARKS.md).
    Needs a running Ray cluster with a GPU."""
    import ray

    gpu_mib = ray.get(ray.remote(num_cpus=0, num_gpus=0.0001)(_smallest_gpu_memory_mib).remote())
    return engine_fits_gpu(estimate, cuda_graphs, gpu_mib)


def engine_fits_gpu(estimate: Callable[[bool], TrialMemory], cuda_graphs: bool, gpu_mib: int) -> tuple[bool, bool, str]:
    """engine_fits for a GPU of `gpu_mib`."""
    def line(memory: TrialMemory) -> str:
        pool = f", CUDA graphs' pool {memory.graph_pool_mib:,.0f}" if memory.graph_pool_mib else ""
        return (f"the engine needs about {memory.total_mib:,.0f} MiB (estimate: base {memory.base_mib:,.0f}, "
                f"adapter slots {memory.adapter_mib:,.0f}, activations {memory.activations_mib:,.0f}{pool}) of "
                f"{gpu_mib:,} MiB")

    usable = gpu_mib * USABLE_GPU_FRACTION
    memory = estimate(cuda_graphs)
    if memory.total_mib <= usable:
        return True, cuda_graphs, line(memory)
    if not cuda_graphs:
        return False, False, line(memory)
    plain = estimate(False)
    if plain.total_mib <= usable:
        return True, False, f"CUDA graphs off: with them {line(memory)}; without them {line(plain)}"
    return False, False, line(plain)  # the least it needs, which is what the fix must lower


def largest_engine_memory(plan: SweepPlan, training: TrainingConfig, model_dir: str, precision: str,
                          dequantized_base: bool, slots: int, mean_row: float,
                          trust_remote_code: bool = False, cuda_graphs: bool = False) -> TrialMemory:
    """The estimate for an engine whose every slot holds the search space's largest micro-batch of rows of the mean
    length: a step whose rows are longer than that and runs out of memory is retried in pieces by the engine (the
    same effective batch), whereas the base and the adapter slots must fit."""
    return estimate_engine_memory(
        model_dir, precision, dequantized_base, slots, max_rank=max(plan.values("lora_r", training.lora_r)),
        batch_size=max(plan.values("per_device_train_batch_size", training.per_device_train_batch_size)),
        seq_len=round(mean_row),
        gradient_checkpointing=all(plan.values("gradient_checkpointing", training.gradient_checkpointing)),
        trust_remote_code=trust_remote_code,
        gradient_accumulation=max(plan.values("gradient_accumulation_steps", training.gradient_accumulation_steps)) > 1,
        cuda_graphs=cuda_graphs)


def check_cpus_fit(resources: ResourcesConfig, trial_gpus: float, eval_gpus: float) -> None:
    """Fail before the sweep when a trial's or the evaluation stage's CPUs, with its GPUs, fit on no node of the
    Ray cluster: Ray would keep it pending forever. Needs a running Ray cluster."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    for key, cpus, gpus in (("resources.cpus_per_trial", resources.cpus_per_trial, trial_gpus),
                            ("resources.eval_cpus", resources.eval_cpus, eval_gpus)):
        most = max((node.get("CPU", 0) for node in nodes if node.get("GPU", 0) >= gpus), default=0)
        if cpus > most:
            where = "Ray node with a GPU" if gpus else "Ray node"
            raise ConfigError(f"{key}={cpus:g} but the largest {where} has {most:g} CPUs; it would wait for them "
                              f"forever. Set {key}<={most:g}")


def longest_row_tokens(splits: dict[str, list[dict]]) -> int:
    """Tokens in the longest training or validation row: the widest batch a trial can meet."""
    return max(len(row["input_ids"]) for name in ("train", "validation") for row in splits[name])


def mean_row_tokens(splits: dict[str, list[dict]]) -> float:
    """Tokens in a training row, on average: what an engine slot's packed micro-batch holds per row."""
    return sum(len(row["input_ids"]) for row in splits["train"]) / max(1, len(splits["train"]))


def largest_trial_memory(plan: SweepPlan, training: TrainingConfig, model_dir: str, precision: str,
                         longest_example: int, trust_remote_code: bool = False) -> TrialMemory:
    """The estimate for the most memory-hungry corner of the search space."""
    presets = plan.values("lora_target_modules", training.lora_target_modules)
    return max((estimate_trial_memory(
        model_dir, precision,
        lora_r=max(plan.values("lora_r", training.lora_r)),
        target_modules=target_modules_for(preset),
        batch_size=max(plan.values("per_device_train_batch_size", training.per_device_train_batch_size)),
        eval_batch_size=training.per_device_eval_batch_size,
        seq_len=longest_example,
        gradient_checkpointing=all(plan.values("gradient_checkpointing", training.gradient_checkpointing)),
        trust_remote_code=trust_remote_code,
    ) for preset in presets), key=lambda memory: memory.total_mib)


def _cpus_per_gpu() -> float:
    """The fewest CPUs per GPU over the cluster's GPU nodes."""
    import ray

    ratios = [node["Resources"].get("CPU", 0) / node["Resources"]["GPU"]
              for node in ray.nodes() if node.get("Alive") and node["Resources"].get("GPU")]
    return min(ratios) if ratios else 1.0


def _smallest_gpu_memory_mib() -> int:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return min(int(line) for line in out.split())
    except (OSError, subprocess.SubprocessError, ValueError):
        import torch

        return torch.cuda.get_device_properties(0).total_memory // 2**20
