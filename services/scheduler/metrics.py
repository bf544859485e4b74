"""The scheduler's Prometheus metrics: the request's view of latency, load and the prefix cache.

The scheduler is the only process that sees a request from arrival to finish and knows which
worker and pool served it, so every per-request metric lives here, labelled {pool, worker}; the
workers export only what happens inside a step, and the front door only what its clients see
(each metric is exported by exactly one service, so sums across processes never double count).

Gauges that describe a worker's state (running, waiting, KV use, up) are read from the worker
loop when Prometheus scrapes (`set_function`), so they are never stale between steps, cost nothing
per step, and drop to 0 by themselves when the last request frees its blocks. Everything else is
pushed from a few one-line hooks in fleet.py, worker_loop.py and servicer.py.

Definitions are module level: a process registers each metric once, and services started side by
side in one process (tests) share them, told apart by their worker label.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from services.scheduler.autoscale import AutoscalePolicy, PoolLoad, WorkerSample, desired_workers
from services.scheduler.batcher import Batcher
from services.scheduler.canary import Rollback, RollbackGuard
from services.scheduler.plan import RequestEvent, RequestOutput, StepPlan
from services.scheduler.request import Request, RequestError
from services.scheduler.router import Router, RoutingDecision
from services.scheduler.speculation import num_accepted
from shared.telemetry import LATENCY_BUCKETS_S


# What the hooks read of the objects that call them. fleet.py and worker_loop.py import this module,
# so it names their classes only through these shapes and imports neither (no cycle, not even for
# the type checker).
class WorkerLoop(Protocol):
    @property
    def pool(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def up(self) -> bool: ...
    @property
    def retiring(self) -> bool: ...
    @property
    def batcher(self) -> Batcher | None: ...


class LiveRequest(Protocol):
    @property
    def request(self) -> Request: ...
    @property
    def decision(self) -> RoutingDecision: ...
    @property
    def worker(self) -> WorkerLoop: ...


class Fleet(Protocol):
    @property
    def loops(self) -> Mapping[str, WorkerLoop]: ...
    @property
    def router(self) -> Router: ...
    @property
    def guard(self) -> RollbackGuard: ...

_LABELS = ("pool", "worker")

TIME_TO_FIRST_TOKEN = Histogram(
    "switchyard_time_to_first_token_seconds", "Arrival at the scheduler to the first token delivered.",
    _LABELS, buckets=LATENCY_BUCKETS_S)
INTER_TOKEN_LATENCY = Histogram(
    "switchyard_inter_token_latency_seconds",
    "Time between consecutive token deliveries of one request, per token.", _LABELS, buckets=LATENCY_BUCKETS_S)
E2E_REQUEST_LATENCY = Histogram(
    "switchyard_e2e_request_latency_seconds", "Arrival at the scheduler to the request's finish.",
    _LABELS, buckets=LATENCY_BUCKETS_S)
REQUEST_QUEUE_TIME = Histogram(
    "switchyard_request_queue_time_seconds", "Arrival to the first step that schedules the request.",
    _LABELS, buckets=LATENCY_BUCKETS_S)
REQUESTS_RUNNING = Gauge("switchyard_requests_running", "Requests holding KV blocks on the worker.", _LABELS)
REQUESTS_WAITING = Gauge("switchyard_requests_waiting", "Requests queued for the worker.", _LABELS)
KV_BLOCKS_USED_RATIO = Gauge(
    "switchyard_kv_blocks_used_ratio", "KV blocks referenced by a live request / usable blocks.", _LABELS)
PREFIX_CACHE_QUERIES = Counter(
    "switchyard_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache at first placement.",
    _LABELS)
PREFIX_CACHE_HITS = Counter(
    "switchyard_prefix_cache_hits_total",
    "Prompt tokens served from the prefix cache at first placement, by the tier that held them "
    "(device: the KV pool attention reads; host: copied up from the host tier).", (*_LABELS, "tier"))
PREEMPTIONS = Counter("switchyard_preemptions_total", "Running requests sent back to the queue.", _LABELS)
SPEC_DRAFT_TOKENS = Counter(
    "switchyard_spec_decode_draft_tokens_total", "Draft tokens (speculative decoding) the worker verified.", _LABELS)
SPEC_ACCEPTED_TOKENS = Counter(
    "switchyard_spec_decode_accepted_tokens_total",
    "Draft tokens the worker kept: tokens its steps returned beyond one per decode.", _LABELS)
PROMPT_TOKENS = Counter("switchyard_prompt_tokens_total", "Prompt tokens of finished requests.", _LABELS)
GENERATION_TOKENS = Counter("switchyard_generation_tokens_total", "Tokens delivered to clients.", _LABELS)
REQUESTS = Counter(
    "switchyard_requests_total", "Finished requests by finish reason (stop, length, abort, error).",
    (*_LABELS, "finish_reason"))
WORKER_UP = Gauge("switchyard_worker_up", "1 while the worker answers and takes requests, else 0.", _LABELS)
LEADER = Gauge("switchyard_scheduler_leader",
               "1 while this scheduler leads (drives the workers, takes requests), 0 while it stands by.")
LEADER_EPOCH = Gauge("switchyard_scheduler_epoch", "The epoch this scheduler leads with; 0 while it stands by.")
POOL_WEIGHT = Gauge("switchyard_pool_weight", "Traffic weight of the pool.", ("pool",))
ROUTING_DECISIONS = Counter(
    "switchyard_routing_decisions_total", "Workers chosen for a request (sticky: the session's pool).",
    (*_LABELS, "sticky"))
WORKER_FAILURES = Counter(
    "switchyard_worker_failures_total", "Step failures that marked the worker down.", _LABELS)
POOL_ROLLED_BACK = Gauge(
    "switchyard_pool_rolled_back", "1 while automatic rollback holds the pool at weight 0, else 0.", ("pool",))
POOL_ROLLBACKS = Counter(
    "switchyard_pool_rollbacks_total", "Automatic rollbacks of the pool (reason: error_rate or ttft_p99).",
    ("pool", "reason"))
REQUESTS_MIGRATED = Counter(
    "switchyard_requests_migrated_total", "Requests moved off a dead worker to another of its pool.", ("pool",))
# The autoscaling signal and its inputs, per pool (autoscale.py has the rule). Workers that are
# retiring (left DNS, finishing their running requests) are not counted: they are leaving.
POOL_DESIRED_WORKERS = Gauge(
    "switchyard_pool_desired_workers",
    "Workers the pool should have for its queue and KV use (the scheduler's autoscaling rule).", ("pool",))
POOL_UP_WORKERS = Gauge("switchyard_pool_up_workers", "Workers of the pool that are up and not retiring.", ("pool",))
POOL_WAITING_REQUESTS = Gauge(
    "switchyard_pool_waiting_requests", "Requests queued for the pool's workers that are up.", ("pool",))
POOL_RUNNING_REQUESTS = Gauge(
    "switchyard_pool_running_requests", "Requests holding KV blocks on the pool's workers that are up.", ("pool",))
POOL_KV_BLOCKS_USED_RATIO = Gauge(
    "switchyard_pool_kv_blocks_used_ratio",
    "KV blocks referenced by a live request / usable blocks, over the pool's workers that are up.", ("pool",))



class Leadership(Protocol):
    @property
    def fleet(self) -> object | None: ...

    @property
    def epoch(self) -> int: ...


def observe_leadership(leadership: Leadership) -> None:
    """Read at scrape time: 1/0 for leading with a published fleet, and its epoch."""
    LEADER.set_function(lambda: 1.0 if leadership.fleet is not None else 0.0)
    LEADER_EPOCH.set_function(lambda: float(leadership.epoch))


def observe_fleet(fleet: Fleet, autoscale: AutoscalePolicy = AutoscalePolicy()) -> None:
    """Binds the state gauges of every worker loop and pool; called once when a fleet is built."""
    for loop in fleet.loops.values():
        observe_worker_loop(loop)
    router, guard = fleet.router, fleet.guard
    for pool in router.pools():
        # Read at scrape time: weights change at runtime (Router.set_weight) during a rollout.
        POOL_WEIGHT.labels(pool.name).set_function(
            lambda name=pool.name: router.weights().get(name, 0.0))
        POOL_ROLLED_BACK.labels(pool.name).set_function(
            lambda name=pool.name: 1.0 if name in guard.rolled_back else 0.0)
        # Read at scrape time too, over fleet.loops as it is then (discovery adds and drops workers).
        # The rule is stateless, so any number of scrapers read the same answer.
        POOL_DESIRED_WORKERS.labels(pool.name).set_function(
            lambda name=pool.name: desired_workers(pool_load(fleet, name), autoscale))
        POOL_UP_WORKERS.labels(pool.name).set_function(lambda name=pool.name: pool_load(fleet, name).num_workers_up)
        POOL_WAITING_REQUESTS.labels(pool.name).set_function(
            lambda name=pool.name: pool_load(fleet, name).num_waiting)
        POOL_RUNNING_REQUESTS.labels(pool.name).set_function(
            lambda name=pool.name: pool_load(fleet, name).num_running)
        POOL_KV_BLOCKS_USED_RATIO.labels(pool.name).set_function(
            lambda name=pool.name: pool_load(fleet, name).kv_used_ratio)


def pool_load(fleet: Fleet, pool: str) -> PoolLoad:
    """The autoscaling inputs of one pool now: its workers that are up and not retiring."""
    samples = []
    for loop in fleet.loops.values():
        batcher = loop.batcher
        if loop.pool != pool or not loop.up or loop.retiring or batcher is None:
            continue
        manager = batcher.block_manager
        samples.append(WorkerSample(batcher.num_waiting, batcher.num_running, manager.num_blocks_used,
                                    manager.num_blocks_total))
    return PoolLoad.of(samples)


def observe_worker_loop(loop: WorkerLoop) -> None:
    """Binds one worker's state gauges (at start, and when discovery adds a worker)."""
    labels = (loop.pool, loop.address)
    # Default arguments pin this loop: a closure over the loop variable would read the last one.
    WORKER_UP.labels(*labels).set_function(lambda loop=loop: 1.0 if loop.up else 0.0)
    REQUESTS_RUNNING.labels(*labels).set_function(
        lambda loop=loop: loop.batcher.num_running if loop.batcher is not None else 0)
    REQUESTS_WAITING.labels(*labels).set_function(
        lambda loop=loop: loop.batcher.num_waiting if loop.batcher is not None else 0)
    KV_BLOCKS_USED_RATIO.labels(*labels).set_function(lambda loop=loop: _kv_used_ratio(loop))


