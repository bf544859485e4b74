"""The host_tier scenario's arithmetic and probes, without a stack: the device pool is sized to the
running batch and the working set is 4x it, the rounds workload revisits every prefix once per
round, and the per-tier counter parser keeps the tiers apart (read_counters sums them)."""

from __future__ import annotations

from collections import Counter

from bench.clients import counter_by_label
from bench.host_tier import FULL, QUICK, _workload
from bench.workload import max_prefix_hit_tokens

SCRAPE = """\
# HELP switchyard_prefix_cache_hits_total Prompt tokens served from the prefix cache
# TYPE switchyard_prefix_cache_hits_total counter
switchyard_prefix_cache_hits_total{pool="default",tier="device",worker="127.0.0.1:1"} 64.0
switchyard_prefix_cache_hits_total{pool="default",tier="host",worker="127.0.0.1:1"} 704.0
switchyard_prefix_cache_hits_total{pool="default",tier="host",worker="127.0.0.1:2"} 16.0
switchyard_prefix_cache_hits_created{pool="default",tier="host",worker="127.0.0.1:2"} 1.7e9
switchyard_prefix_cache_queries_total{pool="default",worker="127.0.0.1:1"} 1920.0
"""


def test_counter_by_label_sums_each_tier_over_workers() -> None:
    assert counter_by_label(SCRAPE, "switchyard_prefix_cache_hits_total", "tier") == {"device": 64.0, "host": 720.0}
    assert counter_by_label(SCRAPE, "switchyard_prefix_cache_queries_total", "tier") == {}


def test_the_device_pool_holds_the_running_batch_and_a_quarter_of_the_working_set() -> None:
    assert (FULL.blocks_per_request, FULL.num_device_blocks_usable, FULL.device_prefixes, FULL.num_prefixes) == (
        18, 144, 9, 36)
    for shape in (FULL, QUICK):
        assert shape.prefix_len % 16 == 0
        assert shape.working_set_blocks == 4 * shape.num_device_blocks_usable


def test_every_prefix_comes_back_once_per_round() -> None:
    for shape in (FULL, QUICK):
        w = _workload(shape, 4096)
        assert len(w.requests) == shape.num_prefixes * shape.num_rounds
        prefixes = Counter(r.prompt_token_ids[: shape.prefix_len] for r in w.requests)
        assert len(prefixes) == shape.num_prefixes and set(prefixes.values()) == {shape.num_rounds}
        first_round = w.requests[: shape.num_prefixes]
        assert len({r.prompt_token_ids[: shape.prefix_len] for r in first_round}) == shape.num_prefixes
        assert len({r.prompt_token_ids for r in w.requests}) == len(w.requests)  # unique suffixes
        # Every revisit could hit its whole prefix; nothing else is shared.
        assert max_prefix_hit_tokens(w, 16) == shape.prefix_len * shape.num_prefixes * (shape.num_rounds - 1)
