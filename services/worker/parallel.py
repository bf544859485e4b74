"""Tensor parallelism inside one worker: N ranks on torch.distributed, one model sharded by heads.

Megatron-style: each rank holds its share of the attention heads (query heads split evenly; KV
heads split too, or, with fewer KV heads than ranks, the one KV head its query heads read) and of
the MLP's intermediate columns, so one all-reduce after the attention's output projection and one
after the MLP's down projection rebuild the full hidden state on every rank. Embedding, norms and
head are replicated. Each rank holds its share of the KV pool under the same block ids, so the
scheduler and the Step contract do not change.

Rank 0 is the worker the scheduler talks to: it keeps every request's state, samples, and serves
gRPC. The other ranks ("followers", `python -m services.worker.follower`) hold no request state:
for every operation on the KV pool and every forward pass rank 0 broadcasts a compact int64
message (an op code and the flat batch: input ids, positions, per-request lengths, block tables),
and each follower replays it on its shard, joining the all-reduces. No pickle crosses between
ranks: `torch.distributed.broadcast_object_list` would pickle, so messages are plain tensors.

A rank that dies breaks the collectives, and every rank exits at once when one of its collectives
fails (`exit_rank_lost`); rank 0 also watches its followers' processes (ranks.py), so it goes even
while idle. The scheduler sees the worker gone and moves its requests elsewhere, as for any dead
worker; a follower whose rank 0 is gone fails its next receive and exits too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from services.worker.kernels import AttentionMetadata, build_metadata

# Followers wait in a broadcast while the worker is idle, possibly for days: the timeout must not
# fire then. A dead peer is still noticed at once, by its closed connection.
IDLE_TIMEOUT = timedelta(days=30)

OP_FORWARD, OP_CLEAR, OP_COPY, OP_STOP = 1, 2, 3, 4
EXIT_RANK_LOST = 3  # the exit status of a rank whose group broke
logger = logging.getLogger("switchyard.worker")
_HEADER_LEN = 8


@dataclass(frozen=True)
class ShardSpec:
    """Which heads and MLP columns one rank holds."""

    tp_rank: int
    tp_size: int
    num_heads: int  # this rank's query heads
    num_kv_heads: int  # this rank's KV heads
    head_start: int  # first query head (global index)
    kv_head_start: int  # first KV head (global index)
    intermediate_size: int  # this rank's MLP columns
    intermediate_start: int


def shard_spec(tp_rank: int, tp_size: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> ShardSpec:
    """The shard of rank `tp_rank`; ValueError naming the numbers when the model cannot be split."""
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor_parallel_size: rank {tp_rank} of {tp_size} is not a rank")
    if num_heads % tp_size:
        raise ValueError(f"tensor_parallel_size: {num_heads} attention heads are not divisible by {tp_size}")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size: {num_kv_heads} KV heads neither divide among {tp_size} ranks "
                         f"nor divide {tp_size} (so each rank could replicate one)")
    if intermediate_size % tp_size:
        raise ValueError(f"tensor_parallel_size: MLP intermediate size {intermediate_size} is not divisible "
                         f"by {tp_size}")
    heads = num_heads // tp_size
    if num_kv_heads % tp_size == 0:
        kv_heads, kv_start = num_kv_heads // tp_size, tp_rank * (num_kv_heads // tp_size)
    else:  # fewer KV heads than ranks: this rank's query heads all read one KV head, replicated here
        kv_heads, kv_start = 1, tp_rank // (tp_size // num_kv_heads)
    columns = intermediate_size // tp_size
    return ShardSpec(tp_rank, tp_size, heads, kv_heads, tp_rank * heads, kv_start, columns, tp_rank * columns)


@dataclass(frozen=True)
class Layout:
    """Where one rank sits: ranks are numbered stage by stage, rank 0 is stage 0's first TP rank."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    rank: int

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def stage(self) -> int:
        return self.rank // self.tensor_parallel_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel_size

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pipeline_parallel_size - 1

    @property
    def next_rank(self) -> int:
        """The same TP rank of the next stage: where this rank's hidden states go."""
        return self.rank + self.tensor_parallel_size

    @property
    def previous_rank(self) -> int:
        return self.rank - self.tensor_parallel_size

    @property
    def last_stage_rank(self) -> int:
        """The rank that sends the logits to rank 0 (the last stage's first TP rank)."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size


def stage_layers(num_layers: int, pipeline_parallel_size: int, stage: int) -> range:
    """The decoder layers of `stage`; equal shares, so every rank's KV pool has as many blocks."""
    if num_layers % pipeline_parallel_size:
        raise ValueError(f"pipeline_parallel_size: {num_layers} layers are not divisible by {pipeline_parallel_size}")
    per_stage = num_layers // pipeline_parallel_size
    return range(stage * per_stage, (stage + 1) * per_stage)


_tp_group = None  # this rank's stage's TP group; None: the default group (no pipeline stages)


def make_stage_groups(layout: Layout) -> None:
    """One TP group per pipeline stage (every rank creates every group, in the same order)."""
    global _tp_group
    if layout.pipeline_parallel_size == 1 or layout.tensor_parallel_size == 1:
        return
    for stage in range(layout.pipeline_parallel_size):
        first = stage * layout.tensor_parallel_size
        group = dist.new_group(list(range(first, first + layout.tensor_parallel_size)))
        if stage == layout.stage:
            _tp_group = group


@contextmanager
def _collective() -> Iterator[None]:
    """Around every send, receive and collective: a failure means a rank is gone, and no later step
    could complete. The process exits at once instead of failing this step: a worker that answered
    one INTERNAL would be taken back into its pool by the scheduler's next probe, only to fail again."""
    try:
        yield
    except RuntimeError as e:
        exit_rank_lost(f"a collective failed ({e}); rank {dist.get_rank()} exits")


