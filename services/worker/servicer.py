"""A thin gRPC shell over the worker's Executor.

Shutdown (SIGTERM) drains rather than drops: health turns NOT_SERVING, Info refuses (so a
scheduler probing for workers does not adopt one that is leaving), Steps are still served and
their replies say `draining`, so the scheduler sends no new requests here and moves its queued
ones elsewhere, and the process stops once the requests it holds are finished and forgotten (or
the grace runs out and the scheduler recomputes the rest on another worker).

Steps run in one dedicated thread: torch releases the GIL while computing, so the event loop
stays free to answer health checks and Info while a long prefill runs, and one thread means
steps never overlap (the scheduler sends one at a time per worker anyway).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from switchyard.worker.v1 import worker_pb2 as pb
from switchyard.worker.v1 import worker_pb2_grpc

from services.worker import wire
from services.worker.executor import Executor
from services.worker.metrics import WorkerMetrics
from shared.errors import FailedPrecondition, Unavailable

_tracer = trace.get_tracer("switchyard.worker")
_propagator = TraceContextTextMapPropagator()


def _links(contexts: list[tuple[str, str]]) -> list[trace.Link]:
    """One link per request in the batch: a step serves many requests, so it cannot be a child of
    all of them; links let a request's trace lead to every step that computed it."""
    links = []
    for request_id, traceparent in contexts:
        span_context = trace.get_current_span(_propagator.extract({"traceparent": traceparent})).get_span_context()
        if span_context.is_valid:
            links.append(trace.Link(span_context, {"switchyard.request_id": request_id}))
    return links


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, executor: Executor, *, version: str, address: str = "") -> None:
        self._executor = executor
        self._metrics = WorkerMetrics(address, executor)  # labelled by the address the scheduler dials
        self._version = version
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step")
        self._lock = asyncio.Lock()
        self._draining = False
        self._emptied = asyncio.Event()  # set while draining once no request is held
        # The epoch of the scheduler that owns this worker (its last Reset); steps from any other
        # epoch are refused, so a stale scheduler cannot write into blocks another one assigns.
        self._scheduler_epoch = 0
        self._num_streams = 0  # Steps streams open: a scheduler that may still finish what it left here

    def register(self, server: grpc.aio.Server) -> list[str]:
        worker_pb2_grpc.add_WorkerServicer_to_server(self, server)
        return [wire.WORKER_SERVICE]

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.WorkerInfo:
        if self._draining:
            raise Unavailable("worker is shutting down")
        runner = self._executor.runner
        return wire.info_to_pb(
            runner.spec, block_size=runner.block_size, num_blocks=runner.num_blocks, version=self._version,
            device=str(runner.device), attention_backend=runner.backend.name,
            num_host_blocks=runner.kv_pool.num_host_blocks,
        )

    async def Step(self, request: pb.StepRequest, context: grpc.aio.ServicerContext) -> pb.StepResponse:
        return await self._step(request)

    async def Steps(self, requests: AsyncIterator[pb.StepRequest],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StepResponse]:
        self._num_streams += 1
        try:
            async for request in requests:
                yield await self._step(request)
        finally:
            self._num_streams -= 1
            if self._draining and not self._num_streams:
                # Its scheduler went away: what it left here can never finish (nobody sends the
                # steps) nor be adopted (a draining worker refuses Info), so the drain stops waiting.
                self._emptied.set()

    async def _step(self, request: pb.StepRequest) -> pb.StepResponse:
        step = wire.step_from_pb(request)
        async with self._lock:  # checked under the lock: a Reset from a newer scheduler may be queued ahead
            if step.scheduler_epoch != self._scheduler_epoch:
                raise FailedPrecondition(
                    f"scheduler_epoch: step from epoch {step.scheduler_epoch}, but this worker belongs to the "
                    f"scheduler of epoch {self._scheduler_epoch} (which must Reset it first)", field="scheduler_epoch")
            links = _links(self._executor.trace_contexts(step))
            with _tracer.start_as_current_span("worker.step", links=links) as span:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._thread, self._executor.execute, step)
                span.set_attributes({
                    "switchyard.step_id": result.step_id,
                    "switchyard.batch_size": result.num_requests,
                    "switchyard.num_prefill_tokens": result.num_prefill_tokens,
                    "switchyard.num_decode_tokens": result.num_decode_tokens,
                    "switchyard.num_finished_requests": len(step.finished_request_ids),
                })
        self._metrics.observe_step(result)
        if self._draining and not self._executor.requests:
            self._emptied.set()
        return wire.result_to_pb(result, draining=self._draining)

    async def Reset(self, request: pb.ResetRequest, context: grpc.aio.ServicerContext) -> pb.ResetResponse:
        if self._draining:
            raise Unavailable("worker is shutting down")
        epoch = wire.reset_epoch_from_pb(request)
        async with self._lock:
            if epoch < self._scheduler_epoch:
                raise FailedPrecondition(
                    f"scheduler_epoch: {epoch} is older than {self._scheduler_epoch}: a newer scheduler has taken "
                    "this worker over", field="scheduler_epoch")
            self._scheduler_epoch = epoch
            return wire.reset_response_to_pb(self._executor.reset())

    async def drain(self) -> None:
        """Serves the requests it holds to their end (the server's grace bounds this), then waits
        for the step in flight, so no step is cut in half."""
        self._draining = True
        if self._executor.requests and self._num_streams:
            await self._emptied.wait()
        async with self._lock:
            pass
        self._thread.shutdown(wait=True)
