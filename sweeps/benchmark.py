"""Run one study several ways on the same GPU and compare them: `baseline` (the plain Ray Tune + TRL sweep of
sweeps/baseline_sweep.py), `lorasweep` (sweeps/lora_search.py with its per-process trials) and `engine`
(sweeps/lora_search.py with resources.engine=shared: one base per GPU, the adapters trained together).
BENCHMARKS.md keeps the tables.

    python sweeps/benchmark.py baseline  --config sweeps/configs/benchmark.yaml output.dir=/tmp/bench
    python sweeps/benchmark.py lorasweep --config sweeps/configs/benchmark.yaml output.dir=/tmp/bench
    python sweeps/benchmark.py engine    --config sweeps/configs/benchmark.yaml output.dir=/tmp/bench
    python sweeps/benchmark.py table /tmp/bench
    python sweeps/benchmark.py make-model --shape llama-3-8b --tokenizer-from DIR --out DIR

Each way runs as its own command (one right after the other), in experiment <output.name>-<way>, and writes
<output.dir>/benchmark_<way>.json; `table` prints both as Markdown. Figures per way: sweep wall time (Tuner.fit),
start-up per trial (trial code imported or trial started, to its first optimizer step), training tokens/s per
trial (non-pad tokens over time inside optimizer steps), aggregate training tokens/s per GPU (all trials'
tokens over the sweep wall time), peak GPU memory per trial (PyTorch's allocator peak), GPU utilization and
memory sampled by nvidia-smi every 0.5 s, best held-out eval loss, and the exact match of the trial with that
loss, scored by the same evaluation code for both ways.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.outcomes import BASE_ROW_ID, rank_by_eval_loss  # noqa: E402
from sweeps.config import PROJECT_ROOT, load_config_for_script  # noqa: E402

WAYS = ("baseline", "lorasweep", "engine")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmark", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for way in WAYS:
        run = sub.add_parser(way, help=f"run the study the {way} way")
        run.add_argument("--config", help="the study: a lora_search.py config")
        run.add_argument("overrides", nargs="*", help="dotted overrides, applied to both ways alike")
    table = sub.add_parser("table", help="print the Markdown table of the ways measured in a directory")
    table.add_argument("directory")
    model = sub.add_parser("make-model", help="save a randomly initialized model of a known shape")
    model.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    model.add_argument("--tokenizer-from", required=True, help="a model directory whose tokenizer to use")
    model.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    if args.command == "table":
        print(render_table(load_figures(Path(args.directory))))
        return 0
    if args.command == "make-model":
        make_shaped_model(args.shape, args.tokenizer_from, args.out)
        return 0
    config = load_config_for_script("benchmark", args.config, args.overrides)
    if config is None:
        return 2
    figures = run_way(args.command, args.config, args.overrides, config)
    out = Path(config.output.dir).expanduser().resolve() / f"benchmark_{args.command}.json"
    out.write_text(json.dumps(figures, indent=2))
    print(render_table([figures]))
    print(f"[benchmark] figures written to {out}")
    return 0


def run_way(way: str, config_path: str | None, overrides: list[str], config) -> dict:
    name = f"{config.output.name}-{way}"
    experiment_dir = Path(config.output.dir).expanduser().resolve() / name
    script = "baseline_sweep.py" if way == "baseline" else "lora_search.py"
    command = [sys.executable, str(PROJECT_ROOT / "sweeps" / script), *(["--config", config_path] if config_path else []),
               *overrides, f"output.name={name}"]
    if way != "baseline":
        command.append("eval.merge=false")  # the merge is not part of the comparison
    command.append(f"resources.engine={'shared' if way == 'engine' else 'per_process'}" if way != "baseline" else "")
    command = [part for part in command if part]
    print(f"[benchmark] {way}: {' '.join(command)}", flush=True)
    sampler = GpuSampler()
    sampler.start()
    started = time.time()
    try:
        subprocess.run(command, check=True)
    finally:
        sampler.stop()
    command_seconds = round(time.time() - started, 1)

    splits, model_dir = prepared_data(config)
    if way == "baseline":
        summary = json.loads((experiment_dir / "baseline.json").read_text())
        sweep_seconds = summary["sweep_seconds"]
        best = {"trial_id": summary["best_trial"], "checkpoint_dir": summary["best_checkpoint"]}
        scores = score_adapter(config, model_dir, best, splits["test"], experiment_dir)
        exact_match, eval_seconds = scores["exact_match"], scores["seconds"]
        estimate_mib = None
    else:
        timings = json.loads((experiment_dir / "timings.json").read_text())
        sweep_seconds = timings["sweep_seconds"]
        rows = json.loads((experiment_dir / "leaderboard.json").read_text())["rows"]
        trial_rows = [r for r in rows if r["trial_id"] != BASE_ROW_ID]
        exact_match = rank_by_eval_loss(trial_rows)[0]["exact_match"]
        eval_seconds = _eval_seconds_per_adapter(timings)
        estimate_mib = _estimated_trial_mib(config, model_dir, splits)
    trials = read_trials(experiment_dir / "tune")
    return summarize(way, config, trials, splits, sweep_seconds, command_seconds, exact_match, eval_seconds,
                     estimate_mib, sampler)


def prepared_data(config):
    """The study's rows exactly as both ways got them (same code, same seed)."""
    from sweeps.data_loading import check_and_filter, prepare_splits, read_splits
    from trainables.model_loading import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(config.model.model_name_or_path)
    raw, origin = read_splits(config.data)
    splits = prepare_splits(config.data, check_and_filter(raw, origin, config.data), load_tokenizer(model_dir),
                            log=lambda line: None)
    return splits, model_dir