def exit_rank_lost(reason: str) -> NoReturn:
    """Ends this rank now (no graceful drain: its group can compute nothing more)."""
    logger.error("parallel worker: %s", reason)
    logging.shutdown()
    os._exit(EXIT_RANK_LOST)


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    with _collective():
        dist.all_reduce(tensor, group=_tp_group)
    return tensor


def isend(tensor: torch.Tensor, dst: int) -> tuple[object, torch.Tensor]:
    """Starts a send; the tensor is kept with its handle until `wait_all`."""
    tensor = tensor.contiguous()
    with _collective():
        return dist.isend(tensor, dst), tensor


def wait_all(pending: list[tuple[object, torch.Tensor]]) -> None:
    with _collective():
        for work, _ in pending:
            work.wait()


def recv(shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype)
    with _collective():
        dist.recv(tensor, src)
    return tensor


def _broadcast(tensor: torch.Tensor) -> None:
    with _collective():
        dist.broadcast(tensor, src=0)


def init_group(rank: int, world_size: int, master_port: int, timeout: timedelta = IDLE_TIMEOUT) -> None:
    """Joins the worker's process group (gloo, whatever the device); blocks until every rank has
    joined or `timeout` passes."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{master_port}", rank=rank,
                            world_size=world_size, timeout=timeout)


# --- messages ----------------------------------------------------------------------------------------

def _send(op: int, counts: Sequence[int], payload: list[int] | torch.Tensor) -> None:
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    header[0] = op
    header[1:1 + len(counts)] = torch.tensor(list(counts), dtype=torch.int64)
    _broadcast(header)
    body = payload if isinstance(payload, torch.Tensor) else torch.tensor(payload, dtype=torch.int64)
    if body.numel():
        _broadcast(body.to(torch.int64).contiguous())


def send_forward(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 logits_indices: torch.Tensor) -> None:
    """Rank 0: what a follower needs to run the same flat batch on its shard."""
    num_reqs, max_blocks = meta.block_tables.shape if meta.block_tables.dim() == 2 else (0, 0)
    body = torch.cat([
        input_ids.cpu(), positions.cpu(), torch.tensor(meta.query_lens, dtype=torch.int64),
        torch.tensor(meta.seq_lens_host, dtype=torch.int64), meta.block_tables.cpu().reshape(-1),
        logits_indices.cpu(),
    ])
    _send(OP_FORWARD, (input_ids.shape[0], num_reqs, max_blocks, logits_indices.shape[0]), body)


def send_clear(block_ids: Sequence[int]) -> None:
    if block_ids:
        _send(OP_CLEAR, (len(block_ids),), list(block_ids))


def send_copies(copies_to_host: Sequence[tuple[int, int]], copies_to_device: Sequence[tuple[int, int]]) -> None:
    if copies_to_host or copies_to_device:
        flat = [b for pair in (*copies_to_host, *copies_to_device) for b in pair]
        _send(OP_COPY, (len(copies_to_host), len(copies_to_device)), flat)


def send_stop() -> None:
    _send(OP_STOP, (), [])


def follow(runner, block_size: int) -> None:  # noqa: ANN001 - a ModelRunner holding a shard
    """A follower's life: replays rank 0's operations on its shard until told to stop."""
    device = runner.device
    while True:
        header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
        _broadcast(header)
        op, a, b, c, d = (int(x) for x in header[:5])
        if op == OP_STOP:
            return
        if op == OP_FORWARD:
            num_tokens, num_reqs, max_blocks, num_logits = a, b, c, d
            body = torch.zeros(2 * num_tokens + 2 * num_reqs + num_reqs * max_blocks + num_logits, dtype=torch.int64)
            _broadcast(body)
            input_ids, positions, query_lens, seq_lens, tables, logits_indices = torch.split(
                body, [num_tokens, num_tokens, num_reqs, num_reqs, num_reqs * max_blocks, num_logits])
            meta = build_metadata(query_lens.tolist(), seq_lens.tolist(),
                                  tables.reshape(num_reqs, max_blocks).tolist(), block_size, device)
            runner.forward(input_ids.to(device), positions.to(device), meta, logits_indices.to(device))
        elif op == OP_CLEAR:
            body = torch.zeros(a, dtype=torch.int64)
            _broadcast(body)
            runner.kv_pool.clear_blocks(body.tolist())
        elif op == OP_COPY:
            body = torch.zeros(2 * (a + b), dtype=torch.int64)
            _broadcast(body)
            pairs = [tuple(p) for p in body.reshape(-1, 2).tolist()]
            runner.kv_pool.copy_to_host(pairs[:a])
            runner.kv_pool.copy_to_device(pairs[a:])
        else:
            raise RuntimeError(f"tensor-parallel message with unknown op {op}")


class LeaderKVPool:
    """Rank 0's KV pool: every change to it is broadcast first, so each follower makes the same
    change to its shard, in the same order relative to the forward passes."""

    def __init__(self, pool) -> None:  # noqa: ANN001 - a KVPool
        self._pool = pool

    def __getattr__(self, name: str):  # noqa: ANN204 - shape, layers, checks: rank 0's own
        return getattr(self._pool, name)

    def clear_blocks(self, block_ids: Sequence[int]) -> None:
        send_clear(block_ids)
        self._pool.clear_blocks(block_ids)

    def copy_to_host(self, copies: Sequence[tuple[int, int]]) -> None:
        send_copies(copies, ())
        self._pool.copy_to_host(copies)

    def copy_to_device(self, copies: Sequence[tuple[int, int]]) -> None:
        send_copies((), copies)
        self._pool.copy_to_device(copies)
