"""The front door's side of the scheduler: one Connect stream that carries every request.

All of this process's requests share one long-lived bidirectional stream: submissions and aborts go
up (whatever queued while the previous write was in flight goes as one message), and each message
down carries the token events of many requests, which the reader hands to each request's inbox.
A request's generator (`stream`) is its one owner here: it registers an inbox, waits on it, and on
any early exit (a stop string, a client that went away, its deadline) sends the abort at once.

Failover: the front door knows every scheduler's address (`--scheduler a,b`). When its stream
breaks (the scheduler died, stopped leading, or went silent: pings every second notice a paused
one), each request on it is resubmitted on a new stream, to the next address, as its prompt plus
the tokens already streamed to its client, with what is left of its deadline and its pool. The
scheduler continues after those tokens (a seeded sampler draws by position, so the continuation is
the one the lost scheduler would have produced) and never repeats them, so the client sees neither
a gap nor a duplicate. A standby refuses at once, so the next address is tried; the request fails
UNAVAILABLE only when no scheduler took it for `failover_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing

import grpc
from opentelemetry import context as otel_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from switchyard.scheduler.v1 import scheduler_pb2_grpc

from services.tokenizer import wire
from services.tokenizer.api_types import GenerateInput, SchedulerEvent, ServingPool
from services.tokenizer.scheduler_targets import SchedulerTargets
from shared.channel import open_channel
from shared.errors import DeadlineExceeded, InvalidArgument, SwitchyardError, Unavailable
from shared.grpc_errors import error_from_rpc
from shared.tls import TlsConfig

logger = logging.getLogger(__name__)
_propagator = TraceContextTextMapPropagator()


class _Inbox:
    """One request's events as they arrive; the request's generator takes them all at once.

    The generator is woken at most once per stream interval: events that come sooner wait in the
    inbox for one timer and then go out together, as one message to the client. The first event
    and a last one wake it at once (time to first token, and the end, are never held back)."""

    __slots__ = ("events", "failure", "lost", "wake", "not_before_s", "timer")

    def __init__(self) -> None:
        self.events: list[SchedulerEvent] = []
        self.failure: SwitchyardError | None = None
        self.lost = False  # the failure is the stream's, not the request's: resubmit elsewhere
        self.wake = asyncio.Event()
        self.not_before_s = 0.0  # the loop time before which a new event only arms the timer
        self.timer: asyncio.TimerHandle | None = None

    def put(self, event: SchedulerEvent, loop: asyncio.AbstractEventLoop) -> None:
        self.events.append(event)
        if event.finish_reason is not None or loop.time() >= self.not_before_s:
            self.wake.set()
        elif self.timer is None:
            self.timer = loop.call_at(self.not_before_s, self._ring)

    def take(self) -> list[SchedulerEvent]:
        events, self.events = self.events, []
        self.close()  # a timer armed for these is of no use now
        return events

    def _ring(self) -> None:
        self.timer = None
        self.wake.set()

    def fail(self, error: SwitchyardError, *, lost: bool = False) -> None:
        if self.failure is None:
            self.failure, self.lost = error, lost
        self.wake.set()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


RoutableListener = Callable[[frozenset[ServingPool] | None], None]


class _Connection:
    """One Connect call and the inboxes of the requests it carries."""

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub, on_routable: RoutableListener) -> None:
        self._on_routable = on_routable
        self._call = stub.Connect()
        self._inboxes: dict[str, _Inbox] = {}
        # What the writer sends next: new requests (by id, in order) and aborts.
        self._submissions: dict[str, object] = {}
        self._aborts: list[str] = []
        self._up_ready = asyncio.Event()
        self.broken: SwitchyardError | None = None
        self.draining = False  # its scheduler refuses new requests (stepping down); running ones go on
        self._tasks = [asyncio.create_task(self._write(), name="scheduler connect writer"),
                       asyncio.create_task(self._read(), name="scheduler connect reader")]

    def open(self, request_id: str, submission: object) -> _Inbox:
        """Registers the request's inbox and queues its submission (a wire message) for the writer."""
        if request_id in self._inboxes:
            # The scheduler would refuse it too; refusing here keeps the running one's events its own.
            raise InvalidArgument(f"request {request_id!r} is already running", field="request_id")
        inbox = self._inboxes[request_id] = _Inbox()
        self._submissions[request_id] = submission
        self._up_ready.set()
        return inbox

    def abort(self, request_id: str) -> None:
        if self._inboxes.pop(request_id, None) is None or self.broken is not None:
            return
        # Not sent yet (cancelled within the same loop turn): it is simply never sent. The
        # scheduler applies a message's aborts before its submissions, so an abort must only
        # ever name a request sent in an earlier message.
        if self._submissions.pop(request_id, None) is not None:
            return
        self._aborts.append(request_id)
        self._up_ready.set()

    def forget(self, request_id: str) -> None:
        self._inboxes.pop(request_id, None)

    async def _write(self) -> None:
        try:
            while True:
                await self._up_ready.wait()
                self._up_ready.clear()
                if not self._submissions and not self._aborts:
                    continue  # the only submission was dropped by its own abort
                message = wire.connect_request_to_pb(list(self._submissions.values()), self._aborts)
                self._submissions, self._aborts = {}, []
                await self._call.write(message)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the reader sees the call's status and reports it
            logger.debug("scheduler stream write failed: %s", e)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for msg in self._call:
                routable = wire.routable_from_pb(msg)
                if routable is not None:  # before this message's events: they may be of a pool now gone
                    self._on_routable(routable)
                for request_id, event, error, resubmit in wire.scheduler_events_from_pb(msg):
                    inbox = self._inboxes.get(request_id)
                    if inbox is None:
                        continue  # aborted here while its events were on the way
                    if error is not None:
                        del self._inboxes[request_id]
                        if resubmit:  # this scheduler is stepping down: new requests go elsewhere
                            self.draining = True
                        inbox.fail(error, lost=resubmit)
                        continue
                    inbox.put(event, loop)
            error: SwitchyardError = Unavailable("the scheduler closed its stream")
        except grpc.aio.AioRpcError as e:
            error = error_from_rpc(e)
            if not isinstance(error, Unavailable):
                error = Unavailable(f"scheduler stream failed: {error}")
        except asyncio.CancelledError:
            error = Unavailable("the front door is closing its scheduler stream")
            raise
        except Exception as e:  # a bug here must still fail the requests, not leave them waiting
            logger.exception("scheduler stream reader failed")
            error = Unavailable(f"scheduler stream reader failed: {e}")
        finally:
            self.broken = error
            self._on_routable(None)  # unknown until the next stream says
            for inbox in self._inboxes.values():
                inbox.fail(error, lost=True)
            self._inboxes.clear()
            self._tasks[0].cancel()

    async def close(self) -> None:
        self._call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# Pings on the scheduler streams: a scheduler that stops answering (paused, partitioned) is given up
