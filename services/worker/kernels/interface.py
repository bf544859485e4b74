"""The kernel interface and the per-step metadata every backend reads.

KV cache layout (per layer): one tensor `[2, num_blocks, block_size, num_kv_heads, head_dim]`,
index 0 keys and 1 values. A token at position `p` of a request lives in slot
`block_table[p // block_size] * block_size + p % block_size`. Block 0 is the null block: it pads
block tables and is never handed to a request, so padded reads are harmless and masked out.

A batch is flat: the scheduled tokens of every request are concatenated (prompt chunks and single
decode tokens mixed), and `query_start_loc` marks where each request's tokens begin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each request's queries sit in the flat batch and which blocks hold its context."""

    query_start_loc: torch.Tensor  # [num_reqs + 1] int64, cumulative scheduled tokens
    seq_lens: torch.Tensor  # [num_reqs] int64, context length after this step (cached + new)
    block_tables: torch.Tensor  # [num_reqs, max_num_blocks] int64, padded with the null block 0
    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each new token
    query_lens: tuple[int, ...]  # host copy of the per-request query lengths
    seq_lens_host: tuple[int, ...]  # host copy of seq_lens, so backends need no device sync
    max_query_len: int
    max_seq_len: int

    @property
    def num_reqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


def build_metadata(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str,
) -> AttentionMetadata:
    """Builds the metadata of one flat batch from per-request lengths and block tables."""
    max_num_blocks = max((len(t) for t in block_tables), default=0)
    padded = [list(t) + [0] * (max_num_blocks - len(t)) for t in block_tables]
    slots: list[int] = []
    for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
        for pos in range(s_len - q_len, s_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
    return AttentionMetadata(
        query_start_loc=as_tensor(starts),
        seq_lens=as_tensor(list(seq_lens)),
        block_tables=as_tensor(padded).reshape(len(padded), max_num_blocks),
        slot_mapping=as_tensor(slots),
        query_lens=tuple(query_lens),
        seq_lens_host=tuple(seq_lens),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
    )


class AttentionBackend(Protocol):
    """Paged attention: what a backend must provide."""

    name: str

    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Stores `key`/`value` ([num_tokens, num_kv_heads, head_dim]) into their slots."""

    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Causal attention of `query` ([num_tokens, num_heads, head_dim]) over each request's
        paged context; returns [num_tokens, num_heads, head_dim]."""
