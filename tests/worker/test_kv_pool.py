"""The KV pool zeroes exactly the blocks it is told to, in every layer and in both K and V."""

from __future__ import annotations

import torch

from services.worker.kv_pool import KVPool, KVPoolShape


def test_clear_blocks_zeroes_only_those_blocks() -> None:
    pool = KVPool(KVPoolShape(num_layers=3, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=8,
                              dtype=torch.float32), "cpu")
    for layer in pool.layers:
        layer.fill_(float("nan"))  # what a request whose logits went NaN leaves behind
    pool.clear_blocks([2, 4])
    for layer in pool.layers:
        assert torch.count_nonzero(layer[:, [2, 4]]) == 0
        assert torch.isnan(layer[:, [0, 1, 3, 5]]).all()
    pool.clear_blocks([])  # nothing to do is not an error
