"""The fleet: every worker loop, the router, and the live requests' event queues.

It admits a request (validate, route, enqueue), delivers each worker's events to the right
stream, aborts on cancel, and moves the requests of a worker that died to another worker of the
same pool, where they resume by recomputing prompt + generated tokens. Tokens already streamed
are kept in the request, and the failed step's tokens were never delivered, so the client sees
neither a gap nor a repeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from services.scheduler import metrics
from services.scheduler.admission import ModelLimits, Submission, build_request
from services.scheduler.autoscale import AutoscalePolicy
from services.scheduler.batcher import RequestEvent
from services.scheduler.canary import PoolView, RollbackGuard, RollbackPolicy
from services.scheduler.discovery import DnsTarget, diff, resolve
from services.scheduler.eviction import DEFAULT_EVICTION, check_eviction
from services.scheduler.request import ErrorKind, FinishReason, Request, RequestError
from services.scheduler.router import PoolConfig, Router, RoutingDecision, WorkerLoad
from services.scheduler.worker_loop import WorkerLoop
from shared.errors import InvalidArgument, ResourceExhausted, Unavailable
from shared.tls import TlsConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetConfig:
    pools: tuple[PoolConfig, ...]
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    batch_wait_ms: float = 0.0  # an idle worker's first step may wait this long for company (batch_wait.py)
    max_waiting_requests: int = 1024  # across the fleet; beyond it new requests get RESOURCE_EXHAUSTED
    step_timeout_s: float = 60.0
    async_scheduling: bool = True  # plan step N+1 while the worker computes step N
    num_speculative_tokens: int = 0  # prompt-lookup draft tokens per decode step (speculation.py); 0: off
    probe_interval_s: float = 1.0
    load_weight: float = 1.0
    decode_cost_tokens: float = 8.0
    host_hit_cost: float = 0.1  # per host-tier prompt token, as a fraction of computing it
    router_seed: int | None = None
    routing: str = "cache_aware"
    tls: TlsConfig = TlsConfig()  # how to reach the workers
    rollback: RollbackPolicy = RollbackPolicy()
    discovery_interval_s: float = 5.0  # how often pools with `dns` are resolved again
    rollback_check_interval_s: float = 1.0  # how often the pools' windows are judged
    kv_eviction: str = DEFAULT_EVICTION  # which cached KV block every worker's pools give up first
    autoscale: AutoscalePolicy = AutoscalePolicy()  # targets of switchyard_pool_desired_workers
    # Sent with every Reset and Step: workers refuse a lower one once a later scheduler has reset
    # them. 0 takes the start time (ns), so a scheduler started later takes its workers over.
    scheduler_epoch: int = 0

    def __post_init__(self) -> None:
        # Checked here, not when a worker first connects, so a bad value stops the scheduler at startup.
        check_eviction(self.kv_eviction, field="kv_eviction")
        if self.scheduler_epoch < 0:
            raise InvalidArgument(f"must be >= 0, got {self.scheduler_epoch}", field="scheduler_epoch")
        if self.scheduler_epoch == 0:  # frozen dataclass: the only way to fill a default in
            object.__setattr__(self, "scheduler_epoch", time.time_ns())


@dataclass
class LiveRequest:
    request: Request
    worker: WorkerLoop
    decision: RoutingDecision
    # Where the request's events go, synchronously, as the worker loop delivers them: a Connect
    # stream's outbox, or `events` for a Generate stream.
    sink: Callable[[RequestEvent], None] | None = None
    events: asyncio.Queue[RequestEvent] = field(default_factory=asyncio.Queue)
    model_version: str = ""  # of its pool, which it never leaves (a dead worker's requests move within it)
    group: str = ""  # Submission.sequence_group

    def __post_init__(self) -> None:
        if self.sink is None:
            self.sink = self.events.put_nowait


class Fleet:
    def __init__(self, config: FleetConfig, clock: Callable[[], float] = time.monotonic,
                 resolver: Callable[[DnsTarget], Awaitable[set[str] | None]] = resolve) -> None:
        self.config = config
        self._resolve = resolver  # tests stand in for DNS here
        self.router = Router(config.pools, load_weight=config.load_weight,
                             decode_cost_tokens=config.decode_cost_tokens, host_hit_cost=config.host_hit_cost,
                             seed=config.router_seed,
                             policy=config.routing)
        self._clock = clock
        self.live: dict[str, LiveRequest] = {}
        self._groups: dict[str, LiveRequest] = {}  # sequence group -> its first live request (n > 1)
        self._idle = asyncio.Event()  # set while no request is live; drain waits on it
        self._idle.set()
        self._last_progress_s = clock()  # last token delivered, or when the fleet stopped being idle
        self.guard = RollbackGuard(config.rollback, self.router.weights())
        # Called whenever the routable pools change; front-door sessions announce the new set.
        self._routable_listeners: list[Callable[[], None]] = []
        self._routable = self.router.routable()
        self.loops: dict[str, WorkerLoop] = {}
        # A worker refused this fleet's epoch (a newer scheduler owns it); the leadership steps down.
        self.on_fenced: Callable[[str], None] = lambda reason: logger.warning("fenced: %s", reason)
        self._dns = {p.name: DnsTarget.parse(p.dns, f"pools[{p.name}].dns") for p in config.pools if p.dns}
        self._tasks: list[asyncio.Task[None]] = []
        for pool in config.pools:
            for address in pool.worker_addresses:
                if address in self.loops:
                    raise InvalidArgument(f"worker {address} is listed in two pools", field="pools")
                self.loops[address] = self._new_loop(address, pool.name)
        metrics.observe_fleet(self, config.autoscale)

    def _new_loop(self, address: str, pool: str) -> WorkerLoop:
        config = self.config
        return WorkerLoop(
            address, pool, on_events=self._deliver, on_down=self._on_worker_down,
            max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
            step_timeout_s=config.step_timeout_s, probe_interval_s=config.probe_interval_s, clock=self._clock,
            tls=config.tls, async_scheduling=config.async_scheduling, batch_wait_ms=config.batch_wait_ms,
            kv_eviction=config.kv_eviction, scheduler_epoch=config.scheduler_epoch,
            num_speculative_tokens=config.num_speculative_tokens,
            on_fenced=lambda reason: self.on_fenced(reason),
        )

    async def start(self, wait_s: float = 0.0) -> None:
        """Starts every loop; waits up to `wait_s` for all workers to answer (missing ones join later)."""
        if self._dns:
            await self.discover()  # the first members, before serving
            self._tasks.append(asyncio.create_task(self._discovery_loop(), name="worker discovery"))
        if self.config.rollback.enabled and len(self.config.pools) > 1:
            self._tasks.append(asyncio.create_task(self._rollback_loop(), name="canary rollback"))
        for loop in self.loops.values():
            if not loop.started:
                loop.start()
        if wait_s > 0:
            await asyncio.gather(*(loop.wait_until_up(wait_s) for loop in self.loops.values()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(loop.stop() for loop in self.loops.values()))

    # --- pools: discovery, weights, rollback ----------------------------------------------------
    async def discover(self) -> None:
        """Resolves every DNS pool once: new addresses become workers, vanished ones retire, and
        retired workers with nothing left to finish are dropped."""
        for pool, target in self._dns.items():
            resolved = await self._resolve(target)
            if resolved is None:
                logger.warning("pool %s: DNS lookup of %s:%d failed; keeping its workers", pool, target.host,
                               target.port)
                continue
            current = {a for a, l in self.loops.items() if l.pool == pool and not l.retiring}
            change = diff(current, resolved)
            for address in change.added:
                if address in self.loops:
                    continue  # still finishing after an earlier retirement; joins once it is gone
                loop = self.loops[address] = self._new_loop(address, pool)
                metrics.observe_worker_loop(loop)
                loop.start()
                logger.info("pool %s: discovered worker %s", pool, address)
            for address in change.removed:
                logger.info("pool %s: worker %s left DNS; finishing its running requests", pool, address)
                self.loops[address].retire()
        for address, loop in list(self.loops.items()):
            if loop.retiring and loop.done:
                await loop.stop()
                metrics.forget_worker_loop(loop)
                del self.loops[address]

    async def _discovery_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.discovery_interval_s)
            try:
                await self.discover()
            except Exception:  # a bug here must not end discovery for good
                logger.exception("worker discovery failed")

    async def _rollback_loop(self) -> None:
        # Judged on a clock, not per finished request: off the request path, and quiet pools too.
        while True:
            await asyncio.sleep(self.config.rollback_check_interval_s)
            self.check_rollback()

    def set_pool_weight(self, pool: str, weight: float) -> PoolView:
        """An operator's change (admin RPC); a weight > 0 re-arms automatic rollback for the pool."""
        before = self.router.weights().get(pool)
        self.router.set_weight(pool, weight)  # validates name and weight
        if weight > 0:
            self.guard.rearm(pool)
        logger.info("pool %s weight %s -> %s (operator)", pool, before, weight)
        self._routing_changed()
        return next(v for v in self.pool_views() if v.name == pool)

    def routable(self) -> tuple[tuple[str, str], ...]:
        """(name, version) of the pools new requests may go to now (weight > 0)."""
        return self._routable

    def watch_routable(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Calls `listener` whenever `routable()` changes; returns the function that stops it."""
        self._routable_listeners.append(listener)
        return lambda: self._routable_listeners.remove(listener)

    def _routing_changed(self) -> None:
        routable = self.router.routable()
        if routable != self._routable:
            self._routable = routable
            for listener in list(self._routable_listeners):
                listener()

    def observe_finished(self, live: LiveRequest | None, error: RequestError | None) -> None:
        """Feeds the rollback guard with a finished request. The client's own ends (a cancel, a stop
        string found by the front door, a deadline) are not failures, but they are requests served,
        and their first token, if any, is a TTFT sample like any other."""
        if live is None:
            return
        request = live.request
        ttft_s = request.first_token_s - request.arrival_s if request.first_token_s is not None else None
        failed = error is not None and not error.by_client
        self.guard.record(live.decision.pool, self._clock(), failed=failed, ttft_s=ttft_s)

    def check_rollback(self) -> None:
        for rollback in self.guard.evaluate(self._clock(), self.router.weights()):
            self.router.set_weight(rollback.pool, 0.0)
            metrics.observe_rollback(rollback)
            logger.warning("canary rollback: %s; weight set to 0", rollback.describe())
            self._routing_changed()

    def pool_views(self) -> list[PoolView]:
        now = self._clock()
        views = []
        for pool in self.router.pools():
            loops = self._pool_loops(pool.name)
            rollback = self.guard.rolled_back.get(pool.name)
            views.append(PoolView(
                name=pool.name, version=pool.version, weight=pool.weight, dns=pool.dns,
                worker_addresses=tuple(l.address for l in loops), num_workers_up=sum(l.up for l in loops),
                rolled_back=rollback is not None, rollback_reason=rollback.describe() if rollback else "",
                window=self.guard.stats(pool.name, now),
            ))
        return views

    # --- admission ------------------------------------------------------------------------------
    def _pool_loops(self, pool: str) -> list[WorkerLoop]:
        return [loop for loop in self.loops.values() if loop.pool == pool]

    def _limits(self, pool: str) -> ModelLimits:
        specs = [loop.spec for loop in self._pool_loops(pool) if loop.up and loop.spec is not None]
        if not specs:
            raise Unavailable(f"no worker of pool {pool!r} is up")
        return ModelLimits(
            max_model_len=min(s.max_model_len for s in specs),
            vocab_size=min(s.vocab_size for s in specs),
            max_tokens_per_request=min(s.max_tokens_per_request for s in specs),
        )

    def _loads(self, pool: str, request: Request) -> list[WorkerLoad]:
        loads = []
        for loop in self._pool_loops(pool):
            batcher = loop.batcher
            if not loop.up or batcher is None:
                loads.append(WorkerLoad(loop.address, False, 0, 0, 0))
                continue
            overlap_tokens, host_overlap_tokens = batcher.overlap(request)
            loads.append(WorkerLoad(loop.address, True, overlap_tokens, batcher.num_queued_prefill_tokens,
                                    batcher.num_running_decode_requests, host_overlap_tokens))
        return loads

    def _place(self, live: LiveRequest, loop: WorkerLoop, decision: RoutingDecision) -> None:
        """Hands a request to a worker (whose batcher counts its prompt as promised there)."""
        request = live.request
        live.worker, live.decision = loop, decision
        # The batcher counts only the uncached part of a queued prompt as load.
        request.num_expected_cached_tokens = decision.overlap_tokens + decision.host_overlap_tokens
        loop.submit(request)

    def num_waiting(self) -> int:
        return sum(loop.batcher.num_waiting for loop in self.loops.values() if loop.batcher is not None)

    def submit(self, sub: Submission, trace_context: str = "",
               sink: Callable[[RequestEvent], None] | None = None) -> LiveRequest:
        if sub.request_id in self.live:
            raise InvalidArgument(f"request {sub.request_id!r} is already running", field="request_id")
        if self.num_waiting() >= self.config.max_waiting_requests:
            raise ResourceExhausted(
                f"waiting queue is full ({self.config.max_waiting_requests} requests)", retry_after_s=0.5)
        def available(name: str) -> bool:
            return any(loop.up for loop in self._pool_loops(name))

        # n > 1: the sequences follow the first of their group to its worker, where the batcher makes
        # them wait for its prompt blocks and then hit them in the prefix cache. Left to the router,
        # load would spread them and each worker would compute the whole prompt.
        leader = self._groups.get(sub.sequence_group) if sub.sequence_group else None
        if leader is not None and not leader.worker.up:
            leader = None
        if leader is not None:
            pool, sticky = leader.worker.pool, False
        elif sub.resume_pool and sub.resume_pool in self.router.weights() and available(sub.resume_pool):
            # A resumed answer stays with the model version that wrote its first tokens, whatever
            # the weights say now (a new request of its session may go elsewhere).
            pool, sticky = sub.resume_pool, False
        else:
            pool, sticky = self.router.choose_pool(sub.session_id, available)
        now = self._clock()
        request = build_request(sub, self._limits(pool), now)
        request.trace_context = trace_context
        loads = self._loads(pool, request)
        if leader is not None:
            loads = [load for load in loads if load.address == leader.worker.address]
        decision = self.router.choose_worker(pool, request.num_prompt_tokens, loads, sticky=sticky)
        metrics.observe_routed(decision)
        live = LiveRequest(request, self.loops[decision.worker], decision, sink,
                           model_version=self.router.version_of(pool), group=sub.sequence_group)
        if sub.sequence_group and leader is None:
            self._groups[sub.sequence_group] = live
        if not self.live:
            self._last_progress_s = now  # an idle fleet owes no tokens; the clock starts now
        self.live[request.request_id] = live
        self._idle.clear()
        self._place(live, self.loops[decision.worker], decision)
        return live

    def fail_all(self, error: RequestError) -> None:
        """Ends every live request with `error` (this scheduler stopped leading): each stream gets
        its last event now rather than waiting on a fleet that will not step again."""
        for request_id in list(self.live):
            live = self._forget(request_id)
            if live is not None:
                live.sink(RequestEvent(request_id, (), (), FinishReason.ABORT, error))

    def abort(self, request_id: str) -> bool:
        live = self._forget(request_id)
        if live is None:
            return False
        live.worker.abort(request_id)
        # An explicit Abort RPC leaves the Generate stream open; this ends it with a status.
        live.sink(RequestEvent(request_id, (), (), FinishReason.ABORT))
        return True

    def finish(self, request_id: str) -> None:
        """Forgets a request whose stream ended (its last event was delivered)."""
        self._forget(request_id)

    def _forget(self, request_id: str) -> LiveRequest | None:
        live = self.live.pop(request_id, None)
        if live is not None and live.group and self._groups.get(live.group) is live:
            del self._groups[live.group]  # later members of the group, if any, are routed afresh
        if not self.live:
            self._idle.set()
        return live

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def stalled_for_s(self) -> float:
        """How long requests have been live without any token delivered; 0 while idle (liveness)."""
        if not self.live:
            return 0.0
        return max(0.0, self._clock() - self._last_progress_s)

    # --- callbacks from the worker loops --------------------------------------------------------
    def _deliver(self, events: list[RequestEvent]) -> None:
        now = self._clock()
        if any(e.token_ids for e in events):
            self._last_progress_s = now
        for event in events:
            live = self.live.get(event.request_id)
            if live is None:
                continue  # aborted while its step was in flight
            request = live.request
            previous_s = request.last_token_s
            if event.token_ids:
                if request.first_token_s is None:
                    request.first_token_s = now
                request.last_token_s = now
            metrics.observe_delivery(live, event, previous_s)
            live.sink(event)

    def _on_worker_down(self, dead: WorkerLoop, requests: Sequence[Request]) -> None:
        for request in requests:
            live = self.live.get(request.request_id)
            if live is None:
                continue
            others = [l for l in self._pool_loops(dead.pool) if l.up and l is not dead]
            if not others:
                self._forget(request.request_id)
                live.sink(RequestEvent(request.request_id, (), (), FinishReason.ABORT, RequestError(
                    ErrorKind.UNAVAILABLE, f"unavailable: no worker of pool {dead.pool!r} is up")))
                continue
            decision = self.router.choose_worker(dead.pool, request.num_prompt_tokens, self._loads(dead.pool, request))
            metrics.observe_migrated(decision)
            self._place(live, self.loops[decision.worker], decision)
            logger.info("request %s moved from %s to %s after %d tokens", request.request_id, dead.address,
                        decision.worker, len(request.output_token_ids))
