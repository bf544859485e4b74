"""The KV pool zeroes exactly the blocks it is told to, in every layer and in both K and V, and copies
blocks to and from its host tier exactly as named."""

from __future__ import annotations

import pytest
import torch

from services.worker.kv_pool import KVPool, KVPoolShape, num_host_blocks_for_budget


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


def _host_pool() -> KVPool:
    shape = KVPoolShape(num_layers=2, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)
    return KVPool(shape, "cpu", num_host_blocks=5)


def test_blocks_copy_down_and_up_in_every_layer_k_and_v() -> None:
    pool = _host_pool()
    for i, layer in enumerate(pool.layers):
        for block_id in range(6):
            layer[:, block_id] = 100 * i + block_id  # each block of each layer recognisable
    pool.copy_to_host([(2, 3), (5, 1)])
    for i, host in enumerate(pool.host_layers):
        assert (host[:, 3] == 100 * i + 2).all() and (host[:, 1] == 100 * i + 5).all()
        assert (host[:, [0, 2, 4]] == 0).all()  # nothing else written
    pool.clear_blocks([2, 5])
    pool.copy_to_device([(3, 4), (1, 2)])
    for i, layer in enumerate(pool.layers):
        assert (layer[:, 4] == 100 * i + 2).all() and (layer[:, 2] == 100 * i + 5).all()
        assert (layer[:, 5] == 0).all() and (layer[:, 1] == 100 * i + 1).all()


def test_bad_copies_name_the_list() -> None:
    pool = _host_pool()
    cases = {
        "copies_to_host": ([(6, 1)], []),  # device block outside the pool
        "copies_to_device": ([], [(1, 0)]),  # the null block is never written
    }
    for name, (down, up) in cases.items():
        with pytest.raises(ValueError, match=name):
            pool.check_copies(down, up)
    with pytest.raises(ValueError, match="written twice"):
        pool.check_copies([(1, 2), (3, 2)], [])
    with pytest.raises(ValueError, match="copies_to_host"):
        KVPool(pool.shape, "cpu").check_copies([(1, 1)], [])  # no host tier at all


def test_host_budget_sizes_the_tier() -> None:
    shape = _host_pool().shape
    assert num_host_blocks_for_budget(0, shape) == 0
    assert num_host_blocks_for_budget(10 * shape.bytes_per_block + 1, shape) == 10
    with pytest.raises(ValueError, match="kv_host_cache_bytes"):
        num_host_blocks_for_budget(shape.bytes_per_block, shape)  # only the reserved block would fit
