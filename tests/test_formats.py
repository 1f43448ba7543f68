"""Every data format and source type: the example configs run end to end on the tiny model, each file
type reads back the same rows, and the data is tokenized once per sweep, not once per trial."""

import json
import math

import pytest

from conftest import CLINC, PROJECT_ROOT, run_lora_search
from sweeps.config import load_config
from sweeps.data_loading import check_and_filter, prepare_splits, read_splits


@pytest.mark.sweep
@pytest.mark.parametrize("example", ["alpaca", "prompt_completion", "messages"])
def test_example_config_runs_end_to_end(example, tiny_model_dir, tmp_path, ray_tmp):
    proc = run_lora_search(
        ["--config", str(PROJECT_ROOT / "sweeps" / "configs" / f"{example}.yaml"),
         f"data.dataset_name={PROJECT_ROOT / load_config(str(PROJECT_ROOT / 'sweeps' / 'configs' / f'{example}.yaml')).data.dataset_name}",
         f"model.model_name_or_path={tiny_model_dir}", f"output.dir={tmp_path}", "output.name=run",
         "training.max_steps=4", "training.eval_steps=2", "training.per_device_train_batch_size=8",
         "data.max_train_rows=64", "data.max_test_rows=16",
         "sweep.method=grid", "sweep.parameters={learning_rate: {values: [3.0e-2]}}", "eval.top_k=1",
         "eval.max_new_tokens=6", "eval.merge_check_prompts=4", "resources.eval_cpus=1"],
        ray_tmp, cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    board = json.loads((tmp_path / "run" / "leaderboard.json").read_text())
    trial = next(r for r in board["rows"] if r["trial_id"] != "base")
    assert trial["status"] == "completed" and math.isfinite(trial["best_eval_loss"]) and trial["exact_match"] is not None
    generations = [json.loads(l) for l in (tmp_path / "run" / "eval" / f"generations_{trial['trial_id']}.jsonl").read_text().splitlines()]
    assert len(generations) == 16 and all(g["target"] and isinstance(g["generation"], str) for g in generations)


def test_messages_prompt_uses_the_chat_template_and_system_prompt(tiny_model_dir):
    from transformers import AutoTokenizer

    config = load_config(str(PROJECT_ROOT / "sweeps" / "configs" / "messages.yaml"),
                         [f"data.dataset_name={PROJECT_ROOT / 'sweeps/data/examples/messages'}", "data.max_train_rows=16"])
    raw, origin = read_splits(config.data)
    rows = prepare_splits(config.data, check_and_filter(raw, origin, config.data), AutoTokenizer.from_pretrained(tiny_model_dir))
    row = rows["train"][0]
    assert row["prompt"].startswith("<|system|>Answer with the intent label") and row["prompt"].endswith("<|assistant|>")
    assert row["completion"] == row["target"] + "<|endoftext|>\n"
    # the loss mask covers the assistant turn only
    masked = [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]
    assert AutoTokenizer.from_pretrained(tiny_model_dir).decode(masked).startswith(row["target"])


def _clinc(split, n):
    return [json.loads(l) for l in (CLINC / f"{split}.jsonl").read_text().splitlines()][:n]


def test_every_file_type_reads_the_same_rows(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {"train": _clinc("train", 30), "validation": _clinc("validation", 5), "test": _clinc("test", 5)}
    for kind in ("jsonl", "json", "csv", "parquet"):
        d = tmp_path / kind
        d.mkdir()
        for split, split_rows in rows.items():
            if kind == "jsonl":
                (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
            elif kind == "json":
                (d / f"{split}.json").write_text(json.dumps(split_rows))
            else:
                getattr(Dataset.from_list(split_rows), f"to_{kind}")(str(d / f"{split}.{kind}"))
    DatasetDict({s: Dataset.from_list(r) for s, r in rows.items()}).save_to_disk(str(tmp_path / "saved"))
    for source in ("jsonl", "json", "csv", "parquet", "saved"):
        raw, _ = read_splits(load_config(None, [f"data.dataset_name={tmp_path / source}"]).data)
        assert raw == rows, source


def test_one_file_is_split_deterministically_by_seed(tmp_path):
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _clinc("train", 100)))
    config = load_config(None, [f"data.dataset_name={path}", "data.validation_fraction=0.1", "data.test_fraction=0.2"])
    first, origin = read_splits(config.data)
    again, _ = read_splits(config.data)
    assert first == again
    assert [len(first[s]) for s in ("train", "validation", "test")] == [70, 10, 20]
    prompts = [{r["text"] for r in first[s]} for s in ("train", "validation", "test")]
    assert not (prompts[0] & prompts[2]) and not (prompts[0] & prompts[1])
    assert "split off by data.seed=42" in origin["test"]
    other, _ = read_splits(load_config(None, [f"data.dataset_name={path}", "data.seed=7"]).data)
    assert other["test"] != first["test"]


def test_tokenized_once_per_sweep_not_per_trial(tiny_model_dir, tiny_data_dir, tmp_path):
    """The driver calls the tokenizer twice per example (prompt, prompt+completion); a trial built from
    those rows trains on exactly those token ids, without tokenizing again."""
    from transformers import AutoTokenizer

    from test_trial_training import make_spec
    from trainables.qlora_trial import build_trainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    calls = []
    original = type(tokenizer).__call__

    class CountingTokenizer(type(tokenizer)):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return original(self, *args, **kwargs)

    tokenizer.__class__ = CountingTokenizer
    config = load_config(None, [f"data.dataset_name={tiny_data_dir}", "data.max_validation_rows=0"])
    raw, origin = read_splits(config.data)
    rows = prepare_splits(config.data, check_and_filter(raw, origin, config.data), tokenizer)
    examples = sum(len(r) for r in rows.values())
    assert len(calls) == 2 * examples

    trainer = build_trainer(make_spec(tiny_model_dir), rows["train"], rows["validation"], output_dir=str(tmp_path))
    assert trainer.train_dataset["input_ids"] == [r["input_ids"] for r in rows["train"]]
    assert "prompt" not in trainer.train_dataset.column_names  # no text left for TRL to tokenize again


def test_a_conversation_the_chat_template_refuses_is_a_data_error(tiny_model_dir):
    """Chat templates check conversations themselves (roles that must alternate): their error becomes the project's."""
    from transformers import AutoTokenizer

    from sweeps.data_loading import DataError, render

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = ("{% for m in messages %}{% if loop.index0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
                               "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
                               "{{ m['content'] }}{% endfor %}")
    config = load_config(None, ["data.format=messages"])
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"},
                        {"role": "assistant", "content": "greeting"}]}
    with pytest.raises(DataError, match=r"the model's chat template refuses the conversation .*roles must alternate"):
        render([row], config.data, tokenizer)
