"""Named target-module presets: Optuna searches over names, not over lists (it warns on lists)."""

TARGET_MODULE_PRESETS: dict[str, list[str] | str] = {
    "attn_qv": ["q_proj", "v_proj"],
    "attn_all": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    # PEFT's own spelling: every linear layer but the output head, whatever the architecture names them.
    "all_linear": "all-linear",
}


def target_modules_for(preset: str) -> list[str] | str:
    """The PEFT `target_modules` value for a preset name."""
    return TARGET_MODULE_PRESETS[preset]
