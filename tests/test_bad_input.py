"""Every bad input fails before any trial starts: exit code 2, one message naming the field, file or line,
the bad value and what would be valid; no experiment directory is created, and an existing one is left
exactly as it was."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_INTENTS
from sweeps.lora_search import main


def tree_state(path: Path):
    if not path.exists():
        return None
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def write_jsonl(directory: Path, split: str, rows: list[dict]) -> None:
    (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_data_dir, tiny_model_dir):
    """The files the cases below point at."""
    root = tmp_path_factory.mktemp("bad")
    good = {s: (tiny_data_dir / f"{s}.jsonl").read_text() for s in ("train", "validation", "test")}

    def data_dir(name, **replace):
        d = root / name
        d.mkdir()
        for split, text in {**good, **replace}.items():
            (d / f"{split}.jsonl").write_bytes(text if isinstance(text, bytes) else text.encode())
        return d

    lines = good["train"].splitlines()
    paths = {
        "bad_json": data_dir("bad_json", train="\n".join(lines[:2] + ['{"text": "oops", "intent": }'] + lines[2:]) + "\n"),
        "bad_bytes": data_dir("bad_bytes", train=(lines[0] + "\n").encode() + b'{"text": "caf\xe9", "intent": "balance"}\n'),
        "empty_validation": data_dir("empty_validation", validation=""),
        # the test split holds only a label that the label filter removes
        "filtered_empty": data_dir("filtered_empty", test="".join(
            json.dumps({"text": f"what time is it {i}", "intent": "zzz_time"}) + "\n" for i in range(12))),
        "long": data_dir("long", train="".join(json.dumps({"text": "word " * 200, "intent": i}) + "\n"
                                              for i in TEST_INTENTS * 6)),
    }
    not_a_dir = root / "a_file"
    not_a_dir.write_text("x")
    paths["not_a_dir"] = not_a_dir
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("training:\n  max_steps: 4\n  eval_steps: [2\n")
    paths["bad_yaml"] = bad_yaml
    paths["gguf"] = _unsupported_gguf(root / "gguf")
    paths["gpt2"] = _tiny_gpt2(root / "gpt2")
    paths["bin_only"] = root / "bin_only"
    paths["bin_only"].mkdir()
    (paths["bin_only"] / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (paths["bin_only"] / "pytorch_model.bin").write_bytes(b"not loaded")
    return paths


def _unsupported_gguf(directory: Path) -> Path:
    import gguf

    directory.mkdir()
    path = directory / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "fooarch")
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_gpt2(directory: Path) -> Path:
    """GPT-2 names its attention projections c_attn/c_proj (Conv1D), not q_proj/v_proj."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).save_pretrained(directory)
    return directory


