"""The batch wait (--batch-wait-ms) in the Batcher, on a fake clock: when an idle worker's first step
holds for company and when it goes, one rule per test (services/scheduler/batch_wait.py)."""

from __future__ import annotations

import math

import pytest

from services.scheduler.batch_wait import BatchWait
from services.scheduler.batcher import Batcher, StepPlan
from services.scheduler.request import FinishReason, Request
from shared.errors import InvalidArgument
from tests.scheduler.fakes import greedy_tokens, make_pair, make_request, run_until_idle, step

WAIT_MS = 10.0


class FakeClock:
    def __init__(self, now_s: float = 100.0) -> None:
        self.now_s = now_s

    def advance(self, ms: float) -> float:
        self.now_s += ms / 1000
        return self.now_s


def prompt(n: int, start: int = 1) -> list[int]:
    return [(start + 7 * i) % 50 + 1 for i in range(n)]


def arrive(batcher: Batcher, clock: FakeClock, request_id: str, num_tokens: int = 6, **kw: object) -> Request:
    # Distinct prompts: one sharing a prefix being computed would wait for it, not join the step.
    request = make_request(request_id, prompt(num_tokens, sum(map(ord, request_id))), arrival_s=clock.now_s, **kw)
    batcher.add(request)
    return request


def new_ids(plan: StepPlan) -> list[str]:
    return [n.request.request_id for n in plan.new_requests]


def shape(plan: StepPlan) -> list[tuple[str, int, int]]:
    """What a step computes, without its step id."""
    return [(n.request.request_id, n.num_computed_tokens, n.num_scheduled_tokens) for n in plan.new_requests] + [
        (c.request_id, c.num_computed_tokens, c.num_scheduled_tokens) for c in plan.cached_requests]


def test_an_idle_worker_holds_its_first_step_for_one_arrival() -> None:
    clock = FakeClock()
    batcher, _ = make_pair(batch_wait_ms=WAIT_MS)
    arrive(batcher, clock, "a")
    until_s = batcher.hold_until_s(clock.now_s)
    assert until_s == pytest.approx(clock.now_s + WAIT_MS / 1000)
    assert batcher.hold_until_s(clock.advance(4)) == until_s  # the window does not move while it waits


def test_a_second_arrival_within_the_window_joins_the_first_step() -> None:
    clock = FakeClock()
    batcher, worker = make_pair(batch_wait_ms=WAIT_MS)
    arrive(batcher, clock, "a")
    until_s = batcher.hold_until_s(clock.now_s)
    clock.advance(4)
    arrive(batcher, clock, "b")
    assert batcher.hold_until_s(clock.now_s) == until_s  # counted from the first arrival, not extended
    clock.advance(6)
    assert batcher.hold_until_s(clock.now_s) is None
    plan, _ = step(batcher, worker)
    assert new_ids(plan) == ["a", "b"]


def test_the_wait_expires_and_the_step_goes() -> None:
    clock = FakeClock()
    batcher, worker = make_pair(batch_wait_ms=WAIT_MS)
    request = arrive(batcher, clock, "a", max_tokens=3)
    assert batcher.hold_until_s(clock.advance(WAIT_MS - 0.1)) is not None
    assert batcher.hold_until_s(clock.advance(0.1)) is None
    plan, _ = step(batcher, worker)
    assert new_ids(plan) == ["a"]
    run_until_idle(batcher, worker)
    assert request.output_token_ids == greedy_tokens(request.prompt_token_ids, max_tokens=3)[0]


def test_a_batch_full_by_max_num_seqs_goes_at_once() -> None:
    clock = FakeClock()
    batcher, worker = make_pair(batch_wait_ms=WAIT_MS, max_num_seqs=2)
    arrive(batcher, clock, "a")
    assert batcher.hold_until_s(clock.now_s) is not None
    clock.advance(1)
    arrive(batcher, clock, "b")
    assert batcher.hold_until_s(clock.now_s) is None
    assert new_ids(step(batcher, worker)[0]) == ["a", "b"]


def test_a_batch_full_by_the_token_budget_goes_at_once() -> None:
    clock = FakeClock()
    batcher, _ = make_pair(batch_wait_ms=WAIT_MS, max_num_batched_tokens=16)
    arrive(batcher, clock, "a", num_tokens=10)
    assert batcher.hold_until_s(clock.now_s) is not None  # 10 of 16 tokens: room for company
    arrive(batcher, clock, "b", num_tokens=6)
    assert batcher.hold_until_s(clock.now_s) is None
    batcher.take_waiting()
    arrive(batcher, clock, "long", num_tokens=40)  # one prompt over the budget fills a step alone
    assert batcher.hold_until_s(clock.now_s) is None