# within about 3 s, so its requests resume elsewhere before most clients notice.
SCHEDULER_KEEPALIVE_MS = (1_000, 2_000)
DEFAULT_FAILOVER_TIMEOUT_S = 30.0
_RETRY_BACKOFF_S = (0.02, 0.5)  # first and longest wait between tries of the scheduler addresses


class _Lost(Exception):
    """The request's stream broke before its end; it may be resubmitted."""


class SchedulerClient:
    def __init__(self, address: str | Sequence[str], tls: TlsConfig | None = None, *, stream_interval_s: float = 0.0,
                 on_routable: RoutableListener | None = None,
                 failover_timeout_s: float = DEFAULT_FAILOVER_TIMEOUT_S) -> None:
        """`address`: one scheduler, or several (a list, or comma-separated; `dns:host:port` for every
        address record of a name: scheduler_targets.py) run active/standby.
        `on_routable` hears the scheduler's routable pools as each stream announces them, and None
        when a stream breaks (the set is unknown until the next one says)."""
        self._targets = SchedulerTargets(address if isinstance(address, str) else list(address))
        self.address = self._targets.current
        self.stream_interval_s = stream_interval_s
        self.failover_timeout_s = failover_timeout_s
        self.on_routable: RoutableListener = on_routable or (lambda pools: None)
        self.num_resubmissions = 0  # requests resubmitted after a lost stream (metrics, tests)
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, scheduler_pb2_grpc.SchedulerStub] = {}
        self._connection: _Connection | None = None
        self._retired: list[_Connection] = []  # draining ones whose requests still run
        self._moving = asyncio.Lock()

    @property
    def addresses(self) -> list[str]:
        return self._targets.addresses

    def _stub(self, address: str) -> scheduler_pb2_grpc.SchedulerStub:
        if address not in self._stubs:
            self._channels[address] = open_channel(address, self._tls, keepalive_ms=SCHEDULER_KEEPALIVE_MS)
            self._stubs[address] = scheduler_pb2_grpc.SchedulerStub(self._channels[address])
        return self._stubs[address]

    def _usable(self) -> _Connection | None:
        connection = self._connection
        if connection is None or connection.broken is not None or connection.draining:
            return None
        return connection

    async def _connected(self) -> _Connection:
        if (connection := self._usable()) is not None:
            return connection
        async with self._moving:  # the requests of a broken stream all get here; one moves, once
            if (connection := self._usable()) is not None:
                return connection
            previous = self._connection
            if previous is None:
                self.address = await self._targets.first()
            elif self._targets.several:
                # The one we had is gone or stands by: the next one may lead now.
                self.address = await self._targets.next()
            if previous is not None and previous.broken is None:
                self._retired.append(previous)  # draining: its running requests finish there
            self._retired = [c for c in self._retired if c.broken is None]
            self._connection = _Connection(self._stub(self.address), lambda pools: self.on_routable(pools))
            return self._connection

    async def stream(self, request_id: str, prompt_token_ids: list[int], inp: GenerateInput,
                     trace_context: otel_context.Context | None = None) -> AsyncIterator[SchedulerEvent]:
        """The request's events in order, merged when several arrived since the last read (a slow
        reader gets fewer, larger events); raises the request's typed error if it fails. A lost
        scheduler stream is not a failure: the request resumes on another stream (see the module)."""
        carrier: dict[str, str] = {}
        if trace_context is not None:
            _propagator.inject(carrier, context=trace_context)
        traceparent = carrier.get("traceparent", "")
        loop = asyncio.get_running_loop()
        deadline_s = None if inp.timeout_s is None else loop.time() + inp.timeout_s
        streamed: list[int] = []  # the tokens the caller has been given: a resubmission continues after them
        pool = ""
        lost_since_s: float | None = None
        backoff_s = _RETRY_BACKOFF_S[0]
        while True:
            timeout_s = None if deadline_s is None else deadline_s - loop.time()
            if timeout_s is not None and timeout_s <= 0:
                raise DeadlineExceeded("deadline exceeded while resubmitting to another scheduler")
            submission = wire.scheduler_request_to_pb(
                request_id, prompt_token_ids, inp, traceparent, timeout_s=timeout_s,
                resume_output_token_ids=streamed, resume_pool=pool)
            try:
                # aclosing: a caller that stops early aborts the request now, not when collected
                async with aclosing(self._attempt(request_id, submission, timeout_s)) as events:
                    async for event in events:
                        if event.token_ids or event.finish_reason is not None:
                            lost_since_s, backoff_s = None, _RETRY_BACKOFF_S[0]  # this scheduler delivers
                        streamed.extend(event.token_ids)
                        if event.served_by is not None:
                            pool = event.served_by.name
                        yield event
                        if event.finish_reason is not None:
                            return
                return
            except _Lost as lost:
                now_s = time.monotonic()
                lost_since_s = now_s if lost_since_s is None else lost_since_s
                if now_s - lost_since_s >= self.failover_timeout_s:
                    raise Unavailable(f"no scheduler took the request for {self.failover_timeout_s:g} s: "
                                      f"{lost.__cause__}") from None
                logger.info("request %s: scheduler stream lost (%s); resubmitting after %d tokens",
                            request_id, lost.__cause__, len(streamed))
                self.num_resubmissions += 1
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, _RETRY_BACKOFF_S[1])

    async def _attempt(self, request_id: str, submission: object,
                       timeout_s: float | None) -> AsyncIterator[SchedulerEvent]:
        """One submission on the current stream; raises _Lost if that stream breaks first."""
        connection = await self._connected()
        inbox = connection.open(request_id, submission)
        loop = asyncio.get_running_loop()
        timer = None
        if timeout_s is not None:
            # The scheduler ends the request at its deadline; this covers a scheduler that cannot.
            timer = loop.call_later(
                timeout_s + 1.0, inbox.fail, DeadlineExceeded("deadline exceeded waiting for the scheduler"))
        finished = False
        try:
            while True:
                if inbox.failure is None:
                    await inbox.wake.wait()  # set when an event is due (see _Inbox), or on failure
                inbox.wake.clear()
                events = inbox.take()
                if not events:
                    if inbox.failure is not None:
                        # Events that came before a failure were handed over first.
                        if inbox.lost:
                            raise _Lost() from inbox.failure
                        raise inbox.failure
                    continue
                event = events[0].merged(events[1:]) if len(events) > 1 else events[0]
                finished = event.finish_reason is not None
                inbox.not_before_s = loop.time() + self.stream_interval_s
                yield event
                if finished:
                    return
        finally:
            inbox.close()
            if timer is not None:
                timer.cancel()
            if finished:
                connection.forget(request_id)
            else:  # closed early or failed here: the scheduler frees the request at once
                connection.abort(request_id)

    async def close(self) -> None:
        for connection in [*self._retired, *([self._connection] if self._connection is not None else [])]:
            await connection.close()
        for channel in self._channels.values():
            await channel.close()
