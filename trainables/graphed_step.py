"""The engine's forward, loss and backward as CUDA graphs (resources.engine_cuda_graphs): one graph per bucket of
shapes, replayed with the step's data copied into its input buffers. An eager step of a small model is bound by the
CPU launching ~27,000 operators (~225 ms for 16 SmolLM2-shaped adapters on an H200, of which ~140 ms of kernels:
BENCHMARKS.md); a replay launches them all at once.

A graph replays fixed shapes and fixed memory, so a step is laid out in buckets: its adapters' rows padded
(bucket_rows; filler rows run the base alone and have no targets: a loss and gradient of exactly 0), the
row width rounded up to a multiple of WIDTH_STEP (dummy sequences, as the eager layout pads), and the positions
whose loss counts padded to a multiple of KEPT_STEP (position 0, whose target is none: a loss of 0), and the list
of where the packed examples start padded with empty sequences at the end; a step takes a bucket already captured
where one has room for it at little more work (bucket_for). Nothing in the captured work reads a value on the CPU:
the slots' rows of the adapter weights are gathered by an index tensor, attention takes the examples' starts as a
tensor and the bucket's sequence bound as the longest a sequence can be (the longest example rounded up; the
padding comes as dummy sequences no longer), and the gradient comes out of the graph as a tensor
(torch.autograd.grad) that the engine adds to the slots' gradients outside it.

The first bucket's first step runs eagerly on a side stream (what capture needs first: cuBLAS handles, workspaces,
lazy initialization), its second is captured and replayed; a later bucket is captured at its first step. All
graphs share one memory pool, which is safe because they run one at a time and copy their outputs out of the pool,
into buffers of their own. The process holds more memory than with eager steps: for 8 adapters of an 8B-shaped
model on an H200, 142 GB reserved against 90 GB eager, for 81 and 67 GB allocated at most (BENCHMARKS.md; expandable
segments did not change it), likely the pool's activations beside the allocator's cache of the eager work (the
first bucket's first step, evaluation). On CPU (the tests) every step runs the same bucketed work eagerly."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from trainables.multi_lora import shared_dropout_rate
from trainables.step_layout import Layout, flat_layout, padding_sequences, row_length, target_count

WIDTH_STEP = 64  # row widths are rounded up to a multiple of this (also the memory-efficient attention's alignment)
WIDTH_SLACK = 0.125  # a step takes an existing bucket up to this much wider than it needs rather than a new one
KEPT_STEP = 256  # positions with a loss, rounded up to a multiple of this
SEQUENCES_STEP = 64  # packed examples (and rows' padding), rounded up to a multiple of this
HEADROOM = 1.25  # a new bucket's room for positions with a loss and for examples, over its first step's


@dataclass
class _Buffers:
    """A bucket's inputs (rows x width), on the device; their addresses are what a captured graph reads."""

    input_ids: torch.Tensor  # [rows, width]
    position_ids: torch.Tensor  # [rows, width]
    kept: torch.Tensor  # [kept]: flattened positions whose loss counts, padded with position 0
    kept_targets: torch.Tensor  # [kept]: their next tokens, -100 for the padding
    sequence_starts: torch.Tensor  # [sequences + 1], int32: where each example starts, then the end, repeated
    index: torch.Tensor  # [rows]: each row's slot (filler rows repeat the first slot)
    live: torch.Tensor  # [rows]: 1 for a slot's row, 0 for a filler row (its LoRA scales are zeroed)
    divisors: torch.Tensor  # [rows]: each row's adapter's completion tokens over its accumulation window
    sequence_bound: int  # no sequence is longer: what attention is told (a constant of the graph)

    @property
    def length(self) -> int:
        return self.input_ids.numel()


@dataclass
class _Bucket:
    buffers: _Buffers
    graph: "torch.cuda.CUDAGraph | None" = None


