"""The worker's KV cache: one preallocated paged tensor per layer.

The worker never decides which block a request uses; the scheduler does, and names blocks in each
step. Block 0 is reserved as the null block that pads block tables, so a pool of `num_blocks`
offers `num_blocks - 1` usable blocks.

The host tier (L2, `--kv-host-cache-mib`) is a second pool of the same block shape in host memory
(pinned on CUDA, so copies run at full bus speed). Attention never reads it: the scheduler names
copies in each step, device -> host for cached blocks it evicts from the device pool, and host ->
device for prefix hits in the host tier. Its block 0 is reserved too, so block ids mean the same
thing on both sides of the Step contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

NULL_BLOCK_ID = 0


@dataclass(frozen=True)
class KVPoolShape:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element_size

    @property
    def num_bytes(self) -> int:
        return self.bytes_per_block * self.num_blocks


def num_blocks_for_budget(
    budget_bytes: int, *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """How many blocks fit in `budget_bytes`; at least 2 (the null block and one usable block)."""
    probe = KVPoolShape(num_layers, 1, block_size, num_kv_heads, head_dim, dtype)
    num_blocks = budget_bytes // probe.bytes_per_block
    if num_blocks < 2:
        raise ValueError(
            f"kv_cache_bytes: {budget_bytes} bytes hold fewer than 2 blocks of {probe.bytes_per_block} bytes"
        )
    return int(num_blocks)


def num_host_blocks_for_budget(budget_bytes: int, shape: KVPoolShape) -> int:
    """Blocks of `shape` the host tier holds in `budget_bytes`: 0 (no tier) for a zero budget."""
    if budget_bytes < 0:
        raise ValueError(f"kv_host_cache_bytes: must be >= 0, got {budget_bytes}")
    if budget_bytes == 0:
        return 0
    num_blocks = budget_bytes // shape.bytes_per_block
    if num_blocks < 2:
        raise ValueError(f"kv_host_cache_bytes: {budget_bytes} bytes hold fewer than 2 blocks of "
                         f"{shape.bytes_per_block} bytes (block 0 is reserved); use 0 to turn the host tier off")
    return int(num_blocks)


def check_block_copies(num_blocks: int, num_host_blocks: int, copies_to_host: Sequence[tuple[int, int]],
                       copies_to_device: Sequence[tuple[int, int]]) -> None:
    """Raises ValueError naming the list when a copy names a block outside its pool or writes a
    destination twice; checked before a step changes anything."""
    _check_copies(copies_to_host, num_blocks, num_host_blocks, "copies_to_host")
    _check_copies(copies_to_device, num_host_blocks, num_blocks, "copies_to_device")


def _check_copies(copies: Sequence[tuple[int, int]], num_sources: int, num_destinations: int, name: str) -> None:
    destinations = set()
    for source, destination in copies:
        if not (NULL_BLOCK_ID < source < num_sources and NULL_BLOCK_ID < destination < num_destinations):
            raise ValueError(f"{name}: block copy {source} -> {destination} names a block outside the pools "
                             f"(sources 1..{num_sources - 1}, destinations 1..{num_destinations - 1})")
        if destination in destinations:
            raise ValueError(f"{name}: destination block {destination} is written twice")
        destinations.add(destination)


class KVPool:
    """Per-layer cache tensors `[2, num_blocks, block_size, num_kv_heads, head_dim]`, and the host
    tier's `[2, num_host_blocks, ...]` when it has one."""

    def __init__(self, shape: KVPoolShape, device: torch.device | str, num_host_blocks: int = 0) -> None:
        self.shape = shape
        self.num_host_blocks = num_host_blocks
        self.layers = [
            torch.zeros(2, shape.num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim,
                        dtype=shape.dtype, device=device)
            for _ in range(shape.num_layers)
        ]
        pin = torch.device(device).type == "cuda"  # page-locked, so the copies can run asynchronously
        self.host_layers = [
            torch.zeros(2, num_host_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim,
                        dtype=shape.dtype, device="cpu", pin_memory=pin)
            for _ in range(shape.num_layers if num_host_blocks else 0)
        ]

    def is_valid_block(self, block_id: int) -> bool:
        return NULL_BLOCK_ID < block_id < self.shape.num_blocks

    def check_copies(self, copies_to_host: Sequence[tuple[int, int]],
                     copies_to_device: Sequence[tuple[int, int]]) -> None:
        check_block_copies(self.shape.num_blocks, self.num_host_blocks, copies_to_host, copies_to_device)

    def copy_to_host(self, copies: Sequence[tuple[int, int]]) -> None:
        """(device block, host block) pairs: keeps the K/V of blocks the device pool is about to reuse."""
        _copy_blocks(self.layers, self.host_layers, copies)

    def copy_to_device(self, copies: Sequence[tuple[int, int]]) -> None:
        """(host block, device block) pairs: brings host-tier prefix hits back for attention."""
        _copy_blocks(self.host_layers, self.layers, copies)

    def clear_blocks(self, block_ids: Sequence[int]) -> None:
        """Zeroes blocks a request has just been given. Attention reads whole blocks and masks the
        slots past a request's length, but a masked slot still holding NaN from the block's previous
        owner (a request whose logits went NaN) turns the row NaN anyway: 0 * NaN = NaN."""
        if not block_ids:
            return
        index = torch.tensor(block_ids, dtype=torch.int64, device=self.layers[0].device)
        for layer in self.layers:
            layer.index_fill_(1, index, 0)


def _copy_blocks(sources: list[torch.Tensor], destinations: list[torch.Tensor],
                 copies: Sequence[tuple[int, int]]) -> None:
    if not copies:
        return
    source_ids = torch.tensor([s for s, _ in copies], dtype=torch.int64, device=sources[0].device)
    destination_ids = torch.tensor([d for _, d in copies], dtype=torch.int64, device=destinations[0].device)
    for source, destination in zip(sources, destinations):
        # One gather and one scatter per layer, whatever the number of blocks.
        destination.index_copy_(1, destination_ids, source.index_select(1, source_ids).to(destination.device))
