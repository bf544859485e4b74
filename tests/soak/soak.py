"""The soak: the real model at ~70% of capacity for many minutes, with random aborts and a worker
killed and restarted every few minutes. `make test-soak` runs it (`SOAK_MINUTES`, default 30); a
3-minute version runs in `make test-chaos` (tests/chaos/test_soak.py).

    python -m tests.soak.soak --minutes 30 [--out bench/results/soak.json]

It starts its own stack (as `make up` does: two workers, a leader and a standby scheduler, the
front door), measures capacity with a short closed-loop run, then sends Poisson arrivals at 70% of
it. About one request in ten is cancelled by its client after a random delay. What it checks, and
writes with the figures: RSS of every process flat after warm-up (at most 5% growth from the first
window after warm-up to the last; a restarted worker is judged from its own restart), no KV block
left in use at the end, no failed request, and p99 TTFT per window stable (the last windows' no
worse than twice the first's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.api.v1 import generation_pb2_grpc
from switchyard.scheduler.v1 import scheduler_pb2 as sched_pb
from switchyard.scheduler.v1 import scheduler_pb2_grpc

from deploy.stack import StackConfig, is_alive, load_stack, restart_process, start_stack, stop_stack
from shared.cpu_features import cpu_features

MAX_GROWTH = 0.05
MAX_TTFT_RATIO = 2.0
TOPICS = ("the sea", "a train station at night", "bread", "rain on a tin roof", "an old map", "the moon",
          "a market in winter", "bees", "a lighthouse keeper", "chess", "a quiet library", "mountain roads")


@dataclass
class Tally:
    num_ok: int = 0
    num_aborted: int = 0  # cancelled by this client on purpose
    failures: list[str] = field(default_factory=list)
    ttfts: list[tuple[float, float]] = field(default_factory=list)  # (arrival time, TTFT s)


def _request(rng: random.Random, max_tokens: int) -> pb.GenerateRequest:
    topic = rng.choice(TOPICS)
    messages = [pb.ChatMessage(role="user", content=f"Write two sentences about {topic}. Variant {rng.randrange(10**6)}.")]
    seed = rng.randrange(2**31) if rng.random() < 0.5 else None
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.7 if seed is not None else 0.0)
    if seed is not None:
        sampling.seed = seed
    return pb.GenerateRequest(messages=pb.ChatMessages(messages=messages), sampling=sampling)


async def _one(api, request: pb.GenerateRequest, tally: Tally, abort_after_s: float | None, t0: float) -> None:
    arrival = time.monotonic()
    call = api.Generate(request, timeout=120)
    first = None

    async def consume() -> None:
        nonlocal first
        async for _ in call:
            if first is None:
                first = time.monotonic()
    try:
        if abort_after_s is None:
            await consume()
        else:
            try:
                await asyncio.wait_for(consume(), abort_after_s)
            except TimeoutError:
                tally.num_aborted += 1  # wait_for cancelled the call: the abort travels every hop
                return
        tally.num_ok += 1
        if first is not None:
            tally.ttfts.append((arrival - t0, first - arrival))
    except grpc.aio.AioRpcError as e:
        tally.failures.append(f"{e.code().name}: {e.details()}")


async def _closed_loop(api, seconds: float, concurrency: int, max_tokens: int) -> float:
    """Requests per second the stack finishes with `concurrency` clients in a loop."""
    rng = random.Random(1)
    tally = Tally()
    end = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < end:
            await _one(api, _request(rng, max_tokens), tally, None, 0.0)
    await asyncio.gather(*(client() for _ in range(concurrency)))
    if tally.failures:
        raise RuntimeError(f"calibration failed: {tally.failures[:3]}")
    return tally.num_ok / seconds


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def _leader_stats(run_dir: Path) -> sched_pb.SchedulerStats:
    for p in load_stack(run_dir).processes:
        if p.kind != "scheduler":
            continue
        try:
            async with grpc.aio.insecure_channel(p.address) as channel:
                stats = await scheduler_pb2_grpc.SchedulerStub(channel).GetStats(sched_pb.GetStatsRequest(), timeout=5)
            if stats.role == sched_pb.SCHEDULER_ROLE_LEADER:
                return stats
        except grpc.aio.AioRpcError:
            continue
    raise RuntimeError("no scheduler leads")


async def soak(config: StackConfig, minutes: float, *, load: float = 0.7, abort_fraction: float = 0.1,
               restart_every_s: float = 180.0, max_tokens: int = 48, seed: int = 0) -> dict:
    duration_s = minutes * 60
    warmup_s = min(120.0, duration_s / 4)
    window_s = max(30.0, min(120.0, duration_s / 10))
    rng = random.Random(seed)
    stack = start_stack(config)
    try:
        async with grpc.aio.insecure_channel(stack.tokenizer_address) as channel:
            api = generation_pb2_grpc.GenerationStub(channel)
            capacity = await _closed_loop(api, min(30.0, max(15.0, duration_s / 20)), 8, max_tokens)
            rate = capacity * load
            print(f"capacity {capacity:.2f} req/s; soaking at {rate:.2f} req/s for {minutes:g} min", flush=True)
            tally = Tally()
            rss: dict[str, list[tuple[float, float]]] = {}  # process name -> (t, MiB), since its last start
            restarts: list[tuple[float, str]] = []
            tasks: set[asyncio.Task] = set()
            t0 = time.monotonic()
            next_arrival = next_sample = 0.0
            next_restart = restart_every_s / 2
            workers = [p.name for p in stack.processes if p.kind == "worker"]
            while (now := time.monotonic() - t0) < duration_s:
                if now >= next_arrival:
                    abort = rng.uniform(0.05, 1.5) if rng.random() < abort_fraction else None
                    task = asyncio.create_task(_one(api, _request(rng, max_tokens), tally, abort, t0))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    next_arrival = now + rng.expovariate(rate)
                if now >= next_sample:
                    for p in load_stack(config.run_dir).processes:
                        value = _rss_mib(p.pid)
                        if value is not None:
                            rss.setdefault(f"{p.name}:{p.pid}", []).append((now, value))
                    next_sample = now + 5.0
                if now >= next_restart:
                    victim = workers[len(restarts) % len(workers)]
                    pid = next(p.pid for p in load_stack(config.run_dir).processes if p.name == victim)
                    os.kill(pid, signal.SIGKILL)
                    while is_alive(pid):  # the kernel takes a moment; the stack reaps its child
                        await asyncio.sleep(0.02)
                    await asyncio.to_thread(restart_process, config, victim)
                    restarts.append((now, victim))
                    print(f"{now:.0f} s: worker {victim} killed and restarted", flush=True)
                    next_restart = now + restart_every_s
                await asyncio.sleep(max(0.0, min(next_arrival, next_sample, next_restart) - (time.monotonic() - t0)))
            await asyncio.gather(*tasks)
            # Nothing left behind: no live request and no KV block in use on any worker.
            deadline = time.monotonic() + 30
            while True:
                stats = await _leader_stats(config.run_dir)
                used = sum(w.num_blocks_used for w in stats.workers)
                if (stats.num_live_requests == 0 and used == 0) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
    finally:
        stop_stack(config.run_dir, grace_s=10.0, quiet=True)
    return _report(tally, rss, restarts, stats, duration_s, warmup_s, window_s, capacity, rate, minutes)


def _report(tally: Tally, rss: dict, restarts: list, stats, duration_s: float, warmup_s: float, window_s: float,
            capacity: float, rate: float, minutes: float) -> dict:
    growth = {}
    for name, samples in rss.items():
        start = samples[0][0] + (warmup_s if samples[0][0] < 1 else min(warmup_s, 60.0))  # a restarted one warms again
        first = [v for t, v in samples if start <= t < start + window_s]
        last = [v for t, v in samples if t >= samples[-1][0] - window_s]
        if len(first) >= 2 and len(last) >= 2 and samples[-1][0] - start >= 2 * window_s:
            growth[name] = {"first_mib": round(statistics.mean(first), 1), "last_mib": round(statistics.mean(last), 1),
                            "growth": round(statistics.mean(last) / statistics.mean(first) - 1, 4)}
    windows = []
    t = warmup_s
    while t < duration_s:
        sample = sorted(v for a, v in tally.ttfts if t <= a < t + window_s)
        if sample:
            windows.append({"start_s": round(t), "num": len(sample),
                            "ttft_p99_s": round(sample[min(len(sample) - 1, int(0.99 * len(sample)))], 3)})
        t += window_s
    p99s = [w["ttft_p99_s"] for w in windows]
    half = max(1, len(p99s) // 2)
    ttft_ratio = (statistics.median(p99s[half:]) / statistics.median(p99s[:half])) if len(p99s) >= 2 else 1.0
    leaked = sum(w.num_blocks_used for w in stats.workers)
    result = {
        "minutes": minutes, "cpu": cpu_features().summary(), "capacity_req_s": round(capacity, 3),
        "rate_req_s": round(rate, 3), "num_ok": tally.num_ok, "num_aborted": tally.num_aborted,
        "num_failed": len(tally.failures), "failures": tally.failures[:10], "worker_restarts": restarts,
        "leaked_blocks": leaked, "live_requests_at_end": stats.num_live_requests, "rss": growth,
        "ttft_windows": windows, "ttft_p99_late_over_early": round(ttft_ratio, 3),
    }
    problems = [f"{len(tally.failures)} failed requests: {tally.failures[:3]}"] if tally.failures else []
    problems += [f"{leaked} KV blocks still in use"] if leaked else []
    problems += [f"{stats.num_live_requests} requests still live"] if stats.num_live_requests else []
    problems += [f"RSS of {n} grew {g['growth']:.1%}" for n, g in growth.items() if g["growth"] > MAX_GROWTH]
    problems += [f"p99 TTFT late/early {ttft_ratio:.2f} > {MAX_TTFT_RATIO}"] if ttft_ratio > MAX_TTFT_RATIO else []
    problems += ["no RSS could be judged (too short)"] if not growth else []
    result["problems"] = problems
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.soak.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 30)))
    p.add_argument("--out", default="", help="write the result as JSON here too")
    p.add_argument("--run-dir", default="", help="default: a fresh temporary directory")
    a = p.parse_args(argv)
    import tempfile  # noqa: PLC0415

    run_dir = Path(a.run_dir or tempfile.mkdtemp(prefix="switchyard-soak-"))
    config = _soak_config(run_dir)
    result = asyncio.run(soak(config, a.minutes))
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 1 if result["problems"] else 0


def _soak_config(run_dir: Path) -> StackConfig:
    """`make up`'s stack on free ports in `run_dir`, with the real model."""
    from tests.deploy.test_stack import make_config  # noqa: PLC0415
    from tests.conftest import REPO_ROOT  # noqa: PLC0415

    return make_config(run_dir, REPO_ROOT / "models" / "smollm2-135m-instruct",
                       services=("worker", "scheduler", "tokenizer"), timeout_s=180.0, grace_s=5.0,
                       worker_args=("--num-threads", "1"), lease_duration_s=5.0)


if __name__ == "__main__":
    sys.exit(main())