class GraphedSteps:
    """The bucketed step of a LoraEngine, captured as CUDA graphs on CUDA."""

    def __init__(self, engine):
        self.engine = engine
        self.capture = engine.model.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        # Every bucket's first, eager step and its capture run on this stream (as torch.cuda.graph captures on one).
        self.side_stream = torch.cuda.Stream() if self.capture else None
        self.buckets: dict[tuple, _Bucket] = {}
        # Once one step has run eagerly and been captured, the lazy set-up that capture needs is done: a later
        # bucket's first step is captured at once and replayed, without an eager step of its own (an eager step of 16
        # SmolLM2-shaped adapters took 221 ms on an H200, and a study met 8 buckets: BENCHMARKS.md).
        self.captured_once = False
        self.capture_seconds = 0.0  # in buckets' first steps and captures: what the graphs cost beyond their replays
        # Where every graph leaves its losses and gradients, outside the graphs' pool: outputs kept inside it would
        # hold a [rows, adapter weights] gradient per bucket (5.6 GB for 8 rank-64 adapters of an 8B model).
        weights = engine.routing.weights
        self.slots = weights.shape[0]
        self.losses_out = torch.zeros(self.slots, device=weights.device) if self.capture else None
        self.grads_out = torch.zeros_like(weights) if self.capture else None

    def losses_and_backward(self, batches: dict[int, list[dict]]) -> torch.Tensor:
        """Each slot's loss for its micro-batch ([len(batches)] in their order, on the device; a view of the graphs'
        output, which the next replay overwrites), with its gradient added to the engine's weight gradients, as
        LoraEngine._losses_and_backward does eagerly."""
        engine = self.engine
        slots = list(batches)
        rates = [engine.adapters[s].training.lora_dropout for s in slots]
        # A shared rate is a constant of the captured kernels: a bucket per rate.
        dropout = (any(rates), shared_dropout_rate(rates))
        key = self.bucket_for(min(bucket_rows(len(slots)), self.slots),
                              [row_length(examples) for examples in batches.values()],
                              sum(target_count(example) for examples in batches.values() for example in examples),
                              sum(len(examples) for examples in batches.values()),
                              max(len(example["input_ids"]) for examples in batches.values() for example in examples),
                              dropout)
        rows, width, kept, sequences, bound, _ = key
        bucket = self.buckets.get(key)
        fresh = bucket is None
        if fresh:
            bucket = self.buckets[key] = _Bucket(_allocate(rows, width, kept, sequences, bound, engine.model.device))
        began = time.time()
        with torch.profiler.record_function("lorasweep: batch layout"):
            self._fill(bucket.buffers, flat_layout(batches, "cpu", width=width, sequence_bound=bound), slots)
        if not self.capture:
            losses, grads = self._losses_and_grads(bucket.buffers, dropout)
        elif fresh and not self.captured_once:  # the first step runs eagerly on a side stream, as capture needs
            side = self.side_stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                losses, grads = self._losses_and_grads(bucket.buffers, dropout)
            torch.cuda.current_stream().wait_stream(side)
            self.capture_seconds += time.time() - began
        else:
            if bucket.graph is None:
                bucket.graph = self._capture(bucket.buffers, dropout, rows)
                self.capture_seconds += time.time() - began
                self.captured_once = True
            with torch.profiler.record_function("lorasweep: graph replay"):
                bucket.graph.replay()
            losses, grads = self.losses_out[:rows], self.grads_out[:rows]
        weights = engine.routing.weights
        if weights.grad is None:
            weights.grad = torch.zeros_like(weights)
        # Filler rows add their gradient of 0 to the first slot's.
        weights.grad.index_add_(0, bucket.buffers.index, grads)
        return losses[:len(slots)]

    def _capture(self, buffers: _Buffers, dropout: tuple, rows: int) -> "torch.cuda.CUDAGraph":
        """The bucket's step captured, writing its losses and gradients to the graphs' output buffers. As
        torch.cuda.graph captures, but without its device-wide synchronize, empty_cache and emptying of the pinned
        host memory cache: those stall the step queued before (LoraEngine.queue_step), and hand the memory of the
        eager work (evaluations, snapshots' pinned buffers) back to the driver, to be allocated again after every
        capture. The graphs' pool is private: a capture needs no free memory of the rest."""
        graph = torch.cuda.CUDAGraph()
        side = self.side_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # Thread-local error mode: a CUDA call of another of the engine actor's threads during a capture is no
            # error of the capture (the engine's own CUDA work happens under its lock, as this step does).
            graph.capture_begin(self.pool, capture_error_mode="thread_local")
            try:
                losses, grads = self._losses_and_grads(buffers, dropout)
                self.losses_out[:rows].copy_(losses)
                self.grads_out[:rows].copy_(grads)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        return graph

    def bucket_for(self, rows: int, row_lengths: list[int], targets: int, examples: int, longest_example: int,
                   dropout: tuple) -> tuple:
        """The bucket (rows, width, kept, sequences, sequence bound, dropout) for a step of `rows` rows holding rows of
        `row_lengths` tokens, `targets` loss positions and `examples` examples, the longest `longest_example` tokens:
        an existing one with room for it and at most WIDTH_SLACK more positions per row, else a new one at the width
        and sequence bound rounded up to WIDTH_STEP, with HEADROOM more loss positions and sequences (they cost the
        output head alone, and an empty sequence nearly nothing). A study without this reuse met 19 shapes, 14 of its
        36 s of stepping in first steps and captures (BENCHMARKS.md): about 0.7 s a shape, some five of its ~150 ms
        steps."""
        width = -(-max(row_lengths) // WIDTH_STEP) * WIDTH_STEP

        def sequences(width: int, bound: int) -> int:  # examples and padding, filler rows included
            return examples + sum(padding_sequences(width - length, bound) for length in row_lengths) \
                + (rows - len(row_lengths)) * padding_sequences(width, bound)

        room = [key for key in self.buckets if key[0] == rows and key[5] == dropout and key[2] >= targets
                and width <= key[1] <= width * (1 + WIDTH_SLACK) and key[4] >= longest_example
                and key[3] >= sequences(key[1], key[4])]
        if room:
            return min(room, key=lambda key: key[1:5])
        bound = -(-longest_example // WIDTH_STEP) * WIDTH_STEP
        return (rows, width, -(-int(targets * HEADROOM) // KEPT_STEP) * KEPT_STEP,
                -(-int(sequences(width, bound) * HEADROOM) // SEQUENCES_STEP) * SEQUENCES_STEP, bound, dropout)

    def _fill(self, buffers: _Buffers, layout, slots: list[int]) -> None:
        """The step's data (its layout already at the bucket's width and sequence bound) into the bucket's buffers,
        with filler rows (dummy sequences, as the layout pads), the kept positions padded, and the sequences' starts
        padded with empty sequences at the end."""
        engine = self.engine
        rows, width = buffers.input_ids.shape
        count = len(slots)
        ids = torch.zeros(rows, width, dtype=torch.long)
        positions = (torch.arange(width) % layout.longest_sequence).repeat(rows, 1)
        ids[:count] = layout.input_ids
        positions[:count] = layout.position_ids
        kept = torch.zeros(buffers.kept.shape[0], dtype=torch.long)
        targets = torch.full((buffers.kept.shape[0],), -100, dtype=torch.long)
        kept[:len(layout.kept)] = layout.kept
        targets[:len(layout.kept)] = layout.kept_targets
        starts = torch.full((buffers.sequence_starts.shape[0],), rows * width, dtype=torch.int32)
        real = layout.sequence_starts[:-1]  # its last entry, the layout's end, is where the filler rows start
        starts[:len(real)] = real
        # Filler rows: dummy sequences of at most the bound, starting again with each row, as the layout pads a row.
        filler = (torch.arange(count, rows, dtype=torch.int32)[:, None] * width
                  + torch.arange(0, width, layout.longest_sequence, dtype=torch.int32)[None]).flatten()
        starts[len(real):len(real) + len(filler)] = filler
        index = torch.tensor(slots + [slots[0]] * (rows - count))
        live = (torch.arange(rows) < count).float()
        divisors = torch.tensor([engine.adapters[s].loss_divisor for s in slots] + [1] * (rows - count),
                                dtype=torch.float32)
        for buffer, values in ((buffers.input_ids, ids), (buffers.position_ids, positions), (buffers.kept, kept),
                               (buffers.kept_targets, targets), (buffers.sequence_starts, starts),
                               (buffers.index, index), (buffers.live, live),
                               (buffers.divisors, divisors)):
            # Through pinned memory (step_layout.to_device): from pageable memory the copy may wait for the device.
            buffer.copy_(values.pin_memory() if buffer.is_cuda else values, non_blocking=True)

    def _losses_and_grads(self, buffers: _Buffers, dropout: tuple[bool, float | None]) \
            -> tuple[torch.Tensor, torch.Tensor]:
        """The bucket's forward, loss and backward, from its buffers alone (what a graph captures). Returns each
        row's loss and the gradient of each row's adapter weights."""
        engine, routing = self.engine, self.engine.routing
        weights = routing.weights.detach().index_select(0, buffers.index).requires_grad_()
        # Filler rows run the base alone (scale 0): their activations stay finite whatever the adapter they repeat,
        # so their gradient is exactly 0.
        routing.assign(weights, routing.scales.index_select(1, buffers.index) * buffers.live,
                       routing.dropout.index_select(0, buffers.index), dropout[0], engine.compute_dtype, dropout[1])
        layout = Layout(buffers.input_ids, buffers.position_ids, buffers.kept, buffers.kept_targets, buffers.length,
                        segments=[], sequence_starts=buffers.sequence_starts, longest_sequence=buffers.sequence_bound)
        try:  # the routing stays set through the backward: gradient checkpointing runs the forward again there
            with torch.profiler.record_function("lorasweep: forward and loss"):  # labels for eager runs' profiles
                token_losses = engine._token_losses(layout)
                losses = token_losses.view(buffers.input_ids.shape[0], -1).sum(dim=1) / buffers.divisors
            # A non-finite loss is left out of the backward (its adapter fails), as in the eager step.
            with torch.profiler.record_function("lorasweep: backward"):
                total = losses.masked_fill(~torch.isfinite(losses.detach()), 0.0).sum()
                (grads,) = torch.autograd.grad(total, weights)
        finally:
            routing.clear()
        return losses.detach(), grads


def bucket_rows(adapters: int) -> int:
    """The rows of a bucket for a step of `adapters` adapters: a power of two up to 4, then a multiple of 4. Fewer
    buckets than exact counts (each is captured once), and fewer filler rows than powers of two alone: as a study's
    early stopping thins its trials, steps of 9 to 12 adapters are common, and 16 rows made them a third filler."""
    return 1 << (adapters - 1).bit_length() if adapters <= 4 else -(-adapters // 4) * 4


def _allocate(rows: int, width: int, kept: int, sequences: int, bound: int, device) -> _Buffers:
    def long(*shape):
        return torch.zeros(*shape, dtype=torch.long, device=device)

    def ones(*shape):
        return torch.ones(*shape, dtype=torch.float32, device=device)

    return _Buffers(long(rows, width), long(rows, width), long(kept), long(kept),
                    torch.zeros(sequences + 1, dtype=torch.int32, device=device), long(rows), ones(rows), ones(rows),
                    bound)