def test_a_busy_worker_never_waits() -> None:
    clock = FakeClock()
    batcher, worker = make_pair(batch_wait_ms=WAIT_MS)
    arrive(batcher, clock, "a", max_tokens=8, ignore_eos=True)
    clock.advance(WAIT_MS)
    step(batcher, worker)
    arrive(batcher, clock, "b")
    assert batcher.hold_until_s(clock.now_s) is None  # "a" is running: "b" joins its next step
    assert new_ids(step(batcher, worker)[0]) == ["b"]
    # Nothing running but a step in flight (its only request aborted meanwhile) is busy too.
    batcher, worker = make_pair(batch_wait_ms=WAIT_MS)
    arrive(batcher, clock, "c")
    clock.advance(WAIT_MS)
    in_flight = batcher.schedule()
    batcher.abort("c")
    arrive(batcher, clock, "d")
    assert batcher.hold_until_s(clock.now_s, lookahead=True) is None
    assert batcher.hold_until_s(clock.now_s) is not None  # the same queue, idle: it would hold
    assert new_ids(batcher.schedule(lookahead=True)) == ["d"] and new_ids(in_flight) == ["c"]


def test_requests_that_queued_behind_a_busy_worker_are_not_held_again() -> None:
    clock = FakeClock()
    batcher, worker = make_pair(batch_wait_ms=WAIT_MS, max_num_seqs=1)
    arrive(batcher, clock, "a", max_tokens=4)
    clock.advance(WAIT_MS)
    step(batcher, worker)
    arrive(batcher, clock, "b")  # queued: max_num_seqs is 1
    while batcher.num_running:
        clock.advance(20)
        step(batcher, worker)
    assert batcher.num_waiting == 1
    assert batcher.hold_until_s(clock.now_s) is None  # idle again, but "b" already waited longer


def test_the_hold_ends_at_a_deadline_and_an_abort_needs_no_wait() -> None:
    clock = FakeClock()
    batcher, _ = make_pair(batch_wait_ms=WAIT_MS)
    start_s = clock.now_s
    arrive(batcher, clock, "patient")
    arrive(batcher, clock, "hurried", deadline_s=start_s + 0.004)
    assert batcher.hold_until_s(clock.now_s) == pytest.approx(start_s + 0.004)  # the loop wakes to expire it
    [event] = batcher.expire(clock.advance(4))
    assert event.request_id == "hurried" and event.finish_reason is FinishReason.ABORT
    assert batcher.hold_until_s(clock.now_s) == pytest.approx(start_s + WAIT_MS / 1000)
    aborted = batcher.abort("patient")
    assert aborted is not None and aborted.finish_reason is FinishReason.ABORT
    assert batcher.hold_until_s(clock.now_s) is None and not batcher.has_work()  # nothing left to hold


def test_zero_never_waits_and_the_wait_changes_when_a_step_goes_never_what_it_holds() -> None:
    def run(batch_wait_ms: float) -> tuple[list[list[tuple[str, int, int]]], list[float | None]]:
        clock = FakeClock()
        batcher, worker = make_pair(batch_wait_ms=batch_wait_ms, max_num_batched_tokens=64, max_num_seqs=8)
        holds, plans = [], []
        for i, n in enumerate((5, 9, 3, 14, 7)):
            arrive(batcher, clock, f"r{i}", num_tokens=n, max_tokens=3)
        while batcher.has_work():
            holds.append(batcher.hold_until_s(clock.now_s))
            clock.advance(WAIT_MS)  # past any hold
            plans.append(shape(step(batcher, worker)[0]))
        return plans, holds

    plans_off, holds_off = run(0.0)
    plans_on, holds_on = run(WAIT_MS)
    assert holds_off and all(h is None for h in holds_off)
    assert holds_on[0] is not None and all(h is None for h in holds_on[1:])  # idle once, busy after
    assert plans_on == plans_off
    batcher, _ = make_pair()
    assert batcher.batch_wait == BatchWait(0.0)


@pytest.mark.parametrize("value", [-1.0, -0.001, math.nan, math.inf])
def test_a_negative_or_non_finite_wait_is_refused_with_the_field(value: float) -> None:
    with pytest.raises(InvalidArgument, match="batch_wait_ms") as err:
        make_pair(batch_wait_ms=value)
    assert err.value.field == "batch_wait_ms"

