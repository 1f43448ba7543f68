"""Config loading: defaults < YAML < overrides, and every bad value fails naming key, value and fix."""

import random
import string

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
    with pytest.raises(ConfigError, match=r"resources.engine_compile=true with resources.engine_dequantize_base=false"):
        load_config(None, ["resources.engine_compile=true", "resources.engine_dequantize_base=false"])
    # Compiled layers over a base dequantized once (the default), or over a base that is not 4-bit, are fine.
    assert load_config(None, ["resources.engine_compile=true"]).resources.engine_compile
    load_config(None, ["resources.engine_compile=true", "resources.engine_dequantize_base=false",
                       "model.load_in_4bit=false"])


def test_cli_exits_2_on_a_bad_config_and_writes_nothing(tmp_path, capsys):
    code = main([f"output.dir={tmp_path}", "sweep.parameters={lora_r: {values: []}}"])
    assert code == 2
    assert "sweep.parameters.lora_r.values: must be a non-empty list" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_space_and_rungs(tmp_path, capsys):
    assert main(["--dry-run", "training.max_steps=40", "training.eval_steps=10", f"output.dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "rungs at evaluations [1, 2]" in out and "max_t=4" in out
    assert "--max-lora-rank 16" in out


# ---------------------------------------------------------------- secrets
# Token-shaped strings are made here at run time (seeded), so that no real-looking token is committed.

def _random(rng, length: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    while True:  # a real token's random part mixes digits, lower and upper case
        text = "".join(rng.choice(alphabet) for _ in range(length))
        if alphabet != string.ascii_letters + string.digits or (
                any(c.isdigit() for c in text) and any(c.islower() for c in text) and any(c.isupper() for c in text)):
            return text


def _secrets() -> dict[str, tuple[str, str]]:
    """{shape: (a secret of that shape, the environment variable the refusal must point to)}."""
    rng = random.Random(12)
    hex40 = "".join(rng.choice("0123456789abcdef") for _ in range(40))
    return {
        "hugging face": ("hf_" + _random(rng, 34), "HF_TOKEN"),
        "wandb": (hex40, "WANDB_API_KEY"),
        "openai": ("sk-proj-" + _random(rng, 64), "OPENAI_API_KEY"),
        "openai legacy": ("sk-" + _random(rng, 48), "OPENAI_API_KEY"),
        "github classic": ("ghp_" + _random(rng, 36), "GITHUB_TOKEN"),
        "github fine-grained": ("github_pat_" + _random(rng, 22) + "_" + _random(rng, 59), "GITHUB_TOKEN"),
        "aws": ("AKIA" + _random(rng, 16, string.ascii_uppercase + string.digits), "AWS_ACCESS_KEY_ID"),
    }


SECRETS = _secrets()
# (the override, the key the message must name, the secret, the variable the message must point to): every shape in
# a free-text field, and URL credentials (a token as the user name, a password) in the tracker URLs.
SECRET_CASES = {
    **{f"{shape} in data.system_prompt": (f"data.system_prompt=You answer briefly. {secret} Be kind.",
                                          "data.system_prompt", secret, variable)
       for shape, (secret, variable) in SECRETS.items()},
    "hugging face in data.prompt_template": (f"data.prompt_template=Q: {{text}} key={SECRETS['hugging face'][0]}\nA:",
                                             "data.prompt_template", SECRETS["hugging face"][0], "HF_TOKEN"),
    "wandb key as a url user name": (f"tracking.mlflow_tracking_uri=https://{SECRETS['wandb'][0]}@mlflow.example:5000",
                                     "tracking.mlflow_tracking_uri", SECRETS["wandb"][0], "MLFLOW_TRACKING_USERNAME"),
    "url password": ("tracking.optuna_storage=postgresql://me:s3cr3t-pw@db.example/optuna", "tracking.optuna_storage",
                     "s3cr3t-pw", "PGPASSWORD"),
    "url user name in free text": ("data.target_prefix= see https://alice@internal.example/x ", "data.target_prefix",
                                   "alice", "credentials"),
    "nested search-space value": (f"sweep.parameters={{lora_target_modules: {{values: [attn_qv, '{SECRETS['github classic'][0]}']}}}}",
                                  "sweep.parameters", SECRETS["github classic"][0], "GITHUB_TOKEN"),
}


def _refused_without_echo(argv: list[str], secret: str, tmp_path, capsys) -> str:
    # A run that missed the secret stops at the model check a moment later (and this test fails on its message),
    # instead of running a sweep.
    assert main([*argv, "model.model_name_or_path=/nonexistent/model"]) == 2
    out, err = capsys.readouterr()
    assert secret not in out and secret not in err, err
    assert err.startswith("lora_search: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()  # no experiment directory, nothing written
    return err


@pytest.mark.parametrize("case", sorted(SECRET_CASES))
def test_a_secret_in_any_value_is_refused_without_repeating_it(case, tmp_path, capsys):
    override, key, secret, variable = SECRET_CASES[case]
    err = _refused_without_echo([f"output.dir={tmp_path / 'runs'}", override], secret, tmp_path, capsys)
    assert err.startswith(f"lora_search: error: {key}"), err
    assert variable in err and "environment" in err


def test_a_secret_in_the_yaml_file_is_refused_naming_the_key_and_the_file(tmp_path, capsys):
    secret = SECRETS["hugging face"][0]
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  format: messages\n  system_prompt: |\n    You are helpful.\n    Token: {secret}\n"
                    f"sweep:\n  parameters:\n    lora_r: {{values: [8, '{SECRETS['aws'][0]}']}}\n")
    err = _refused_without_echo(["--config", str(path), f"output.dir={tmp_path / 'runs'}"], secret, tmp_path, capsys)
    assert err.startswith(f"lora_search: error: data.system_prompt (in {path}): holds a Hugging Face token"), err
    # Further down the same file, nested in a list: the walk reaches it too.
    path.write_text(f"sweep:\n  parameters:\n    lora_r: {{values: [8, '{SECRETS['aws'][0]}']}}\n")
    err = _refused_without_echo(["--config", str(path), f"output.dir={tmp_path / 'runs'}"], SECRETS["aws"][0],
                                tmp_path, capsys)
    assert err.startswith(f"lora_search: error: sweep.parameters.lora_r.values[1] (in {path}): holds an AWS"), err
    # As a key, where the unknown-key message would otherwise repeat it.
    path.write_text(f"data:\n  {SECRETS['openai'][0]}: 1\n")
    err = _refused_without_echo(["--config", str(path)], SECRETS["openai"][0], tmp_path, capsys)
    assert "a key under data" in err


def test_a_secret_in_an_argument_argparse_cannot_parse_is_refused_without_repeating_it(tmp_path, capsys):
    secret = SECRETS["hugging face"][0]
    err = _refused_without_echo([f"--hf-token={secret}", f"output.dir={tmp_path / 'runs'}"], secret, tmp_path, capsys)
    assert "a command-line argument: holds a Hugging Face token" in err
    _refused_without_echo([secret], secret, tmp_path, capsys)  # not key=value: the parse error would repeat it


@pytest.mark.parametrize("value", [
    "output.name=sk-learn-baseline-comparison-2026-12-01-run",  # sk- and long, but not a key's random part
    "data.dataset_name=/cache/hub/datasets--x/snapshots/0123456789abcdef0123456789abcdef01234567/data",  # hub hash
    "data.system_prompt=Models: hf_internal_testing_tiny_random_llama_for_causal_lm, see https://huggingface.co/docs",
    "tracking.optuna_storage=postgresql://db.example:5432/optuna",
    "tracking.mlflow_tracking_uri=http://127.0.0.1:5000",
])
def test_values_that_only_resemble_secrets_are_accepted(value):
    load_config(None, [value])


# ---------------------------------------------------------------- command line


def _dry_run_args(tmp_path, tiny_model_dir, tiny_data_dir) -> list[str]:
    return [f"model.model_name_or_path={tiny_model_dir}", f"data.dataset_name={tiny_data_dir}",
            f"output.dir={tmp_path / 'runs'}"]


def test_overrides_before_between_and_after_flags(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    args = _dry_run_args(tmp_path, tiny_model_dir, tiny_data_dir)
    assert main([*args, "training.max_steps=40", "--dry-run", "training.eval_steps=10", "--smoke-test",
                 "output.name=mixed"]) == 0
    out = capsys.readouterr().out
    assert "rungs at evaluations [1, 2]" in out and "max_t=4" in out  # both sides of --dry-run were applied
    assert f"experiment directory: {tmp_path / 'runs' / 'mixed-smoke'}" in out


def test_smoke_test_runs_in_its_own_experiment(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    """After --smoke-test, the main command starts its own experiment instead of being refused as another config."""
    from sweeps.experiment import Experiment
    from sweeps.lora_search import parse_args, resolve

    args = _dry_run_args(tmp_path, tiny_model_dir, tiny_data_dir)
    smoke, _ = resolve(parse_args(["--smoke-test", *args]))
    main_config, _ = resolve(parse_args(args))
    assert smoke.experiment_dir == tmp_path / "runs" / "clinc150-smollm2-smoke"
    assert main_config.experiment_dir == tmp_path / "runs" / "clinc150-smollm2"
    experiment = Experiment(smoke, smoke.experiment_dir)  # as the smoke test's run leaves it
    experiment.claim()
    experiment.create("bf16")
    experiment.release()
    assert main(["--dry-run", *args]) == 0  # the main command's checks pass
    assert main(["--dry-run", "--smoke-test", *args, "training.max_steps=8"]) == 2  # the smoke experiment is guarded
    assert "holds a sweep with a different config (changed: training.max_steps)" in capsys.readouterr().err


DRY_RUN_CASES = {
    # name: (overrides, the message)
    "dataset missing": (["data.dataset_name=/nonexistent/clinc"], r"data.dataset_name: '/nonexistent/clinc' does not exist"),
    "train file missing": (["data.train_file=/nonexistent/train.jsonl"],
                           r"data.train_file: dataset file '/nonexistent/train.jsonl' does not exist"),
    "field missing": (["data.prompt_template=Q: {question}"], r"field\(s\) \['question'\] needed by data.format=template"),
    "model missing": (["model.model_name_or_path=/nonexistent/model"],
                      r"model.model_name_or_path: '/nonexistent/model' does not exist"),
    "gguf missing": (["model.model_name_or_path=/nonexistent/model.gguf"],
                     r"model.model_name_or_path: GGUF file '/nonexistent/model.gguf' does not exist"),
    "output dir a file": (["output.dir=TMP/a_file/runs"], r"output.dir: .*a_file is a file, not a directory"),
}


@pytest.mark.parametrize("case", sorted(DRY_RUN_CASES))
def test_dry_run_runs_the_cheap_checks(case, tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    import re

    (tmp_path / "a_file").write_text("x")
    overrides, message = DRY_RUN_CASES[case]
    argv = ["--dry-run", *_dry_run_args(tmp_path, tiny_model_dir, tiny_data_dir),
            *[o.replace("TMP", str(tmp_path)) for o in overrides]]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert re.search(message, err) and err.count("\n") == 1, err
    assert out == ""  # refused before the plan is printed
    assert not (tmp_path / "runs").exists()


def test_dry_run_refuses_what_the_existing_experiment_would_refuse(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    from sweeps.experiment import Experiment

    args = _dry_run_args(tmp_path, tiny_model_dir, tiny_data_dir)
    config = load_config(None, args)
    experiment = Experiment(config, config.experiment_dir)
    experiment.claim()
    experiment.create("bf16")
    experiment.release()
    before = sorted(p.name for p in config.experiment_dir.iterdir())
    assert main(["--dry-run", *args, "training.learning_rate=1.0e-3"]) == 2
    assert "holds a sweep with a different config (changed: training.learning_rate)" in capsys.readouterr().err
    assert main(["--dry-run", *args, "resources.cpus_per_trial=2"]) == 0  # resources do not change results
    assert sorted(p.name for p in config.experiment_dir.iterdir()) == before  # no lock taken, nothing written


def test_dry_run_asks_the_mlflow_server(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    """A tracking server that never answers fails the dry run as it fails the run (after the check's timeout)."""
    import socket

    pytest.importorskip("mlflow")
    from sweeps.trackers import MLFLOW_CHECK_TIMEOUT_S

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        code = main(["--dry-run", *_dry_run_args(tmp_path, tiny_model_dir, tiny_data_dir), "tracking.mlflow=true",
                     f"tracking.mlflow_tracking_uri={uri}"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert f"the MLflow server at {uri} did not answer within {MLFLOW_CHECK_TIMEOUT_S} s" in err


def test_auto_engine_is_the_shared_engine_on_gpus_and_per_process_trials_without():
    from sweeps.config import LorasweepConfig
    from sweeps.lora_search import choose_engine

    assert LorasweepConfig().resources.engine == "auto"
    assert choose_engine("auto", cluster_gpus=2) == "shared" and choose_engine("auto", cluster_gpus=0) == "per_process"
    assert choose_engine("per_process", cluster_gpus=2) == "per_process"
    assert choose_engine("shared", cluster_gpus=0) == "shared"