def forget_worker_loop(loop: WorkerLoop) -> None:
    """A discovered worker left for good: its state gauges go (counters stay, as Prometheus expects)."""
    for gauge in (WORKER_UP, REQUESTS_RUNNING, REQUESTS_WAITING, KV_BLOCKS_USED_RATIO):
        try:
            gauge.remove(loop.pool, loop.address)
        except KeyError:
            pass


def observe_rollback(rollback: Rollback) -> None:
    POOL_ROLLBACKS.labels(rollback.pool, rollback.reason).inc()


def _kv_used_ratio(loop: WorkerLoop) -> float:
    batcher = loop.batcher
    if batcher is None:
        return 0.0  # down: the scheduler holds no blocks there (the worker is reset on return)
    manager = batcher.block_manager
    return manager.num_blocks_used / manager.num_blocks_total if manager.num_blocks_total else 0.0


def observe_routed(decision: RoutingDecision) -> None:
    ROUTING_DECISIONS.labels(decision.pool, decision.worker, "true" if decision.sticky else "false").inc()


def observe_migrated(decision: RoutingDecision) -> None:
    """A request of a dead worker was re-routed; the new placement is a routing decision too."""
    REQUESTS_MIGRATED.labels(decision.pool).inc()
    observe_routed(decision)


def observe_schedule(loop: WorkerLoop, plan: StepPlan, now_s: float) -> None:
    """Called right after `Batcher.schedule()` and before the loop stamps `first_scheduled_s`,
    so a request whose stamp is still unset is at its first placement."""
    labels = (loop.pool, loop.address)
    if plan.num_preemptions:
        PREEMPTIONS.labels(*labels).inc(plan.num_preemptions)
    for scheduled in plan.new_requests:
        request = scheduled.request
        if request.first_scheduled_s is not None:
            continue  # re-sent after a preemption or a move: not a new lookup, not queue time
        REQUEST_QUEUE_TIME.labels(*labels).observe(now_s - request.arrival_s)
        PREFIX_CACHE_QUERIES.labels(*labels).inc(request.num_prompt_tokens)
        # At first placement the scheduled start is exactly the prefix found in the cache.
        PREFIX_CACHE_HITS.labels(*labels, "device").inc(scheduled.num_computed_tokens - request.num_host_cached_tokens)
        if request.num_host_cached_tokens:
            PREFIX_CACHE_HITS.labels(*labels, "host").inc(request.num_host_cached_tokens)


