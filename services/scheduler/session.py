"""The requests of one front door's Connect stream, and the events owed to it.

A front-door process keeps one Connect stream open and sends every request over it, so the cost of
a message (framing, a syscall, a task switch, on both sides) is paid once per worker step rather
than once per request per step. The fleet delivers events into the session's outbox synchronously,
as the worker loop hands them over; the servicer's writer takes the whole outbox as one message
whenever the previous write is done, so a slow reader gets fewer, larger messages instead of a
growing queue of small ones.

The session owns each of its requests' ends: the last event (or an admission error) concludes the
request in the fleet, its span and its metrics at once, and closing the session (the stream ended:
the front door went away or shut down) aborts whatever is still running, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio

from opentelemetry.trace import Span

from services.scheduler import metrics
from services.scheduler.admission import Submission
from services.scheduler.plan import Delivery, Outgoing, RequestEvent
from services.scheduler.fleet import Fleet, LiveRequest
from services.scheduler.request import ErrorKind, FinishReason, RequestError
from services.scheduler.tracing import end_request_span, start_request_span
from shared.errors import DeadlineExceeded, SwitchyardError, Unavailable

CLOSED = RequestError(ErrorKind.CANCELLED, "cancelled: the front door's stream closed")
CANCELLED = RequestError(ErrorKind.CANCELLED, "cancelled")


def error_for(error: RequestError) -> SwitchyardError:
    """The typed error (and so the status code) a request that ended with `error` gets."""
    if error.kind is ErrorKind.DEADLINE:
        return DeadlineExceeded(error.message)
    if error.kind is ErrorKind.UNAVAILABLE:
        return Unavailable(error.message)
    return SwitchyardError(f"request failed: {error.message}")


def conclude(fleet: Fleet, live: LiveRequest | None, span: Span, finish_reason: str,
             error: RequestError | None) -> None:
    """Ends a request's life in the scheduler, however it ended: forgotten (or aborted, which frees
    its blocks on the worker), its span ended, its metrics and rollback window fed."""
    if live is not None:
        if error:
            fleet.abort(live.request.request_id)
        else:
            fleet.finish(live.request.request_id)
    end_request_span(span, live, finish_reason, error)
    metrics.observe_request_finished(live, finish_reason, error)
    fleet.observe_finished(live, error)


class FrontDoorSession:
    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._live: dict[str, tuple[LiveRequest, Span]] = {}
        self._outbox: list[Delivery] = []
        self._ready = asyncio.Event()
        self.input_closed = False  # the front door sends nothing more; end once its requests have
        self.failure: SwitchyardError | None = None  # set: the stream ends with this status (fail)
        # The routable pools ride on the first message (no message of their own: until a request's
        # events arrive the front door has no answer to cache) and go out again at once after every
        # change, so a front door that caches answers drops a rolled-back pool's without delay.
        self._routable_due = True
        self._routable_changed = False
        self._unwatch = fleet.watch_routable(self._on_routable_changed)

    def submit(self, sub: Submission, traceparent: str) -> None:
        """Admits a request; an admission error becomes its last (and only) event."""
        span, worker_traceparent = start_request_span(sub.request_id, traceparent)
        try:
            live = self._fleet.submit(sub, worker_traceparent, sink=self._push)
        except SwitchyardError as e:
            conclude(self._fleet, None, span, "abort", RequestError(ErrorKind.REFUSED, str(e)))
            self.refuse(sub, e)
            return
        self._live[sub.request_id] = (live, span)

    def refuse(self, sub: Submission, error: SwitchyardError, *, resubmit: bool = False) -> None:
        """Answers a submission with an error without admitting it (the scheduler is draining);
        `resubmit`: the front door may send it to another scheduler at once."""
        self._send(Delivery(RequestEvent(sub.request_id, (), (), FinishReason.ABORT), 0, 0, 0, error,
                            resubmit=resubmit))

    def abort(self, request_id: str) -> None:
        """The front door stopped the request (a cancel, a stop string): nothing more is sent for it."""
        tracked = self._live.pop(request_id, None)
        if tracked is not None:
            conclude(self._fleet, tracked[0], tracked[1], "abort", CANCELLED)

    def close(self) -> None:
        """The stream ended: every request still running is aborted."""
        # Taken out first: aborting a request delivers its last event, which must find it gone.
        running, self._live = self._live, {}
        for live, span in running.values():
            conclude(self._fleet, live, span, "abort", CLOSED)
        self.input_closed = True
        self._unwatch()
        self._unwatch = lambda: None
        self._ready.set()

    def fail(self, error: SwitchyardError) -> None:
        """Ends the stream with `error` once what is in the outbox has gone (this scheduler stopped
        leading): its requests are aborted here and resumed by the front door elsewhere."""
        self.failure = error
        self.close()

    def end_input(self) -> None:
        self.input_closed = True
        self._ready.set()

    async def next_batch(self) -> Outgoing | None:
        """Everything delivered since the last call, with the routable pools when they are due
        (waiting until there is something); None once the front door has closed its side and every
        request has ended."""
        while not self._outbox and not self._routable_changed:
            if self.input_closed and not self._live:
                return None
            self._ready.clear()
            await self._ready.wait()
        routable = None
        if self._routable_due:
            self._routable_due = self._routable_changed = False
            routable = self._fleet.routable()
        batch, self._outbox = self._outbox, []
        return Outgoing(batch, routable)

    def _on_routable_changed(self) -> None:
        self._routable_due = self._routable_changed = True
        self._ready.set()

    def _send(self, delivery: Delivery) -> None:
        self._outbox.append(delivery)
        self._ready.set()

    def _push(self, event: RequestEvent) -> None:
        """The fleet's sink for this session's requests (synchronous, from the worker loop)."""
        tracked = self._live.get(event.request_id)
        if tracked is None:
            return  # aborted by the front door: it wants nothing more
        live, span = tracked
        request = live.request
        error = error_for(event.error) if event.error else None
        self._send(Delivery(event, request.num_prompt_tokens, request.num_cached_tokens,
                            len(request.output_token_ids), error, live.decision.pool, live.model_version))
        if event.error is not None or event.finish_reason is not None:
            del self._live[event.request_id]
            finish_reason = event.finish_reason.name.lower() if event.finish_reason else "abort"
            conclude(self._fleet, live, span, finish_reason, event.error)
