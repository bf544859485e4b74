"""gRPC server bootstrap: one lifecycle for every service.

Each service only registers its servicers; this module adds what all of them share (the error
interceptor, health, reflection, message limits) and owns the shutdown order the design fixes:
health NOT_SERVING so balancers and `make up` stop sending work, then the service's drain, then
`server.stop(grace)` for RPCs still running, then a telemetry flush so the last spans are not lost.
`grace_s` bounds the whole sequence, drain included, because an orchestrator kills the process at
its own deadline whatever we are doing. A second SIGTERM/SIGINT skips what is left of the grace.

A service may pass a `liveness` check (the scheduler: "requests are running but no token came for
too long"). A watchdog task asks it every `liveness_period_s` and flips health between SERVING and
NOT_SERVING, so a wedged process is taken out of rotation by whatever watches health (Kubernetes
probes, `make status`, a load balancer) and put back when it recovers on its own.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.channel import SERVER_OPTIONS
from shared.grpc_errors import ErrorInterceptor
from shared.telemetry import Telemetry
from shared.tls import TlsConfig

logger = logging.getLogger(__name__)

Register = Callable[[grpc.aio.Server], Iterable[str]]
Drain = Callable[[], Awaitable[None]]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class BindError(RuntimeError):
    """The server could not listen on its address (port taken, or not a local address)."""


class GrpcServer:
    """A grpc.aio server with health, reflection, typed-error mapping and ordered shutdown.

    `register` adds the service's servicers and returns their full names (e.g.
    "switchyard.api.v1.Generation"); those names get health entries and reflection.
    """

    def __init__(
        self,
        *,
        service_name: str,
        register: Register,
        address: str,
        grace_s: float,
        on_drain: Drain | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        telemetry: Telemetry | None = None,
        tls: TlsConfig | None = None,
        liveness: Callable[[], bool] | None = None,
        liveness_period_s: float = 1.0,
        ready: bool = True,
    ) -> None:
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        self.service_name = service_name
        self.address = address
        self.grace_s = grace_s
        self._register = register
        self._on_drain = on_drain
        self._interceptors = tuple(interceptors)
        self._telemetry = telemetry
        self._tls = tls if tls is not None and tls.enabled else None
        self._liveness = liveness
        self._ready = ready
        self._status: int | None = None  # last set overall; None before start
        self._liveness_period_s = liveness_period_s
        self._watchdog: asyncio.Task[None] | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._service_names: tuple[str, ...] = ()
        self._bound_port: int | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self._forced = asyncio.Event()
        self._terminated = asyncio.Event()
        self._signals: list[signal.Signals] = []

    @property
    def bound_port(self) -> int:
        """The port listening; differs from the address's when it asked for port 0."""
        if self._bound_port is None:
            raise RuntimeError(f"{self.service_name}: server not started")
        return self._bound_port

    @property
    def target(self) -> str:
        """"host:port" a client on this machine can dial, with the real port."""
        return f"{self.address.rpartition(':')[0]}:{self.bound_port}"

    @property
    def service_names(self) -> tuple[str, ...]:
        return self._service_names

    @property
    def shutting_down(self) -> bool:
        return self._shutdown_task is not None

    @property
    def terminated(self) -> bool:
        return self._terminated.is_set()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"{self.service_name}: server already started")
        # Looked up at call time: telemetry instrumentation replaces grpc.aio.server and puts its
        # tracing interceptor first, so typed errors are mapped inside the request's span.
        server = grpc.aio.server(
            interceptors=[ErrorInterceptor(), *self._interceptors], options=list(SERVER_OPTIONS)
        )
        self._service_names = tuple(self._register(server))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            if self._tls is not None:
                self._bound_port = server.add_secure_port(self.address, self._tls.server_credentials())
            else:
                self._bound_port = server.add_insecure_port(self.address)
        except RuntimeError as e:
            raise BindError(
                f"{self.service_name} cannot listen on {self.address}: the port is in use or the "
                f"host is not a local address; choose another address or stop the other process"
            ) from e
        self._server = server
        await server.start()
        await self._set_health(_SERVING)
        if self._liveness is not None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_liveness(self._liveness))
        security = "plaintext" if self._tls is None else ("mutual TLS" if self._tls.mutual else "TLS")
        logger.info("%s serving on %s (port %d, %s)", self.service_name, self.address, self._bound_port, security)

    def install_signal_handlers(
        self, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Routes SIGTERM/SIGINT to `request_shutdown` (the loop must run in the main thread)."""
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self.request_shutdown, sig)
            self._signals.append(sig)

    def remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals.clear()

    def request_shutdown(self, sig: signal.Signals | None = None) -> None:
        """What a signal does: begin shutdown, or, if it has begun, stop without waiting further."""
        reason = sig.name if sig is not None else "request"
        if self._shutdown_task is None:
            logger.info("%s: %s, shutting down (grace %.1fs)", self.service_name, reason, self.grace_s)
            self._shutdown_task = asyncio.get_running_loop().create_task(self._shut_down())
            return
        if not self._forced.is_set():
            logger.warning("%s: %s again, stopping without grace", self.service_name, reason)
            self._forced.set()

    async def shutdown(self) -> None:
        """NOT_SERVING, drain, stop(grace), flush telemetry; safe to call any number of times."""
        self.request_shutdown()
        task = self._shutdown_task
        if task is None:  # pragma: no cover - request_shutdown always creates it
            raise RuntimeError("shutdown task missing")
        # Shielded so a caller giving up (e.g. a cancelled test) does not abandon a half-stopped server.
        await asyncio.shield(task)

    async def wait_for_termination(self) -> None:
        """Returns once a shutdown, however it was started, has finished."""
        await self._terminated.wait()

    async def __aenter__(self) -> GrpcServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()

    async def _shut_down(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        try:
            if self._watchdog is not None:
                self._watchdog.cancel()
            await self._health.enter_graceful_shutdown()
            if self._on_drain is not None:
                await self._drain(self._on_drain, deadline)
            if self._server is not None:
                grace = None if self._forced.is_set() else max(0.0, deadline - loop.time())
                await self._stop_server(self._server, grace)
            if self._telemetry is not None:
                # The flush blocks on network I/O; keep the loop free for anything else still running.
                await asyncio.to_thread(self._telemetry.shutdown)
            logger.info("%s stopped", self.service_name)
        finally:
            self._terminated.set()

    async def _set_health(self, status: int) -> None:
        self._status = status
        for name in ("", *self._service_names):
            # A service that is up but not ready (a standby scheduler) is NOT_SERVING under its own
            # name, which readiness probes ask, and SERVING overall, which liveness probes ask.
            await self._health.set(name, status if self._ready or not name else _NOT_SERVING)

    async def set_ready(self, ready: bool) -> None:
        """Whether the named services take requests now; the process stays live either way."""
        self._ready = ready
        if self._shutdown_task is None and self._status is not None:
            await self._set_health(self._status)

    async def _watch_liveness(self, check: Callable[[], bool]) -> None:
        live = True
        while self._shutdown_task is None:
            await asyncio.sleep(self._liveness_period_s)
            now_live = check()
            if now_live == live or self._shutdown_task is not None:
                continue
            live = now_live
            if live:
                logger.warning("%s: tokens flow again; health SERVING", self.service_name)
            else:
                logger.error("%s: requests are running but no token came in time; health NOT_SERVING",
                             self.service_name)
            await self._set_health(_SERVING if live else _NOT_SERVING)

    async def _drain(self, on_drain: Drain, deadline: float) -> None:
        draining = asyncio.ensure_future(on_drain())
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        if not await self._finished_before_forced(draining, timeout):
            logger.warning("%s: drain cut short (grace over or second signal)", self.service_name)
            draining.cancel()
        try:
            await draining
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the shutdown itself is being cancelled, not just the drain
        except Exception:
            logger.exception("%s: drain failed; stopping anyway", self.service_name)

    async def _stop_server(self, server: grpc.aio.Server, grace: float | None) -> None:
        stopping = asyncio.ensure_future(server.stop(grace))
        if not await self._finished_before_forced(stopping, None):
            # stop() is idempotent and the smallest grace wins, so this ends the first call too.
            await server.stop(None)
        await stopping

    async def _finished_before_forced(self, task: asyncio.Future[None], timeout: float | None) -> bool:
        """Waits for `task` until the timeout or a second signal; says whether it finished."""
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            await asyncio.wait({task, forced}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
        return task.done()


async def serve(
    *,
    service_name: str,
    register: Register,
    address: str,
    grace_s: float,
    on_drain: Drain | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    telemetry: Telemetry | None = None,
    tls: TlsConfig | None = None,
    liveness: Callable[[], bool] | None = None,
    liveness_period_s: float = 1.0,
    ready: bool = True,
    on_started: Callable[[GrpcServer], Awaitable[None]] | None = None,
) -> None:
    """Runs a service until SIGTERM/SIGINT and its shutdown have completed (for `__main__`).
    `ready` False starts it NOT_SERVING under its service names (see `set_ready`); `on_started`
    gets the server once it listens."""
    server = GrpcServer(
        service_name=service_name,
        register=register,
        address=address,
        grace_s=grace_s,
        on_drain=on_drain,
        interceptors=interceptors,
        telemetry=telemetry,
        tls=tls,
        liveness=liveness,
        liveness_period_s=liveness_period_s,
        ready=ready,
    )
    await server.start()
    if on_started is not None:
        await on_started(server)
    server.install_signal_handlers()
    try:
        await server.wait_for_termination()
    finally:
        server.remove_signal_handlers()
        if not server.terminated:
            # serve() itself was cancelled: still leave nothing half-running.
            await server.shutdown()
