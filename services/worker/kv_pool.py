"""The worker's KV cache: one preallocated paged tensor per layer.

The worker never decides which block a request uses; the scheduler does, and names blocks in each
step. Block 0 is reserved as the null block that pads block tables, so a pool of `num_blocks`
offers `num_blocks - 1` usable blocks.
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


class KVPool:
    """Per-layer cache tensors `[2, num_blocks, block_size, num_kv_heads, head_dim]`."""

    def __init__(self, shape: KVPoolShape, device: torch.device | str) -> None:
        self.shape = shape
        self.layers = [
            torch.zeros(2, shape.num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim,
                        dtype=shape.dtype, device=device)
            for _ in range(shape.num_layers)
        ]

    def is_valid_block(self, block_id: int) -> bool:
        return NULL_BLOCK_ID < block_id < self.shape.num_blocks

    def clear_blocks(self, block_ids: Sequence[int]) -> None:
        """Zeroes blocks a request has just been given. Attention reads whole blocks and masks the
        slots past a request's length, but a masked slot still holding NaN from the block's previous
        owner (a request whose logits went NaN) turns the row NaN anyway: 0 * NaN = NaN."""
        if not block_ids:
            return
        index = torch.tensor(block_ids, dtype=torch.int64, device=self.layers[0].device)
        for layer in self.layers:
            layer.index_fill_(1, index, 0)
