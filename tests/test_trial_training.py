"""One trial's training, without Ray: LoRA learns, the base stays frozen, and gradients survive the
bitsandbytes CPU repack pitfall after an evaluation pass."""

import dataclasses

import pytest
import torch

from sweeps.config import load_config
from sweeps.data import check_and_filter, prepare_splits, read_splits
from trainables.model_loading import keep_bnb_cpu_training_layout, load_base_model
from trainables.qlora_trial import TrialSpec, build_trainer


def make_spec(model_dir, **changes) -> TrialSpec:
    config = load_config(None, [])
    settings = {**vars(config.training), **vars(config.model), "model_dir": str(model_dir), "max_length": 64}
    spec = TrialSpec.from_tune_config(settings, {"learning_rate": 3e-2, "max_steps": 4, "eval_steps": 2,
                                                 "per_device_train_batch_size": 8})
    return dataclasses.replace(spec, **changes)


@pytest.fixture(scope="module")
def rows(tiny_model_dir, tiny_data_dir):
    return tokenized_rows(tiny_model_dir, tiny_data_dir)


def tokenized_rows(model_dir, data_dir) -> dict:
    from transformers import AutoTokenizer

    config = load_config(None, [f"data.dataset_name={data_dir}", "data.num_targets=0", "data.max_validation_rows=0"])
    raw, origin = read_splits(config.data)
    return prepare_splits(config.data, check_and_filter(raw, origin, config.data), AutoTokenizer.from_pretrained(model_dir))


@pytest.mark.parametrize("cpu_fallback", ["bf16", "4bit"])
def test_adapter_learns_and_base_stays_frozen(tiny_model_dir, rows, tmp_path, cpu_fallback):
    spec = make_spec(tiny_model_dir, cpu_fallback=cpu_fallback)
    trainer = build_trainer(spec, rows["train"], rows["validation"], output_dir=str(tmp_path))
    model = trainer.model
    before = {n: p.detach().clone().float() for n, p in model.named_parameters()}
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach().float())}
    lora_names = {n for n, p in model.named_parameters() if "lora_" in n}
    assert lora_names and changed == {n for n in lora_names if n in changed}, "only LoRA weights may change"
    assert any("lora_B" in n for n in changed), "LoRA B starts at zero and must have moved"
    assert loss_after < loss_before and torch.isfinite(torch.tensor(loss_after))


def test_lora_gradients_nonzero_after_an_eval_pass_on_4bit_cpu(tiny_model_dir, rows, tmp_path):
    """On CPUs with AVX512-BF16 a no-grad forward repacks 4-bit weights and later gradients through
    frozen layers come out zero; load_base_model turns the repack off (DESIGN.md)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_base_model(str(tiny_model_dir), "4bit")
    assert keep_bnb_cpu_training_layout(model) > 0  # the 4-bit layers really are bitsandbytes layers
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    batch = tokenizer([r["prompt"] + r["completion"] for r in rows["train"][:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        model.eval()
        model(**batch)  # the evaluation pass that triggers the repack
    model.train()
    # Give B a value so that gradients reach A and the layers below through the frozen 4-bit weights.
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_A" in n}
    first_layer_grads = [g for n, g in grads.items() if ".layers.0." in n]
    assert first_layer_grads and all(g is not None and g.abs().sum() > 0 for g in first_layer_grads)


def test_a_trial_resumes_from_its_tune_checkpoint(tiny_model_dir, rows, tmp_path):
    """What a retried trial does after a lost node: the adapter, optimizer and schedule come back from the
    checkpoint and training goes on from its step instead of starting over."""
    from transformers import TrainerCallback

    from trainables.qlora_trial import save_trial_checkpoint

    spec = make_spec(tiny_model_dir, max_steps=4, eval_steps=2)
    checkpoint = tmp_path / "checkpoint"

    class SaveAtStep2(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
            if state.global_step == 2:
                checkpoint.mkdir()
                save_trial_checkpoint(checkpoint, model, trainer.processing_class, state, optimizer, lr_scheduler, {"step": 2})

    trainer = build_trainer(spec, rows["train"], rows["validation"], output_dir=str(tmp_path / "first"))
    trainer.add_callback(SaveAtStep2())
    trainer.train()

    seen = {"steps": [], "lora_b_at_resume": None}

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if seen["lora_b_at_resume"] is None:
                seen["lora_b_at_resume"] = sum(p.abs().sum().item() for n, p in model.named_parameters() if "lora_B" in n)

        def on_step_end(self, args, state, control, **kwargs):
            seen["steps"].append(state.global_step)

    resumed = build_trainer(spec, rows["train"], rows["validation"], output_dir=str(tmp_path / "second"))
    resumed.add_callback(Watch())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert seen["steps"] == [3, 4]  # only the steps after the checkpoint
    assert seen["lora_b_at_resume"] > 0  # the trained adapter came back (a fresh LoRA B is all zeros)
