"""Measure the shared-base engine itself on this machine: aggregate training tokens/s for K adapters of the study's
search space trained together, model FLOPs utilization against a bf16 matmul rate measured in the same run, GPU
memory, and a breakdown of one engine step (base matmuls, LoRA, optimizer, the rest, and the time no kernel ran).

    python sweeps/engine_benchmark.py --config sweeps/configs/gpu.yaml --model DIR --slots 1 4 16 --steps 20 \
        [resources.engine_compile=true] [resources.engine_cuda_graphs=false] [resources.engine_dequantize_base=false]

Compiled layers and CUDA graphs apply on CUDA only, as in a study (trainables/engine.py: study_step_options); unlike
a study, which drops graphs where its memory estimate fits the GPU only without them (sweeps/gpu_share.engine_fits),
the benchmark runs what it is given. Writes nothing but what it prints (and --json FILE). BENCHMARKS.md keeps the
tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.config import load_config_for_script  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engine_benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the study (its data and search space): a lora_search.py config")
    parser.add_argument("--model", help="model directory (default: the config's model)")
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 4, 16], help="adapters trained together")
    parser.add_argument("--steps", type=int, default=20, help="timed engine steps per measurement")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides before, between and after the flags
    config = load_config_for_script("engine_benchmark", args.config, args.overrides)
    if config is None:
        return 2
    figures = measure(config, args.model, args.slots, args.steps)
    print(render(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


def measure(config, model_path: str | None, slot_counts: list[int], steps: int) -> dict:
    """The engine as a study runs it: the config's resources.engine_dequantize_base, engine_compile and
    engine_cuda_graphs (set them with overrides to compare), the config's batch and search space."""
    import torch

    from sweeps.benchmark import linear_parameters_of, matmul_rate, prepared_data
    from sweeps.search_space import plan_sweep
    from trainables.engine import LoraEngine, study_step_options
    from trainables.model_loading import choose_precision
    from trainables.trial_spec import BaseModelSpec

    if model_path:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, model_name_or_path=model_path))
    splits, model_dir = prepared_data(config)
    plan = plan_sweep(config.sweep, config.training)
    cuda = torch.cuda.is_available()
    precision, path = choose_precision(config.model.load_in_4bit, config.model.cpu_fallback, cuda)
    base = BaseModelSpec(model_dir=model_dir, precision=precision, device="cuda" if cuda else "cpu",
                         bnb_4bit_quant_type=config.model.bnb_4bit_quant_type,
                         bnb_4bit_use_double_quant=config.model.bnb_4bit_use_double_quant)
    max_rank = max(plan.values("lora_r", config.training.lora_r))
    resources = config.resources
    dequantized_base = resources.engine_dequantize_base
    options = study_step_options(base.device, resources.engine_compile, resources.engine_cuda_graphs)
    peak = matmul_rate() if cuda else None
    results = []
    for count in slot_counts:
        engine = LoraEngine(base, slots=count, max_rank=max_rank, dequantized_base=dequantized_base, **options)
        for training in adapters_of_the_space(config, plan, count):
            engine.add(f"a{training.seed}", training, splits["train"], splits["validation"])
        results.append(time_steps(engine, steps, peak, linear_parameters_of(model_dir)))
        del engine
        if cuda:
            torch.cuda.empty_cache()
    if dequantized_base and precision == "4bit":
        path += ", base dequantized once to bf16"
    if options["compile_backend"]:
        path += ", decoder layers compiled"
    if options["cuda_graphs"]:
        path += ", steps as CUDA graphs"
    return {"model": base.model_dir, "path": path, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "bf16_matmul_tflops": peak, "batch": config.training.per_device_train_batch_size,
            "date": time.strftime("%Y-%m-%d"), "runs": results}


def adapters_of_the_space(config, plan, count: int) -> list:
    """`count` adapters over the corners of the searched ranks, alphas and target presets (the largest first), the
    learning rate at its upper bound: what a study puts on one GPU."""
    training = config.training
    corners = list(itertools.product(sorted(plan.values("lora_r", training.lora_r), reverse=True),
                                     plan.values("lora_alpha", training.lora_alpha),
                                     plan.values("lora_target_modules", training.lora_target_modules)))
    corners.sort(key=lambda c: (c[2] != "all_linear", -c[0]))
    learning_rate = max(plan.values("learning_rate", training.learning_rate))
    return [dataclasses.replace(training, lora_r=r, lora_alpha=a, lora_target_modules=t, learning_rate=learning_rate,
                                seed=index, max_steps=10**6)
            for index, (r, a, t) in zip(range(count), itertools.cycle(corners))]


