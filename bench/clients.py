"""Load generators that replay a Workload against a running stack: gRPC (the public API) and HTTP
(the OpenAI-compatible API), plus the two read-only probes the scenarios need (/metrics counters
and the scheduler's GetStats).

Both drivers share one loop so their numbers differ only by the protocol: closed loop (at most
`workload.concurrency` requests in flight, the next sent as soon as one finishes) or open loop
(each request sent at its Poisson `arrival_s`, however many are in flight). Every request becomes a
`RequestRecord`; a failed request keeps its error string and never stops the run, because one
RESOURCE_EXHAUSTED in a sweep is a result, not a crash.

Token timing: gRPC responses carry the token ids of each delta, so a delivery of k tokens appends
its arrival time k times. The HTTP stream carries text, not ids, so the HTTP driver records when
each non-empty chunk arrived and, once the final usage event gives `completion_tokens`, spreads
that count over the chunks: one token each (a chunk is only sent when it has text, hence at least
one token), the rest in proportion to each chunk's text length (text held back for a partial
character arrives with the tokens of the next chunk). Asking for `logprobs` would give exact
per-chunk counts but makes the workers compute log-softmax, which the gRPC run does not pay.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import httpx

from bench.records import RequestRecord
from bench.workload import Workload, WorkloadRequest
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.api.v1 import generation_pb2_grpc
from switchyard.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

PROGRESS_EVERY_S = 5.0
_SendOne = Callable[[WorkloadRequest, RequestRecord], Awaitable[None]]


class Progress:
    """Prints `label: done/total requests, tokens so far` every few seconds while a run is in flight."""

    def __init__(self, label: str, records: list[RequestRecord], every_s: float = PROGRESS_EVERY_S) -> None:
        self.label, self.records, self.every_s = label, records, every_s
        self.num_done = 0
        self.t0 = time.perf_counter()

    def line(self) -> str:
        num_tokens = sum(r.num_output_tokens for r in self.records)
        return (f"    {self.label}: {self.num_done}/{len(self.records)} requests done, {num_tokens} tokens,"
                f" {time.perf_counter() - self.t0:.0f} s")

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            print(self.line(), flush=True)


async def _drive(workload: Workload, send_one: _SendOne, label: str) -> tuple[list[RequestRecord], float]:
    limit = asyncio.Semaphore(workload.concurrency or len(workload.requests) or 1)
    records = [RequestRecord(r.request_id, len(r.prompt_token_ids), 0.0) for r in workload.requests]
    progress = Progress(label, records)
    t0 = time.perf_counter()

    async def one(request: WorkloadRequest, record: RequestRecord) -> None:
        if workload.request_rate:
            await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.perf_counter()))
        async with limit:
            record.start_s = time.perf_counter()
            try:
                await send_one(request, record)
            except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
                record.error = record.error or f"{type(e).__name__}: {e}"
            record.end_s = time.perf_counter()
        progress.num_done += 1

    ticker = asyncio.create_task(progress.tick())
    try:
        await asyncio.gather(*(one(r, rec) for r, rec in zip(workload.requests, records)))
    finally:
        ticker.cancel()
    duration_s = time.perf_counter() - t0
    print(progress.line(), flush=True)
    return records, duration_s


def _sampling(request: WorkloadRequest) -> pb.SamplingParams:
    # Greedy and ignore_eos unless the request says otherwise: every runner then produces exactly
    # max_tokens, so work is identical across peers.
    return pb.SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature,
                             ignore_eos=request.ignore_eos, seed=request.seed)


async def run_grpc(address: str, workload: Workload, *, label: str = "grpc") -> tuple[list[RequestRecord], float]:
    """Replays `workload` through the public gRPC `Generate`; returns the records and the wall time."""
    async with grpc.aio.insecure_channel(address) as channel:
        api = generation_pb2_grpc.GenerationStub(channel)

        async def send_one(request: WorkloadRequest, record: RequestRecord) -> None:
            message = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=request.prompt_token_ids),
                                         sampling=_sampling(request), session_id=request.session_id)
            if request.json_schema:
                message.response_format.CopyFrom(pb.ResponseFormat(type="json_schema", json_schema=request.json_schema))
            try:
                async for response in api.Generate(message):
                    now = time.perf_counter()
                    record.token_times_s.extend([now] * len(response.token_ids))
                    record.output_token_ids.extend(response.token_ids)
                    if response.HasField("usage"):
                        record.num_cached_tokens = response.usage.cached_tokens
            except grpc.aio.AioRpcError as e:
                record.error = f"{e.code().name}: {e.details()}"

        return await _drive(workload, send_one, label)


def spread_tokens(chunks: list[tuple[float, int]], num_tokens: int) -> list[float]:
    """Token arrival times from (arrival_s, text_length) chunks and the request's token count:
    one token per chunk, the remainder by largest remainder in proportion to text length."""
    if not chunks or num_tokens <= 0:
        return []
    if num_tokens <= len(chunks):
        return [t for t, _ in chunks[:num_tokens]]
    extra = num_tokens - len(chunks)
    weights = [max(n, 1) for _, n in chunks]
    shares = [extra * w / sum(weights) for w in weights]
    counts = [1 + int(s) for s in shares]
    by_remainder = sorted(range(len(chunks)), key=lambda i: int(shares[i]) - shares[i])
    for i in by_remainder[: num_tokens - sum(counts)]:
        counts[i] += 1
    return [t for (t, _), k in zip(chunks, counts) for _ in range(k)]


async def run_http(base_url: str, workload: Workload, *, label: str = "http", model: str | None = None,
                   keepalive: bool = True) -> tuple[list[RequestRecord], float]:
    """Replays `workload` through the OpenAI-compatible `/v1/completions` (SSE streaming, prompts as
    token ids); returns the records and the wall time. Token times are spread as the module says.

    `keepalive=False` opens a connection per request: for servers that close idle keep-alive
    connections on their own schedule (llama-server's HTTP library does), where a reused
    connection can be closed under a request ("Server disconnected without sending a response")."""
    connections = workload.concurrency or len(workload.requests) or 1
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections if keepalive else 0)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def send_one(request: WorkloadRequest, record: RequestRecord) -> None:
            body: dict[str, Any] = {
                "prompt": list(request.prompt_token_ids), "max_tokens": request.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            }
            if model:
                body["model"] = model
            if request.session_id:
                body["session_id"] = request.session_id
            chunks: list[tuple[float, int]] = []
            usage: dict[str, Any] | None = None
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    record.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.perf_counter()
                    event = json.loads(line[6:])
                    if "error" in event:
                        record.error = f"stream error: {event['error']}"
                        return
                    for choice in event.get("choices") or ():
                        if choice.get("text"):
                            chunks.append((now, len(choice["text"])))
                    usage = event.get("usage") or usage
            if usage is None:
                record.error = "no usage event (stream_options.include_usage ignored?)"
                num_tokens = len(chunks)
            else:
                num_tokens = usage["completion_tokens"]
                record.num_cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            record.token_times_s.extend(spread_tokens(chunks, num_tokens))

        return await _drive(workload, send_one, label)


def read_counters(metrics_url: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sums each named counter over all its label sets in one Prometheus text scrape."""
    text = httpx.get(metrics_url, timeout=10.0).text
    totals = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def read_counter_by_label(metrics_url: str, name: str, label: str) -> dict[str, float]:
    """One counter from one /metrics scrape, summed per value of `label` (see counter_by_label)."""
    return counter_by_label(httpx.get(metrics_url, timeout=10.0).text, name, label)


def counter_by_label(text: str, name: str, label: str) -> dict[str, float]:
    """The samples of counter `name` in Prometheus text, summed per value of `label` over their
    other labels (e.g. hit tokens per `tier` over all workers); read_counters would sum the tiers
    together. Samples without the label are left out."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels, value = line[len(name) + 1:].rsplit("} ", 1)
        found = re.search(rf'(?:^|,){re.escape(label)}="((?:[^"\\]|\\.)*)"', labels)
        if found:
            totals[found.group(1)] = totals.get(found.group(1), 0.0) + float(value)
    return totals


def scheduler_stats(address: str) -> list[dict[str, Any]]:
    """Per-worker queue and KV-block counts from the scheduler's GetStats, as plain dicts."""
    with grpc.insecure_channel(address) as channel:
        stats = scheduler_pb2_grpc.SchedulerStub(channel).GetStats(scheduler_pb2.GetStatsRequest(), timeout=10.0)
    fields = ("address", "pool", "up", "num_blocks_total", "num_blocks_used", "num_blocks_cached",
              "num_blocks_free", "num_running_requests", "num_waiting_requests", "num_host_blocks_total",
              "num_host_blocks_used", "num_host_blocks_cached", "num_host_blocks_free")
    return [{f: getattr(w, f) for f in fields} for w in stats.workers]
