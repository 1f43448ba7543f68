"""The shared-base engine on CPU with the tiny model: an adapter trained beside others with other ranks, targets,
learning rates, schedules, dropouts and accumulation matches the same adapter trained alone; the engine's math
matches PEFT + torch.optim.AdamW + clip_grad_norm_ + transformers' schedule step by step; a diverging neighbour
fails alone; the saved adapter is a PEFT adapter that scores as the engine does; a checkpoint resumes exactly."""

import dataclasses
import json
import math

import pytest
import torch

from test_trial_training import tokenized_rows
from trainables.engine import LoraEngine
from trainables.multi_lora import keyed_keep_mask
from trainables.step_layout import flat_layout
from trainables.trial_spec import BaseModelSpec, TrainingConfig

MAX_RANK = 16
# The adapter under test, and three neighbours that differ from it in everything an adapter can differ in.
SUBJECT = TrainingConfig(lora_r=8, lora_alpha=16, lora_target_modules="attn_qv", lora_dropout=0.1, learning_rate=1e-2,
                         max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2, warmup_steps=2,
                         lr_scheduler_type="cosine", weight_decay=0.01, per_device_eval_batch_size=8, seed=7)
NEIGHBOURS = [
    TrainingConfig(lora_r=4, lora_alpha=8, lora_target_modules="all_linear", lora_dropout=0.0, learning_rate=3e-2,
                   max_steps=4, per_device_train_batch_size=8, seed=1),
    TrainingConfig(lora_r=16, lora_alpha=32, lora_target_modules="mlp", lora_dropout=0.05, learning_rate=1e-3,
                   max_steps=9, per_device_train_batch_size=2, gradient_accumulation_steps=3, seed=2),
    TrainingConfig(lora_r=8, lora_alpha=8, lora_target_modules="attn_all", lora_dropout=0.2, learning_rate=5e-3,
                   max_steps=6, per_device_train_batch_size=4, lr_scheduler_type="constant_with_warmup",
                   warmup_steps=3, seed=3),
]


@pytest.fixture(scope="module")
def rows(tiny_model_dir, tiny_data_dir):
    return tokenized_rows(tiny_model_dir, tiny_data_dir)


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    # fp32 on CPU keeps the comparisons tight; the engine's code path is the same for bf16 and 4-bit bases.
    return BaseModelSpec(model_dir=str(tiny_model_dir), precision="bf16", device="cpu")


def engine_for(base, slots: int) -> LoraEngine:
    engine = LoraEngine(base, slots=slots, max_rank=MAX_RANK)
    engine.model.float()
    return engine


def base_as_the_engine_holds_it(base):
    """The tiny base loaded in bf16 (precision "bf16"), then widened to fp32 as engine_for does."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base.model_dir, dtype=torch.bfloat16).float()


def train(engine: LoraEngine) -> dict[int, list[float]]:
    """Engine steps until every adapter is done; each slot's micro-batch losses in order."""
    losses: dict[int, list[float]] = {}
    while engine.active():
        for slot, loss in engine.step().items():
            losses.setdefault(slot, []).append(loss)
    return losses


def train_queued(engine: LoraEngine) -> None:
    """As train(), but as the engine actor steps: each step queued, then the one before it read."""
    while engine.active():
        engine.queue_step()
        engine.settle(leave=1)
    engine.settle()


def subject_weights(engine: LoraEngine, slot: int) -> dict[str, torch.Tensor]:
    return {name: torch.cat([m.lora_A[slot].flatten(), m.lora_B[slot].flatten()]).detach().clone()
            for name, m in engine.modules.items()}


def test_an_adapter_beside_three_others_trains_as_it_does_alone(base, rows):
    together = engine_for(base, slots=4)
    for config in NEIGHBOURS[:2]:
        together.add(f"n{config.seed}", config, rows["train"], rows["validation"])
    subject = together.add("subject", SUBJECT, rows["train"], rows["validation"])  # in slot 2, not 0
    together.add("n3", NEIGHBOURS[2], rows["train"], rows["validation"])
    untrained = {slot: together.evaluate(slot) for slot in (0, 1, 3)}  # B starts at zero: the base's loss
    losses_together = train(together)

    alone = engine_for(base, slots=1)
    only = alone.add("subject", SUBJECT, rows["train"], rows["validation"])
    losses_alone = train(alone)

    assert subject == 2 and only == 0
    assert len(losses_alone[only]) == SUBJECT.max_steps * SUBJECT.gradient_accumulation_steps
    assert losses_together[subject] == pytest.approx(losses_alone[only], rel=1e-4)
    assert together.adapters[subject].step == alone.adapters[only].step == SUBJECT.max_steps
    assert together.evaluate(subject) == pytest.approx(alone.evaluate(only), rel=1e-4)
    for name, weights in subject_weights(alone, only).items():
        assert torch.allclose(subject_weights(together, subject)[name], weights, atol=1e-5), name
    # The neighbours trained too, each to its own number of steps, and learned.
    assert [together.adapters[s].step for s in (0, 1, 3)] == [4, 9, 6]
    assert all(together.evaluate(slot) < untrained[slot] for slot in (0, 1, 3))


