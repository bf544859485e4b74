"""The scheduler's metric hooks on plain objects: ITL per token, finish reasons, first placement,
preemption counts and the scrape-time gauges. Each test uses its own worker label, so the
process-global registry needs no reset."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from services.scheduler import metrics
from services.scheduler.autoscale import AutoscalePolicy
from services.scheduler.batcher import Batcher
from services.scheduler.block_manager import BlockManager
from services.scheduler.canary import RollbackGuard, RollbackPolicy
from services.scheduler.plan import RequestEvent, RequestOutput, ScheduledNew, StepPlan
from services.scheduler.request import ErrorKind, Request, RequestError
from shared.sampling_rules import SamplingParams
from services.scheduler.router import PoolConfig, Router


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def live_request(worker: str, num_prompt_tokens: int = 5, arrival_s: float = 0.0) -> SimpleNamespace:
    return SimpleNamespace(decision=SimpleNamespace(pool="p"), worker=SimpleNamespace(address=worker),
                           request=SimpleNamespace(num_prompt_tokens=num_prompt_tokens, arrival_s=arrival_s,
                                                   last_token_s=None))


def deliver(live: SimpleNamespace, event: RequestEvent, now_s: float) -> None:
    """What the fleet does at a delivery: stamp the request, then let metrics read it."""
    previous_s = live.request.last_token_s
    if event.token_ids:
        live.request.last_token_s = now_s
    metrics.observe_delivery(live, event, previous_s)


def make_request(rid: str, num_prompt_tokens: int = 20, **kw: object) -> Request:
    return Request(rid, list(range(1, num_prompt_tokens + 1)), SamplingParams(), max_tokens=4, **kw)


def test_first_token_then_one_itl_observation_per_token() -> None:
    live, labels = live_request("w-itl"), {"pool": "p", "worker": "w-itl"}
    deliver(live, RequestEvent("r", (), (), None), 0.2)  # no tokens: nothing
    deliver(live, RequestEvent("r", (7,), (), None), 0.5)
    deliver(live, RequestEvent("r", (1, 2, 3), (), None), 1.1)
    assert value("switchyard_time_to_first_token_seconds_sum", **labels) == pytest.approx(0.5)
    assert value("switchyard_inter_token_latency_seconds_count", **labels) == 3
    assert value("switchyard_inter_token_latency_seconds_sum", **labels) == pytest.approx(0.6)
    assert value("switchyard_generation_tokens_total", **labels) == 4


@pytest.mark.parametrize("reason, kind, counted", [
    ("length", None, "length"), ("stop", None, "stop"), ("abort", None, "abort"),
    ("abort", ErrorKind.CANCELLED, "abort"), ("abort", ErrorKind.DEADLINE, "abort"),
    ("abort", ErrorKind.FAILED, "error"), ("abort", ErrorKind.UNAVAILABLE, "error"),
])
def test_finish_reason_of_a_request(reason: str, kind: ErrorKind | None, counted: str) -> None:
    worker = f"w-finish-{reason}-{kind}"
    error = RequestError(kind, "why") if kind is not None else None
    metrics.observe_request_finished(live_request(worker, 9, time.monotonic()), reason, error)
    assert value("switchyard_requests_total", pool="p", worker=worker, finish_reason=counted) == 1
    assert value("switchyard_prompt_tokens_total", pool="p", worker=worker) == 9
    assert value("switchyard_e2e_request_latency_seconds_count", pool="p", worker=worker) == 1


def test_refused_request_is_not_a_finished_one() -> None:
    def num_finished() -> float:
        return sum(s.value for s in metrics.REQUESTS.collect()[0].samples if s.name == "switchyard_requests_total")

    before = num_finished()
    metrics.observe_request_finished(None, "abort", RequestError(ErrorKind.REFUSED, "queue full"))
    assert num_finished() == before


def test_queue_time_and_prefix_lookup_only_at_first_placement() -> None:
    loop, labels = SimpleNamespace(pool="p", address="w-sched"), {"pool": "p", "worker": "w-sched"}
    first = make_request("a", 40, arrival_s=1.0)
    first.num_host_cached_tokens = 12  # of its 32 cached tokens, copied up from the host tier
    again = make_request("b", 40, arrival_s=1.0, first_scheduled_s=1.5)  # after a preemption
    plan = StepPlan(1, (ScheduledNew(first, (1, 2, 3), 32, 8), ScheduledNew(again, (4, 5, 6), 0, 40)), (), (),
                    num_preemptions=2)
    metrics.observe_schedule(loop, plan, 3.0)
    assert value("switchyard_request_queue_time_seconds_count", **labels) == 1
    assert value("switchyard_request_queue_time_seconds_sum", **labels) == pytest.approx(2.0)
    assert value("switchyard_prefix_cache_queries_total", **labels) == 40
    assert value("switchyard_prefix_cache_hits_total", **labels, tier="device") == 20
    assert value("switchyard_prefix_cache_hits_total", **labels, tier="host") == 12
    assert value("switchyard_preemptions_total", **labels) == 2


def test_batcher_reports_its_preemptions_in_the_plan() -> None:
    # 4 usable blocks of 4 tokens: two 7-token prompts fit, and their first decodes do not.
    batcher = Batcher(BlockManager(5, 4, "v1"), max_model_len=64, eos_token_ids=())
    batcher.add(make_request("a", 8))
    batcher.add(Request("b", list(range(101, 109)), SamplingParams(), max_tokens=4))  # no shared prefix
    plan = batcher.schedule()
    assert plan.num_preemptions == 0 and len(plan.new_requests) == 2
    batcher.update(plan, [RequestOutput("a", (1,)), RequestOutput("b", (1,))])
    assert batcher.schedule().num_preemptions == 1


def test_state_gauges_are_read_when_scraped() -> None:
    loop = SimpleNamespace(pool="p", address="w-gauge", up=False, retiring=False, batcher=None)
    router = Router((PoolConfig("p-gauge", "v1", 3.0, ("w-gauge",)),))
    guard = RollbackGuard(RollbackPolicy(), {"p-gauge": 3.0})
    metrics.observe_fleet(SimpleNamespace(loops={"w-gauge": loop}, router=router, guard=guard))
    labels = {"pool": "p", "worker": "w-gauge"}
    assert value("switchyard_worker_up", **labels) == 0
    assert value("switchyard_kv_blocks_used_ratio", **labels) == 0
    loop.up = True
    loop.batcher = Batcher(BlockManager(9, 4, "v1"), max_model_len=64, eos_token_ids=())
    loop.batcher.add(make_request("g", 8))
    assert value("switchyard_requests_waiting", **labels) == 1
    loop.batcher.schedule()
    assert value("switchyard_worker_up", **labels) == 1
    assert value("switchyard_requests_running", **labels) == 1
    assert value("switchyard_kv_blocks_used_ratio", **labels) == pytest.approx(2 / 8)
    assert value("switchyard_pool_weight", pool="p-gauge") == 3.0
    router.set_weight("p-gauge", 0.5)
    assert value("switchyard_pool_weight", pool="p-gauge") == 0.5
    assert value("switchyard_pool_rolled_back", pool="p-gauge") == 0
    guard.rolled_back["p-gauge"] = object()  # what RollbackGuard.evaluate records
    assert value("switchyard_pool_rolled_back", pool="p-gauge") == 1
    metrics.forget_worker_loop(loop)  # a discovered worker left: its gauges go
    assert REGISTRY.get_sample_value("switchyard_worker_up", labels) is None


def test_pool_autoscaling_gauges_are_read_when_scraped() -> None:
    """switchyard_pool_desired_workers and its inputs, over the pool's workers that are up and not
    retiring, as they are at each scrape."""
    def worker(address: str, num_blocks: int = 9) -> SimpleNamespace:
        batcher = Batcher(BlockManager(num_blocks, 4, "v1"), max_model_len=64, eos_token_ids=())
        return SimpleNamespace(pool="p-scale", address=address, up=True, retiring=False, batcher=batcher)

    a, b, other = worker("w-scale-a"), worker("w-scale-b"), worker("w-scale-other")
    other.pool = "p-other"
    router = Router((PoolConfig("p-scale", "v1", 1.0, ("w-scale-a", "w-scale-b")),
                     PoolConfig("p-other", "v1", 1.0, ("w-scale-other",))))
    fleet = SimpleNamespace(loops={"a": a, "b": b, "other": other}, router=router,
                            guard=RollbackGuard(RollbackPolicy(), router.weights()))
    metrics.observe_fleet(fleet, AutoscalePolicy(target_waiting_per_worker=2.0, target_kv_used_ratio=0.5))
    labels = {"pool": "p-scale"}
    assert value("switchyard_pool_up_workers", **labels) == 2
    assert value("switchyard_pool_desired_workers", **labels) == 1  # idle: one fewer
    assert value("switchyard_pool_kv_blocks_used_ratio", **labels) == 0

    for i in range(7):  # 7 queued on worker a: 3.5 workers' worth at 2 per worker
        a.batcher.add(make_request(f"q{i}", 8))
    other.batcher.add(make_request("elsewhere", 8))
    assert value("switchyard_pool_waiting_requests", **labels) == 7
    assert value("switchyard_pool_desired_workers", **labels) == 4
    a.batcher.schedule()  # the first step places one 8-token prompt: 2 of a's 8 blocks
    assert value("switchyard_pool_running_requests", **labels) == 1
    assert value("switchyard_pool_waiting_requests", **labels) == 6
    assert value("switchyard_pool_kv_blocks_used_ratio", **labels) == pytest.approx(2 / 16)  # over a and b

    b.retiring = True  # left DNS: no longer counted, its gauges' pool shrinks at once
    a.batcher = None  # and a went down
    assert value("switchyard_pool_up_workers", **labels) == 0
    assert value("switchyard_pool_desired_workers", **labels) == 1  # the minimum
    assert value("switchyard_pool_waiting_requests", pool="p-other") == 1
