"""The pure parts of tensor and pipeline parallelism: which heads, MLP columns and layers each rank
holds, where each rank sits, and how a step's batch is cut into micro-batches."""

from __future__ import annotations

import pytest

from services.worker.parallel import Layout, shard_spec, stage_layers
from services.worker.pipeline import micro_batches


def test_heads_and_columns_split_evenly_and_cover_the_model() -> None:
    shards = [shard_spec(rank, 2, num_heads=8, num_kv_heads=4, intermediate_size=688) for rank in range(2)]
    assert [(s.head_start, s.num_heads) for s in shards] == [(0, 4), (4, 4)]
    assert [(s.kv_head_start, s.num_kv_heads) for s in shards] == [(0, 2), (2, 2)]
    assert [(s.intermediate_start, s.intermediate_size) for s in shards] == [(0, 344), (344, 344)]


def test_fewer_kv_heads_than_ranks_replicates_the_one_each_rank_reads() -> None:
    # SmolLM2: 9 query heads in 3 groups of 3; 3 ranks hold one group each, 9 ranks share per group.
    assert [shard_spec(r, 3, 9, 3, 1536).kv_head_start for r in range(3)] == [0, 1, 2]
    shards = [shard_spec(r, 6, 12, 2, 1536) for r in range(6)]  # 6 query heads per KV head, 2 per rank
    for s in shards:  # every query head this rank holds reads the KV head it holds
        assert all(h // 6 == s.kv_head_start for h in range(s.head_start, s.head_start + s.num_heads))
        assert s.num_kv_heads == 1


@pytest.mark.parametrize("args, message", [
    ((0, 3, 8, 4, 688), "8 attention heads are not divisible by 3"),
    ((0, 4, 12, 6, 688), "6 KV heads neither divide among 4 ranks"),
    ((0, 2, 8, 4, 687), "MLP intermediate size 687 is not divisible by 2"),
    ((2, 2, 8, 4, 688), "rank 2 of 2"),
])
def test_a_model_that_cannot_be_split_names_the_numbers(args, message) -> None:
    with pytest.raises(ValueError, match=message):
        shard_spec(*args)


def test_layers_split_into_equal_stages() -> None:
    assert [stage_layers(30, 3, s) for s in range(3)] == [range(0, 10), range(10, 20), range(20, 30)]
    with pytest.raises(ValueError, match="4 layers are not divisible by 3"):
        stage_layers(4, 3, 0)


def test_layout_numbers_ranks_stage_by_stage() -> None:
    layouts = [Layout(2, 2, rank) for rank in range(4)]
    assert [(lay.stage, lay.tp_rank) for lay in layouts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert layouts[1].next_rank == 3 and layouts[3].previous_rank == 1
    assert layouts[0].is_first_stage and layouts[2].is_last_stage and layouts[0].last_stage_rank == 2


@pytest.mark.parametrize("query_lens, num, expected", [
    ((1, 1, 1, 1), 2, [(0, 2), (2, 4)]),
    ((100, 1, 1, 1), 2, [(0, 1), (1, 4)]),  # whole requests: a long prefill is never cut
    ((5,), 3, [(0, 1)]),  # fewer requests than stages: no empty micro-batch
    ((3, 3, 3), 3, [(0, 1), (1, 2), (2, 3)]),
])
def test_micro_batches_are_whole_requests_of_about_equal_tokens(query_lens, num, expected) -> None:
    bounds = micro_batches(query_lens, num)
    assert bounds == expected
    assert bounds[0][0] == 0 and bounds[-1][1] == len(query_lens)
    assert all(a < b for a, b in bounds) and all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