def observe_drafts(loop: WorkerLoop, plan: StepPlan, outputs: list[RequestOutput]) -> None:
    """A step's drafts sent and kept (a reply holds the kept drafts and one more token)."""
    drafted = {c.request_id: len(c.draft_token_ids) for c in plan.cached_requests if c.draft_token_ids}
    if not drafted:
        return
    accepted = sum(num_accepted(drafted[o.request_id], o) for o in outputs if o.request_id in drafted)
    SPEC_DRAFT_TOKENS.labels(loop.pool, loop.address).inc(sum(drafted.values()))
    SPEC_ACCEPTED_TOKENS.labels(loop.pool, loop.address).inc(accepted)


def observe_worker_down(loop: WorkerLoop) -> None:
    WORKER_FAILURES.labels(loop.pool, loop.address).inc()


def observe_delivery(live: LiveRequest, event: RequestEvent, previous_token_s: float | None) -> None:
    """Tokens put on a request's stream (the fleet has stamped this delivery on the request):
    TTFT on the first delivery, then inter-token latency since `previous_token_s`.

    A delivery of k tokens after dt observes dt/k k times, so ITL means the same whether a worker
    returns one token per step or several; a stall (preemption, a move) shows in the tail.
    """
    num_tokens = len(event.token_ids)
    if not num_tokens:
        return
    request = live.request
    tokens, ttft, itl = _delivery_series(live.decision.pool, live.worker.address)
    tokens.inc(num_tokens)
    if previous_token_s is None:
        ttft.observe(request.last_token_s - request.arrival_s)
    else:
        per_token_s = (request.last_token_s - previous_token_s) / num_tokens
        for _ in range(num_tokens):
            itl.observe(per_token_s)


