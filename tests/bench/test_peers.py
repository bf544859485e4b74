"""The comparison runners: our in-process engine and the two Hugging Face peers, on the tiny model."""

from __future__ import annotations

import pytest

from bench.engine import Admission, plan_to_step
from bench.peers import run_hf_continuous, run_hf_static, run_in_process
from bench.records import RequestRecord, summarize
from bench.workload import Workload, WorkloadRequest, random_workload
from services.worker.null_runner import next_token
from tests.reference import assert_greedy_matches, hf_greedy

# The first prompt makes the model emit EOS (id 2) as its third token: every runner must go on.
PROMPTS = [(11, 20, 30, 40, 51), (10, 20, 30, 40, 50, 60, 70), (100,) * 20, (7, 8, 9), tuple(range(300, 340))]
MAX_TOKENS = [8, 5, 3, 6, 4]
WORKLOAD = Workload(
    "peers", tuple(WorkloadRequest(f"r{i}", p, n) for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))),
    concurrency=3)


@pytest.fixture(scope="module")
def references(tiny_model_dir) -> dict:
    return {r.request_id: hf_greedy(tiny_model_dir, r.prompt_token_ids, r.max_tokens) for r in WORKLOAD.requests}


def check_records(records: list[RequestRecord], workload: Workload) -> None:
    assert [r.request_id for r in records] == [w.request_id for w in workload.requests]
    for record, wr in zip(records, workload.requests):
        assert not record.error, record.error
        assert record.num_prompt_tokens == len(wr.prompt_token_ids)
        assert len(record.output_token_ids) == record.num_output_tokens == wr.max_tokens, record.request_id
        times = record.token_times_s
        assert all(a <= b for a, b in zip(times, times[1:])), f"{record.request_id}: token times go back"
        assert record.start_s <= times[0] <= record.end_s + 1e-9 and times[-1] <= record.end_s + 1e-9


def check_greedy(records: list[RequestRecord], references: dict, label: str) -> None:
    for record in records:
        assert_greedy_matches(references[record.request_id], record.output_token_ids, f"{label} {record.request_id}")


def max_in_flight(records: list[RequestRecord]) -> int:
    """Most requests sent and not yet finished at any send time."""
    return max(sum(1 for o in records if o.start_s <= r.start_s < o.end_s) for r in records)


def test_admission_closed_open_and_offline() -> None:
    reqs = tuple(WorkloadRequest(f"r{i}", (1,), 1, arrival_s=0.1 * i) for i in range(4))
    closed = Admission(Workload("c", tuple(WorkloadRequest(r.request_id, (1,), 1) for r in reqs), concurrency=2), 10.0)
    assert [s for _, s in closed.due(10.0)] == [10.0, 10.0] and closed.due(99.0) == []
    assert closed.next_arrival_s() is None  # needs a finish first
    closed.release(11.0)
    assert [(r.request_id, s) for r, s in closed.due(11.5)] == [("r2", 11.0)]
    opened = Admission(Workload("o", reqs, request_rate=10.0), 10.0)
    assert [r.request_id for r, _ in opened.due(10.15)] == ["r0", "r1"]
    assert opened.next_arrival_s() == pytest.approx(10.2)
    assert [s for _, s in opened.due(20.0)] == pytest.approx([10.2, 10.3]) and opened.exhausted
    offline = Admission(Workload("x", tuple(WorkloadRequest(f"x{i}", (1,), 1) for i in range(3))), 5.0)
    assert [s for _, s in offline.due(5.0)] == [5.0] * 3 and offline.num_in_flight == 3 and offline.exhausted


