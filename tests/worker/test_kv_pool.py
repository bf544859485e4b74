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


def test_a_budget_pool_always_holds_one_full_length_request() -> None:
    from services.worker.model_runner import ModelSpec, kv_pool_shape  # noqa: PLC0415

    spec = ModelSpec("m", "llama", "float32", 49152, 8192, (2,), num_layers=30, num_kv_heads=3, head_dim=64)
    small_budget = kv_pool_shape(spec, 16, None, 64 * 2**20, torch.float32)  # holds ~1,400 tokens
    assert (small_budget.num_blocks - 1) * 16 >= 8192 and small_budget.num_blocks == 8192 // 16 + 1
    big_budget = kv_pool_shape(spec, 16, None, 1024 * 2**20, torch.float32)
    assert big_budget.num_blocks > 8192 // 16 + 1  # the budget wins when it holds more
    assert kv_pool_shape(spec, 16, 64, None, torch.float32).num_blocks == 64  # explicit: taken as given
