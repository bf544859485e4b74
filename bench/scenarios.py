"""The benchmark scenarios: each builds its workload(s), starts the stack the way `make up` does
(separate processes, on free ports, in a temporary run dir), replays the workload through the
public API, runs the peers it is compared with, and states its targets.

Peers run while no stack is up, so they never share the two cores with idle services. Every stack
gets a few warm-up requests first (lazy torch initialisation is not what a benchmark measures).
Each run on one stack gets its own prompts (a different seed), so a later run never hits the
prefix cache the earlier one filled. A runner that is not available yet (a peer module, a flag a
service does not have) is skipped with the reason; it does not fail the scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import json
import random
import socket
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.clients import read_counters, run_grpc, run_http, scheduler_stats
from bench.report import ScenarioResult
from bench.workload import Workload, max_prefix_hit_tokens, random_workload, shared_prefix_workload
from deploy.stack import REPO_ROOT, Stack, StackConfig, start_stack, stop_stack

BLOCK_SIZE = 16
# The tiny model's worker runs one torch thread when the whole stack shares the machine's two cores:
# with two, each step's OpenMP threads spin at their barrier whenever the tokenizer, scheduler or
# client takes a core, and steps slow down 1.1-2.4x (measured: 1,422 and 1,473 tok/s with one
# thread, 625 and 1,275 with two, 1,124 and 1,081 with two and OMP_WAIT_POLICY=PASSIVE). The small
# model's steps are long enough that two threads still win (87 and 71 vs 71 and 60 tok/s).
TINY_STACK_WORKER_ARGS = ("--num-threads", "1")
_HIT_COUNTERS = ("switchyard_prefix_cache_hits_total", "switchyard_prefix_cache_queries_total")


@dataclass(frozen=True)
class Options:
    quick: bool = False  # few short requests on the tiny model: checks the harness, measures nothing
    models_dir: Path = REPO_ROOT / "models"
    roofline: dict[str, Any] | None = None  # bench/roofline.py's probe of this machine, taken at the start

    def model(self, preset: str) -> Path:
        """The preset's model directory, made the way `make model` does when missing."""
        preset = "tiny" if self.quick else preset
        path = self.models_dir / f"{preset}-llama"
        if not (path / "config.json").exists():
            from services.worker.make_model import make_model  # noqa: PLC0415 - loads torch only when needed

            print(f"  making model {path} ...", flush=True)
            make_model(preset, path)
        return path

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full


def vocab_size(model_dir: Path) -> int:
    """Prompts are token ids, so the model's vocabulary is all a workload needs to know of it."""
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def supports_flag(service: str, flag: str) -> bool:
    """Whether `python -m services.<service>` knows `flag`, from its own --help (config only, no torch)."""
    config = importlib.import_module(f"services.{service}.config")
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        config.parse_config(["--help"])
    return flag in text.getvalue()


def _peers() -> tuple[Any, str]:
    try:
        return importlib.import_module("bench.peers"), ""
    except ImportError as e:
        return None, f"bench.peers is not importable ({e})"


def _port_block(count: int) -> int:
    for _ in range(200):
        base = random.randrange(20000, 32000)  # below the ephemeral range, where clients' ports land
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError("no block of free ports")


@contextlib.contextmanager
def running_stack(model_dir: Path, *, num_workers: int = 1, worker_args: tuple[str, ...] = (),
                  scheduler_args: tuple[str, ...] = ()) -> Iterator[Stack]:
    """A whole stack on free ports, warmed up; stopped (and its run dir removed) on exit."""
    base = _port_block(2 * num_workers + 5)
    with tempfile.TemporaryDirectory(prefix="switchyard-bench-") as run_dir:
        config = StackConfig(
            run_dir=Path(run_dir), model_dir=model_dir, num_workers=num_workers, worker_args=worker_args,
            scheduler_args=scheduler_args, worker_base_port=base, worker_base_metrics_port=base + num_workers,
            scheduler_port=base + 2 * num_workers, scheduler_metrics_port=base + 2 * num_workers + 1,
            tokenizer_port=base + 2 * num_workers + 2, http_port=base + 2 * num_workers + 3,
            tokenizer_metrics_port=base + 2 * num_workers + 4, grace_s=2.0, stop_grace_s=10.0, timeout_s=180.0)
        print(f"  starting stack: {model_dir.name}, {num_workers} worker(s) {' '.join(worker_args)}"
              f" | scheduler {' '.join(scheduler_args) or '(defaults)'}", flush=True)
        t0 = time.perf_counter()
        stack = start_stack(config)
        try:
            print(f"  stack up in {time.perf_counter() - t0:.1f} s; warming up", flush=True)
            warm = random_workload("warmup", num_requests=4 * num_workers, prompt_len=(16, 48), output_len=(4, 8),
                                   vocab_size=vocab_size(model_dir), concurrency=4 * num_workers, seed=999)
            asyncio.run(run_grpc(stack.tokenizer_address, warm, label="warmup"))
            yield stack
        finally:
            stop_stack(Path(run_dir), grace_s=10.0, quiet=True)