_DELIVERY_SERIES: dict[tuple[str, str], tuple] = {}


def _delivery_series(pool: str, worker: str) -> tuple:
    """The labelled children one delivery touches, looked up once per worker: `labels()` checks and
    locks on every call, and this runs for every request of every step."""
    series = _DELIVERY_SERIES.get((pool, worker))
    if series is None:
        series = _DELIVERY_SERIES[(pool, worker)] = (
            GENERATION_TOKENS.labels(pool, worker), TIME_TO_FIRST_TOKEN.labels(pool, worker),
            INTER_TOKEN_LATENCY.labels(pool, worker))
    return series


def observe_request_finished(live: LiveRequest | None, finish_reason: str, error: RequestError | None = None) -> None:
    """Called once per admitted request when its stream ends, however it ends.

    `finish_reason` is stop/length/abort as the stream reported it; `error` is set when it ended by
    an error, which counts as `error` unless the client cancelled or its deadline passed. A request
    the front door stops early (a stop string) cancels its stream and so counts as abort here; the
    front door's own finish-reason counter says stop.
    """
    if live is None:
        return  # refused at admission: never ran on a worker
    if error is not None:
        finish_reason = "abort" if error.by_client else "error"
    labels = (live.decision.pool, live.worker.address)
    # The fleet's clock is time.monotonic in every service; arrival was stamped with it.
    E2E_REQUEST_LATENCY.labels(*labels).observe(time.monotonic() - live.request.arrival_s)
    PROMPT_TOKENS.labels(*labels).inc(live.request.num_prompt_tokens)
    REQUESTS.labels(*labels, finish_reason).inc()
