"""The pipeline's own cost: a null-model worker (no compute), so what is measured is the services.

`pipeline_cost` (letter i) replays 256 requests x 256 tokens at 64 concurrent streams through gRPC
and through HTTP, and reads each service's CPU time from /proc before and after each run: CPU
microseconds per generated token, per process, is the figure that says how many tokens one core of
that service can carry (a front door at 30 us carries ~33k tokens/s per core).

`tiny_mixed_vs_hf` (letter j) is the tiny model on mixed lengths (prompts 16-256, outputs 16-128,
32 concurrent, 1 worker) against Hugging Face static batching: the whole stack against the simplest
thing a user could run instead.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Callable

from bench.clients import run_grpc, run_http
from bench.report import ScenarioResult
from bench.scenarios import TINY_STACK_WORKER_ARGS, Options, _peer, _peers, running_stack, vocab_size
from bench.workload import random_workload
from deploy.stack import Stack

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far, from /proc/<pid>/stat (fields 14 and 15)."""
    # The command name (field 2) may hold spaces; everything after its closing parenthesis is fixed.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def _cpu_by_kind(stack: Stack) -> dict[str, float]:
    totals: dict[str, float] = {}
    for p in stack.processes:
        totals[p.kind] = totals.get(p.kind, 0.0) + cpu_seconds(p.pid)
    return totals


def measure_cpu(stack: Stack, run: Callable[[], tuple[list, float]]) -> tuple[list, float, dict[str, float]]:
    """Runs `run` and returns its records, its wall time and each service kind's CPU seconds
    (plus this process's, the load generator's, as "client") spent during it."""
    before, client_before = _cpu_by_kind(stack), os.times()
    records, duration_s = run()
    after, client_after = _cpu_by_kind(stack), os.times()
    spent = {kind: after[kind] - before[kind] for kind in before}
    spent["client"] = (client_after.user + client_after.system) - (client_before.user + client_before.system)
    return records, duration_s, spent


def _per_token_us(spent: dict[str, float], records: list) -> dict[str, float | None]:
    num_tokens = sum(r.num_output_tokens for r in records if not r.error)
    return {kind: (s * 1e6 / num_tokens if num_tokens else None) for kind, s in spent.items()}


def pipeline_cost(o: Options, r: ScenarioResult) -> None:
    model = o.model("tiny")
    shape = dict(num_requests=o.pick(256, 16), prompt_len=(32, 32), output_len=o.pick((256, 256), (16, 16)),
                 vocab_size=vocab_size(model), concurrency=o.pick(64, 8))
    worker_args = ("--null-model", "--num-threads", "1")
    r.config.update(model=model.name, workload={**random_workload("shape", seed=0, **shape).params},
                    worker_args=worker_args)
    with running_stack(model, worker_args=worker_args) as stack:
        for i, (api, drive) in enumerate((
            ("grpc", lambda w: asyncio.run(run_grpc(stack.tokenizer_address, w, label="grpc"))),
            ("http", lambda w: asyncio.run(run_http(stack.http_url, w, label="http"))),
        )):
            w = random_workload(f"pipeline_cost-{api}", seed=i + 1, **shape)
            records, duration_s, spent = measure_cpu(stack, lambda: drive(w))
            per_token = _per_token_us(spent, records)
            r.add_run(api, records, duration_s, cpu_s=spent, cpu_us_per_token=per_token)
            print(f"    {api}: CPU us/token " + ", ".join(f"{k} {v:.1f}" for k, v in per_token.items() if v is not None),
                  flush=True)
    for api in ("grpc", "http"):
        r.target(f"{api}: front door CPU per generated token", r.metric(api, "cpu_us_per_token", "tokenizer"),
                 "<=", 30.0, "us")
        r.target(f"{api}: scheduler CPU per generated token", r.metric(api, "cpu_us_per_token", "scheduler"),
                 "<=", 10.0, "us")
    r.target("grpc: output throughput (null model, 64 streams)", r.metric("grpc", "output_throughput_tokens_per_s"),
             ">=", 30000.0, "tokens/s")


def tiny_mixed_vs_hf(o: Options, r: ScenarioResult) -> None:
    model = o.model("tiny")
    w = random_workload("tiny_mixed_vs_hf", num_requests=o.pick(128, 8), prompt_len=o.pick((16, 256), (8, 32)),
                        output_len=o.pick((16, 128), (4, 16)), vocab_size=vocab_size(model), concurrency=o.pick(32, 4))
    batch_size = o.pick(32, 4)
    worker_args = TINY_STACK_WORKER_ARGS
    r.config.update(model=model.name, workload=w.params, worker_args=worker_args, hf_static_batch_size=batch_size)
    with running_stack(model, worker_args=worker_args) as stack:
        r.add_run("stack", *asyncio.run(run_grpc(stack.tokenizer_address, w, label="stack")))
    peers, why = _peers()
    _peer(r, "hf_static", peers, why, lambda p: p.run_hf_static(model, w, batch_size))
    r.target("stack / hf_static output throughput (tiny model, mixed lengths)",
             r.ratio("stack/hf_static", "stack", "hf_static"), ">=", 1.5, "x")


SCENARIOS = {
    "pipeline_cost": (pipeline_cost, "Null-model worker, 64 streams x 256 tokens over gRPC and HTTP: tokens/s and "
                      "CPU microseconds per generated token in each service."),
    "tiny_mixed_vs_hf": (tiny_mixed_vs_hf, "Tiny model, mixed lengths, 32 concurrent, 1 worker: the whole stack vs "
                         "Hugging Face static batching."),
}
