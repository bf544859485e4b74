"""Async scheduling in the Batcher: step N+1 planned while step N is in flight, one rule per test.

The fake worker executes a plan when it is "sent" and the batcher sees the outputs only at
`update`, as with the real Steps stream; it refuses any plan a real worker would refuse.
"""

from __future__ import annotations

from services.scheduler.request import FinishReason, RequestStatus
from tests.scheduler.fakes import greedy_tokens, lookahead_steps, make_pair, make_request


def prompt(n: int, start: int = 1) -> list[int]:
    return [(start + 7 * i) % 50 + 1 for i in range(n)]


def test_a_decode_is_planned_on_the_token_still_in_flight() -> None:
    batcher, worker = make_pair()
    request = make_request("r", prompt(6), max_tokens=5)
    batcher.add(request)
    first = batcher.schedule()
    outputs_1 = worker.execute(first)
    ahead = batcher.schedule(lookahead=True)
    [entry] = ahead.cached_requests
    assert (entry.num_computed_tokens, entry.num_scheduled_tokens) == (6, 1)  # position 6: the token of step 1
    assert request.num_output_placeholders == 2
    outputs_2 = worker.execute(ahead)  # the worker decodes its own sampled token
    [event_1] = batcher.update(first, outputs_1)
    [event_2] = batcher.update(ahead, outputs_2)
    assert request.num_output_placeholders == 0
    assert list(event_1.token_ids + event_2.token_ids) == greedy_tokens(prompt(6), max_tokens=5)[0][:2]


def test_without_lookahead_nothing_is_planned_before_the_reply() -> None:
    batcher, worker = make_pair()
    batcher.add(make_request("r", prompt(6), max_tokens=5))
    batcher.schedule()
    assert batcher.schedule().is_empty


def test_a_stop_in_flight_wastes_one_token_and_frees_everything() -> None:
    reference, _ = greedy_tokens(prompt(6), max_tokens=20)
    index = next(i for i in range(2, 20) if reference[i] not in reference[:i])
    stop = reference[index]  # a token first sampled at step `index` + 1 stops the request
    batcher, worker = make_pair()
    request = make_request("r", prompt(6), max_tokens=20, stop_token_ids={stop})
    batcher.add(request)
    events = [e for batch in lookahead_steps(batcher, worker) for e in batch]
    assert request.output_token_ids == reference[: index + 1]
    assert [t for e in events for t in e.token_ids] == reference[: index + 1]  # the next, computed ahead, is dropped
    assert events[-1].finish_reason is FinishReason.STOP
    assert batcher.block_manager.num_blocks_used == 0
    assert worker.held == {}  # its id reached the worker in a later plan


def test_no_step_is_planned_past_max_tokens() -> None:
    batcher, worker = make_pair()
    request = make_request("r", prompt(5), max_tokens=3)
    batcher.add(request)
    executed = []
    execute = worker.execute
    worker.execute = lambda plan: executed.append(plan) or execute(plan)  # type: ignore[method-assign]
    for _ in lookahead_steps(batcher, worker):
        pass
    assert request.output_token_ids == greedy_tokens(prompt(5), max_tokens=3)[0]
    assert request.finish_reason is FinishReason.LENGTH
    # The prompt step and two decodes: the token in flight being the last, no fourth was planned;
    # the last plan only carries the finished id.
    assert [p.num_scheduled_tokens for p in executed] == [5, 1, 1, 0]


def test_a_lookahead_plan_never_preempts_it_waits_for_the_reply() -> None:
    # 3 usable blocks of 4 slots: a fills 2, b 1; a's first decode needs a fourth.
    batcher, worker = make_pair(num_blocks=4, block_size=4)
    a = make_request("a", prompt(8, 1), max_tokens=4, arrival_s=0.0)
    b = make_request("b", prompt(3, 2), max_tokens=4, arrival_s=1.0)
    batcher.add(a)
    batcher.add(b)
    first = batcher.schedule()
    assert len(first.new_requests) == 2 and batcher.block_manager.num_blocks_free == 0
    outputs = worker.execute(first)
    ahead = batcher.schedule(lookahead=True)  # b fits its token; a needs a third block that is not there
    assert batcher.short_of_blocks
    assert ahead.num_preemptions == 0 and {c.request_id for c in ahead.cached_requests} == {"b"}
    assert a.status is RequestStatus.RUNNING
    batcher.update(first, outputs)
    batcher.update(ahead, worker.execute(ahead))
    synced = batcher.schedule()  # nothing in flight: now it may preempt
    assert synced.num_preemptions == 1


def test_a_reply_is_not_applied_to_a_new_request_that_reused_the_id() -> None:
    batcher, worker = make_pair()
    old = make_request("same", prompt(6), max_tokens=10)
    batcher.add(old)
    first = batcher.schedule()
    outputs_1 = worker.execute(first)
    ahead = batcher.schedule(lookahead=True)
    outputs_2 = worker.execute(ahead)
    batcher.update(first, outputs_1)
    batcher.abort("same")  # the client gave up and sent the id again
    new = make_request("same", prompt(4, 9), max_tokens=2)
    batcher.add(new)
    third = batcher.schedule(lookahead=True)
    assert third.finished_request_ids == ("same",) and third.new_requests[0].request is new
    outputs_3 = worker.execute(third)
    assert batcher.update(ahead, outputs_2) == []  # the old request's token goes nowhere
    [event] = batcher.update(third, outputs_3)
    assert new.output_token_ids == list(event.token_ids) == greedy_tokens(prompt(4, 9), max_tokens=2)[0][:1]


def test_a_failed_sampling_in_flight_ends_the_request_and_the_worker_skips_it() -> None:
    batcher, worker = make_pair()
    request = make_request("bad", prompt(6), max_tokens=5)
    batcher.add(request)
    worker.fail_request_ids = {"bad"}
    first = batcher.schedule()
    outputs_1 = worker.execute(first)
    ahead = batcher.schedule(lookahead=True)
    assert [c.request_id for c in ahead.cached_requests] == ["bad"]
    assert worker.execute(ahead) == []  # skipped, not refused
    [event] = batcher.update(first, outputs_1)
    assert event.finish_reason is FinishReason.ABORT and event.error is not None
    assert batcher.update(ahead, []) == []
    batcher.update(last := batcher.schedule(), worker.execute(last))
    assert worker.held == {} and batcher.block_manager.num_blocks_used == 0
