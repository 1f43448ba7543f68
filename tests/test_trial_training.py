"""One trial's training, without Ray: LoRA learns, the base stays frozen, and gradients survive the
bitsandbytes CPU repack pitfall after an evaluation pass."""

import pytest
import torch

from sweeps.config import load_config
from sweeps.data_loading import check_and_filter, prepare_splits, read_splits
from trainables.model_loading import choose_precision, keep_bnb_cpu_training_layout, load_base_model
from trainables.qlora_trial import build_trainer
from trainables.trial_spec import BaseModelSpec, TrialSpec, TrialSpecError


def make_spec(model_dir, cpu_fallback: str = "bf16", **changes) -> TrialSpec:
    """A trial of the default config on the tiny model, the base decided as the driver decides it."""
    config = load_config(None, [f"model.cpu_fallback={cpu_fallback}"])
    cuda = torch.cuda.is_available()
    precision, _ = choose_precision(config.model.load_in_4bit, config.model.cpu_fallback, cuda)
    base = BaseModelSpec(model_dir=str(model_dir), precision=precision, device="cuda" if cuda else "cpu")
    spec = TrialSpec.from_tune_config(config.training, {"learning_rate": 3e-2, "max_steps": 4, "eval_steps": 2,
                                                        "per_device_train_batch_size": 8}, base, max_length=64)
    return spec.with_training(**changes)


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


def test_a_sampled_key_that_is_no_training_setting_fails_naming_it(tiny_model_dir):
    spec = make_spec(tiny_model_dir)
    with pytest.raises(TrialSpecError, match=r"\['learnig_rate'\], which are not training settings; valid: lora_r"):
        TrialSpec.from_tune_config(spec.training, {"learnig_rate": 1e-3}, spec.base, spec.max_length)


def _eval_losses(trainer) -> list[float]:
    return [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]


@pytest.mark.parametrize("cpu_fallback", ["bf16", "4bit"])
def test_a_reused_base_trains_exactly_like_a_fresh_one(tiny_model_dir, rows, tmp_path, cpu_fallback):
    """A reused Ray actor keeps the loaded base for its next trial (trainables/base_model_cache.py): the previous
    trial's adapter must be gone and the next trial must not be able to tell the difference."""
    from peft.tuners.lora import LoraLayer

    from trainables.base_model_cache import release_base_model

    spec = make_spec(tiny_model_dir, cpu_fallback=cpu_fallback, lora_target_modules="attn_qv", lora_r=4)
    other = spec.with_training(lora_target_modules="all_linear", lora_r=8, learning_rate=1e-2)

    release_base_model()
    fresh = build_trainer(spec, rows["train"], rows["validation"], output_dir=str(tmp_path / "a"))
    fresh.train()
    in_between = build_trainer(other, rows["train"], rows["validation"], output_dir=str(tmp_path / "b"))
    in_between.train()
    reused = build_trainer(spec, rows["train"], rows["validation"], output_dir=str(tmp_path / "c"))
    lora_layers = [name for name, module in reused.model.named_modules() if isinstance(module, LoraLayer)]
    assert lora_layers and all(name.endswith(("q_proj", "v_proj")) for name in lora_layers), \
        "the all_linear adapter of the trial in between must have been taken off"
    reused.train()
    assert _eval_losses(reused) == _eval_losses(fresh) and len(_eval_losses(fresh)) == 2
    release_base_model()


def test_padding_free_batches_give_the_padded_loss(tiny_model_dir, rows, tmp_path):
    """Padding-free batches are one flat sequence per batch: transformers must keep the examples apart. The loss
    of a random tiny model barely notices attention leaking across examples (about 1e-4 relative), so the logits
    of an example inside the flat batch are also compared with the same example run alone."""
    from trainables.base_model_cache import release_base_model

    padded = build_trainer(make_spec(tiny_model_dir, padding_free=False), rows["train"], rows["validation"],
                           output_dir=str(tmp_path / "padded"))
    padded_loss = padded.evaluate()["eval_loss"]
    flat = build_trainer(make_spec(tiny_model_dir, padding_free=True), rows["train"], rows["validation"],
                         output_dir=str(tmp_path / "flat"))
    batch = next(iter(flat.get_eval_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # really one flat sequence
    flat_loss = flat.evaluate()["eval_loss"]
    assert flat_loss == pytest.approx(padded_loss, rel=1e-3)

    model = flat.model.eval()
    with torch.no_grad():
        _, outputs = flat.compute_loss(model, dict(batch), return_outputs=True)  # TRL's own forward pass
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        second = slice(starts[1], starts[2])  # an example with another one before it in the flat sequence
        alone = model(input_ids=batch["input_ids"][:, second], use_cache=False).logits
    assert torch.allclose(outputs.logits[:, second].float(), alone.float(), atol=2e-2), \
        (outputs.logits[:, second].float() - alone.float()).abs().max()
    release_base_model()
