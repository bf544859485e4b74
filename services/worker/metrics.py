"""The worker's Prometheus metrics: what happens inside a step, labelled {worker} (its listen address).

A worker sees batches, not requests: per-request latency and token counts are the scheduler's
(it alone knows when a token reaches a client), so the worker exports only step cost and shape,
and the state it holds. Step numbers come from the `StepResult` the executor already returns;
the counts of held requests and KV blocks are read at scrape time, so they are right between
steps and after a Reset without a hook of their own.

Definitions are module level (a process registers each metric once); workers started side by
side in one process, as in tests, share them and differ by their worker label.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from services.worker.step import StepResult
from shared.telemetry import LATENCY_BUCKETS_S

if TYPE_CHECKING:  # the executor pulls in torch; the dashboard test imports this module without it
    from services.worker.executor import Executor

# Requests per step: powers of two up to well past any CPU batch (max_num_seqs defaults to 128).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

STEP_DURATION = Histogram(
    "switchyard_step_duration_seconds", "Time to execute one step (model forward and sampling).",
    ("worker",), buckets=LATENCY_BUCKETS_S)
STEP_BATCH_SIZE = Histogram(
    "switchyard_step_batch_size", "Requests computed in one step.", ("worker",), buckets=BATCH_SIZE_BUCKETS)
STEP_PREFILL_TOKENS = Counter(
    "switchyard_step_prefill_tokens_total", "Tokens computed at prompt positions.", ("worker",))
STEP_DECODE_TOKENS = Counter(
    "switchyard_step_decode_tokens_total",
    "Tokens computed at generated positions (decodes, and their recomputation after a preemption).", ("worker",))
WORKER_REQUESTS = Gauge("switchyard_worker_requests", "Requests the worker holds state for.", ("worker",))
WORKER_KV_BLOCKS = Gauge("switchyard_worker_kv_blocks", "KV blocks in the worker's pool (constant).", ("worker",))
SAMPLER_ERRORS = Counter(
    "switchyard_sampler_errors_total", "Batch rows that failed alone (non-finite logits).", ("worker",))


class WorkerMetrics:
    """The metric children of one worker, bound once so a step pays no label lookups."""

    def __init__(self, worker: str, executor: Executor) -> None:
        self.worker = worker
        self._duration = STEP_DURATION.labels(worker)
        self._batch_size = STEP_BATCH_SIZE.labels(worker)
        self._prefill_tokens = STEP_PREFILL_TOKENS.labels(worker)
        self._decode_tokens = STEP_DECODE_TOKENS.labels(worker)
        self._sampler_errors = SAMPLER_ERRORS.labels(worker)
        WORKER_KV_BLOCKS.labels(worker).set(executor.runner.num_blocks)
        WORKER_REQUESTS.labels(worker).set_function(lambda: len(executor.requests))

    def observe_step(self, result: StepResult) -> None:
        """Records one executed step.

        A step that only drops finished requests runs no model; counting it would pull the duration
        and batch-size distributions towards zero without describing any compute.
        """
        if result.num_requests == 0:
            return
        self._duration.observe(result.execute_duration_s)
        self._batch_size.observe(result.num_requests)
        self._prefill_tokens.inc(result.num_prefill_tokens)
        self._decode_tokens.inc(result.num_decode_tokens)
        num_errors = sum(1 for output in result.outputs if output.error)
        if num_errors:
            self._sampler_errors.inc(num_errors)
