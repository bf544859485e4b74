"""`batch_wait` (letter k): what `--batch-wait-ms` buys and costs under Poisson arrivals.

The tiny model on one worker, open loop: requests arrive at a Poisson rate (`request_rate` in
bench/workload.py) whatever is in flight, the way independent users do, so the worker keeps going
idle between bursts; that is the only time the wait applies (a busy worker never waits). The same
workload is replayed once per `--batch-wait-ms` value, each on a fresh stack (a cold prefix cache,
so no value gains from an earlier one's prompts), and each run records output throughput and TTFT
p50/p99, plus the mechanism behind them: how many requests a worker step computed on average (the
workers' `switchyard_step_batch_size`) and the mean queue time the scheduler measured (arrival to
first placement, which is where the wait shows up).

The rate (16 requests/s of 8-32 output tokens, about 320 tokens/s offered) is well below what the
tiny stack serves at 64 streams, so the worker is often idle: at saturation it never is, and every
value would measure the same thing.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from bench.clients import read_counters, run_grpc
from bench.report import ScenarioResult
from bench.scenarios import TINY_STACK_WORKER_ARGS, Options, running_stack, vocab_size
from bench.workload import random_workload

_STEP_COUNTERS = ("switchyard_step_batch_size_sum", "switchyard_step_batch_size_count")
_QUEUE_COUNTERS = ("switchyard_request_queue_time_seconds_sum", "switchyard_request_queue_time_seconds_count")


def _key(wait_ms: float) -> str:
    return f"wait_{wait_ms:g}ms"


def _deltas(urls: list[str], names: tuple[str, ...], before: dict[str, float] | None = None) -> dict[str, float]:
    totals = dict.fromkeys(names, 0.0)
    for url in urls:
        for name, value in read_counters(url, names).items():
            totals[name] += value
    return {n: totals[n] - (before or {}).get(n, 0.0) for n in names}


def batch_wait(o: Options, r: ScenarioResult) -> None:
    model = o.model("tiny")
    waits_ms = o.pick((0.0, 2.0, 5.0, 10.0), (0.0, 10.0))
    w = random_workload("batch_wait", num_requests=o.pick(400, 16), prompt_len=o.pick((32, 256), (8, 32)),
                        output_len=o.pick((8, 32), (4, 8)), vocab_size=vocab_size(model),
                        request_rate=o.pick(16.0, 40.0), seed=1)
    worker_args = TINY_STACK_WORKER_ARGS
    r.config.update(model=model.name, workload=w.params, worker_args=worker_args, batch_wait_ms=list(waits_ms))
    for wait_ms in waits_ms:
        key = _key(wait_ms)
        with running_stack(model, worker_args=worker_args, scheduler_args=("--batch-wait-ms", f"{wait_ms:g}")) as stack:
            worker_urls = [u for name, u in stack.metrics_urls.items() if name.startswith("worker")]
            scheduler_url = [stack.metrics_urls["scheduler"]]
            steps_before = _deltas(worker_urls, _STEP_COUNTERS)
            queue_before = _deltas(scheduler_url, _QUEUE_COUNTERS)  # the warm-up's requests are not this run's
            records, duration_s = asyncio.run(run_grpc(stack.tokenizer_address, w, label=key))
            steps = _deltas(worker_urls, _STEP_COUNTERS, steps_before)
            queue = _deltas(scheduler_url, _QUEUE_COUNTERS, queue_before)
        num_steps, num_queued = steps["switchyard_step_batch_size_count"], queue[_QUEUE_COUNTERS[1]]
        r.add_run(key, records, duration_s, batch_wait_ms=wait_ms, num_steps=num_steps,
                  mean_requests_per_step=steps["switchyard_step_batch_size_sum"] / num_steps if num_steps else None,
                  mean_queue_time_ms=queue[_QUEUE_COUNTERS[0]] * 1000 / num_queued if num_queued else None)
        print(f"    {key}: {num_steps:.0f} steps, TTFT p50 {_ms(r.metric(key, 'ttft_s', 'p50'))}, "
              f"p99 {_ms(r.metric(key, 'ttft_s', 'p99'))}", flush=True)
    base = _key(0.0)
    for wait_ms in waits_ms[1:]:
        key = _key(wait_ms)
        r.ratio(f"{key}/{base}", key, base)
        for q in ("p50", "p99"):
            r.ratio(f"ttft_{q} {key}/{base}", key, base, "ttft_s", q)
    # The wait's promise: no request is held longer than the wait, so the median TTFT grows by at most that.
    longest = _key(waits_ms[-1])
    added_s = _difference(r, longest, base, "ttft_s", "p50")
    r.target(f"TTFT p50 added by --batch-wait-ms {waits_ms[-1]:g} (vs 0)", None if added_s is None else added_s * 1000,
             "<=", waits_ms[-1], "ms")


def _difference(r: ScenarioResult, a: str, b: str, *path: str) -> float | None:
    x, y = r.metric(a, *path), r.metric(b, *path)
    return None if x is None or y is None else x - y


def _ms(value_s: float | None) -> str:
    return "-" if value_s is None else f"{value_s * 1000:.1f} ms"


SCENARIOS: dict[str, tuple[Callable[[Options, ScenarioResult], None], str]] = {
    "batch_wait": (batch_wait, "Tiny model, 1 worker, Poisson arrivals: output throughput and TTFT p50/p99 for "
                   "--batch-wait-ms 0, 2, 5 and 10 (an idle worker's first step waiting for company)."),
}