def _grpc(stack: Stack, workload: Workload, label: str) -> tuple[list, float]:
    return asyncio.run(run_grpc(stack.tokenizer_address, workload, label=label))


def _peer(result: ScenarioResult, key: str, peers: Any, why: str, call: Callable[[Any], tuple[list, float]]) -> None:
    """Runs one peer into result.runs[key], or records why it was skipped."""
    if peers is None:
        result.skipped[key] = why
        return
    print(f"  running peer {key} ...", flush=True)
    try:
        records, duration_s = call(peers)
    except Exception as e:  # noqa: BLE001 - a broken peer is reported; the other runners still count
        traceback.print_exc()
        result.skipped[key] = f"failed: {type(e).__name__}: {e}"
        return
    result.add_run(key, records, duration_s)


def small_vs_hf(o: Options, r: ScenarioResult) -> None:
    model = o.model("small")
    w = random_workload("small_vs_hf", num_requests=o.pick(128, 8), prompt_len=o.pick((16, 512), (8, 32)),
                        output_len=o.pick((16, 256), (4, 16)), vocab_size=vocab_size(model), concurrency=o.pick(32, 4))
    batch_size = o.pick(32, 4)
    worker_args = ("--num-threads", "2", "--kv-cache-mib", "1024")
    r.config.update(model=model.name, workload=w.params, worker_args=worker_args, hf_static_batch_size=batch_size)
    with running_stack(model, worker_args=worker_args) as stack:
        r.add_run("stack", *_grpc(stack, w, "stack"))
    peers, why = _peers()
    _peer(r, "hf_static", peers, why, lambda p: p.run_hf_static(model, w, batch_size))
    _peer(r, "hf_continuous", peers, why, lambda p: p.run_hf_continuous(model, w))
    r.target("stack / hf_static output throughput", r.ratio("stack/hf_static", "stack", "hf_static"), ">=", 1.5, "x")
    r.target("stack / hf_continuous output throughput", r.ratio("stack/hf_continuous", "stack", "hf_continuous"),
             ">=", 4.0, "x")


def _engine_workload(o: Options, model: Path, name: str, num_requests: int, seed: int = 0,
                     concurrency: int | None = None) -> Workload:
    """Fixed 64-in/64-out requests (16/16 when quick): the engine-bound shape of (b), (e) and (f)."""
    return random_workload(name, num_requests=num_requests, prompt_len=o.pick((64, 64), (16, 16)),
                           output_len=o.pick((64, 64), (16, 16)), vocab_size=vocab_size(model),
                           concurrency=concurrency or o.pick(64, 8), seed=seed)


def tiny_stack_vs_engine(o: Options, r: ScenarioResult) -> None:
    """Alternates stack and engine runs and states the median of each round's ratio: this shared
    machine's speed drifts by tens of percent within minutes (the same engine run measured 2,083 and
    3,570 tok/s half an hour apart), and one pair of runs would mostly measure that drift."""
    model = o.model("tiny")
    w = _engine_workload(o, model, "tiny_stack_vs_engine", o.pick(256, 16))
    worker_args = TINY_STACK_WORKER_ARGS
    num_rounds = o.pick(3, 1)
    r.config.update(model=model.name, workload=w.params, worker_args=worker_args, in_process_num_threads=2,
                    num_rounds=num_rounds)
    peers, why = _peers()
    ratios = []
    for i in range(num_rounds):
        suffix = "" if i == 0 else f"_{i + 1}"  # round 1 keeps the plain names the plots and table use
        with running_stack(model, worker_args=worker_args) as stack:  # a fresh stack: same prompts, cold cache
            r.add_run(f"stack{suffix}", *_grpc(stack, w, f"stack{suffix}"))
        _peer(r, f"in_process{suffix}", peers, why, lambda p: p.run_in_process(model, w, num_threads=2))
        ratios.append(r.ratio(f"stack/in_process{suffix}", f"stack{suffix}", f"in_process{suffix}"))
    measured = [x for x in ratios if x is not None]
    r.target(f"stack / in-process engine output throughput (median of {num_rounds} alternating rounds)",
             statistics.median(measured) if measured else None, ">=", 0.9, "x")