def score_adapter(config, model_dir: str, candidate: dict, test_rows: list[dict], experiment_dir: Path) -> dict:
    """The baseline's best adapter, scored by lorasweep's evaluation code (the same prompts and normalization)."""
    import torch

    from eval.stage import evaluate_candidates
    from trainables.model_loading import choose_precision
    from trainables.trial_spec import BaseModelSpec

    cuda = torch.cuda.is_available()
    precision, _ = choose_precision(config.model.load_in_4bit, config.model.cpu_fallback, cuda)
    base = BaseModelSpec(model_dir=model_dir, precision=precision, device="cuda" if cuda else "cpu",
                         bnb_4bit_quant_type=config.model.bnb_4bit_quant_type,
                         bnb_4bit_use_double_quant=config.model.bnb_4bit_use_double_quant)
    results, _ = evaluate_candidates(base, [candidate], test_rows, config.eval, experiment_dir)
    return results[candidate["trial_id"]]


def _eval_seconds_per_adapter(timings: dict) -> float | None:
    """The slowest adapter of the evaluation stage: generation and held-out loss over all test prompts."""
    per_model = timings.get("evaluation_seconds_per_model") or {}
    adapters = [seconds for row_id, seconds in per_model.items() if row_id != "base"]
    return round(max(adapters), 2) if adapters else None


def _estimated_trial_mib(config, model_dir: str, splits: dict) -> float:
    from sweeps.gpu_share import largest_trial_memory, longest_row_tokens
    from sweeps.search_space import plan_sweep
    from trainables.model_loading import choose_precision

    precision, _ = choose_precision(config.model.load_in_4bit, config.model.cpu_fallback, cuda=True)
    memory = largest_trial_memory(plan_sweep(config.sweep, config.training), config.training, model_dir, precision,
                                  longest_row_tokens(splits), config.model.trust_remote_code)
    return round(memory.total_mib)


def read_trials(tune_dir: Path) -> list[dict]:
    """Each trial's last reported result, with its best eval loss over all its reports."""
    trials = []
    for result_file in sorted(tune_dir.glob("*/result.json")):
        results = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if results:
            trials.append({**results[-1], "best_eval_loss": min(r["eval_loss"] for r in results)})
    return trials