def test_the_engine_computes_what_peft_and_torch_adamw_compute(base, rows, tmp_path):
    """The subject without dropout (the engine keys its masks differently from torch's RNG), trained by the engine
    and by PEFT on the same micro-batches with torch.optim.AdamW, clip_grad_norm_ and transformers' scheduler."""
    from peft import PeftModel
    from transformers import get_scheduler

    from trainables.step_layout import flat_layout
    from trainables.slot_optimizer import BETAS, EPS, MAX_GRAD_NORM

    config = TrainingConfig(**{**SUBJECT.__dict__, "lora_dropout": 0.0})
    engine = engine_for(base, slots=2)
    assert engine.head_alone  # the Llama's head runs only where a completion token is predicted
    engine.add("neighbour", NEIGHBOURS[0], rows["train"], rows["validation"])
    slot = engine.add("subject", config, rows["train"], rows["validation"])
    engine.save_adapter(slot, tmp_path / "init")
    untrained = engine.evaluate(slot)
    engine_losses = train(engine)[slot]

    model = base_as_the_engine_holds_it(base)
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "init"), is_trainable=True)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=BETAS, eps=EPS,
                                  weight_decay=config.weight_decay)
    schedule = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                             num_training_steps=config.max_steps)
    generator, order, reference = torch.Generator().manual_seed(config.seed), [], []
    for _ in range(config.max_steps):
        window = []
        for _ in range(config.gradient_accumulation_steps):
            batch = []
            while len(batch) < config.per_device_train_batch_size:
                if not order:
                    order = torch.randperm(len(rows["train"]), generator=generator).tolist()
                batch.append(rows["train"][order.pop(0)])
            window.append(batch)
        targets = sum(sum(r["completion_mask"][1:]) for batch in window for r in batch)
        for batch in window:
            layout = flat_layout({0: batch}, "cpu")
            # use_cache=False as the engine does: with a cache, transformers does not keep packed examples apart.
            logits = peft_model(input_ids=layout.input_ids, position_ids=layout.position_ids, use_cache=False).logits[0]
            # Over every position (the engine computes the head only where a completion token is predicted).
            labels = torch.full((layout.length,), -100).index_copy(0, layout.kept, layout.kept_targets)
            loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / targets
            loss.backward()
            reference.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    assert engine_losses == pytest.approx(reference, rel=1e-4)
    assert engine.evaluate(slot) < untrained


def test_a_diverging_neighbour_fails_alone(base, rows):
    engine = engine_for(base, slots=2)
    subject = engine.add("subject", SUBJECT, rows["train"], rows["validation"])
    wild = engine.add("wild", TrainingConfig(**{**NEIGHBOURS[0].__dict__, "learning_rate": 1e30}), rows["train"],
                      rows["validation"])
    losses = train(engine)
    assert engine.adapters[wild].failure and ("nan" in engine.adapters[wild].failure
                                              or "inf" in engine.adapters[wild].failure), engine.adapters[wild].failure
    assert not math.isfinite(losses[wild][-1]) and engine.adapters[wild].step < NEIGHBOURS[0].max_steps
    assert engine.adapters[subject].failure is None and engine.adapters[subject].step == SUBJECT.max_steps

    alone = engine_for(base, slots=1)
    alone.add("subject", SUBJECT, rows["train"], rows["validation"])
    assert losses[subject] == pytest.approx(train(alone)[0], rel=1e-4)


def test_steps_queued_ahead_of_their_reading_train_as_steps_read_at_once_and_contain_a_divergence(base, rows):
    """The engine actor's loop queues a step, then reads the one before it: the neighbour of a diverging adapter
    ends with the weights and training loss of synchronous steps, and the diverging one fails by its own figures
    (read a step late, its update having been left out on the device)."""
    def pair():
        engine = engine_for(base, slots=2)
        subject = engine.add("subject", SUBJECT, rows["train"], rows["validation"])
        wild = engine.add("wild", TrainingConfig(**{**NEIGHBOURS[0].__dict__, "learning_rate": 1e30}), rows["train"],
                          rows["validation"])
        return engine, subject, wild

    at_once, subject, wild = pair()
    train(at_once)
    queued, _, _ = pair()
    train_queued(queued)
    assert queued.adapters[wild].failure and ("nan" in queued.adapters[wild].failure
                                              or "inf" in queued.adapters[wild].failure), queued.adapters[wild].failure
    assert queued.adapters[subject].failure is None and queued.adapters[subject].step == SUBJECT.max_steps
    for name, weights in subject_weights(at_once, subject).items():
        assert torch.allclose(subject_weights(queued, subject)[name], weights, atol=1e-6), name
    assert queued.take_train_loss(subject) == pytest.approx(at_once.take_train_loss(subject), rel=1e-6)
    assert math.isfinite(queued.evaluate(subject))


def test_a_slot_whose_gradient_norm_is_not_finite_is_left_as_it_was():
    from trainables.slot_optimizer import SlotAdamW

    weights = torch.nn.Parameter(torch.ones(3, 4))
    optimizer = SlotAdamW(weights, [weights])
    weights.grad = torch.tensor([[1.0] * 4, [math.nan, 1.0, 1.0, 1.0], [math.inf] * 4])
    optimizer.accumulated([0, 1, 2])
    norms = optimizer.step([0, 1, 2], dict.fromkeys(range(3), 0.1), dict.fromkeys(range(3), 0.01)).tolist()
    assert math.isfinite(norms[0]) and not math.isfinite(norms[1]) and not math.isfinite(norms[2])
    assert not torch.equal(weights[0].detach(), torch.ones(4))
    assert torch.equal(weights[1:].detach(), torch.ones(2, 4))
    assert torch.equal(optimizer.moment1[1:], torch.zeros(2, 4)) and torch.equal(optimizer.moment2[1:], torch.zeros(2, 4))