def null_ttft(o: Options, r: ScenarioResult) -> None:
    model = o.model("tiny")
    w = random_workload("null_ttft", num_requests=o.pick(200, 20), prompt_len=(32, 32),
                        output_len=o.pick((8, 8), (4, 4)), vocab_size=vocab_size(model), concurrency=1)
    worker_args = ("--null-model", "--num-threads", "1")
    r.config.update(model=model.name, workload=w.params, worker_args=worker_args)
    if supports_flag("worker", "--null-model"):
        with running_stack(model, worker_args=worker_args) as stack:
            r.add_run("stack", *_grpc(stack, w, "stack"))
    else:
        r.skipped["stack"] = "the worker has no --null-model flag yet"
    peers, why = _peers()
    _peer(r, "in_process", peers, why, lambda p: p.run_in_process(model, w, null_model=True, num_threads=1))
    p50_s = r.metric("stack", "ttft_s", "p50")
    r.target("p50 TTFT through the full stack (null model)", None if p50_s is None else p50_s * 1000, "<=", 2.0, "ms")


def shared_prefix(o: Options, r: ScenarioResult) -> None:
    model = o.model("tiny")
    w = shared_prefix_workload("shared_prefix", num_groups=o.pick(8, 2), prefix_len=o.pick(512, 64),
                               suffix_len=o.pick(32, 16), num_requests=o.pick(256, 16), output_len=o.pick(32, 8),
                               vocab_size=vocab_size(model), concurrency=o.pick(32, 4))
    # KV sized so one worker holds about half of the prefixes plus its running requests (255 usable
    # blocks; 8 prefixes need 256 on their own): routing that keeps each prefix on one worker
    # fits, routing that spreads them evicts. With room for everything everywhere, any routing
    # hits almost always and the comparison would measure nothing.
    kv_args = o.pick(("--num-blocks", "256"), ())
    worker_args = ("--num-threads", "1", "--block-size", str(BLOCK_SIZE), *kv_args)
    max_rate = max_prefix_hit_tokens(w, BLOCK_SIZE) / w.num_prompt_tokens
    r.config.update(model=model.name, workload=w.params, worker_args=worker_args, num_workers=2,
                    max_prefix_hit_rate=max_rate)
    has_routing = supports_flag("scheduler", "--routing")
    for routing in ("cache_aware", "round_robin"):
        if not has_routing and routing == "round_robin":
            r.skipped[routing] = "the scheduler has no --routing flag yet"
            continue
        scheduler_args = ("--routing", routing) if has_routing else ()
        with running_stack(model, num_workers=2, worker_args=worker_args, scheduler_args=scheduler_args) as stack:
            url = stack.metrics_urls["scheduler"]
            before = read_counters(url, _HIT_COUNTERS)
            records, duration_s = _grpc(stack, w, routing)
            after = read_counters(url, _HIT_COUNTERS)
            hits, queries = (after[n] - before[n] for n in _HIT_COUNTERS)
            rate = hits / queries if queries else None
            r.add_run(routing, records, duration_s, prefix_hit_rate=rate, max_prefix_hit_rate=max_rate,
                      hit_rate_vs_max=rate / max_rate if rate is not None and max_rate else None,
                      workers=scheduler_stats(stack.scheduler_address))
    r.target("cache-aware prefix hit rate / theoretical max", r.metric("cache_aware", "hit_rate_vs_max"),
             ">=", 0.95, "x")
    r.target("cache-aware / round-robin output throughput", r.ratio("cache_aware/round_robin", "cache_aware",
             "round_robin"), ">=", 1.5, "x")
    r.target("cache-aware / round-robin p50 TTFT", r.ratio("ttft_p50 cache_aware/round_robin", "cache_aware",
             "round_robin", "ttft_s", "p50"), "<", 1.0, "x")