def summarize(way: str, config, trials: list[dict], splits: dict, sweep_seconds: float, command_seconds: float,
              exact_match, eval_seconds, estimate_mib, sampler: "GpuSampler") -> dict:
    import torch

    from trainables.model_loading import resolve_model_dir

    t = config.training
    # Non-pad tokens per optimizer step: the same rows per step both ways, whatever the padding.
    row_tokens = statistics.fmean(len(r["input_ids"]) for r in splits["train"])
    tokens_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * row_tokens
    # A per-process trial times its own steps; an engine's trials share steps, so only the aggregate rate counts.
    per_trial_rate = [r["step"] * tokens_per_step / r["train_seconds"] for r in trials
                      if r.get("train_seconds") and way != "engine"]
    first = [r["startup_s"] for r in trials if r.get("trial_in_process") == 1 and r.get("startup_s") is not None]
    later = [r["startup_s"] for r in trials if (r.get("trial_in_process") or 1) > 1 and r.get("startup_s") is not None]
    gpus = max(torch.cuda.device_count(), 1)
    tokens_per_s_per_gpu = sum(r["step"] for r in trials) * tokens_per_step / sweep_seconds / gpus
    peak = matmul_rate() if torch.cuda.is_available() else None
    model_tflops = 4 * linear_parameters_of(resolve_model_dir(config.model.model_name_or_path),
                                            config.model.trust_remote_code) * tokens_per_s_per_gpu / 1e12
    return {
        "way": way,
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})",
        "versions": _versions(),
        "model": config.model.model_name_or_path,
        "trials": len(trials),
        "max_steps": t.max_steps,
        "eval_steps": t.eval_steps,
        "batch": t.per_device_train_batch_size,
        "total_steps": sum(r["step"] for r in trials),
        "sweep_seconds": sweep_seconds,
        "command_seconds": command_seconds,
        "startup_first_in_process_s": _median(first),
        "startup_later_s_median": _median(later),
        "startup_later_s_max": max(later) if later else None,
        "trials_on_reused_workers": len(later),
        "train_tokens_per_s_per_trial": _median(per_trial_rate),
        "train_tokens_per_s_per_gpu": round(tokens_per_s_per_gpu),
        # Forward plus the input-gradient backward: 4 FLOPs per linear parameter and token, over a bf16 matmul rate
        # measured in the same run.
        "bf16_matmul_tflops": peak,
        "mfu": round(model_tflops / peak, 4) if peak else None,
        "peak_memory_mib_per_trial": max((r.get("peak_memory_mib") or 0 for r in trials), default=None),
        "estimated_trial_mib": estimate_mib,
        "gpu_utilization_mean": sampler.mean_utilization(),
        "gpu_memory_used_max_mib": sampler.max_memory_used(),
        "best_eval_loss": min(r["best_eval_loss"] for r in trials),
        "exact_match_of_best": exact_match,
        "test_prompts": len(splits["test"]),
        "eval_seconds_per_adapter": eval_seconds,
    }


def linear_parameters_of(model_dir: str, trust_remote_code: bool = False) -> int:
    """Weights of the model's linear layers and output head (what each token multiplies through), counted on the
    meta device from its config: nothing loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code),
                                                 trust_remote_code=trust_remote_code)
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def matmul_rate() -> float:
    """bf16 TFLOP/s of a large matmul on this GPU, measured now."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    began, runs = time.time(), 20
    for _ in range(runs):
        a @ b
    torch.cuda.synchronize()
    return round(2 * 8192**3 * runs / (time.time() - began) / 1e12, 1)


def _median(values: list[float]):
    return round(statistics.median(values), 2) if values else None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "trl", "peft", "bitsandbytes", "ray", "optuna"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


