"""An engine step's batch laid out as the base model takes it: one row per slot, its examples packed in that row."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def target_count(row: dict) -> int:
    """Positions whose next token is a completion token: what the completion-only loss averages over."""
    return sum(row["completion_mask"][1:])


@dataclass
class Layout:
    input_ids: torch.Tensor  # [slots, L]
    position_ids: torch.Tensor  # [slots, L], restarting at 0 for every example: examples do not attend to each other
    kept: torch.Tensor  # the flattened positions whose next token is a completion token (the loss's positions)
    kept_targets: torch.Tensor  # that next token, per kept position
    length: int  # slots * L
    segments: list[tuple[int, int, int]]  # (slot, start, end) over the flattened tokens; slot -1 is padding


def flat_layout(batches: dict[int, list[dict]], device, pad_token_id: int = 0, width_multiple: int = 1) -> Layout:
    """One row per slot, its examples packed without padding between them (as TRL's padding_free packs them), the
    rows padded at the end to the longest, rounded up to a multiple of `width_multiple` (CUDA graphs' buckets:
    trainables/graphed_step.py), with one dummy sequence (its own positions, no targets). A row per
    slot rather than one flat sequence for all: attention computes masked-out scores as 0 times the values, and a
    diverging adapter's inf or NaN values would reach its neighbours through those zeros (0 * NaN = NaN)."""
    rows = {}
    for slot, examples in batches.items():
        ids, positions, targets = [], [], []
        for example in examples:
            tokens, mask = example["input_ids"], example["completion_mask"]
            ids += tokens
            positions += range(len(tokens))
            targets += [t if m else -100 for t, m in zip(tokens[1:], mask[1:])] + [-100]
        rows[slot] = (ids, positions, targets)
    width = -(-max(len(ids) for ids, _, _ in rows.values()) // width_multiple) * width_multiple
    all_ids, all_positions, all_targets, segments = [], [], [], []
    for slot, (ids, positions, targets) in rows.items():
        start, pad = len(all_targets), width - len(ids)
        all_ids.append(ids + [pad_token_id] * pad)
        all_positions.append(positions + list(range(pad)))
        all_targets += targets + [-100] * pad
        segments.append((slot, start, start + len(ids)))
        if pad:
            segments.append((-1, start + len(ids), start + width))
    kept = [position for position, target in enumerate(all_targets) if target != -100]
    return Layout(torch.tensor(all_ids, device=device), torch.tensor(all_positions, device=device),
                   torch.tensor(kept, device=device, dtype=torch.long),
                   torch.tensor([all_targets[position] for position in kept], device=device, dtype=torch.long),
                   len(all_targets), segments)