def test_plan_to_step_matches_the_protobuf_round_trip() -> None:
    from services.scheduler import wire as scheduler_wire  # noqa: PLC0415
    from services.scheduler.batcher import Batcher  # noqa: PLC0415
    from services.scheduler.block_manager import BlockManager  # noqa: PLC0415
    from services.scheduler.request import Request  # noqa: PLC0415
    from shared.sampling_rules import SamplingParams  # noqa: PLC0415
    from services.worker import wire as worker_wire  # noqa: PLC0415

    batcher = Batcher(BlockManager(32, 4, "v1"), max_model_len=256, eos_token_ids=(2,), max_num_batched_tokens=8)
    batcher.add(Request("a", list(range(10, 20)), SamplingParams(temperature=0.5, top_k=3, seed=7), 4,
                        trace_context="00-abc-def-01"))
    batcher.add(Request("b", [5, 6], SamplingParams(), 2))
    first = batcher.schedule()  # a's first chunk of 8
    batcher.update(first, [])
    second = batcher.schedule()  # a's last 2 prompt tokens (cached) and b (new)
    batcher.abort("b")
    third = batcher.schedule()  # carries b in finished_request_ids
    for plan in (first, second, third):
        assert plan_to_step(plan) == worker_wire.step_from_pb(scheduler_wire.plan_to_pb(plan))
    assert second.cached_requests and second.new_requests and third.finished_request_ids == ("b",)


def test_in_process_matches_hf_greedy(tiny_model_dir, references) -> None:
    records, duration_s = run_in_process(tiny_model_dir, WORKLOAD, num_threads=1, num_blocks=64)
    check_records(records, WORKLOAD)
    check_greedy(records, references, "in-process")
    assert 1 <= max_in_flight(records) <= 3
    assert duration_s == pytest.approx(max(r.token_times_s[-1] for r in records) - min(r.start_s for r in records))
    assert summarize(records, duration_s)["num_output_tokens"] == sum(MAX_TOKENS)


def test_in_process_null_model_closed_and_open_loop(tiny_model_dir) -> None:
    closed = random_workload("closed", num_requests=12, prompt_len=(4, 40), output_len=(2, 9), vocab_size=4096,
                             concurrency=4, seed=3)
    records, _ = run_in_process(tiny_model_dir, closed, null_model=True, num_threads=1)
    check_records(records, closed)
    assert max_in_flight(records) == 4  # never more, and the slots are kept full
    for record, wr in zip(records, closed.requests):
        last, expected = wr.prompt_token_ids[-1], []
        for _ in range(wr.max_tokens):
            last = next_token(last, 4096)
            expected.append(last)
        assert record.output_token_ids == expected

    opened = random_workload("open", num_requests=6, prompt_len=(4, 8), output_len=(2, 3), vocab_size=4096,
                             request_rate=100.0, seed=4)
    records, _ = run_in_process(tiny_model_dir, opened, null_model=True, num_threads=1)
    check_records(records, opened)
    t0 = records[0].start_s - opened.requests[0].arrival_s
    for record, wr in zip(records, opened.requests):
        assert record.start_s == pytest.approx(t0 + wr.arrival_s)  # sent at its arrival, not when admitted


def test_hf_static_counts_only_each_requests_own_tokens(tiny_model_dir, references) -> None:
    records, duration_s = run_hf_static(tiny_model_dir, WORKLOAD, batch_size=2, num_threads=1)
    check_records(records, WORKLOAD)
    check_greedy(records, references, "hf static")
    # The first batch ran 8 steps for both members; r1 counts its 5, at the first 5 steps' times.
    assert records[1].token_times_s == records[0].token_times_s[:5]
    assert records[0].end_s == records[1].end_s
    assert duration_s > 0


def test_hf_continuous_batching(tiny_model_dir, references) -> None:
    try:
        records, duration_s = run_hf_continuous(tiny_model_dir, WORKLOAD, num_threads=1)
    except RuntimeError as e:
        pytest.skip(f"HF continuous batching cannot run here: {e}")
    check_records(records, WORKLOAD)
    check_greedy(records, references, "hf continuous")
    assert 1 <= max_in_flight(records) <= 3
    assert duration_s > 0
