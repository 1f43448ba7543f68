"""One loaded base model per trial process, kept for the next trial that Ray Tune runs in the same actor
(`TuneConfig(reuse_actors=True)`). Loading and 4-bit quantizing the base is most of a short trial's start-up;
a reused actor skips it and only attaches a fresh LoRA adapter. The base weights are frozen, so what a trial
changes is its adapter, which PEFT's `unload()` takes off again before the next trial gets the model."""

from __future__ import annotations

from typing import Callable

_cached: dict = {"key": None, "model": None, "adapter": None}


def acquire_base_model(key: tuple, load: Callable[[], object]) -> tuple[object, bool]:
    """The cached base for `key` with no adapter attached, or a fresh one from `load()` (any other base is
    dropped first, so one process never holds two). Returns (model, reused)."""
    if _cached["key"] == key:
        if _cached["adapter"] is not None:
            _cached["adapter"].unload()  # the previous trial's LoRA layers are replaced by their base layers
            _cached["adapter"] = None
        return _cached["model"], True
    release_base_model()
    model = load()
    _cached.update(key=key, model=model, adapter=None)
    return model, False


def remember_adapter(peft_model) -> None:
    """The PeftModel now wrapping the cached base: its adapter is removed before the base is handed out again."""
    _cached["adapter"] = peft_model


def release_base_model() -> None:
    """Drop the cached base and give its memory back (also before a trial loads a different base)."""
    import gc

    had_model = _cached["model"] is not None
    _cached.update(key=None, model=None, adapter=None)
    if had_model:
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
