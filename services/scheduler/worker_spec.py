"""What the scheduler learns from a worker's Info at start."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerSpec:
    model: str
    version: str
    block_size: int
    num_blocks: int  # including the worker's null block 0
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    num_host_blocks: int = 0  # host-memory KV tier, including its block 0; 0 = none

    @property
    def max_tokens_per_request(self) -> int:
        """KV capacity of the worker in tokens (the null block holds none)."""
        return (self.num_blocks - 1) * self.block_size
