"""Batched greedy generation and completion-only held-out loss for one (base or adapted) model."""

from __future__ import annotations

import math


def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                    progress=None) -> list[str]:
    """Greedy completions (KV cache on, left padding so every row continues from its own last token).
    `progress`, a tqdm-like bar, advances by the prompts of each batch."""
    import torch

    device = next(model.parameters()).device
    outputs = []
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            if progress is not None:
                progress.update(len(new_tokens))
    finally:
        tokenizer.padding_side = padding_side  # the tokenizer is shared with the held-out loss and the merge check
    return outputs


def heldout_loss(model, tokenizer, rows: list[dict], batch_size: int, progress=None) -> float:
    """Mean NLL per completion token on the rows' input_ids/completion_mask (tokenized once by the
    driver, exactly as the trials trained): the loss the trials minimize, on held-out data."""
    return heldout_losses(model, tokenizer, rows, batch_size, progress)[0]


def heldout_losses(model, tokenizer, rows: list[dict], batch_size: int, progress=None) -> tuple[float, list[float]]:
    """(mean NLL per completion token over all rows, each row's own mean NLL per completion token): the second is
    what a paired comparison of two models on the same prompts needs."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    total_nll, total_tokens, per_row = 0.0, 0, []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        input_ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in chunk], device=device)
        labels = torch.tensor([[t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]
                               + [-100] * (width - len(r["input_ids"])) for r in chunk], device=device)
        attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in chunk],
                                 device=device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)),
                                                shifted_labels.reshape(-1), ignore_index=-100,
                                                reduction="none").view(shifted_labels.shape)
        row_nll, row_tokens = nll.sum(dim=1), (shifted_labels != -100).sum(dim=1)
        total_nll += row_nll.sum().item()
        total_tokens += int(row_tokens.sum())
        per_row += [n / t if t else math.nan for n, t in zip(row_nll.tolist(), row_tokens.tolist())]
        if progress is not None:
            progress.update(len(chunk))
    return (total_nll / total_tokens if total_tokens else math.nan), per_row
