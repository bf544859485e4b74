"""One asyncio task per worker: schedule → Step → update → deliver events, one step ahead.

The loop is the only code that touches its worker's Batcher while a step is planned, so the
batcher needs no locks; gRPC handlers only call `submit`/`abort`, which are synchronous and take
effect at the next iteration. A failed Step marks the worker down and hands every live request to
`on_down` (the fleet moves them to another worker of the pool); a probe then waits for the worker
to answer again, resets it, and brings it back into its pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Callable

import grpc
from switchyard.worker.v1 import worker_pb2_grpc

from services.scheduler import metrics, wire
from services.scheduler.batcher import Batcher, RequestEvent, RequestOutput, StepPlan
from services.scheduler.block_manager import BlockManager
from services.scheduler.eviction import DEFAULT_EVICTION
from services.scheduler.request import Request
from services.scheduler.speculation import NgramProposer
from services.scheduler.worker_spec import WorkerSpec
from shared.channel import open_channel
from shared.tls import TlsConfig
from shared.errors import Unavailable

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.05  # how often an idle-but-blocked loop re-checks deadlines


class StepFailed(Exception):
    """A step got no reply: it timed out, or the worker closed the Steps stream."""


class WorkerLoop:
    def __init__(
        self,
        address: str,
        pool: str,
        *,
        on_events: Callable[[list[RequestEvent]], None],
        on_down: Callable[["WorkerLoop", list[Request]], None],
        on_up: Callable[["WorkerLoop"], None] = lambda loop: None,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 128,
        step_timeout_s: float = 60.0,
        probe_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        tls: TlsConfig | None = None,
        async_scheduling: bool = True,
        batch_wait_ms: float = 0.0,
        kv_eviction: str = DEFAULT_EVICTION,
        scheduler_epoch: int = 0,
        on_fenced: Callable[[str], None] = lambda reason: None,
        num_speculative_tokens: int = 0,
    ) -> None:
        self.address = address
        self.pool = pool
        self.spec: WorkerSpec | None = None
        self.batcher: Batcher | None = None
        self.up = False
        self.num_steps = 0
        self.num_steps_in_flight = 0  # sent and not yet answered (their plans predate any later abort)
        self._max_steps_in_flight = 2 if async_scheduling else 1
        self.kv_eviction = kv_eviction  # the policy of every block pool this loop mirrors
        self.scheduler_epoch = scheduler_epoch  # on every Reset and Step: the worker fences older schedulers
        self._on_events = on_events
        # A worker refused this loop's epoch: a newer scheduler has reset it. The fleet's leadership
        # steps down at once (its requests resume through their front doors), so the loop neither
        # marks the worker down nor moves its requests: they are no longer this scheduler's to run.
        self._on_fenced = on_fenced
        self._on_down = on_down
        self._on_up = on_up
        self._max_num_batched_tokens = max_num_batched_tokens
        self._max_num_seqs = max_num_seqs
        self._batch_wait_ms = batch_wait_ms
        self._num_speculative_tokens = num_speculative_tokens  # 0: no speculative decoding
        self._step_timeout_s = step_timeout_s
        self._probe_interval_s = probe_interval_s
        self._clock = clock
        self._channel = open_channel(address, tls)
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._steps: grpc.aio.StreamStreamCall | None = None  # the Steps stream, opened at the first step
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.retiring = False  # discovery no longer lists it: finish what runs here, then end

    # --- called by the fleet / handlers (synchronous, never block) ---------------------------
    def submit(self, request: Request) -> None:
        if self.batcher is None:  # the fleet routes only to workers that are up; this is a race
            raise Unavailable(f"worker {self.address} is down")
        self.batcher.add(request)
        self._wake.set()

    def abort(self, request_id: str) -> Request | None:
        if self.batcher is None:
            return None
        request = self.batcher.abort(request_id)
        self._wake.set()
        return request

    def start(self) -> None:
        self._task = asyncio.create_task(self._lifecycle(), name=f"worker-loop {self.address}")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._close_steps()
        await self._channel.close()

    def retire(self) -> None:
        """Takes the worker out of its pool for good: queued requests move elsewhere at once, running
        ones finish here, then the loop ends (`done`) instead of probing for the worker again."""
        self.retiring = True
        if self.up and self.batcher is not None:
            self._leave_pool(self.batcher)
        self._wake.set()

    @property
    def started(self) -> bool:
        return self._task is not None

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def wait_until_up(self, timeout_s: float) -> bool:
        deadline = self._clock() + timeout_s
        while not self.up and self._clock() < deadline:
            await asyncio.sleep(0.02)
        return self.up

    # --- the loop ------------------------------------------------------------------------------
    async def _lifecycle(self) -> None:
        while not self._stopping and not self.retiring:
            await self._connect()
            if self.retiring or self._stopping:
                return
            try:
                await self._run()
            except grpc.aio.AioRpcError as e:
                if _is_fenced(e):
                    self._on_fenced(f"worker {self.address} refused a step: {e.details()}")
                self._mark_down(f"Step failed: {e.code().name} {e.details()}")
            except (StepFailed, asyncio.InvalidStateError) as e:
                self._mark_down(f"Step failed: {e}")

    async def _connect(self) -> None:
        """Waits until the worker answers Info, then resets its state and joins the pool."""
        self._close_steps()  # a stream to an earlier process on this address is of no use
        fenced = False
        while not self._stopping and not self.retiring:
            try:
                info = await self._stub.Info(wire.INFO_REQUEST, timeout=2.0)
                await self._stub.Reset(wire.reset_request(self.scheduler_epoch), timeout=5.0)
            except grpc.aio.AioRpcError as e:
                if _is_fenced(e) and not fenced:
                    fenced = True  # said once: it stays so (until the worker restarts and forgets the epoch)
                    logger.warning("worker %s (pool %s) belongs to a newer scheduler (this one's epoch %d): %s",
                                   self.address, self.pool, self.scheduler_epoch, e.details())
                    self._on_fenced(f"worker {self.address} refused our Reset: {e.details()}")
                await asyncio.sleep(self._probe_interval_s)
                continue
            if self.retiring:  # retired while we were asking
                return
            self.spec = wire.worker_spec_from_pb(info)
            manager = BlockManager(self.spec.num_blocks, self.spec.block_size, self.spec.version,
                                   num_host_blocks=self.spec.num_host_blocks, eviction=self.kv_eviction)
            self.batcher = Batcher(
                manager, max_model_len=self.spec.max_model_len, eos_token_ids=self.spec.eos_token_ids,
                max_num_batched_tokens=self._max_num_batched_tokens, max_num_seqs=self._max_num_seqs,
                batch_wait_ms=self._batch_wait_ms,
                proposer=NgramProposer(self._num_speculative_tokens) if self._num_speculative_tokens else None,
            )
            self.up = True
            logger.info("worker %s (pool %s) up: %s %s, %d blocks, %d host blocks", self.address, self.pool,
                        self.spec.model, self.spec.version, self.spec.num_blocks, self.spec.num_host_blocks)
            self._on_up(self)
            return

    async def _run(self) -> None:
        batcher = self.batcher
        assert batcher is not None
        # Async scheduling: up to `_max_steps_in_flight` steps are on the Steps stream at once, so
        # the worker finds step N+1 waiting when it finishes step N and never idles while this loop
        # reads the reply, updates the batcher and plans (the worker runs steps in order, one at a
        # time). Events of an answered step are handed to the request streams just before the loop
        # waits for the next reply, so the streams' writes (and the front door's detokenizing)
        # overlap the worker's compute too.
        in_flight: deque[StepPlan] = deque()
        held: list[RequestEvent] = []
        try:
            while not self._stopping:
                if not self.up and not batcher.has_work() and not in_flight:
                    return  # drained or retired: probe for whatever process comes back on this address
                self._wake.clear()
                now_s = self._clock()
                expired = batcher.expire(now_s)
                if expired:
                    self._on_events(expired)
                # A lookahead plan never preempts: short of blocks, the steps in flight are answered first.
                can_plan = len(in_flight) < self._max_steps_in_flight and not (in_flight and batcher.short_of_blocks)
                # An idle worker's first step may hold for more arrivals (--batch-wait-ms); a busy one never does.
                hold_until_s = batcher.hold_until_s(now_s, lookahead=bool(in_flight)) if can_plan else None
                plan = batcher.schedule(lookahead=bool(in_flight)) if can_plan and hold_until_s is None else None
                if plan is not None and not plan.is_empty:
                    metrics.observe_schedule(self, plan, self._clock())
                    await self._send(plan)
                    in_flight.append(plan)
                    if len(in_flight) < self._max_steps_in_flight:
                        continue  # plan the next step while the worker computes this one
                elif not in_flight:
                    held = self._hand_over(held)
                    timeout = IDLE_POLL_S if batcher.has_work() else None
                    if hold_until_s is not None:  # an arrival (wake) may fill the step before the hold ends
                        timeout = min(IDLE_POLL_S, max(hold_until_s - self._clock(), 0.0))
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout)
                    except TimeoutError:
                        pass
                    continue
                held = self._hand_over(held)
                outputs, draining = await self._read_reply(self._steps)
                self.num_steps += 1
                answered = in_flight.popleft()
                metrics.observe_drafts(self, answered, outputs)
                held = batcher.update(answered, outputs)
                self.num_steps_in_flight = len(in_flight)
                if draining and self.up:
                    self._leave_pool(batcher)
        finally:
            self.num_steps_in_flight = 0
            self._hand_over(held)  # a failed Step or a stop still delivers what the last one produced

    async def _send(self, plan: StepPlan) -> None:
        now = self._clock()
        for scheduled in plan.new_requests:
            if scheduled.request.first_scheduled_s is None:
                scheduled.request.first_scheduled_s = now
        if self._steps is None:
            self._steps = self._stub.Steps()
        self.num_steps_in_flight += 1  # counted before the write: its plan predates any abort that follows
        await self._steps.write(wire.plan_to_pb(plan, self.scheduler_epoch))

    async def _read_reply(self, steps: grpc.aio.StreamStreamCall | None) -> tuple[list[RequestOutput], bool]:
        """The reply to the oldest step in flight, within the step timeout: outputs, and whether the
        worker is draining."""
        assert steps is not None, "a reply is awaited only after a step was sent"
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            steps.cancel()

        timer = asyncio.get_running_loop().call_later(self._step_timeout_s, expire)
        try:
            reply = await steps.read()
        except asyncio.CancelledError:
            if not timed_out:
                raise
            raise StepFailed(f"no reply within {self._step_timeout_s:g} s") from None
        finally:
            timer.cancel()
        if reply is grpc.aio.EOF:
            raise StepFailed("the worker closed the Steps stream")
        return wire.step_reply_from_pb(reply)

    def _close_steps(self) -> None:
        if self._steps is not None:
            self._steps.cancel()
            self._steps = None

    def _hand_over(self, events: list[RequestEvent]) -> list[RequestEvent]:
        if events:
            self._on_events(events)
        return []

    def _leave_pool(self, batcher: Batcher) -> None:
        """The worker is shutting down: no new requests go to it, the queued ones go elsewhere,
        and the running ones keep stepping here until they finish."""
        logger.info("worker %s (pool %s) draining: finishing %d running requests, moving %d queued", self.address,
                    self.pool, batcher.num_running, batcher.num_waiting)
        self.up = False
        queued = batcher.take_waiting()
        if queued:
            self._on_down(self, queued)

    def _mark_down(self, reason: str) -> None:
        logger.warning("worker %s (pool %s) down: %s", self.address, self.pool, reason)
        self._close_steps()
        metrics.observe_worker_down(self)
        self.up = False
        requests = self.batcher.take_all() if self.batcher is not None else []
        self.batcher = None
        self._on_down(self, requests)


def _is_fenced(e: grpc.aio.AioRpcError) -> bool:
    """The worker's answer to a Reset or Step of an epoch other than its owner's."""
    return e.code() is grpc.StatusCode.FAILED_PRECONDITION and "scheduler_epoch" in (e.details() or "")
