"""Per-request timings and the summary metrics, with vLLM's definitions.

- TTFT: send → first output token.
- TPOT: (e2e − TTFT) / (output tokens − 1), per request (requests with one token are skipped).
- ITL: every gap between consecutive output-token arrivals (a delivery of k tokens after a gap of
  g counts as k gaps of g/k, so batched deliveries do not hide latency).
- E2E: send → last token.
- Throughput: completed requests and output tokens divided by the benchmark's wall time.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Sequence

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    request_id: str
    num_prompt_tokens: int
    start_s: float  # when the request was sent (time.perf_counter)
    token_times_s: list[float] = field(default_factory=list)  # arrival time of each output token
    end_s: float = 0.0
    num_cached_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    error: str = ""

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.start_s if self.token_times_s else None

    @property
    def e2e_s(self) -> float | None:
        return self.token_times_s[-1] - self.start_s if self.token_times_s else None

    @property
    def tpot_s(self) -> float | None:
        if self.num_output_tokens < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (self.num_output_tokens - 1)

    def itls_s(self) -> list[float]:
        gaps, times = [], self.token_times_s
        i = 1
        while i < len(times):
            j = i
            while j + 1 < len(times) and times[j + 1] == times[i]:
                j += 1  # tokens delivered together share a timestamp
            k = j - i + 1
            gaps.extend([(times[i] - times[i - 1]) / k] * k)
            i = j + 1
        return gaps


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {"mean": statistics.fmean(values) if values else None}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    return out


def summarize(records: Sequence[RequestRecord], duration_s: float) -> dict:
    """The summary every runner reports: counts, throughput and latency distributions (seconds)."""
    ok = [r for r in records if not r.error]
    num_output = sum(r.num_output_tokens for r in ok)
    return {
        "num_requests": len(records),
        "num_completed": len(ok),
        "num_failed": len(records) - len(ok),
        "duration_s": duration_s,
        "num_prompt_tokens": sum(r.num_prompt_tokens for r in ok),
        "num_output_tokens": num_output,
        "num_cached_tokens": sum(r.num_cached_tokens for r in ok),
        "request_throughput_per_s": len(ok) / duration_s if duration_s > 0 else None,
        "output_throughput_tokens_per_s": num_output / duration_s if duration_s > 0 else None,
        "ttft_s": _stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": _stats([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": _stats([g for r in ok for g in r.itls_s()]),
        "e2e_s": _stats([r.e2e_s for r in ok if r.e2e_s is not None]),
    }
