"""The worker's step metrics: counted from the StepResult, cleanup-only steps skipped, state read
when scraped."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import REGISTRY

from services.worker.metrics import WorkerMetrics
from services.worker.step import RequestResult, StepResult


def value(name: str, worker: str) -> float:
    return REGISTRY.get_sample_value(name, {"worker": worker}) or 0.0


def test_steps_are_counted_and_state_is_read_at_scrape_time() -> None:
    executor = SimpleNamespace(runner=SimpleNamespace(num_blocks=64), requests={"a": None})
    worker_metrics = WorkerMetrics("w-test", executor)  # type: ignore[arg-type]
    assert value("switchyard_worker_kv_blocks", "w-test") == 64
    assert value("switchyard_worker_requests", "w-test") == 1
    outputs = (RequestResult("a", (5,)), RequestResult("b", (), (), "non-finite logits"))
    worker_metrics.observe_step(StepResult(1, outputs, 0.02, num_requests=3, num_prefill_tokens=30,
                                           num_decode_tokens=2))
    worker_metrics.observe_step(StepResult(2, (), 0.0001))  # only dropped finished requests
    assert value("switchyard_step_duration_seconds_count", "w-test") == 1
    assert value("switchyard_step_batch_size_sum", "w-test") == 3
    assert value("switchyard_step_prefill_tokens_total", "w-test") == 30
    assert value("switchyard_step_decode_tokens_total", "w-test") == 2
    assert value("switchyard_sampler_errors_total", "w-test") == 1
    executor.requests.clear()
    assert value("switchyard_worker_requests", "w-test") == 0
