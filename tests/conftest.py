"""Shared fixtures: a tiny Llama built from a config (no downloads), a small slice of CLINC150, throwaway Ray
clusters; and the two tiers: `pytest` runs the fast tier, `pytest --sweeps` also the tests that run real Ray
sweeps in subprocesses (marked `sweep`), as the README's test command and CI do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CLINC = PROJECT_ROOT / "sweeps" / "data" / "clinc150"
TEST_INTENTS = ["balance", "alarm", "calories"]


def pytest_addoption(parser):
    parser.addoption("--sweeps", action="store_true",
                     help="also run the tests marked `sweep`, which run real Ray sweeps (minutes on 2 cores)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--sweeps"):
        return
    sweeps = [item for item in items if item.get_closest_marker("sweep")]
    if sweeps:
        config.hook.pytest_deselected(items=sweeps)
        items[:] = [item for item in items if not item.get_closest_marker("sweep")]
        config.stash[_DESELECTED_SWEEPS] = len(sweeps)


_DESELECTED_SWEEPS = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, config):
    count = config.stash.get(_DESELECTED_SWEEPS, 0)
    if count:
        terminalreporter.write_line(f"{count} tests that run real Ray sweeps were left out: `pytest --sweeps` runs "
                                    f"them too (the README's test command and CI do)")


def _clinc_rows(split: str, per_intent: int) -> list[dict]:
    counts: dict[str, int] = {}
    rows = []
    for line in (CLINC / f"{split}.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["intent"] in TEST_INTENTS and counts.get(row["intent"], 0) < per_intent:
            counts[row["intent"]] = counts.get(row["intent"], 0) + 1
            rows.append(row)
    return rows


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """train/validation/test JSONL with three intents, in the layout of the shipped dataset."""
    out = tmp_path_factory.mktemp("data")
    for split, per_intent in (("train", 16), ("validation", 4), ("test", 6)):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _clinc_rows(split, per_intent)))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 64) with a byte-level BPE tokenizer trained on CLINC150 text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    import torch

    out = tmp_path_factory.mktemp("tiny-llama")
    texts = [json.loads(l)["text"] + " " + json.loads(l)["intent"] for l in (CLINC / "train.jsonl").read_text().splitlines()]
    texts += ["Query: Intent:"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    # A ChatML-like template, so that the chat-messages data format can run on the tiny model too.
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def tiny_sweep_overrides(model_dir: Path, data_dir: Path, out_dir: Path, name: str) -> list[str]:
    """A 2-trial sweep on the tiny model that finishes in well under a minute on 2 CPU cores."""
    return [
        f"model.model_name_or_path={model_dir}", f"data.dataset_name={data_dir}",
        f"output.dir={out_dir}", f"output.name={name}",
        "training.max_steps=6", "training.eval_steps=2", "training.per_device_train_batch_size=8",
        "training.lora_target_modules=all_linear", "training.lora_r=8", "training.lora_alpha=16",
        "sweep.method=grid", "sweep.max_concurrent_trials=1", "sweep.early_terminate={type: hyperband, min_iter: 1, eta: 2}",
        # First a learning rate that learns, then one that barely moves: ASHA must cut the second at rung 0.
        "sweep.parameters={learning_rate: {values: [3.0e-2, 1.0e-7]}}",
        "eval.top_k=1", "eval.max_new_tokens=6", "eval.merge_check_prompts=8",
        "resources.eval_cpus=1",
    ]


def run_lora_search(args: list[str], ray_tmp: Path, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    """Run the entry point as a user does, on its own throwaway local Ray instance."""
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "sweeps" / "lora_search.py"), *args],
                          env=ray_test_env(ray_tmp), capture_output=True, text=True, timeout=timeout, **popen)


def start_lora_search(args: list[str], ray_tmp: Path, stdout=subprocess.PIPE) -> subprocess.Popen:
    """Start the entry point as a user does, on its own throwaway local Ray instance, in a process group of its own
    (a test can signal it as a terminal does); stderr goes with stdout, as text."""
    return subprocess.Popen([sys.executable, str(PROJECT_ROOT / "sweeps" / "lora_search.py"), *args],
                            env=ray_test_env(ray_tmp), stdout=stdout, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=_sigint_as_in_a_terminal)


def _sigint_as_in_a_terminal() -> None:
    """In the child before it runs: SIGINT's default action. A suite started in the background (`pytest ... &` in a
    script) inherits SIGINT ignored, Python then installs no KeyboardInterrupt handler, and the Ctrl-C tests would
    see the driver carry on to the end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_tiny_sweep(model_dir: Path, data_dir: Path, out_dir: Path, name: str) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the tiny 2-trial sweep to the end on a throwaway Ray instance; (experiment dir, the finished process)."""
    with throwaway_ray() as ray_tmp:
        proc = run_lora_search(tiny_sweep_overrides(model_dir, data_dir, out_dir, name), ray_tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out_dir / name, proc


def ray_test_env(ray_tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A throwaway test cluster: no token auth, its own temp dir (so its processes can be found and stopped).
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(ray_tmp), "LORASWEEP_CACHE": str(ray_tmp / "cache"),
                "TOKENIZERS_PARALLELISM": "false"})
    return env


@contextmanager
def throwaway_ray():
    """A temp root for a test's own Ray processes, short because Ray's socket paths must stay under 107 bytes;
    every process started under it (raylet, GCS, workers, also of a killed driver) is killed on the way out."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="lsray", dir="/tmp"))
    try:
        yield ray_tmp
    finally:
        stop_ray_processes(ray_tmp)


@pytest.fixture
def ray_tmp():
    """throwaway_ray() for one test: pass it to run_lora_search / ray_test_env."""
    with throwaway_ray() as path:
        yield path


def stop_ray_processes(ray_tmp: Path) -> None:
    """Kill what a driver left behind under ray_tmp (its local raylet, GCS and workers)."""
    subprocess.run(["pkill", "-9", "-f", str(ray_tmp)], check=False)
