"""Shared pieces of the chaos tests: a real stack (separate processes, started as `make up` starts
them) and the probes that check what it left behind (GetStats, /metrics, /proc).

Everything here is generic: each test module builds its own module-scoped stack with
`running_stack(...)` and the configuration its attack needs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.api.v1 import generation_pb2_grpc
from switchyard.scheduler.v1 import scheduler_pb2 as sched_pb
from switchyard.scheduler.v1 import scheduler_pb2_grpc

from deploy.stack import Stack, StackConfig, start_stack, stop_stack
from tests.deploy.test_stack import make_config
from tests.reference import Reference, assert_greedy_matches, hf_greedy

ALL_SERVICES = ("worker", "scheduler", "tokenizer")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- the stack ------------------------------------------------------------------------------------
@contextmanager
def running_stack(run_dir: Path, model_dir: Path, **overrides: object) -> Iterator[tuple[StackConfig, Stack]]:
    """Starts workers, scheduler and tokenizer on free ports; stops them (and anything restarted) after."""
    config = make_config(run_dir, model_dir, services=ALL_SERVICES, **overrides)
    stack = start_stack(config)
    try:
        yield config, stack
    finally:
        stop_stack(config.run_dir, grace_s=5.0, quiet=True)


Stubs = tuple[generation_pb2_grpc.GenerationStub, scheduler_pb2_grpc.SchedulerStub]


@asynccontextmanager
async def stubs(stack: Stack) -> AsyncIterator[Stubs]:
    """(public Generation stub on the tokenizer, Scheduler stub) of a running stack."""
    async with grpc.aio.insecure_channel(stack.tokenizer_address) as api_channel, \
            grpc.aio.insecure_channel(stack.scheduler_address) as sched_channel:
        yield generation_pb2_grpc.GenerationStub(api_channel), scheduler_pb2_grpc.SchedulerStub(sched_channel)


# --- requests ---------------------------------------------------------------------------------------
def greedy_request(prompt: str | Sequence[int], max_tokens: int, request_id: str = "") -> pb.GenerateRequest:
    """Greedy, EOS ignored: the output is a pure function of the prompt, comparable with HF."""
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    if isinstance(prompt, str):
        return pb.GenerateRequest(request_id=request_id, prompt=prompt, sampling=sampling)
    return pb.GenerateRequest(request_id=request_id, prompt_token_ids=pb.TokenIds(ids=list(prompt)),
                              sampling=sampling)


async def prompt_ids(api: generation_pb2_grpc.GenerationStub, prompt: str) -> list[int]:
    """The ids the stack generates from for `prompt` (special tokens included, as Generate adds them)."""
    reply = await api.Tokenize(pb.TokenizeRequest(prompt=prompt, add_special_tokens=True), timeout=10)
    return list(reply.token_ids)


def hf_reference(model_dir: Path | str, prompt_token_ids: Sequence[int], max_new_tokens: int) -> Reference:
    """`hf_greedy` on one torch thread: the stack's processes share the machine, and torch's
    intra-op threads spin-waiting for a core they cannot get make a 0.1 s reference take seconds."""
    import torch  # noqa: PLC0415

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return hf_greedy(model_dir, prompt_token_ids, max_new_tokens)
    finally:
        torch.set_num_threads(threads)


def assert_reference_prefix(reference: Reference, tokens: Sequence[int], label: str) -> int:
    """`tokens` (possibly fewer than the reference holds) match the reference up to its first near-tie."""
    n = len(tokens)
    return assert_greedy_matches(Reference(reference.token_ids[:n], reference.top2_gaps[:n]), tokens, label)


# --- probes -----------------------------------------------------------------------------------------
async def get_stats(scheduler: scheduler_pb2_grpc.SchedulerStub) -> sched_pb.SchedulerStats:
    return await scheduler.GetStats(sched_pb.GetStatsRequest(), timeout=5)


def check_block_accounting(stats: sched_pb.SchedulerStats) -> None:
    """Every block of every up worker, in each tier, is exactly one of free, cached or used."""
    for w in stats.workers:
        if w.up:
            assert w.num_blocks_used + w.num_blocks_cached + w.num_blocks_free == w.num_blocks_total, w
            assert (w.num_host_blocks_used + w.num_host_blocks_cached + w.num_host_blocks_free
                    == w.num_host_blocks_total), w


async def wait_quiescent(scheduler: scheduler_pb2_grpc.SchedulerStub,
                         timeout_s: float = 15.0) -> sched_pb.SchedulerStats:
    """GetStats once nothing is live and no block is in use (the last abort's bookkeeping trails the
    client's cancel by a step); returns the last stats either way, so the caller asserts on them."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await get_stats(scheduler)
        check_block_accounting(stats)
        idle = stats.num_live_requests == 0 and all(
            w.num_blocks_used == 0 and w.num_running_requests == 0 and w.num_waiting_requests == 0
            for w in stats.workers if w.up)
        if idle or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.1)


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(url)).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric_total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of `name` over every series whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def wait_worker_requests_zero(stack: Stack, timeout_s: float = 10.0) -> dict[str, float]:
    """Each worker's `switchyard_worker_requests` gauge (request states it holds) once all are 0."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = {name: metric_total(await scrape(url), "switchyard_worker_requests")
                for name, url in stack.metrics_urls.items() if name.startswith("worker")}
        if not any(held.values()) or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.1)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def process(stack: Stack, name: str):  # noqa: ANN201 (deploy.stack.Process)
    return next(p for p in stack.processes if p.name == name)


async def wait_until_mid_decode(tasks: Sequence[asyncio.Task], progress: dict[int, int], num_streams: int,
                                min_tokens: int, timeout_s: float = 120.0) -> None:
    """Returns once 3/4 of the streams have `min_tokens` tokens (and some are still running): the
    moment a fault lands mid-decode for most of them."""
    deadline = time.monotonic() + timeout_s
    while sum(n >= min_tokens for n in progress.values()) < 0.75 * num_streams:
        assert time.monotonic() < deadline, f"streams made no progress: {progress}"
        assert not all(t.done() for t in tasks), "every stream ended before the fault"
        await asyncio.sleep(0.005)


async def busiest_worker(stack: Stack, scheduler: scheduler_pb2_grpc.SchedulerStub):  # noqa: ANN201 (Process, int)
    """The worker process holding the most requests now, and how many it holds."""
    stats = await get_stats(scheduler)
    busiest = max(stats.workers, key=lambda w: w.num_running_requests + w.num_waiting_requests)
    process = next(p for p in stack.processes if p.kind == "worker" and p.address == busiest.address)
    return process, busiest.num_running_requests + busiest.num_waiting_requests