def time_steps(engine, steps: int, peak: float | None, parameters: int) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    began = time.time()
    # Warm-up: allocator, kernels' first launches, compilation (a static, then a dynamic variant); with CUDA graphs
    # also the first bucket's eager step and each shape bucket's capture.
    warm_up_steps = 10 if engine.graphed is not None else 3
    for _ in range(warm_up_steps):
        engine.step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_up_seconds = time.time() - began
    tokens_before = sum(a.tokens_seen for a in engine.adapters.values())
    buckets_before = len(engine.graphed.buckets) if engine.graphed is not None else 0
    began = time.time()
    for _ in range(steps):  # as the engine actor steps: each step queued, then the one before it read
        engine.queue_step()
        engine.settle(leave=1)
    engine.settle()
    seconds = time.time() - began
    # Real tokens only (a slot's row is padded to the longest of the step; pads are not counted).
    tokens = sum(a.tokens_seen for a in engine.adapters.values()) - tokens_before
    rate = tokens / seconds
    run = {"slots": len(engine.adapters), "step_ms": round(1000 * seconds / steps, 1),
           f"warm_up_s ({warm_up_steps} steps)": round(warm_up_seconds, 1),
           "tokens_per_step": round(tokens / steps), "tokens_per_s": round(rate),
           # Forward plus the input-gradient backward: 4 FLOPs per parameter and token (no weight gradients).
           "model_tflops": round(4 * parameters * rate / 1e12, 2)}
    if engine.graphed is not None:  # shape buckets met: each captured at its first step (the first after an eager one)
        run["graph_buckets"] = len(engine.graphed.buckets)
        run["graph_buckets_new_while_timed"] = len(engine.graphed.buckets) - buckets_before
    if cuda:
        run["mfu"] = round(run["model_tflops"] / peak, 4)
        run["gpu_memory_allocated_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        # What the process holds (allocated plus the allocator's cache and the graphs' pool), nearer nvidia-smi.
        run["gpu_memory_reserved_peak_mib"] = round(torch.cuda.max_memory_reserved() / 2**20)
    run.update(time_evaluation(engine))
    run["breakdown"] = profile_step(engine)
    return run


def time_evaluation(engine) -> dict:
    """What an evaluation costs the engine beside its steps (a study's engine spent 12 of 55 s evaluating:
    BENCHMARKS.md): all adapters evaluated together over their evaluation rows, as when they reach an evaluation in
    the same step, and the snapshot (the copy off the device) that each evaluation takes."""
    import torch

    slots = list(engine.adapters)
    began = time.time()
    engine.evaluate_many(slots)  # returns numbers read off the device: the passes are done
    evaluation = time.time() - began
    between_steps = [slot for slot in slots if not engine.adapters[slot].micro_step]  # where a snapshot is taken
    if between_steps:
        engine.snapshot(between_steps[0])  # the first one imports and builds PEFT's config code
    began = time.time()
    for slot in between_steps:
        engine.snapshot(slot)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"evaluation_s (all adapters)": round(evaluation, 2),
            "snapshot_ms (per adapter)": round(1000 * (time.time() - began) / max(1, len(between_steps)), 1)}


