"""Fixed-seed workloads: what every runner (our stack, the in-process engine, the Hugging Face
peers) is given, so results of one run compare like with like.

Prompts are token ids drawn from the model's vocabulary, not text, so every runner sees exactly
the same prompt lengths (no tokenizer drift between peers). Outputs run to `max_tokens` (the
benchmarks set ignore_eos), which makes output lengths part of the workload too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkloadRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    arrival_s: float = 0.0  # offset from the start for open-loop (Poisson) runs; 0 in closed loop
    session_id: str = ""
    # Past greedy-to-max_tokens, which every runner replays; only the gRPC driver sends these.
    temperature: float = 0.0
    seed: int | None = None  # sampled requests: seeded, so runs repeat
    ignore_eos: bool = True  # False for constrained output: a finished grammar allows only EOS
    json_schema: str = ""  # non-empty: response_format json_schema with this schema (JSON text)


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[WorkloadRequest, ...]
    concurrency: int | None = None  # closed loop: at most this many in flight
    request_rate: float | None = None  # open loop: Poisson arrivals per second
    seed: int = 0
    params: dict = field(default_factory=dict)  # how it was made, for the results file

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)


def _lengths(rng: random.Random, count: int, low: int, high: int) -> list[int]:
    return [rng.randint(low, high) for _ in range(count)]


def _arrivals(rng: random.Random, count: int, request_rate: float | None) -> list[float]:
    if not request_rate:
        return [0.0] * count
    t, times = 0.0, []
    for _ in range(count):
        t += rng.expovariate(request_rate)
        times.append(t)
    return times


def random_workload(
    name: str, *, num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
    vocab_size: int, concurrency: int | None = None, request_rate: float | None = None, seed: int = 0,
    first_token_id: int = 8,
) -> Workload:
    """Independent prompts with uniformly drawn prompt and output lengths (inclusive ranges).

    `first_token_id` keeps special tokens (BOS, EOS, chat markers) out of the prompts."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(first_token_id, vocab_size) for _ in range(n)]
               for n in _lengths(rng, num_requests, *prompt_len)]
    outputs = _lengths(rng, num_requests, *output_len)
    arrivals = _arrivals(rng, num_requests, request_rate)
    requests = tuple(WorkloadRequest(f"{name}-{i}", tuple(p), o, a)
                     for i, (p, o, a) in enumerate(zip(prompts, outputs, arrivals)))
    params = dict(num_requests=num_requests, prompt_len=list(prompt_len), output_len=list(output_len),
                  concurrency=concurrency, request_rate=request_rate)
    return Workload(name, requests, concurrency, request_rate, seed, params)


def shared_prefix_workload(
    name: str, *, num_groups: int, prefix_len: int, suffix_len: int, num_requests: int, output_len: int,
    vocab_size: int, concurrency: int | None = None, seed: int = 0, first_token_id: int = 8,
) -> Workload:
    """`num_groups` long prefixes shared by many requests, each with a unique suffix.

    Requests of one group carry the group as their session id only in the `params`, not on the
    request: cache-aware routing must find the overlap from the prefix index, not be told."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(first_token_id, vocab_size) for _ in range(prefix_len)] for _ in range(num_groups)]
    requests = []
    for i in range(num_requests):
        group = rng.randrange(num_groups)
        suffix = [rng.randrange(first_token_id, vocab_size) for _ in range(suffix_len)]
        requests.append(WorkloadRequest(f"{name}-{i}", tuple(prefixes[group] + suffix), output_len))
    params = dict(num_groups=num_groups, prefix_len=prefix_len, suffix_len=suffix_len,
                  num_requests=num_requests, output_len=output_len, concurrency=concurrency)
    return Workload(name, tuple(requests), concurrency, None, seed, params)


def prefix_rounds_workload(
    name: str, *, num_prefixes: int, prefix_len: int, suffix_len: int, num_rounds: int, output_len: int,
    vocab_size: int, concurrency: int | None = None, seed: int = 0, first_token_id: int = 8,
) -> Workload:
    """`num_prefixes` long prefixes, each visited once per round in a freshly shuffled order, each
    visit with its own unique suffix: a working set that is scanned again and again.

    Unlike shared_prefix_workload's random draws, every prefix comes back exactly `num_rounds` times
    and, a round boundary aside, about `num_prefixes` other requests pass between two visits of
    one prefix: the reuse distance is the working set, which is what a cache smaller than it must
    fail at (an LRU cache a fraction of it never hits)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(first_token_id, vocab_size) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    requests = []
    for round_index in range(num_rounds):
        order = list(range(num_prefixes))
        rng.shuffle(order)
        for group in order:
            suffix = [rng.randrange(first_token_id, vocab_size) for _ in range(suffix_len)]
            requests.append(WorkloadRequest(f"{name}-{len(requests)}", tuple(prefixes[group] + suffix), output_len))
    params = dict(num_prefixes=num_prefixes, prefix_len=prefix_len, suffix_len=suffix_len, num_rounds=num_rounds,
                  num_requests=len(requests), output_len=output_len, concurrency=concurrency)
    return Workload(name, tuple(requests), concurrency, None, seed, params)


def max_prefix_hit_tokens(workload: Workload, block_size: int) -> int:
    """The prompt tokens a perfect prefix cache could serve: for every request after the first of
    its prefix, the full blocks it shares with an earlier request (per worker it is at most this)."""
    seen: set[tuple[int, ...]] = set()
    total = 0
    for request in workload.requests:
        ids = request.prompt_token_ids
        usable = (len(ids) - 1) // block_size  # the last token is always computed
        hit = 0
        for b in range(usable):
            key = ids[: (b + 1) * block_size]
            if key in seen:
                hit = b + 1
            else:
                break
        for b in range(usable):
            seen.add(ids[: (b + 1) * block_size])
        total += hit * block_size
    return total
