"""An engine step's batch laid out as the base model takes it: one row per slot, its examples packed in that row."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch


def row_length(examples: list[dict]) -> int:
    """The tokens of a slot's row: its examples packed (their real tokens, no padding)."""
    return sum(len(example["input_ids"]) for example in examples)


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
    # Where each sequence (an example, or a row's padding) starts among the flattened tokens, then `length`: int32, as
    # attention over packed examples takes them (trainables/packed_attention.py); and the longest sequence's tokens.
    sequence_starts: torch.Tensor
    longest_sequence: int


def flat_layout(batches: dict[int, list[dict]], device, pad_token_id: int = 0, width: int | None = None,
                sequence_bound: int | None = None) -> Layout:
    """One row per slot, its examples packed without padding between them (as TRL's padding_free packs them), the
    rows padded at the end to the longest, or to `width` (CUDA graphs' buckets: trainables/graphed_step.py). The
    padding is dummy sequences (their own positions, no targets) of at most `sequence_bound` tokens (default: the
    longest example), so that no sequence is longer than that bound: attention's work per sequence is sized by the
    longest (trainables/packed_attention.py). A row per slot: the LoRA matmuls take each slot's tokens as one batch
    entry (trainables/multi_lora.py), and a diverging adapter's inf or NaN values stay in its own row even where
    attention computes masked-out scores as 0 times the values (the reference's mask: 0 * NaN = NaN)."""
    # numpy rather than Python lists: the layout runs on the CPU for every step, and 16 adapters' 32 rows took
    # ~10 ms that way on the H200's host, next to a step of ~150 ms.
    lengths = {slot: [len(example["input_ids"]) for example in examples] for slot, examples in batches.items()}
    longest = max(sum(sizes) for sizes in lengths.values())
    width = width or longest
    if width < longest:
        raise ValueError(f"a row of {longest} tokens does not fit a layout {width} wide")
    longest_example = max(max(sizes) for sizes in lengths.values())
    bound = sequence_bound or longest_example
    if bound < longest_example:
        raise ValueError(f"an example of {longest_example} tokens is longer than the sequence bound {bound}")
    ids = np.full((len(batches), width), pad_token_id, dtype=np.int64)
    positions = np.empty((len(batches), width), dtype=np.int64)
    targets = np.full((len(batches), width), -100, dtype=np.int64)
    segments, starts_of_sequences = [], []
    for row, (slot, examples) in enumerate(batches.items()):
        sizes = lengths[slot]
        count = sum(sizes)
        tokens = np.fromiter(chain.from_iterable(example["input_ids"] for example in examples), np.int64, count)
        mask = np.fromiter(chain.from_iterable(example["completion_mask"] for example in examples), np.bool_, count)
        starts = np.cumsum([0] + sizes[:-1])
        ids[row, :count] = tokens
        positions[row, :count] = np.arange(count) - np.repeat(starts, sizes)
        positions[row, count:] = np.arange(width - count) % bound  # the padding's dummy sequences
        # A position's target is the next token where that one is a completion token of the same example.
        predicts = np.zeros(count, dtype=np.bool_)
        predicts[:-1] = mask[1:]
        predicts[starts[1:] - 1] = False
        targets[row, :count - 1] = np.where(predicts[:-1], tokens[1:], -100)
        segments.append((slot, row * width, row * width + count))
        starts_of_sequences += [row * width + starts, row * width + np.arange(count, width, bound)]
        if count < width:
            segments.append((-1, row * width + count, (row + 1) * width))
    flat_targets = targets.reshape(-1)
    kept = np.flatnonzero(flat_targets != -100)
    sequence_starts = np.concatenate(starts_of_sequences + [[flat_targets.size]]).astype(np.int32)
    return Layout(to_device(ids, device), to_device(positions, device), to_device(kept, device),
                  to_device(flat_targets[kept], device), flat_targets.size, segments, to_device(sequence_starts, device),
                  bound)


def to_device(values, device) -> torch.Tensor:
    """`values` (a list, numpy array or CPU tensor) as a tensor on `device`, the host not waiting for the device. A
    blocking copy to CUDA waits for everything queued before it: one index tensor made with torch.tensor(...,
    device=...) had every step wait for the one queued before it (LoraEngine.queue_step). So a copy to CUDA goes
    through pinned memory and is queued (PyTorch keeps the pinned block until the copy is done)."""
    tensor = torch.as_tensor(values)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def padding_sequences(padding: int, bound: int) -> int:
    """The dummy sequences flat_layout pads `padding` positions of a row with, for a sequence bound of `bound`."""
    return -(-padding // bound)
