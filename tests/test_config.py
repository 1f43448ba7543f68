"""Config loading: defaults < YAML < overrides, and every bad value fails naming key, value and fix."""

import pytest

from sweeps.config import ConfigError, load_config
from sweeps.lora_search import main


def test_layers_defaults_yaml_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_steps: 40\n  learning_rate: 2e-4\nsweep:\n  run_cap: 6\n")
    config = load_config(str(path), ["training.max_steps=24", "output.name=x"])
    assert config.training.max_steps == 24  # override beats YAML
    assert config.training.learning_rate == pytest.approx(2e-4)  # PyYAML's string '2e-4' coerced
    assert config.sweep.run_cap == 6  # YAML beats default
    assert config.training.eval_steps == 8  # default kept
    assert config.output.name == "x"


def test_split_files_replace_the_dataset_name_in_the_saved_config(tmp_path):
    """A run given data.train_file reads that file only: config.yaml must not name the default dataset as well."""
    import yaml

    from sweeps.config import save_config

    config = load_config(None, [f"data.train_file={tmp_path / 'train.jsonl'}"])
    assert config.data.dataset_name == "" and config.data.train_file == str(tmp_path / "train.jsonl")
    save_config(config, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["dataset_name"] == ""
    assert load_config(None, []).data.dataset_name.endswith("clinc150")  # without split files the default stays


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'training.learnig_rate'.*Did you mean training.learning_rate"):
        load_config(None, ["training.learnig_rate=1e-3"])


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer'.*Did you mean training"):
        load_config(None, ["trainer.max_steps=3"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"training.max_steps: expected an integer, got 'ten'"):
        load_config(None, ["training.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"training.learning_rate: expected a number, got 'fast'.*2.0e-4"):
        load_config(None, ["training.learning_rate=fast"])


def test_choice_lists_valid_values():
    with pytest.raises(ConfigError, match=r"model.bnb_4bit_quant_type: 'int8' is not one of the valid choices \['nf4', 'fp4'\]"):
        load_config(None, ["model.bnb_4bit_quant_type=int8"])


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  max_steps: 4\n  eval_steps: [2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+.*invalid YAML"):
        load_config(str(path))


def test_range_checks():
    with pytest.raises(ConfigError, match="must be a multiple of training.eval_steps"):
        load_config(None, ["training.max_steps=25", "training.eval_steps=10"])
    with pytest.raises(ConfigError, match="sweep.run_cap: must be positive, got 0"):
        load_config(None, ["sweep.run_cap=0"])
    with pytest.raises(ConfigError, match=r"eval.top_k \(7\) is larger than sweep.run_cap \(6\)"):
        load_config(None, ["eval.top_k=7"])


def test_cli_exits_2_on_a_bad_config_and_writes_nothing(tmp_path, capsys):
    code = main([f"output.dir={tmp_path}", "sweep.parameters={lora_r: {values: []}}"])
    assert code == 2
    assert "sweep.parameters.lora_r.values: must be a non-empty list" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_space_and_rungs(capsys):
    assert main(["--dry-run", "training.max_steps=40", "training.eval_steps=10"]) == 0
    out = capsys.readouterr().out
    assert "rungs at evaluations [1, 2]" in out and "max_t=4" in out
    assert "--max-lora-rank 16" in out
