"""CUDA graphs for decode steps: one graph per padded batch size, replayed instead of the forward.

A decode step of a small model is hundreds of short kernel launches, and on a GPU their launch
cost outweighs their work; a captured graph replays them in one call. Graphs capture fixed
shapes and fixed addresses, so each one is captured for a batch size from `graph_batch_sizes`,
a step's batch is padded up to the next of them (`padded_batch_size`), and inputs are copied into
static buffers before a replay. Padding rows decode one token at position 0 against the null
block (block 0, slot 0), which no request owns, so they write and read nothing that matters.

Only pure decode batches are captured; prefills and mixed batches vary in shape every step and
run eagerly. Capturing needs a backend whose decode path makes no host-to-device copies and no
host syncs, which the Triton backend guarantees and the torch one does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from services.worker.kernels.interface import AttentionMetadata

MAX_GRAPH_BATCH_SIZE = 256

Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor], torch.Tensor]


def graph_batch_sizes(max_batch_size: int = MAX_GRAPH_BATCH_SIZE) -> tuple[int, ...]:
    """The batch sizes to capture: 1, 2, 4, then every multiple of 8 up to `max_batch_size`.

    Small batches get exact-ish sizes because padding a 3-request batch to 8 would cost more than
    the graph saves; past 8 the step of 8 bounds padding to 7 rows (vLLM uses the same ladder)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size: must be >= 1, got {max_batch_size}")
    sizes = [s for s in (1, 2, 4) if s < max_batch_size]
    sizes += list(range(8, max_batch_size, 8))
    sizes.append(max_batch_size)
    return tuple(sorted(set(sizes)))


def padded_batch_size(num_reqs: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size that holds `num_reqs` requests, or None (run eagerly)."""
    if num_reqs < 1:
        return None
    for size in sizes:  # sizes is sorted ascending
        if size >= num_reqs:
            return size
    return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # the captured forward's output, overwritten by every replay


class DecodeGraphs:
    """Captured decode forwards of one model runner, keyed by padded batch size."""

    def __init__(self, forward: Forward, *, device: torch.device, max_model_len: int, block_size: int,
                 max_batch_size: int = MAX_GRAPH_BATCH_SIZE) -> None:
        self.forward = forward
        self.sizes = graph_batch_sizes(max_batch_size)
        self.max_model_len = max_model_len
        self.max_num_blocks = -(-max_model_len // block_size)
        size = self.sizes[-1]
        as_int = dict(dtype=torch.int64, device=device)
        self._input_ids = torch.zeros(size, **as_int)
        self._positions = torch.zeros(size, **as_int)
        self._query_start_loc = torch.arange(size + 1, **as_int)  # one token per request, forever
        self._seq_lens = torch.ones(size, **as_int)
        self._block_tables = torch.zeros(size, self.max_num_blocks, **as_int)
        self._slot_mapping = torch.zeros(size, **as_int)
        self._arange = torch.arange(size, **as_int)
        self._logits_indices = self._arange.clone()
        self._graphs: dict[int, _Graph] = {}

    def capture(self) -> None:
        """Captures every size, largest first so the smaller graphs reuse its memory pool."""
        pool = None
        for size in reversed(self.sizes):
            meta = self._static_meta(size)
            args = (self._input_ids[:size], self._positions[:size], meta, self._logits_indices[:size])
            # Warm-up on a side stream, as torch requires: compiles the Triton kernels and creates
            # the cuBLAS workspaces outside the capture.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.forward(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.forward(*args)
            pool = graph.pool()
            self._graphs[size] = _Graph(graph, logits)
        torch.cuda.synchronize()

    def can_run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> bool:
        return (meta.is_pure_decode and meta.num_reqs == input_ids.shape[0]
                and meta.block_tables.shape[1] <= self.max_num_blocks
                and padded_batch_size(meta.num_reqs, self.sizes) in self._graphs)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            logits_indices: torch.Tensor) -> torch.Tensor:
        """The same float32 logits the eager forward returns, from a graph replay."""
        n = meta.num_reqs
        size = padded_batch_size(n, self.sizes)
        entry = self._graphs[size]
        width = meta.block_tables.shape[1]
        self._input_ids[:n].copy_(input_ids)
        self._positions[:n].copy_(positions)
        self._seq_lens[:n].copy_(meta.seq_lens)
        self._block_tables[:n, :width].copy_(meta.block_tables)
        self._slot_mapping[:n].copy_(meta.slot_mapping)
        # Padding rows: earlier replays of a larger batch left real values there.
        self._input_ids[n:size].zero_()
        self._positions[n:size].zero_()
        self._seq_lens[n:size].fill_(1)
        self._block_tables[n:size, 0].zero_()  # a 1-token context reads only its first block
        self._slot_mapping[n:size].zero_()
        m = logits_indices.shape[0]
        self._logits_indices[:m].copy_(logits_indices)
        self._logits_indices[m:size].copy_(self._arange[m:size])
        entry.graph.replay()
        return entry.logits[:m].clone()  # the next replay overwrites the captured output

    def _static_meta(self, size: int) -> AttentionMetadata:
        # Host lengths are upper bounds here: the Triton decode path reads only `max_seq_len` on the
        # host (to size split-K for the longest context the model allows); real lengths are read
        # from `seq_lens` on the device at replay.
        return AttentionMetadata(
            query_start_loc=self._query_start_loc[: size + 1],
            seq_lens=self._seq_lens[:size],
            block_tables=self._block_tables[:size],
            slot_mapping=self._slot_mapping[:size],
            query_lens=(1,) * size,
            seq_lens_host=(self.max_model_len,) * size,
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )
