"""`host_tier` (letter l): what the host-memory KV tier (L2, the worker's `--kv-host-cache-mib`)
buys when the prefixes in use do not fit the device pool (L1).

The tiny model on one worker, closed loop. The device pool is sized to exactly the running batch:
`concurrency` requests of prefix + suffix + output tokens (8 x 18 blocks of 16 tokens = 144 usable
blocks in the full run), so every request can run at once and L1 holds at most N = 144 / 16 = 9
prefixes' blocks. The workload scans 4N = 36 distinct prefixes (576 blocks, 4x L1) in rounds, each
round visiting every prefix once in a fresh shuffled order with its own unique suffix
(`prefix_rounds_workload`): about 36 requests pass between two visits of one prefix, so under the
LRU eviction an L1 a quarter of the working set has long evicted a prefix when it comes back. Without
L2 that prefix is computed again; with L2 (64 MiB: 1,024 blocks of the tiny model's float32 KV,
2,048 in bfloat16; room for the whole working set and every unique suffix block either way) it is
copied back up instead.

The same workload runs twice, each on a fresh stack (cold caches in both tiers): `--kv-host-cache-mib
0` and then 64. Each run records output throughput, TTFT, the scheduler's prefix hit tokens per tier
(`switchyard_prefix_cache_hits_total{tier=...}`, read before and after the run so the warm-up does
not count) against the most any cache could serve (`max_prefix_hit_tokens`), and the host blocks
cached at the end (GetStats). The first round is cold in both runs (nothing to hit yet), so the
ratios understate the steady state by about 1/num_rounds.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Callable

from bench.clients import read_counter_by_label, read_counters, run_grpc, scheduler_stats
from bench.report import ScenarioResult
from bench.scenarios import BLOCK_SIZE, TINY_STACK_WORKER_ARGS, Options, running_stack, vocab_size
from bench.workload import Workload, max_prefix_hit_tokens, prefix_rounds_workload

_HITS = "switchyard_prefix_cache_hits_total"
_QUERIES = "switchyard_prefix_cache_queries_total"
WORKING_SET_VS_DEVICE = 4  # distinct prefix blocks / usable device blocks
HOST_CACHE_MIB = 64  # the tiny model's KV is 64 KiB a block in float32: 1,024 blocks, past the whole working set


@dataclass(frozen=True)
class Shape:
    """The workload and device pool, sized from one another (see the module docstring)."""

    concurrency: int
    prefix_len: int  # tokens, a multiple of BLOCK_SIZE so a hit covers the whole prefix
    suffix_len: int
    output_len: int
    num_rounds: int

    @property
    def blocks_per_request(self) -> int:
        return -(-(self.prefix_len + self.suffix_len + self.output_len) // BLOCK_SIZE)

    @property
    def num_device_blocks_usable(self) -> int:
        # Exactly the running batch: all `concurrency` requests fit at once (no run queues for
        # blocks), and whatever they leave behind is all L1 can keep.
        return self.concurrency * self.blocks_per_request

    @property
    def device_prefixes(self) -> int:
        """N: the most prefixes whose blocks L1 holds."""
        return self.num_device_blocks_usable // (self.prefix_len // BLOCK_SIZE)

    @property
    def num_prefixes(self) -> int:
        return WORKING_SET_VS_DEVICE * self.device_prefixes

    @property
    def working_set_blocks(self) -> int:
        return self.num_prefixes * (self.prefix_len // BLOCK_SIZE)


FULL = Shape(concurrency=8, prefix_len=256, suffix_len=16, output_len=16, num_rounds=5)
QUICK = Shape(concurrency=2, prefix_len=64, suffix_len=16, output_len=4, num_rounds=2)


def _workload(shape: Shape, vocab: int) -> Workload:
    return prefix_rounds_workload("host_tier", num_prefixes=shape.num_prefixes, prefix_len=shape.prefix_len,
                                  suffix_len=shape.suffix_len, num_rounds=shape.num_rounds,
                                  output_len=shape.output_len, vocab_size=vocab, concurrency=shape.concurrency,
                                  seed=3)


def _hits_by_tier(url: str) -> dict[str, float]:
    hits = read_counter_by_label(url, _HITS, "tier")
    return {"device": hits.get("device", 0.0), "host": hits.get("host", 0.0),
            "queries": read_counters(url, (_QUERIES,))[_QUERIES]}


def _key(host_cache_mib: int) -> str:
    return "with_l2" if host_cache_mib else "without_l2"


def host_tier(o: Options, r: ScenarioResult) -> None:
    model = o.model("tiny")
    shape = o.pick(FULL, QUICK)
    w = _workload(shape, vocab_size(model))
    max_hit_tokens = max_prefix_hit_tokens(w, BLOCK_SIZE)
    num_device_blocks = shape.num_device_blocks_usable + 1  # + the null block
    base_args = (*TINY_STACK_WORKER_ARGS, "--block-size", str(BLOCK_SIZE), "--num-blocks", str(num_device_blocks))
    r.config.update(model=model.name, workload=w.params, worker_args=base_args, shape=asdict(shape),
                    device_blocks_usable=shape.num_device_blocks_usable, device_prefixes=shape.device_prefixes,
                    working_set_blocks=shape.working_set_blocks,
                    working_set_vs_device=shape.working_set_blocks / shape.num_device_blocks_usable,
                    host_cache_mib=[0, HOST_CACHE_MIB], max_prefix_hit_tokens=max_hit_tokens)
    for host_cache_mib in (0, HOST_CACHE_MIB):
        key = _key(host_cache_mib)
        worker_args = (*base_args, "--kv-host-cache-mib", str(host_cache_mib))
        with running_stack(model, worker_args=worker_args) as stack:
            url = stack.metrics_urls["scheduler"]
            before = _hits_by_tier(url)  # the warm-up's lookups are not this run's
            records, duration_s = asyncio.run(run_grpc(stack.tokenizer_address, w, label=key))
            after = _hits_by_tier(url)
            workers = scheduler_stats(stack.scheduler_address)
        hits = {tier: after[tier] - before[tier] for tier in after}
        num_hit_tokens = hits["device"] + hits["host"]
        r.add_run(key, records, duration_s, host_cache_mib=host_cache_mib,
                  prefix_hit_tokens_device=hits["device"], prefix_hit_tokens_host=hits["host"],
                  prefix_hit_rate=num_hit_tokens / hits["queries"] if hits["queries"] else None,
                  hit_tokens_vs_max=num_hit_tokens / max_hit_tokens if max_hit_tokens else None,
                  host_blocks_cached=sum(s["num_host_blocks_cached"] for s in workers), workers=workers)
        print(f"    {key}: hit tokens device {hits['device']:.0f}, host {hits['host']:.0f} "
              f"(max {max_hit_tokens}); TTFT p50 {_ms(r.metric(key, 'ttft_s', 'p50'))}", flush=True)
    with_l2, without = _key(HOST_CACHE_MIB), _key(0)
    throughput = r.ratio(f"{with_l2}/{without}", with_l2, without)
    ttft_p50 = r.ratio(f"ttft_p50 {with_l2}/{without}", with_l2, without, "ttft_s", "p50")
    r.ratio(f"ttft_p90 {with_l2}/{without}", with_l2, without, "ttft_s", "p90")
    r.target("with L2 / without: output throughput", throughput, ">", 1.0, "x")
    r.target("with L2 / without: TTFT p50", ttft_p50, "<", 1.0, "x")
    r.target("with L2: host-tier prefix hit tokens", r.metric(with_l2, "prefix_hit_tokens_host"), ">", 0, "tokens")
    # L2 holds the whole working set, so only a prefix still being computed by a concurrent request
    # (a round boundary) should miss.
    r.target("with L2: prefix hit tokens / theoretical max", r.metric(with_l2, "hit_tokens_vs_max"), ">=", 0.9, "x")


def _ms(value_s: float | None) -> str:
    return "-" if value_s is None else f"{value_s * 1000:.1f} ms"


SCENARIOS: dict[str, tuple[Callable[[Options, ScenarioResult], None], str]] = {
    "host_tier": (host_tier, "Tiny model, 1 worker, a prefix working set 4x the device KV pool scanned in "
                  "shuffled rounds: output throughput, TTFT and prefix hits per tier without and with a "
                  f"{HOST_CACHE_MIB} MiB host KV tier (--kv-host-cache-mib)."),
}