CASES = {
    # name: (overrides or a function of the fixture paths, the message it must print)
    "01 unknown key": (["training.learnig_rate=1.0e-3"], r"unknown config key 'training.learnig_rate'.*Did you mean training.learning_rate"),
    "02 wrong type": (["training.max_steps=ten"], r"training.max_steps: expected an integer, got 'ten'"),
    "03 invalid yaml": (lambda p: ["--config", str(p["bad_yaml"])], r"bad.yaml line 4, column 1: invalid YAML"),
    "04 empty space": (["sweep.parameters={}"], r"sweep.parameters: the search space is empty"),
    "04 empty choices": (["sweep.parameters={lora_r: {values: []}}"], r"sweep.parameters.lora_r.values: must be a non-empty list, got \[\]"),
    "05 rank not positive": (["sweep.parameters={lora_r: {values: [0, 8]}}"], r"lora_r must be positive, got 0"),
    "05 alpha not positive": (["training.lora_alpha=0"], r"training.lora_alpha: must be positive, got 0"),
    "06 lr inverted": (["sweep.parameters={learning_rate: {distribution: log_uniform_values, min: 1.0e-3, max: 1.0e-4}}"],
                       r"min \(0.001\) must be below max \(0.0001\); swap them"),
    "06 lr not positive": (["sweep.parameters={learning_rate: {min: -1.0e-3, max: 1.0e-4}}"], r"learning_rate must be positive, got -0.001"),
    "07 module not in model": (lambda p: [f"model.model_name_or_path={p['gpt2']}", "model.load_in_4bit=false",
                                          "sweep.parameters={lora_target_modules: {values: [attn_qv, all_linear]}}"],
                               r"preset 'attn_qv' needs \['q_proj', 'v_proj'\].*its linear modules: lm_head"),
    "07 preset unknown": (["training.lora_target_modules=attention"], r"preset 'attention' is unknown; valid presets: attn_qv"),
    "08 dataset missing": (["data.dataset_name=/nonexistent/clinc"], r"data.dataset_name: '/nonexistent/clinc' does not exist"),
    "08 file missing": (["data.train_file=/nonexistent/train.jsonl"], r"data.train_file: dataset file '/nonexistent/train.jsonl' does not exist"),
    "09 field missing": (["data.prompt_template=Q: {question}"], r"field\(s\) \['question'\] needed by data.format=template are missing; columns found: \['intent', 'text'\]"),
    "10 invalid json": (lambda p: [f"data.dataset_name={p['bad_json']}"], r"bad_json/train.jsonl:3: invalid JSON"),
    "11 non utf-8": (lambda p: [f"data.dataset_name={p['bad_bytes']}"], r"bad_bytes/train.jsonl:2: not UTF-8"),
    "12 empty split": (lambda p: [f"data.dataset_name={p['empty_validation']}"], r"validation.jsonl: the validation split has 0 row\(s\); lorasweep needs at least 8"),
    "12 empty after filter": (lambda p: [f"data.dataset_name={p['filtered_empty']}", "data.num_targets=2"],
                              r"the test split has 0 row\(s\); .* data.num_targets=2 kept 0 of 12: raise data.num_targets"),
    "13 too long": (lambda p: [f"data.dataset_name={p['long']}", "data.max_length=64"],
                    r"18 of 18 train examples are longer than data.max_length=64 tokens.*all were dropped"),
    "08 hub dataset offline": (["data.dataset_name=someone/no-such-dataset"], r"'someone/no-such-dataset' is not a local path and the hub could not load it"),
    "15 hub model offline": (["model.model_name_or_path=someone/no-such-model"], r"'someone/no-such-model' is not a local directory and the hub could not load it"),
    "15 pickled weights only": (lambda p: [f"model.model_name_or_path={p['bin_only']}"], r"has no .safetensors weights"),
    "15 model missing": (["model.model_name_or_path=/nonexistent/model"], r"model.model_name_or_path: '/nonexistent/model' does not exist"),
    "16 gguf unsupported": (lambda p: [f"model.model_name_or_path={p['gguf']}"],
                            r"transformers cannot load the GGUF .*fooarch is not supported"),
    "17 output not writable": (lambda p: [f"output.dir={p['not_a_dir']}/runs"], r"output.dir: .*a_file is a file, not a directory"),
    "18 storage uri": (["output.dir=s3://bucket/runs"], r"output.dir: 's3://bucket/runs' is a URI"),
    "19 num_samples": (["sweep.run_cap=0"], r"sweep.run_cap: must be positive, got 0"),
    "19 concurrency": (["sweep.max_concurrent_trials=0"], r"sweep.max_concurrent_trials: must be positive, got 0"),
    "20 too many gpus": (["resources.gpus_per_trial=2"], r"resources.gpus_per_trial=2.0 but the Ray cluster has 0 GPUs"),
    "21 4-bit without cuda": (["model.cpu_fallback=refuse"], r"model.load_in_4bit=true needs CUDA.*model.cpu_fallback=refuse"),
    "22 top_k": (["eval.top_k=7"], r"eval.top_k \(7\) is larger than sweep.run_cap \(6\)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(case, bad_inputs, tiny_model_dir, tiny_data_dir,
                                                                   tmp_path, capsys, monkeypatch):
    import re

    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # cases 20 and 21 start a throwaway local Ray instance
    monkeypatch.setenv("LORASWEEP_CACHE", str(tmp_path / "cache"))
    # Hub ids must fail clearly when the hub is out of reach; offline mode makes that fast (the libraries
    # read the variable at import, so set their constant too).
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    overrides, message = CASES[case]
    overrides = overrides(bad_inputs) if callable(overrides) else overrides
    base = [f"model.model_name_or_path={tiny_model_dir}", f"data.dataset_name={tiny_data_dir}",
            f"output.dir={tmp_path / 'runs'}", "output.name=exp"]
    experiment = tmp_path / "runs" / "exp"
    try:
        assert main(base + overrides) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert err.count("lora_search: error:") == 1
        assert not experiment.exists()

        experiment.mkdir(parents=True)  # an existing experiment directory stays exactly as it was
        (experiment / "notes.txt").write_text("kept")
        before = tree_state(experiment)
        assert main(base + overrides) == 2
        assert tree_state(experiment) == before
    finally:
        ray.shutdown()


def test_partial_length_overflow_is_reported_and_dropped():
    from sweeps.data_loading import apply_length_policy

    rows = [{"input_ids": [1] * n, "completion_mask": [0] * (n - 1) + [1]} for n in (4, 9, 12)]
    kept, note = apply_length_policy("train", rows, 8, "drop")
    assert [len(r["input_ids"]) for r in kept] == [4]
    assert note == "2 of 3 train examples are longer than data.max_length=8 tokens (longest 12): dropped (data.length_policy=drop)"
    truncated, note = apply_length_policy("train", rows, 8, "truncate")
    assert [len(r["input_ids"]) for r in truncated] == [4, 8, 8] and "truncated" in note


def test_test_prompts_seen_in_training_are_counted(tiny_model_dir, tiny_data_dir):
    from transformers import AutoTokenizer

    from sweeps.config import load_config
    from sweeps.data_loading import check_and_filter, prepare_splits, read_splits

    config = load_config(None, [f"data.dataset_name={tiny_data_dir}", f"data.test_file={tiny_data_dir / 'train.jsonl'}",
                                f"data.train_file={tiny_data_dir / 'train.jsonl'}",
                                f"data.validation_file={tiny_data_dir / 'validation.jsonl'}"])
    raw, origin = read_splits(config.data)
    lines = []
    prepare_splits(config.data, check_and_filter(raw, origin, config.data), AutoTokenizer.from_pretrained(tiny_model_dir),
                   log=lines.append)
    assert any("WARNING: 48 of 48 held-out test prompts also occur in the training data" in line for line in lines)


def test_relative_output_dir_is_refused_inside_a_ray_job(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    """Case 18: a job's working directory is a temporary copy, so a relative output.dir would lose the results."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for the entrypoint
    code = main([f"model.model_name_or_path={tiny_model_dir}", f"data.dataset_name={tiny_data_dir}", "output.dir=runs"])
    assert code == 2
    assert "output.dir: 'runs' is relative, and this is a Ray job" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
