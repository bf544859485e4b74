"""A thin gRPC shell over the Fleet: handlers only enqueue and await."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from switchyard.scheduler.v1 import scheduler_pb2 as pb
from switchyard.scheduler.v1 import scheduler_pb2_grpc

from services.scheduler import wire
from services.scheduler.fleet import Fleet
from services.scheduler.leadership import Leadership, Role
from services.scheduler.request import ErrorKind, RequestError
from services.scheduler.session import CANCELLED, FrontDoorSession, conclude, error_for
from services.scheduler.tracing import start_request_span
from shared.errors import SwitchyardError, Unavailable


def fleet_or_refuse(leadership: Leadership) -> Fleet:
    """The fleet this scheduler leads; a standby refuses with UNAVAILABLE naming the leader."""
    fleet = leadership.fleet
    if fleet is None:
        leader = f"; the leader is {leadership.leader}" if leadership.leader else ""
        state = "leads but its workers have not answered yet" if leadership.role is Role.LEADER else "is a standby"
        raise Unavailable(f"scheduler {leadership.identity or ''} {state}{leader}".replace("  ", " "))
    return fleet


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, leadership: Leadership) -> None:
        self._leadership = leadership
        self._draining = False
        self._sessions: set[FrontDoorSession] = set()
        leadership.on_change(self._role_changed)

    @property
    def _fleet(self) -> Fleet:
        return fleet_or_refuse(self._leadership)

    async def _role_changed(self, leading: bool) -> None:
        if leading:
            return
        # Every front door's stream ends UNAVAILABLE: the front doors resubmit their requests to
        # the new leader. Generate streams end the same way, when the leadership fails what is left
        # of the withdrawn fleet (it is no longer `leadership.fleet` here).
        error = Unavailable("this scheduler stopped leading; resubmit to the leader")
        for session in list(self._sessions):
            session.fail(error)

    def register(self, server: grpc.aio.Server) -> list[str]:
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self, server)
        return [wire.SCHEDULER_SERVICE]

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TokenEvent]:
        if self._draining:
            raise Unavailable("scheduler is draining")
        fleet = self._fleet  # this call's, even if this scheduler stops leading before it ends
        sub = wire.submission_from_pb(request, context.time_remaining())
        span, traceparent = start_request_span(sub.request_id)
        live = None
        finish_reason, error = "abort", CANCELLED
        try:
            live = fleet.submit(sub, traceparent)
            finished = False
            while not finished:
                event = await live.events.get()
                # Whatever queued up while this stream was busy goes out as one message: under load
                # the per-message cost (here and at the front door) is paid once for several tokens.
                while event.finish_reason is None and event.error is None and not live.events.empty():
                    event = event.then(live.events.get_nowait())
                finished = event.finish_reason is not None
                if event.error is not None:
                    error = event.error
                    raise error_for(event.error)
                if finished:
                    finish_reason, error = event.finish_reason.name.lower(), None
                yield wire.event_to_pb(event, live.request, live.decision.pool, live.model_version)
        except SwitchyardError as e:
            if live is None:  # refused at admission; a failure after it already set `error`
                error = RequestError(ErrorKind.REFUSED, str(e))
            raise
        finally:
            # Reached on normal end, on error, and when the client goes away (cancellation).
            conclude(fleet, live, span, finish_reason, error)

    async def Connect(self, requests: AsyncIterator[pb.ConnectRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ConnectResponse]:
        session = FrontDoorSession(self._fleet)
        self._sessions.add(session)
        reader = asyncio.create_task(self._read(requests, session), name="connect reader")
        try:
            while (outgoing := await session.next_batch()) is not None:
                yield wire.outgoing_to_pb(outgoing)
            if session.failure is not None:
                raise session.failure
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()  # a bug in the reader ends the stream with INTERNAL
        finally:
            self._sessions.discard(session)
            reader.cancel()
            session.close()  # the stream ended, however: whatever still runs is aborted

    async def _read(self, requests: AsyncIterator[pb.ConnectRequest], session: FrontDoorSession) -> None:
        try:
            async for msg in requests:
                # Aborts first: an id aborted and then submitted again in one message is a new request.
                for request_id in msg.abort_request_ids:
                    session.abort(request_id)
                for sub, traceparent in wire.submissions_from_pb(msg):
                    if self._draining:
                        # With a standby about to lead, the front door takes the request there.
                        session.refuse(sub, Unavailable("scheduler is draining"), resubmit=self._leadership.leased)
                    else:
                        session.submit(sub, traceparent)  # an admission error ends that request only
        finally:
            session.end_input()

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        fleet = self._leadership.fleet
        return wire.abort_response_to_pb(fleet is not None and fleet.abort(request.request_id))

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.SchedulerStats:
        leadership = self._leadership
        role = (leadership.role.value, leadership.epoch, leadership.leader)
        fleet = leadership.fleet
        if fleet is None:
            return wire.stats_to_pb([], [], 0, role)
        workers = []
        for loop in fleet.loops.values():
            row = dict(address=loop.address, pool=loop.pool, up=loop.up)
            if loop.batcher is not None:
                manager = loop.batcher.block_manager
                row.update(
                    num_blocks_total=manager.num_blocks_total, num_blocks_used=manager.num_blocks_used,
                    num_blocks_cached=manager.num_blocks_cached, num_blocks_free=manager.num_blocks_free,
                    num_running_requests=loop.batcher.num_running, num_waiting_requests=loop.batcher.num_waiting,
                )
                if manager.host is not None:
                    host = manager.host
                    row.update(num_host_blocks_total=host.num_blocks_total, num_host_blocks_used=host.num_blocks_used,
                               num_host_blocks_cached=host.num_blocks_cached, num_host_blocks_free=host.num_blocks_free)
            workers.append(row)
        pools = [dict(name=p.name, version=p.version, weight=p.weight) for p in fleet.router.pools()]
        return wire.stats_to_pb(workers, pools, len(fleet.live), role)

    async def drain(self) -> None:
        """Refuses new requests and lets the running ones finish (bounded by the server's grace)."""
        self._draining = True
        if self._leadership.fleet is not None:
            await self._leadership.fleet.wait_idle()


class AdminServicer(scheduler_pb2_grpc.SchedulerAdminServicer):
    """Operator controls on the scheduler's port: read the pools, set a pool's weight."""

    def __init__(self, leadership: Leadership) -> None:
        self._leadership = leadership

    @property
    def _fleet(self) -> Fleet:
        return fleet_or_refuse(self._leadership)

    def register(self, server: grpc.aio.Server) -> list[str]:
        scheduler_pb2_grpc.add_SchedulerAdminServicer_to_server(self, server)
        return [wire.ADMIN_SERVICE]

    async def ListPools(self, request: pb.ListPoolsRequest, context: grpc.aio.ServicerContext) -> pb.ListPoolsResponse:
        policy = self._fleet.config.rollback
        return wire.pools_to_pb(self._fleet.pool_views(), self._fleet.guard.baseline_pool, policy.enabled,
                                policy.window_s)

    async def SetPoolWeight(self, request: pb.SetPoolWeightRequest, context: grpc.aio.ServicerContext) -> pb.PoolStatus:
        return wire.pool_view_to_pb(self._fleet.set_pool_weight(request.pool, request.weight))