def profile_step(engine, steps: int = 3) -> dict:
    """One engine step taken apart over a few steps: CPU time per phase (the engine's record_function labels) and
    the operators that cost the CPU most, with how many operators a step runs; on CUDA also the GPU time per kernel
    class, the top kernels, and the step time no kernel covered (the GPU waiting for the CPU)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    began = time.time()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):  # as the engine actor steps (time_steps): the GPU's idle time is then the loop's own
            engine.queue_step()
            engine.settle(leave=1)
        engine.settle()
    wall_ms = 1000 * (time.time() - began) / steps
    out: dict[str, float] = {}
    phases: dict[str, float] = {}
    for event in prof.events():  # the labels' CPU-side ranges (the GPU side of a label is a span, not a kernel)
        if event.name.startswith("lorasweep:") and event.device_type == DeviceType.CPU:
            phases[event.name] = phases.get(event.name, 0.0) + event.cpu_time_total / 1000 / steps
    out.update({f"phase (CPU): {name[len('lorasweep: '):]}": round(ms, 2) for name, ms in phases.items()})
    operators = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    out["operators per step (aten calls, nested ones included)"] = round(sum(e.count for e in operators) / steps)
    out["of them computing (views, reshapes and allocations left out)"] = round(
        sum(e.count for e in operators if e.key not in METADATA_OPERATORS) / steps)
    for event in sorted(operators, key=lambda e: -e.self_cpu_time_total)[:6]:
        out[f"operator (CPU self): {event.key} x{event.count // steps}"] = round(event.self_cpu_time_total / 1000 / steps, 2)
    if cuda:
        kernels = [e for e in prof.key_averages() if e.self_device_time_total
                   and not e.key.startswith(("aten::", "cuda", "Profiler", "lorasweep:"))]
        classes: dict[str, float] = {}
        for event in kernels:
            name = kernel_class(event.key)
            classes[name] = classes.get(name, 0.0) + event.self_device_time_total / 1000 / steps
        busy = sum(classes.values())
        out.update({name: round(ms, 2) for name, ms in sorted(classes.items(), key=lambda kv: -kv[1])})
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]
        out.update({f"kernel: {e.key[:90]}": round(e.self_device_time_total / 1000 / steps, 2) for e in top})
        # The operators whose own kernels took the GPU's time (in eager steps; a graph's replay launches them all).
        for event in sorted(operators, key=lambda e: -e.self_device_time_total)[:14]:
            if event.self_device_time_total:
                out[f"operator (GPU, its kernels): {event.key} x{event.count // steps}"] = round(
                    event.self_device_time_total / 1000 / steps, 2)
        out["gpu busy (sum of kernels)"] = round(busy, 2)
        out["no kernel running (the GPU waiting for the CPU)"] = round(max(0.0, wall_ms - busy), 2)
    out["step wall (profiled)"] = round(wall_ms, 2)
    return out


# Operators that only make a tensor's metadata or allocate (no kernel on a GPU): left out of the computing count.
METADATA_OPERATORS = {f"aten::{name}" for name in (
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "slice", "narrow", "select", "transpose", "t",
    "permute", "expand", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "detach", "detach_", "alias",
    "resolve_conj", "resolve_neg", "lift_fresh", "empty", "empty_strided", "empty_like")}


def kernel_class(name: str) -> str:
    """A kernel's class by its name: only the dtype of a matmul shows there, not whether it is the base's or LoRA's."""
    lowered = name.lower()
    if "4bit" in lowered or "dequant" in lowered or "nf4" in lowered:
        return "4-bit dequantize / gemm_4bit (base)"
    if "fmha" in lowered or "flash" in lowered or "attention" in lowered:
        return "attention (fp32)" if "_f32" in lowered else "attention"
    if lowered.startswith("nvjet"):  # cuBLAS's Hopper matmuls: their names give no dtype
        return "matmul (cuBLAS nvjet)"
    if "gemm" in lowered or "gemv" in lowered or "cutlass" in lowered or "xmma" in lowered:
        # bf16 kernels name their inputs bf16 (and often an f32 accumulator); fp32 ones f32f32, sgemm or ffma.
        return "matmul bf16" if "bf16" in lowered else "matmul fp32"
    if lowered.startswith("triton_"):  # compiled layers: Inductor's fused kernels (elementwise, norms, reductions)
        return "fused by Inductor (Triton)"
    if "softmax" in lowered or "cross_entropy" in lowered or "nll" in lowered:
        return "loss (softmax, cross-entropy)"
    if "elementwise" in lowered or "reduce" in lowered or "copy" in lowered or "index" in lowered or "cat" in lowered:
        return "elementwise, copies, gathers, reductions"
    return "other kernels"


def render(figures: dict) -> str:
    lines = [f"{figures['model']} ({figures['path']}) on {figures['device']}, {figures['date']}; batch "
             f"{figures['batch']} per adapter; bf16 matmul rate measured: {figures['bf16_matmul_tflops']} TFLOP/s", "",
             "| adapters | step (ms) | tokens/step | tokens/s | model TFLOP/s | MFU | GPU memory peak: allocated | "
             "reserved |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in figures["runs"]:
        mfu = f"{100 * run['mfu']:.1f}%" if "mfu" in run else "-"
        allocated, reserved = (f"{run[key]:,} MiB" if key in run else "-"
                               for key in ("gpu_memory_allocated_peak_mib", "gpu_memory_reserved_peak_mib"))
        lines.append(f"| {run['slots']} | {run['step_ms']} | {run['tokens_per_step']:,} | {run['tokens_per_s']:,} | "
                     f"{run['model_tflops']} | {mfu} | {allocated} | {reserved} |")
    for run in figures["runs"]:
        if "graph_buckets" in run:
            lines.append(f"\n{run['slots']} adapters: {run['graph_buckets']} shape buckets met, "
                         f"{run['graph_buckets_new_while_timed']} of them new while timed (each captured when first met, "
                         f"the first after one eager step)")
    for run in figures["runs"]:
        if "evaluation_s (all adapters)" in run:
            lines.append(f"\n{run['slots']} adapters: evaluated together in {run['evaluation_s (all adapters)']} s; "
                         f"a snapshot (the copy off the device at each evaluation) {run['snapshot_ms (per adapter)']} "
                         f"ms per adapter")
    for run in figures["runs"]:
        if "breakdown" in run:
            lines += ["", f"one engine step with {run['slots']} adapters (ms):"]
            lines += [f"- {name}: {ms}" for name, ms in run["breakdown"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