class GpuSampler:
    """nvidia-smi every 0.5 s while a way runs: utilization (%) and memory used (MiB) of every GPU."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.process = None
        self.thread = None

    def start(self) -> None:
        try:
            self.process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return  # no NVIDIA driver: utilization is reported as not measured
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                utilization, memory = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((utilization, memory))

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait()
            self.thread.join(timeout=5)

    def mean_utilization(self):
        return round(statistics.fmean(u for u, _ in self.samples), 1) if self.samples else None

    def max_memory_used(self):
        return max(m for _, m in self.samples) if self.samples else None


ROWS = [
    ("trials (steps per trial, batch)", lambda f: f"{f['trials']} ({f['max_steps']}, {f['batch']})"),
    ("optimizer steps run (ASHA stops the rest)", lambda f: f["total_steps"]),
    ("sweep wall time (Tuner.fit)", lambda f: f"{f['sweep_seconds']:.0f} s"),
    ("whole command", lambda f: f"{f['command_seconds']:.0f} s"),
    ("start-up, a worker's first trial (median)", lambda f: _s(f["startup_first_in_process_s"])),
    ("start-up, later trials on a reused worker (median / max)",
     lambda f: f"{_s(f['startup_later_s_median'])} / {_s(f['startup_later_s_max'])} ({f['trials_on_reused_workers']} trials)"),
    ("training tokens/s per trial (median)", lambda f: _n(f["train_tokens_per_s_per_trial"])),
    ("training tokens/s per GPU (all trials / wall time)", lambda f: _n(f["train_tokens_per_s_per_gpu"])),
    ("model FLOPs utilization (of the bf16 matmul rate measured in the run)",
     lambda f: "-" if f.get("mfu") is None else f"{100 * f['mfu']:.2f}% of {f['bf16_matmul_tflops']} TFLOP/s"),
    ("peak GPU memory per trial (allocator peak)", lambda f: _mib(f["peak_memory_mib_per_trial"])),
    ("estimated memory per trial (sizes the GPU share)", lambda f: _mib(f["estimated_trial_mib"])),
    ("GPU utilization (mean of samples)", lambda f: "-" if f["gpu_utilization_mean"] is None else f"{f['gpu_utilization_mean']}%"),
    ("GPU memory used (max of samples)", lambda f: _mib(f["gpu_memory_used_max_mib"])),
    ("best eval loss", lambda f: f"{f['best_eval_loss']:.4f}"),
    ("exact match of that trial", lambda f: "-" if f["exact_match_of_best"] is None else
     f"{100 * f['exact_match_of_best']:.1f}% of {f['test_prompts']}"),
    ("evaluation per adapter", lambda f: _s(f["eval_seconds_per_adapter"])),
]


def _s(value) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _n(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _mib(value) -> str:
    return "-" if not value else f"{value:,.0f} MiB"


def load_figures(directory: Path) -> list[dict]:
    found = {way: directory / f"benchmark_{way}.json" for way in WAYS}
    return [json.loads(path.read_text()) for path in found.values() if path.is_file()]


def render_table(figures: list[dict]) -> str:
    if not figures:
        return "no benchmark_<way>.json found"
    head = figures[0]
    versions = ", ".join(f"{k} {v}" for k, v in head["versions"].items() if v)
    lines = [f"{head['model']} on {head['device']}, {head['date']}; {versions}", "",
             "| | " + " | ".join(f["way"] for f in figures) + " |", "| --- |" + " --- |" * len(figures)]
    for label, cell in ROWS:
        lines.append(f"| {label} | " + " | ".join(str(cell(f)) for f in figures) + " |")
    ways = {f["way"]: f for f in figures}
    for reference, other in (("baseline", "lorasweep"), ("lorasweep", "engine")):
        if reference in ways and other in ways:
            lines.append("\n" + speed_line(ways[reference], ways[other]))
    if "lorasweep" in ways and "engine" in ways:
        ratio = ways["engine"]["train_tokens_per_s_per_gpu"] / ways["lorasweep"]["train_tokens_per_s_per_gpu"]
        lines.append(f"engine aggregate training tokens/s per GPU: {ratio:.2f}x the per-process trials'")
    return "\n".join(lines)


def speed_line(reference: dict, other: dict) -> str:
    """How the second way's sweep wall time compares with the first's, in the right direction."""
    ratio = reference["sweep_seconds"] / other["sweep_seconds"]
    if ratio >= 1:
        return f"{other['way']} sweep wall time: {ratio:.2f}x faster than {reference['way']}"
    return f"{other['way']} sweep wall time: {1 / ratio:.2f}x slower than {reference['way']}"


# Layer shapes of known models (their published configs); the vocabulary is the tokenizer's.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, tie_word_embeddings=False),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, tie_word_embeddings=False),
}


def make_shaped_model(shape: str, tokenizer_from: str, out: str) -> None:
    """A model of a known shape with random bf16 weights and the given tokenizer's vocabulary: throughput costs the
    same as with real weights. Built on the GPU when there is one (seconds, even for 8B)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"[benchmark] {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, random, saved to {out}")


if __name__ == "__main__":
    sys.exit(main())