def test_the_saved_adapter_is_a_peft_adapter_that_scores_as_the_engine_does(base, rows, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from eval.generation import heldout_loss

    engine = engine_for(base, slots=2)
    engine.add("neighbour", NEIGHBOURS[1], rows["train"], rows["validation"])
    slot = engine.add("subject", SUBJECT, rows["train"], rows["validation"])
    train(engine)
    engine.save_adapter(slot, tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(base.model_dir)
    base_loss = heldout_loss(base_as_the_engine_holds_it(base).eval(), tokenizer, rows["validation"], 8)
    model = base_as_the_engine_holds_it(base)
    adapted = PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
    adapted_modules = {n.rsplit(".", 2)[-2] for n, _ in adapted.named_modules() if n.endswith(".lora_A")}
    assert adapted_modules == {"q_proj", "v_proj"}  # the attn_qv preset, nothing else
    # The evaluation stage's held-out loss of the PEFT adapter is the engine's own evaluation, and it learned.
    peft_loss = heldout_loss(adapted, tokenizer, rows["validation"], 8)
    assert engine.evaluate(slot) == pytest.approx(peft_loss, rel=1e-4)
    assert peft_loss < base_loss


def test_a_checkpoint_resumes_the_adapter_exactly(base, rows, tmp_path):
    straight = engine_for(base, slots=1)
    straight.add("subject", SUBJECT, rows["train"], rows["validation"])
    expected = train(straight)[0]

    first = engine_for(base, slots=1)
    slot = first.add("subject", SUBJECT, rows["train"], rows["validation"])
    done = []
    while first.adapters[slot].step < 3:
        done.append(first.step()[slot])
    first.save_adapter(slot, tmp_path / "ckpt")  # the PEFT files and the engine's state

    second = engine_for(base, slots=2)
    second.add("neighbour", NEIGHBOURS[2], rows["train"], rows["validation"])
    slot = second.add("subject", SUBJECT, rows["train"], rows["validation"])
    second.resume(slot, tmp_path / "ckpt")
    rest = []
    while second.adapters[slot].step < SUBJECT.max_steps:
        rest.append(second.step()[slot])
    assert done + rest == pytest.approx(expected, rel=1e-4)


def test_keyed_dropout_drops_the_rate_asked_and_depends_only_on_its_key():
    key = {"seed": 7, "step": 3, "module_index": 5}
    mask = keyed_keep_mask((64, 32), 0.25, **key, device="cpu")
    assert mask.shape == (1, 64, 32) and torch.equal(mask, keyed_keep_mask((64, 32), 0.25, **key, device="cpu"))
    assert abs(float((~mask).float().mean()) - 0.25) < 0.03
    for other in ({"seed": 8}, {"step": 4}, {"module_index": 6}):
        assert not torch.equal(mask, keyed_keep_mask((64, 32), 0.25, **{**key, **other}, device="cpu"))
    # A longer micro-batch keeps the same mask for its first tokens: the mask depends on positions, not shapes.
    assert torch.equal(keyed_keep_mask((80, 32), 0.25, **key, device="cpu")[:, :64], mask)


def test_device_generator_dropout_keeps_each_slots_rate_and_its_scale_carries_the_rescaling(base):
    """CUDA's dropout path (masks from the device generator, for all rows at once): each row keeps 1 - p of its
    features, and the 1 / (1 - p) of inverted dropout rides on every module's scale for that row."""
    engine = engine_for(base, slots=2)
    engine.routing.exact_dropout = False
    module = next(iter(engine.modules.values()))
    module.set_slot(0, 4, 2.0, torch.ones(4, module.in_features))
    module.set_slot(1, 4, 2.0, torch.ones(4, module.in_features))
    engine.routing.dropout[0], engine.routing.dropout[1] = 0.5, 0.0
    engine.routing.set([0, 1], [(1, 0), (2, 0)], "cpu", any_dropout=True)
    try:
        kept = module._dropout(torch.ones(2, 4000, module.in_features)).mean(dim=(1, 2))
        assert kept[0].item() == pytest.approx(0.5, abs=0.01) and kept[1].item() == 1.0
        assert module.step_scale.flatten().tolist() == [4.0, 2.0]
    finally:
        engine.routing.clear()


def test_a_shared_dropout_rate_is_one_fused_dropout_whose_rescaling_is_its_own(base):
    """Rows sharing one rate (the usual study: lora_dropout is not searched) take one fused dropout kernel per module,
    which rescales by 1 / (1 - p) itself: the scales then carry none, and the rate kept is the one asked."""
    engine = engine_for(base, slots=2)
    engine.routing.exact_dropout = False
    module = next(iter(engine.modules.values()))
    module.set_slot(0, 4, 2.0, torch.ones(4, module.in_features))
    module.set_slot(1, 4, 2.0, torch.ones(4, module.in_features))
    engine.routing.dropout[0] = engine.routing.dropout[1] = 0.25
    engine.routing.set([0, 1], [(1, 0), (2, 0)], "cpu", any_dropout=True, shared_dropout=0.25)
    try:
        assert engine.routing.fused_dropout == 0.25 and module.step_scale.flatten().tolist() == [2.0, 2.0]
        dropped = module._dropout(torch.ones(2, 4000, module.in_features))
        assert dropped.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]
        assert (dropped == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    finally:
        engine.routing.clear()
    # Keyed masks (the CPU reference) stay per row, shared rate or not.
    engine.routing.exact_dropout = True
    engine.routing.set([0, 1], [(1, 0), (2, 0)], "cpu", any_dropout=True, shared_dropout=0.25)
    assert engine.routing.fused_dropout is None and module.step_scale.flatten().tolist() == [pytest.approx(2 / 0.75)] * 2
    engine.routing.clear()


def test_an_input_cast_once_for_several_modules_gives_each_the_gradient_of_its_own_cast():
    """On CUDA q, k and v (gate and up) share one bf16 cast of their fp32 input (MultiLoraLinear._cast_once); the
    input's gradient is still each module's gradient cast back to fp32 and summed in fp32, as with a cast per module."""
    from trainables.multi_lora import _SharedCast

    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    weights = [torch.randn(16, 16, dtype=torch.bfloat16) for _ in range(3)]
    shared = x.detach().to(torch.bfloat16)
    torch.stack([(_SharedCast.apply(x, shared) @ w).float().sum() for w in weights]).sum().backward()
    once = x.grad.clone()
    x.grad = None
    torch.stack([(x.to(torch.bfloat16) @ w).float().sum() for w in weights]).sum().backward()
    assert x.grad.dtype == torch.float32 and torch.equal(once, x.grad)


@pytest.mark.parametrize("dropout", [False, True])
def test_the_base_and_lora_node_gives_autograds_sum_and_gradients(dropout):
    """On CUDA a module's base product and LoRA term are summed by the matmuls in one autograd node of its own
    (multi_lora._BaseAndLora, its backward written by hand): its output and its gradients for the input, the dropped
    LoRA input and both adapter factors are autograd's for the same sums, here in float64 over the same bf16 values
    (run in fp32 on CPU), the output's gradient cast to bf16 once as the node does."""
    from trainables.multi_lora import _BaseAndLora

    torch.manual_seed(0)
    rows, length, d_in, d_out, rank = 3, 5, 16, 24, 4

    def bf16(*shape):
        return torch.randn(*shape).to(torch.bfloat16)

    compute, weight, bias = bf16(rows, length, d_in), bf16(d_out, d_in), bf16(d_out)
    dropped = bf16(rows, length, d_in) if dropout else None
    a_t, b_t, scale = bf16(rows, d_in, rank), bf16(rows, rank, d_out), torch.tensor([0.5, 2.0, 0.0]).view(3, 1, 1)
    inputs = [compute, dropped, a_t, b_t]
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    out = _BaseAndLora.apply(leaves[0], leaves[1], weight, bias, leaves[2], leaves[3], scale.to(torch.bfloat16),
                             torch.float32)
    gradient = torch.randn_like(out)
    out.backward(gradient)

    exact = [t.double().requires_grad_() if t is not None else None for t in inputs]
    lora_input = exact[0] if not dropout else exact[1]
    expected = exact[0] @ weight.double().t() + bias.double() + (lora_input @ exact[2] * scale.double()) @ exact[3]
    expected.backward(gradient.to(torch.bfloat16).double())
    def close(value, reference):  # within bf16's rounding of the products, relative to the tensor's scale
        return (value.double() - reference).abs().max() <= 1e-2 * reference.abs().max()

    assert out.dtype == torch.float32 and close(out, expected)
    for leaf, reference in zip(leaves, exact):
        if leaf is not None:
            assert leaf.grad is not None and leaf.grad.dtype == torch.bfloat16
            assert close(leaf.grad, reference.grad), (leaf.shape, dropout)
    # The slot of scale 0 is the base alone, and its factors get no gradient.
    assert torch.allclose(out[2].double(), (compute[2].double() @ weight.double().t() + bias.double()), atol=1e-5)
    assert not leaves[2].grad[2].any() and not leaves[3].grad[2].any()


def test_a_step_takes_a_captured_bucket_with_room_for_it_at_little_more_work(base):
    """Fewer captures: a step takes an existing bucket of its rows and dropout that holds its longest row with at most
    WIDTH_SLACK more positions per row, its loss positions, its longest example and its sequences (examples and
    padding pieces); otherwise a new one, with room for more loss positions and sequences."""
    from trainables.graphed_step import KEPT_STEP, SEQUENCES_STEP, WIDTH_STEP

    graphed = LoraEngine(base, slots=4, max_rank=MAX_RANK, cuda_graphs=True).graphed
    dropout = (True, 0.05)
    rows = [20 * WIDTH_STEP - 5] * 15  # 15 adapters' rows in a bucket of 16: one filler row
    first = graphed.bucket_for(16, rows, 1000, 400, 50, dropout)
    assert first[:2] == (16, 20 * WIDTH_STEP) and first[2] % KEPT_STEP == 0 and first[2] >= 1250
    # The sequence bound is the longest example rounded up; the filler row is 20 dummy sequences, each other row's
    # padding 1: room for 1.25 x (400 + 15 + 20).
    assert first[4] == WIDTH_STEP and first[3] % SEQUENCES_STEP == 0 and first[3] >= 1.25 * 435
    graphed.buckets[first] = None
    shorter = [19 * WIDTH_STEP] * 15
    assert graphed.bucket_for(16, shorter, 1200, 480, 60, dropout) == first  # 1/19 wider: taken
    assert graphed.bucket_for(16, [17 * WIDTH_STEP] * 15, 1000, 400, 50, dropout)[1] == 17 * WIDTH_STEP  # 3/17 wider
    assert graphed.bucket_for(16, shorter, first[2] + 1, 400, 50, dropout) != first  # too few loss positions
    assert graphed.bucket_for(16, shorter, 1000, first[3], 50, dropout) != first  # too few sequences
    assert graphed.bucket_for(16, shorter, 1000, 400, WIDTH_STEP + 1, dropout) != first  # a longer example
    assert graphed.bucket_for(12, shorter[:12], 1000, 400, 50, dropout)[0] == 12  # other rows
    assert graphed.bucket_for(16, shorter, 1000, 400, 50, (False, None))[5] == (False, None)  # other dropout


def test_a_buckets_sequences_stay_within_their_rows(base, rows):
    """The bucket's list of where sequences start: the step's examples and padding pieces, then its filler rows cut in
    pieces of at most the sequence bound that start again with each row (a sequence never spans two rows, even where
    the width is no multiple of the bound), then empty sequences at the end."""
    from trainables.graphed_step import _allocate

    engine = LoraEngine(base, slots=2, max_rank=MAX_RANK, cuda_graphs=True)
    slot = engine.add("subject", SUBJECT, rows["train"], rows["validation"])
    batch = {slot: rows["train"][:2]}
    width, bound = 192, 128  # 1.5 bounds per row
    buffers = _allocate(rows=3, width=width, kept=256, sequences=16, bound=bound, device="cpu")
    layout = flat_layout(batch, "cpu", width=width, sequence_bound=bound)
    engine.graphed._fill(buffers, layout, [slot])
    starts = buffers.sequence_starts.tolist()
    real = layout.sequence_starts.tolist()[:-1]
    assert starts[:len(real)] == real
    assert starts[len(real):len(real) + 4] == [width, width + bound, 2 * width, 2 * width + bound]
    assert set(starts[len(real) + 4:]) == {3 * width}
    sequence_of = torch.searchsorted(buffers.sequence_starts, torch.arange(3 * width, dtype=torch.int32), right=True)
    assert all(set(sequence_of[r * width:(r + 1) * width].tolist()).isdisjoint(sequence_of[(r + 1) * width:].tolist())
               for r in range(2))


def test_bucket_rows_are_powers_of_two_up_to_four_then_multiples_of_four():
    from trainables.graphed_step import bucket_rows

    assert [bucket_rows(n) for n in range(1, 18)] == [1, 2, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12, 16, 16, 16, 16, 20]


def test_on_a_4bit_base_too_an_adapter_beside_others_trains_as_it_does_alone(tiny_model_dir, rows):
    import bitsandbytes as bnb

    base = BaseModelSpec(model_dir=str(tiny_model_dir), precision="4bit", device="cpu")
    together = LoraEngine(base, slots=3, max_rank=MAX_RANK)
    assert all(isinstance(m.base, bnb.nn.Linear4bit) for m in together.modules.values())
    together.add("n1", NEIGHBOURS[0], rows["train"], rows["validation"])
    subject = together.add("subject", SUBJECT, rows["train"], rows["validation"])
    together.add("n2", NEIGHBOURS[1], rows["train"], rows["validation"])
    alone = LoraEngine(base, slots=1, max_rank=MAX_RANK)
    alone.add("subject", SUBJECT, rows["train"], rows["validation"])
    assert train(together)[subject] == pytest.approx(train(alone)[0], rel=1e-4)
    assert together.evaluate(subject) == pytest.approx(alone.evaluate(0), rel=1e-4)


def test_a_base_dequantized_once_trains_as_the_4bit_base_does(tiny_model_dir, rows):
    """The same NF4 numbers, dequantized once instead of in every matmul: the same losses."""
    import bitsandbytes as bnb

    base = BaseModelSpec(model_dir=str(tiny_model_dir), precision="4bit", device="cpu")
    engines = [LoraEngine(base, slots=2, max_rank=MAX_RANK, dequantized_base=d) for d in (False, True)]
    assert not any(isinstance(m.base, bnb.nn.Linear4bit) for m in engines[1].modules.values())
    for engine in engines:
        engine.add("n1", NEIGHBOURS[0], rows["train"], rows["validation"])
        engine.add("subject", SUBJECT, rows["train"], rows["validation"])
    four_bit, dequantized = (train(engine) for engine in engines)
    for slot in (0, 1):
        assert four_bit[slot] == pytest.approx(dequantized[slot], rel=1e-4)
    assert engines[0].evaluate(1) == pytest.approx(engines[1].evaluate(1), rel=1e-4)


def test_compiled_decoder_layers_train_as_the_eager_ones(tiny_model_dir, rows, tmp_path):
    """resources.engine_compile: the decoder layers under torch.compile train and evaluate as the eager ones, with
    slots leaving as their adapters finish (3, 2, then 1 per step: dynamic shapes), dropout, and no graph breaks.
    The backend here is AOTAutograd without code generation: the graphs Dynamo and AOTAutograd capture, forward
    and backward, are those Inductor compiles on CUDA; the device-generator dropout is CUDA's path."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    # Four layers rather than the tiny model's two: the layers after the first must share their compiled code.
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    base = BaseModelSpec(model_dir=str(tmp_path), precision="bf16", device="cpu")
    adapters = [SUBJECT, NEIGHBOURS[0], dataclasses.replace(NEIGHBOURS[2], max_steps=8)]
    results = []
    for backend in (None, "aot_eager"):
        torch._dynamo.reset()
        counters.clear()
        engine = LoraEngine(base, slots=3, max_rank=MAX_RANK, compile_backend=backend)
        engine.model.float()
        engine.routing.exact_dropout = False
        for index, config in enumerate(adapters):
            engine.add(f"a{index}", config, rows["train"], rows["validation"])
        torch.manual_seed(0)
        results.append((train(engine), engine.evaluate_many([0, 1, 2])))
    compiled_graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    (eager_losses, eager_eval), (compiled_losses, compiled_eval) = results
    assert [len(eager_losses[s]) for s in range(3)] == [12, 4, 8]  # micro-batches: the slots left one by one
    for slot in range(3):
        assert compiled_losses[slot] == pytest.approx(eager_losses[slot], rel=1e-5)
        assert compiled_eval[slot] == pytest.approx(eager_eval[slot], rel=1e-5)
    # Compiled variants: the first layer's input without a gradient and the others' with, dropout on and off, one
    # slot and several, static then dynamic shapes; not one per layer, module or slot range.
    assert 0 < compiled_graphs <= 8 and breaks == 0  # 4 measured; 12 when each layer compiled its own


def test_bucketed_steps_train_as_the_plain_ones_and_contain_a_divergence(base, rows):
    """resources.engine_cuda_graphs: the step laid out in buckets (rows padded with filler rows (bucket_rows),
    widths and loss positions padded, the attention mask made from the position ids, the gradient taken with
    autograd.grad and added to the slots'), run eagerly here as on CUDA before a bucket is captured: the same losses,
    weights and evaluations as the plain step, with 3, 2 and then 1 adapters per step, and a neighbour whose
    learning rate blows up failing alone."""
    adapters = [dataclasses.replace(SUBJECT, lora_dropout=0.0), dataclasses.replace(NEIGHBOURS[0], lora_dropout=0.0),
                dataclasses.replace(NEIGHBOURS[2], lora_dropout=0.0, max_steps=8),
                dataclasses.replace(NEIGHBOURS[1], lora_dropout=0.0, learning_rate=1e30)]
    results = []
    for cuda_graphs in (False, True):
        engine = LoraEngine(base, slots=4, max_rank=MAX_RANK, cuda_graphs=cuda_graphs)
        engine.model.float()
        for index, config in enumerate(adapters):
            engine.add(f"a{index}", config, rows["train"], rows["validation"])
        results.append((engine, train(engine), engine.evaluate_many([0, 1, 2])))
    (plain, plain_losses, plain_eval), (bucketed, bucketed_losses, bucketed_eval) = results
    assert [len(bucketed_losses[s]) for s in range(3)] == [12, 4, 8]  # micro-batches: the slots left one by one
    assert bucketed.adapters[3].failure and all(bucketed.adapters[s].failure is None for s in range(3))
    for slot in range(3):
        assert bucketed_losses[slot] == pytest.approx(plain_losses[slot], rel=1e-5)
        assert bucketed_eval[slot] == pytest.approx(plain_eval[slot], rel=1e-5)
        for name, weights in subject_weights(plain, slot).items():
            assert torch.allclose(subject_weights(bucketed, slot)[name], weights, atol=1e-5), name
    # Buckets of 4 rows (4 adapters, then 3 and a filler row), 2 and 1; widths padded to WIDTH_STEP.
    from trainables.graphed_step import WIDTH_STEP

    assert {key[0] for key in bucketed.graphed.buckets} == {4, 2, 1}
    assert all(key[1] % WIDTH_STEP == 0 for key in bucketed.graphed.buckets)


def test_the_packed_examples_mask_is_transformers_mask():
    """The reference of the engine's attention (on CPU): the mask made on the device from where the packed examples
    start is the one transformers makes from their position ids (each example attends to itself, causally)."""
    from transformers.masking_utils import find_packed_sequence_indices

    from trainables.packed_attention import packed_causal_mask

    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    starts = torch.tensor([0, 3, 5, 9, 15, 18], dtype=torch.int32)
    mask = packed_causal_mask(starts, 2, 9)
    assert mask.shape == (2, 1, 9, 9)
    example = find_packed_sequence_indices(positions)
    for row in range(2):
        for i in range(9):
            for j in range(9):
                assert mask[row, 0, i, j].item() == (j <= i and example[row][i] == example[row][j])
    # With a sliding window of 2, a position sees itself and the one before it, within its example.
    windowed = packed_causal_mask(starts, 2, 9, window=2)
    assert windowed[0, 0, 8].nonzero().flatten().tolist() == [7, 8]
    assert windowed[0, 0, 5].nonzero().flatten().tolist() == [5]


def test_the_layout_says_where_each_packed_example_starts():
    """flat_layout's sequence starts: each example, then each row's padding, then the end; with the longest."""
    from trainables.step_layout import flat_layout

    def example(length):
        return {"input_ids": list(range(1, length + 1)), "completion_mask": [0] + [1] * (length - 1)}

    layout = flat_layout({3: [example(3), example(2)], 0: [example(6)]}, "cpu", width=8)
    assert layout.sequence_starts.dtype == torch.int32
    assert layout.sequence_starts.tolist() == [0, 3, 5, 8, 14, 16]
    assert layout.longest_sequence == 6
    # Wider rows: the padding comes as dummy sequences of at most the bound (its positions restart with each).
    layout = flat_layout({3: [example(3), example(2)], 0: [example(6)]}, "cpu", width=16, sequence_bound=8)
    assert layout.sequence_starts.tolist() == [0, 3, 5, 13, 16, 22, 30, 32]
    assert layout.position_ids[0, 5:].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]
    assert layout.longest_sequence == 8
    with pytest.raises(ValueError, match="longer than the sequence bound"):
        flat_layout({0: [example(6)]}, "cpu", sequence_bound=4)


def test_gradient_checkpointing_trains_as_without_it(tiny_model_dir, rows):
    """With checkpointed layers (their forward run again in the backward) the step's adapters, handed to the
    modules once per step (Routing.set), still get their gradients: the same losses as without."""
    base = BaseModelSpec(model_dir=str(tiny_model_dir), precision="4bit", device="cpu")
    losses, evaluations = [], []
    for checkpointing in (False, True):
        engine = LoraEngine(base, slots=2, max_rank=MAX_RANK, gradient_checkpointing=checkpointing)
        engine.add("subject", dataclasses.replace(SUBJECT, lora_dropout=0.0), rows["train"], rows["validation"])
        engine.add("n1", NEIGHBOURS[0], rows["train"], rows["validation"])
        untrained = engine.evaluate_many([0, 1])
        losses.append(train(engine))
        evaluations.append(engine.evaluate_many([0, 1]))
        assert all(evaluations[-1][slot] < untrained[slot] for slot in (0, 1))  # both adapters learned
    for slot in (0, 1):
        assert losses[1][slot] == pytest.approx(losses[0][slot], rel=1e-5)
        assert evaluations[1][slot] == pytest.approx(evaluations[0][slot], rel=1e-5)


def test_the_engine_benchmark_measures_more_tokens_per_step_with_more_adapters(tiny_model_dir, tiny_data_dir, capsys,
                                                                                 tmp_path, rows):
    from sweeps.engine_benchmark import kernel_class, main, render, time_steps

    figures = tmp_path / "figures.json"
    assert main(["--model", str(tiny_model_dir), "--slots", "1", "3", "--steps", "2", f"data.dataset_name={tiny_data_dir}",
                 "data.num_targets=0", "training.per_device_train_batch_size=4", "--json", str(figures)]) == 0
    table_rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")
                  or line.startswith("| 3 |")]
    tokens_per_step = [int(row[3].replace(",", "")) for row in table_rows]
    assert len(table_rows) == 2 and tokens_per_step[1] > 2 * tokens_per_step[0] > 0
    # Each step taken apart: CPU time in each of the engine's phases, and how many operators a step runs.
    for run in json.loads(figures.read_text())["runs"]:
        phases = {k: v for k, v in run["breakdown"].items() if k.startswith("phase (CPU): ")}
        assert set(phases) == {f"phase (CPU): {p}" for p in ("batch layout", "forward and loss", "backward", "optimizer")}
        assert all(ms > 0 for ms in phases.values())
        assert sum(phases.values()) <= 1.05 * run["breakdown"]["step wall (profiled)"]
        assert run["breakdown"]["operators per step (aten calls, nested ones included)"] > 100
        assert run["evaluation_s (all adapters)"] > 0 and run["snapshot_ms (per adapter)"] > 0
    assert kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "matmul bf16"
    # With CUDA graphs (on CUDA only in a study; bucketed steps run eagerly here) it says how many shape buckets the
    # steps met.
    engine = LoraEngine(BaseModelSpec(model_dir=str(tiny_model_dir), precision="4bit", device="cpu"), slots=3,
                        max_rank=MAX_RANK, cuda_graphs=True)
    for index, training in enumerate([SUBJECT, *NEIGHBOURS[:2]]):
        engine.add(f"a{index}", training, rows["train"], rows["validation"])
    run = time_steps(engine, steps=2, peak=None, parameters=1)
    assert run["graph_buckets"] >= 1 and 0 <= run["graph_buckets_new_while_timed"] <= run["graph_buckets"]
    figures = {"model": "tiny", "path": "bucketed", "device": "cpu", "date": "today", "batch": 4,
               "bf16_matmul_tflops": None, "runs": [run]}
    assert f"3 adapters: {run['graph_buckets']} shape buckets met" in render(figures)
    assert kernel_class("sm80_xmma_gemm_f32f32_f32f32_f32_nn_n_ffma") == "matmul fp32"
    assert kernel_class("fmha_cutlassB_f32_aligned_64x64_k64_sm80") == "attention (fp32)"
    assert kernel_class("nvjet_sm90_tst_192x208_64x4_1x2_h_bz_coopB_TNT") == "matmul (cuBLAS nvjet)"
    assert kernel_class("triton_poi_fused__to_copy_add_mul_silu_2") == "fused by Inductor (Triton)"


def test_evaluating_adapters_together_gives_each_its_own_loss(base, rows, capsys):
    engine = engine_for(base, slots=3)
    slots = [engine.add(f"a{i}", config, rows["train"], rows["validation"])
             for i, config in enumerate([SUBJECT, NEIGHBOURS[0], NEIGHBOURS[2]])]
    for _ in range(3):
        engine.step()
    assert engine.eval_rows_per_pass(rows["validation"], 1) >= len(rows["validation"])  # the tiny model: one pass
    together = engine.evaluate_many(slots)
    alone = {slot: engine.evaluate(slot) for slot in slots}
    assert together == pytest.approx(alone, rel=1e-5)
    assert len({round(loss, 6) for loss in together.values()}) == 3  # three different adapters, three losses
    # A pass per row (the memory budget allowing no more) gives the same losses.
    engine.eval_pass_bytes = 1
    assert engine.eval_rows_per_pass(rows["validation"], 3) == 1
    assert engine.evaluate_many(slots) == pytest.approx(together, rel=1e-5)

    # Passes that run out of memory are retried with half the rows, down to what fits, with the same losses; the
    # halved budget stays for later evaluations.
    engine.eval_pass_bytes = 2**40
    rejected = out_of_memory_above(engine, examples_per_row=3)
    assert engine.evaluate_many(slots) == pytest.approx(together, rel=1e-5)
    assert rejected and engine.eval_rows_per_pass(rows["validation"], 3) <= 3
    assert "CUDA out of memory in an evaluation pass" in capsys.readouterr().out
    out_of_memory_above(engine, examples_per_row=0)
    with pytest.raises(torch.OutOfMemoryError):  # not even one row fits
        engine.evaluate_many(slots)


def out_of_memory_above(engine: LoraEngine, examples_per_row: int) -> list[int]:
    """Make the engine's forward raise CUDA's out-of-memory error whenever a row holds more than `examples_per_row`
    examples, as a GPU too small for the step would; returns the list of rejected row sizes."""
    rejected = []
    forward = engine._token_losses

    def limited(layout):
        starts = layout.position_ids.flatten() == 0  # each example starts at position 0 (and so does padding)
        per_row = max(int(starts[begin:end].sum()) for slot, begin, end in layout.segments if slot >= 0)
        if per_row > examples_per_row:
            rejected.append(per_row)
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return forward(layout)

    engine._token_losses = limited
    return rejected


def test_an_out_of_memory_step_is_retried_in_pieces_with_the_same_result(base, rows, capsys):
    """No dropout (the keyed masks follow a token's position in its row, which the pieces change); accumulation,
    neighbours with other batch sizes, and a step that must be split twice (8 rows -> 4 pieces of 2)."""
    configs = [TrainingConfig(**{**c.__dict__, "lora_dropout": 0.0}) for c in (SUBJECT, *NEIGHBOURS[:2])]
    reference, limited = engine_for(base, slots=3), engine_for(base, slots=3)
    for engine in (reference, limited):
        for config in configs:
            engine.add(f"a{config.seed}", config, rows["train"], rows["validation"])
    rejected = out_of_memory_above(limited, examples_per_row=2)
    split, whole = train(limited), train(reference)
    assert split.keys() == whole.keys()
    for slot in whole:
        assert split[slot] == pytest.approx(whole[slot], rel=1e-4), slot
    assert rejected and limited.pieces == 4 and reference.pieces == 1
    for slot in range(3):
        assert limited.adapters[slot].step == reference.adapters[slot].step
        assert limited.adapters[slot].tokens_seen == reference.adapters[slot].tokens_seen
        for name, weights in subject_weights(reference, slot).items():
            assert torch.allclose(subject_weights(limited, slot)[name], weights, atol=1e-5), name
    assert "micro-batches now run in 4 pieces" in capsys.readouterr().out


def test_out_of_memory_at_one_row_per_adapter_is_an_error_and_keeps_earlier_gradients(base, rows):
    engine = engine_for(base, slots=1)
    slot = engine.add("subject", TrainingConfig(**{**SUBJECT.__dict__, "lora_dropout": 0.0}), rows["train"],
                      rows["validation"])
    engine.step()  # the first micro-batch of a 2-step accumulation window: its gradients wait for the second
    kept = engine.optimizer.weights.grad.clone()
    out_of_memory_above(engine, examples_per_row=0)
    with pytest.raises(torch.OutOfMemoryError):
        engine.step()
    assert engine.pieces == SUBJECT.per_device_train_batch_size
    assert torch.equal(engine.optimizer.weights.grad, kept)
    assert engine.adapters[slot].step == 0