def concurrency_sweep(o: Options, r: ScenarioResult) -> None:
    model = o.model("tiny")
    levels = o.pick((1, 4, 16, 64), (1, 4))
    worker_args = TINY_STACK_WORKER_ARGS
    r.config.update(model=model.name, levels=levels, worker_args=worker_args)
    with running_stack(model, worker_args=worker_args) as stack:
        for i, c in enumerate(levels):
            w = _engine_workload(o, model, f"sweep-c{c}", o.pick(64, 8), seed=i, concurrency=c)
            r.config["workload"] = {k: v for k, v in w.params.items() if k != "concurrency"}
            r.add_run(f"c{c}", *_grpc(stack, w, f"concurrency {c}"), concurrency=c)


def _guidellm(stack: Stack, model: Path, w: Workload) -> tuple[dict[str, Any] | None, str]:
    """GuideLLM (its own venv) against our own HTTP client on the HTTP workload's shape, or why not.

    `bench.guidellm_check.check`: after a warm-up, ours, GuideLLM's and ours again on fresh prompts,
    compared with the mean of our two runs, repeated while the machine was not steady. A single cold
    GuideLLM run against one earlier run of ours measures the machine's drift as much as the clients.
    """
    try:
        check = importlib.import_module("bench.guidellm_check")
    except ImportError as e:
        return None, f"bench.guidellm_check is not importable ({e})"
    if not check.available():
        return None, f"GuideLLM is not installed at {check.guidellm_venv()} (`make bench-tools`)"
    print("  running guidellm (bracketed by our client) ...", flush=True)
    (prompt_tokens, _), (output_tokens, _) = w.params["prompt_len"], w.params["output_len"]
    try:
        return check.check(stack.http_url, model, num_requests=len(w.requests), concurrency=w.concurrency,
                           prompt_tokens=prompt_tokens, output_tokens=output_tokens, out_dir=check.RESULTS_DIR,
                           worker_metrics_urls=check.worker_metrics_urls(stack)), ""
    except Exception as e:  # noqa: BLE001 - GuideLLM failing is reported, our own runs still count
        return None, f"failed: {type(e).__name__}: {e}"


def http_api(o: Options, r: ScenarioResult) -> None:
    model = o.model("tiny")
    n = o.pick(64, 8)
    grpc_w = _engine_workload(o, model, "http_api-grpc", n, seed=1)
    http_w = _engine_workload(o, model, "http_api-http", n, seed=2)
    worker_args = TINY_STACK_WORKER_ARGS
    r.config.update(model=model.name, workload=grpc_w.params, worker_args=worker_args)
    with running_stack(model, worker_args=worker_args) as stack:
        r.add_run("grpc", *_grpc(stack, grpc_w, "grpc"))
        r.add_run("http", *asyncio.run(run_http(stack.http_url, http_w, label="http")))
        guidellm, why = _guidellm(stack, model, http_w)
    r.ratio("http/grpc", "http", "grpc")
    if guidellm is None:
        r.skipped["guidellm"] = why
        return
    r.config["guidellm"] = {k: v for k, v in guidellm.items() if not isinstance(v, (dict, list))}
    r.config["guidellm_rounds"] = guidellm.get("rounds", [])
    r.ratios["guidellm/http"] = ratio = guidellm.get("ratio")
    r.target("guidellm vs bench.clients HTTP output throughput: abs(ratio - 1)", None if ratio is None else abs(ratio - 1),
             "<=", 0.10)


SCENARIOS: dict[str, tuple[Callable[[Options, ScenarioResult], None], str]] = {
    "small_vs_hf": (small_vs_hf, "Small model (~100M) through the full stack vs Hugging Face `generate` on "
                    "static batches and transformers' own continuous batching."),
    "tiny_stack_vs_engine": (tiny_stack_vs_engine, "The full stack (tokenizer, scheduler, worker processes) vs "
                             "the same engine in one process: the cost of the microservice split."),
    "null_ttft": (null_ttft, "A null-model worker (no compute) at concurrency 1: pure serving overhead on TTFT."),
    "shared_prefix": (shared_prefix, "Shared long prefixes on 2 workers: cache-aware routing vs round robin."),
    "concurrency_sweep": (concurrency_sweep, "Output throughput and TTFT as concurrency grows (1 worker)."),
    "http_api": (http_api, "The OpenAI-compatible HTTP API vs gRPC on one workload (and guidellm when set up)."),
}
