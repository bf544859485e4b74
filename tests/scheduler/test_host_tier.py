"""The host tier (L2) as the scheduler keeps it: evicted device blocks are copied down in the plan
that evicts them, prefixes found there are copied up instead of computed, the copies ride in the
plans the fake worker executes against its fake KV (so a wrong copy changes tokens), and routing
prices a host hit between a device hit and a recompute."""

from __future__ import annotations

from services.scheduler.batcher import Batcher, StepPlan
from services.scheduler.block_manager import BlockManager
from services.scheduler.router import PoolConfig, Router, WorkerLoad
from tests.scheduler.fakes import FakeWorker, greedy_tokens, make_pair, make_request

BLOCK_SIZE = 4


def run(batcher: Batcher, worker: FakeWorker) -> list[StepPlan]:
    """Steps until idle; returns the plans."""
    plans = []
    while batcher.has_work():
        plan = batcher.schedule()
        plans.append(plan)
        batcher.update(plan, worker.execute(plan))
    return plans


def prompt(seed: int, length: int = 17) -> list[int]:
    return [(seed * 7 + i * 3) % 60 + 1 for i in range(length)]


def test_an_evicted_prefix_is_copied_down_then_up_instead_of_recomputed() -> None:
    # 8 usable device blocks: a (17 + 4 tokens) leaves 5 full blocks cached; b (29 + 2) needs all 8.
    batcher, worker = make_pair(num_blocks=9, block_size=BLOCK_SIZE, num_host_blocks=32)
    host = batcher.block_manager.host
    assert host is not None
    first = make_request("a", prompt(1), max_tokens=4)
    batcher.add(first)
    run(batcher, worker)
    assert batcher.block_manager.num_blocks_cached == 5
    batcher.add(make_request("b", prompt(2, 29), max_tokens=2))
    plans = run(batcher, worker)
    # All five go down in the plan whose allocation evicts them, before b's prefill writes them.
    assert [len(p.copies_to_host) for p in plans][0] == 5 and host.num_blocks_cached == 5
    again = make_request("a2", prompt(1), max_tokens=4)
    batcher.add(again)
    plans = run(batcher, worker)
    # a's four full prompt blocks (16 tokens) come up in its first step; the 17th token is computed.
    assert len(plans[0].copies_to_device) == 4 and sum(len(p.copies_to_device) for p in plans) == 4
    assert plans[0].new_requests[0].num_computed_tokens == 16
    assert again.num_cached_tokens == again.num_host_cached_tokens == 16
    assert again.output_token_ids == first.output_token_ids == greedy_tokens(prompt(1), max_tokens=4)[0]
    assert host.num_blocks_used == 0  # pins last only while a plan is built


def test_a_block_kept_once_is_not_copied_down_again() -> None:
    batcher, worker = make_pair(num_blocks=9, block_size=BLOCK_SIZE, num_host_blocks=32)
    for rid, seed in (("a", 1), ("b", 2), ("a2", 1), ("b2", 2), ("a3", 1)):
        batcher.add(make_request(rid, prompt(seed), max_tokens=4))
        run(batcher, worker)
    # Each prompt's 4 full blocks went down once; later evictions of their copies find them kept.
    assert worker.num_copies_to_host == batcher.block_manager.host.num_blocks_cached
    assert batcher.block_manager.host.num_blocks_cached <= 2 * 5  # 4 full blocks + the decode block, per prompt


def test_without_room_in_the_host_tier_an_evicted_block_is_simply_lost() -> None:
    manager = BlockManager(4, BLOCK_SIZE, "v1", num_host_blocks=2)  # one usable host block
    assert manager.host is not None and manager.host.num_blocks_total == 1
    manager.allocate_slots("a", 12)
    manager.cache_blocks("a", list(range(12)), 12, "")
    manager.free("a")  # three cached device blocks
    assert manager.allocate_slots("b", 12) is not None  # evicts all three
    copies_to_host, copies_to_device = manager.take_copies()
    assert len(copies_to_host) == 1 and copies_to_device == ()  # the tier had room for one
    assert manager.host.num_blocks_cached == 1 and manager.host.num_blocks_used == 0


def test_reset_empties_both_tiers_and_drops_pending_copies() -> None:
    batcher, worker = make_pair(num_blocks=9, block_size=BLOCK_SIZE, num_host_blocks=32)
    for rid, seed in (("a", 1), ("b", 2)):
        batcher.add(make_request(rid, prompt(seed), max_tokens=4))
        run(batcher, worker)
    manager = batcher.block_manager
    assert manager.host.num_blocks_cached > 0
    manager.reset()
    assert manager.host.num_blocks_cached == 0 and manager.host.num_blocks_free == manager.host.num_blocks_total
    assert manager.take_copies() == ((), ())


def test_overlap_counts_the_host_continuation_separately() -> None:
    batcher, worker = make_pair(num_blocks=9, block_size=BLOCK_SIZE, num_host_blocks=32)
    batcher.add(make_request("a", prompt(1), max_tokens=4))
    run(batcher, worker)
    probe = make_request("p", prompt(1))
    assert batcher.overlap(probe) == (16, 0)  # all four full blocks still on the device
    batcher.add(make_request("b", prompt(2), max_tokens=4))
    run(batcher, worker)
    device_tokens, host_tokens = batcher.overlap(probe)
    assert host_tokens > 0 and device_tokens + host_tokens == 16
    assert batcher.overlap_tokens(probe) == device_tokens
    no_tier, _ = make_pair(num_blocks=9, block_size=BLOCK_SIZE)
    assert no_tier.overlap(probe) == (0, 0)


def test_routing_prices_a_host_hit_between_a_device_hit_and_a_recompute() -> None:
    router = Router([PoolConfig("p", "v1", 1.0, ("device", "host", "none"))], seed=0)

    def load(address: str, overlap: int = 0, host_overlap: int = 0) -> WorkerLoad:
        return WorkerLoad(address, True, overlap, 0, 0, host_overlap)

    loads = [load("none"), load("host", host_overlap=256), load("device", overlap=256)]
    decision = router.choose_worker("p", 300, loads)
    assert decision.worker == "device"
    costs = {c.address: c.cost for c in decision.candidates}
    assert costs["device"] < costs["host"] < costs["none"]
    assert costs["host"] == (300 - 256) + 0.1 * 256
    decision = router.choose_worker("p", 300, loads[:2])
    assert decision.worker == "host" and decision.host_overlap_tokens == 256
    # A host hit is worth less than the same number of device hits, but more than a short device hit.
    decision = router.choose_worker("p", 300, [load("host", host_overlap=256), load("device", overlap=64)])
    assert decision.worker == "host"
