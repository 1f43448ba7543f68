"""Every bad input fails before any trial starts: exit code 2, one message naming the field, file or line,
the bad value and what would be valid; no experiment directory is created, and an existing one is left
exactly as it was."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_INTENTS
from sweeps.lora_search import main


def tree_state(path: Path):
    """Every file's name, bytes and modification time: what "left exactly as it was" compares."""
    if not path.exists():
        return None
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
                  for p in path.rglob("*"))


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
    paths["three_rows"] = root / "three.jsonl"
    paths["three_rows"].write_text("".join(good["train"].splitlines(keepends=True)[:3]))
    # enough rows, but every one has the same target
    paths["one_answer"] = data_dir("one_answer", **{split: "".join(
        json.dumps({"text": f"what is my balance {i}", "intent": "balance"}) + "\n" for i in range(20))
        for split in ("train", "validation", "test")})
    paths["remote_code"] = _needs_remote_code(root / "remote_code", tiny_model_dir)
    paths["broken_saved"] = root / "broken_saved"  # a save_to_disk directory copied without its split folders
    paths["broken_saved"].mkdir()
    (paths["broken_saved"] / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
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


def _needs_remote_code(directory: Path, tiny_model_dir: Path) -> Path:
    """The tiny model with a config that names its own code (auto_map) and a model_type transformers lacks."""
    import shutil

    shutil.copytree(tiny_model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="lorasweep_custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


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
    "23 negative row limit": (["data.max_train_rows=-1"], r"data.max_train_rows: must be 0 \(all rows\) or at least 16, got -1"),
    "23 not a number": (["training.learning_rate=nan"], r"training.learning_rate: expected a finite number, got 'nan'"),
    "23 negative eval cpus": (["resources.eval_cpus=-1"], r"resources.eval_cpus: must be positive, got -1.0"),
    "23 searched dropout": (["sweep.parameters={lora_dropout: {values: [0.1, 1.5]}}"],
                            r"sweep.parameters.lora_dropout.values: lora_dropout must be in \[0, 1\), got 1.5"),
    "23 negative warmup": (["training.warmup_steps=-2"], r"training.warmup_steps: must be 0 or more, got -2"),
    "23 searched scheduler": (["sweep.parameters={lr_scheduler_type: {values: [cosine, wavy]}}"],
                              r"lr_scheduler_type.values: 'wavy' is not a valid lr_scheduler_type; valid: linear"),
    "23 searched flag": (["sweep.parameters={gradient_checkpointing: {values: [maybe]}}"],
                         r"gradient_checkpointing takes true or false, got 'maybe'"),
    "23 bad regex": (["eval.regexes_to_ignore=['(a']"], r"eval.regexes_to_ignore: '\(a' is not a regular expression"),
    "23 negative retries": (["resources.max_failures=-1"], r"resources.max_failures: must be 0 or more, got -1"),
    "24 template lone brace": (["data.prompt_template=Q: {text} }"],
                               r"data.prompt_template: 'Q: \{text\} \}' cannot be parsed by str.format \(Single '\}'"),
    "24 template unclosed": (["data.prompt_template=Q: {text"], r"cannot be parsed by str.format .*write a literal brace as \{\{"),
    "24 template positional": (["data.prompt_template=Q: {}"], r"placeholder \{\} in 'Q: \{\}' is not a field name"),
    "24 template numbered": (["data.prompt_template=Q: {0}"], r"placeholder \{0\} in 'Q: \{0\}' is not a field name"),
    "24 template empty": (["data.prompt_template="], r"data.prompt_template: '' has no \{field\} placeholder"),
    "24 template format spec": (["data.prompt_template=Q: {text:d}"],
                                r"train.jsonl: row 1: data.prompt_template 'Q: \{text:d\}' cannot render this row"),
    "12 saved dataset broken": (lambda p: [f"data.dataset_name={p['broken_saved']}"],
                                r"the saved dataset .*broken_saved' cannot be loaded \(FileNotFoundError"),
    "25 one label": (["data.num_targets=1"], r"data.num_targets: must be 0 \(all labels\) or at least 2, got 1"),
    "25 too few test rows": (["data.max_test_rows=3"], r"data.max_test_rows: must be 0 \(all rows\) or at least 10, got 3"),
    "25 three rows": (lambda p: [f"data.dataset_name={p['three_rows']}"],
                      r"three.jsonl: the train split has 1 row\(s\); lorasweep needs at least 16 .*needs at least 95 rows"),
    # raising the fractions, as a user might try next, still cannot make three rows a study
    "25 three rows, larger fractions": (lambda p: [f"data.dataset_name={p['three_rows']}", "data.validation_fraction=0.45",
                                                   "data.test_fraction=0.45"], r"three.jsonl: the train split has 1 row"),
    "25 one answer": (lambda p: [f"data.dataset_name={p['one_answer']}", "data.num_targets=0"],
                      r"every training row has the same target 'balance'"),
    "26 remote code, all_linear": (lambda p: [f"model.model_name_or_path={p['remote_code']}",
                                              "training.lora_target_modules=all_linear",
                                              "sweep.parameters={learning_rate: {values: [1.0e-3, 2.0e-3]}}"],
                                   r"remote_code' needs its own Python code to load .*model.trust_remote_code=true"),
    "26 remote code, attn_qv": (lambda p: [f"model.model_name_or_path={p['remote_code']}",
                                           "sweep.parameters={lora_target_modules: {values: [attn_qv]}}"],
                                r"remote_code' needs its own Python code to load"),
    "26 remote code trusted, code missing": (lambda p: [f"model.model_name_or_path={p['remote_code']}",
                                                        "model.trust_remote_code=true"],
                                             r"transformers cannot read the config of .*remote_code.*configuration_custom.py"),
    "27 cpus per trial": (["resources.cpus_per_trial=1000"],
                          r"resources.cpus_per_trial=1000 but the largest Ray node has \d+ CPUs; .*<=\d+"),
    "27 evaluation cpus": (["resources.eval_cpus=1000"], r"resources.eval_cpus=1000 but the largest Ray node has \d+ CPUs"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(case, bad_inputs, tiny_model_dir, tiny_data_dir,
                                                                   tmp_path, capsys, monkeypatch):
    import re

    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # cases 20, 21 and 27 start a throwaway local Ray instance
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

    from sweeps.data_loading import DataError

    rows = [{"input_ids": [1] * n, "completion_mask": [0] * (n - 1) + [1]} for n in [4] * 16 + [9, 12]]
    kept, note = apply_length_policy("train", rows, 8, "drop")
    assert [len(r["input_ids"]) for r in kept] == [4] * 16
    assert note == "2 of 18 train examples are longer than data.max_length=8 tokens (longest 12): dropped (data.length_policy=drop)"
    truncated, note = apply_length_policy("train", rows, 8, "truncate")
    assert [len(r["input_ids"]) for r in truncated] == [4] * 16 + [8, 8] and "truncated" in note
    # what is left must still reach the minimum
    with pytest.raises(DataError, match=r"2 of 17 train examples .*; 15 are left, fewer than the 16 a study needs"):
        apply_length_policy("train", rows[1:], 8, "drop")


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


# ---------------------------------------------------------------- malformed files, every data format

# name: (data.format, file type, the row a format reads, made from a CLINC150 text and intent)
FORMATS = {
    "template-csv": ("template", "csv", lambda text, intent: {"text": text, "intent": intent}),
    "template-json": ("template", "json", lambda text, intent: {"text": text, "intent": intent}),
    "template-jsonl": ("template", "jsonl", lambda text, intent: {"text": text, "intent": intent}),
    "template-parquet": ("template", "parquet", lambda text, intent: {"text": text, "intent": intent}),
    "alpaca": ("alpaca", "json", lambda text, intent: {"instruction": "Name the intent of the query.", "input": text,
                                                       "output": intent}),
    "prompt_completion": ("prompt_completion", "parquet", lambda text, intent: {"prompt": f"Query: {text}\nIntent:",
                                                                                "completion": f" {intent}"}),
    "messages": ("messages", "jsonl", lambda text, intent: {"messages": [{"role": "user", "content": text},
                                                                         {"role": "assistant", "content": intent}]}),
}
TARGET = {"template": "intent", "alpaca": "output", "prompt_completion": "completion", "messages": "messages"}
KINDS = ("truncated", "wrong delimiter", "wrong encoding", "wrong types", "missing fields", "empty")
BROKEN_ROW = 4  # the fifth row: errors must name it, not only the first row


def write_rows(path: Path, rows: list[dict], encoding: str = "utf-8") -> None:
    """Rows in the file type path's suffix names, as a user's tool would write them."""
    kind = path.suffix[1:]
    if kind == "parquet":
        from datasets import Dataset

        Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "csv":
        import csv
        import io

        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        path.write_bytes(text.getvalue().encode(encoding))
    elif kind == "json":
        path.write_bytes(json.dumps(rows, ensure_ascii=False).encode(encoding))
    else:
        path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))


def malformed(kind: str, data_format: str, suffix: str, rows: list[dict], path: Path) -> str:
    """Write a broken training file of this kind at path; returns what the error must say (a regex)."""
    name = re.escape(path.name)
    target = TARGET[data_format]
    row_number = BROKEN_ROW + 1
    if kind == "truncated":  # cut in the middle of the last row's first value, as a copy that stopped early
        write_rows(path, rows)
        data = path.read_bytes()
        cut = data.rstrip(b"\n").rfind(b"\n") + 6 if suffix in ("csv", "jsonl") else len(data) * 3 // 5
        path.write_bytes(data[:cut])
        return {"csv": rf"{name}:{len(rows) + 1}: 1 comma-separated field\(s\), but the header has",
                "jsonl": rf"{name}:{len(rows)}: invalid JSON", "json": rf"{name}:1: invalid JSON",
                "parquet": rf"{name}: cannot be read as parquet"}[suffix]
    if kind == "wrong delimiter":
        if suffix == "csv":  # semicolons, and texts with commas in them
            path.write_text("text;intent\n" + "".join(f"{r['text']}, please;{r['intent']}\n" for r in rows))
            return rf"{name}:1: the header 'text;intent' is one column; .* looks ';'-separated"
        if suffix == "parquet":  # a CSV under a Parquet name
            path.write_text("".join(json.dumps(r) + "," for r in rows))
            return rf"{name}: cannot be read as parquet"
        # JSON objects one after another on a line, not one per line (JSONL) or in a list (JSON)
        path.write_text(" ".join(json.dumps(r) for r in rows))
        return rf"{name}:1: invalid JSON \(Extra data"
    if kind == "wrong encoding":  # Latin-1, as spreadsheet exports on Windows often are
        rows = [dict(r) for r in rows]
        key = {"template": "text", "alpaca": "input", "prompt_completion": "prompt"}.get(data_format)
        if key:
            rows[BROKEN_ROW][key] = "how much is a café au lait"
        else:
            rows[BROKEN_ROW]["messages"] = [{"role": "user", "content": "café"}, {"role": "assistant", "content": "x"}]
        write_rows(path, rows, encoding="latin-1")
        line = {"csv": row_number + 1, "jsonl": row_number, "json": 1}[suffix]
        return rf"{name}:{line}: not UTF-8 .*re-encode the file as UTF-8"
    if kind == "wrong types":
        rows = [dict(r) for r in rows]
        if suffix == "csv":  # CSV has only text: the nearest is a row without its target
            rows[BROKEN_ROW][target] = ""
            write_rows(path, rows)
            return rf"{name}: row {row_number}: the target \('{target}'\) is empty"
        if data_format == "messages":
            rows[BROKEN_ROW][target] = "what is my balance"
            write_rows(path, rows)
            return rf"{name}: row {row_number}: field 'messages' is \"what is my balance\"; data.format=messages needs"
        rows[BROKEN_ROW][target] = None if suffix == "parquet" else ["balance", "alarm"]
        write_rows(path, rows)
        shown = "null" if suffix == "parquet" else r"a list \[\"balance\""
        return rf"{name}: row {row_number}: field '{target}' is {shown}.*data.format={data_format} needs text"
    if kind == "missing fields":
        if suffix in ("csv", "parquet"):  # columnar: the column has another name
            write_rows(path, [{("label" if k == target else k): v for k, v in r.items()} for r in rows])
            return rf"{name}: row 1: field\(s\) \['{target}'\] needed by data.format={data_format} are missing; columns found: \[.*'label'"
        rows = [dict(r) for r in rows]
        del rows[BROKEN_ROW][target]
        write_rows(path, rows)
        return rf"{name}: row {row_number}: field\(s\) \['{target}'\] needed by data.format={data_format} are missing"
    assert kind == "empty"
    path.write_bytes(b"")
    return {"csv": rf"{name}: the file is empty", "json": rf"{name}:1: invalid JSON",
            "jsonl": rf"{name}: the train split has 0 row\(s\)", "parquet": rf"{name}: cannot be read as parquet"}[suffix]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_malformed_file_of_every_format_exits_2_with_one_line_and_writes_nothing(fmt, kind, tiny_model_dir,
                                                                                 tiny_data_dir, tmp_path, capsys):
    """Each data format's training file broken each way: exit 2, one line naming the file and the line or row, and
    no experiment directory (an existing one stays byte for byte). The error comes from reading the data, before
    any model work, so the real run path is cheap here."""
    data_format, suffix, make_row = FORMATS[fmt]
    if kind == "wrong encoding" and suffix == "parquet":
        pytest.skip("Parquet stores its strings as UTF-8 itself")
    clinc = {split: [json.loads(line) for line in (tiny_data_dir / f"{split}.jsonl").read_text().splitlines()]
             for split in ("train", "validation", "test")}
    data = tmp_path / "data"
    data.mkdir()
    files = {split: data / f"{split}.{suffix}" for split in clinc}
    for split in ("validation", "test"):
        write_rows(files[split], [make_row(r["text"], r["intent"]) for r in clinc[split]])
    message = malformed(kind, data_format, suffix, [make_row(r["text"], r["intent"]) for r in clinc["train"]],
                        files["train"])
    args = [f"model.model_name_or_path={tiny_model_dir}", f"data.format={data_format}",
            *(f"data.{split}_file={path}" for split, path in files.items()),
            f"output.dir={tmp_path / 'runs'}", "output.name=exp"]
    experiment = tmp_path / "runs" / "exp"
    capsys.readouterr()  # what writing the files printed

    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lora_search: error: "), err
    assert re.search(message, err), err
    assert not experiment.exists()

    experiment.mkdir(parents=True)
    (experiment / "notes.txt").write_text("kept")
    before = tree_state(experiment)
    assert main(args) == 2
    assert tree_state(experiment) == before


def test_mlflow_server_that_does_not_answer_fails_fast_before_anything_is_written(tiny_model_dir, tiny_data_dir,
                                                                                  tmp_path, capsys):
    """A tracking server that accepts the connection and never answers: refused after MLFLOW_CHECK_TIMEOUT_S, not
    after MLflow's minutes of retries, and before the experiment directory exists."""
    import socket
    import time

    from sweeps.trackers import MLFLOW_CHECK_TIMEOUT_S

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        code = main([f"model.model_name_or_path={tiny_model_dir}", f"data.dataset_name={tiny_data_dir}",
                     f"output.dir={tmp_path / 'runs'}", "output.name=exp", "tracking.mlflow=true",
                     f"tracking.mlflow_tracking_uri={uri}"])
        seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2
    assert f"tracking.mlflow_tracking_uri: the MLflow server at {uri} did not answer within {MLFLOW_CHECK_TIMEOUT_S} s" in err
    assert err.count("lora_search: error:") == 1
    assert MLFLOW_CHECK_TIMEOUT_S <= seconds < MLFLOW_CHECK_TIMEOUT_S + 30  # the data checks before it take seconds
    assert not (tmp_path / "runs" / "exp").exists()


def test_mlflow_server_that_answers_passes_the_check_and_one_that_refuses_is_named():
    """The check asks the server's REST API as MLflow's client does: an answer passes; an HTTP error is refused
    with the server's status, and the environment MLflow reads is left as it was."""
    import os
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sweeps.config import ConfigError, TrackingConfig
    from sweeps.trackers import check_mlflow_server

    class Server(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path.startswith("/ok/api/2.0/mlflow/experiments/search")
            body = b'{"experiments": []}' if ok else b'{"error_code": "UNAUTHENTICATED", "message": "no"}'
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    names = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    environment = {name: os.environ.get(name) for name in names}
    try:
        check_mlflow_server(TrackingConfig(mlflow=True, mlflow_tracking_uri=f"{url}/ok"))
        with pytest.raises(ConfigError, match=rf"the MLflow server at {url}/denied refused the request"):
            check_mlflow_server(TrackingConfig(mlflow=True, mlflow_tracking_uri=f"{url}/denied"))
    finally:
        server.shutdown()
    assert {name: os.environ.get(name) for name in names} == environment
