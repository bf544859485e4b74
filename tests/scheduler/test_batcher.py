"""Batcher scheduling rules, one rule per test, against the fake deterministic model and worker."""

from __future__ import annotations

import pytest

from services.scheduler.batcher import Batcher, RequestOutput, ScheduledNew
from services.scheduler.request import ErrorKind, FinishReason, Request, RequestError, RequestStatus, TokenLogprob
from shared.errors import InvalidArgument
from tests.scheduler.fakes import FakeWorker, greedy_tokens, make_pair, make_request, run_until_idle, step


def prompt(n: int, start: int = 1) -> list[int]:
    return [(start + 7 * i) % 50 + 1 for i in range(n)]


def expected(request: Request, **kwargs: object) -> list[int]:
    return greedy_tokens(request.prompt_token_ids, max_tokens=request.max_tokens,
                         stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos, **kwargs)[0]


def test_chunks_stay_within_the_token_budget() -> None:
    batcher, worker = make_pair(max_num_batched_tokens=10)
    requests = [make_request(f"r{i}", prompt(n, i), max_tokens=4) for i, n in enumerate((23, 5, 17, 9))]
    for request in requests:
        batcher.add(request)
    plans = run_until_idle(batcher, worker)
    assert all(p.num_scheduled_tokens <= 10 for p in plans)
    assert plans[0].num_scheduled_tokens == 10  # prefill work fills the budget
    for request in requests:
        assert request.output_token_ids == expected(request)


def test_long_prompt_is_chunked_and_samples_only_after_its_last_chunk() -> None:
    batcher, worker = make_pair(max_num_batched_tokens=8)
    request = make_request("long", prompt(30), max_tokens=2)
    batcher.add(request)
    chunks, computed, token_counts = [], [], []
    for _ in range(4):
        plan, events = step(batcher, worker)
        [entry] = plan.new_requests + plan.cached_requests
        chunks.append(entry.num_scheduled_tokens)
        computed.append(entry.num_computed_tokens)
        token_counts.append(sum(len(e.token_ids) for e in events))
    assert chunks == [8, 8, 8, 6]
    assert computed == [0, 8, 16, 24]
    assert token_counts == [0, 0, 0, 1]  # no event while only prompt chunks ran
    run_until_idle(batcher, worker)
    assert request.output_token_ids == expected(request)


def test_max_num_seqs_caps_running_requests() -> None:
    batcher, worker = make_pair(max_num_seqs=2)
    requests = [make_request(f"r{i}", prompt(3, i), max_tokens=3) for i in range(5)]
    for request in requests:
        batcher.add(request)
    plan, _ = step(batcher, worker)
    assert [n.request.request_id for n in plan.new_requests] == ["r0", "r1"]
    assert (batcher.num_running, batcher.num_waiting) == (2, 3)
    run_until_idle(batcher, worker)  # the fake worker fails the test if it ever holds 3
    assert all(r.output_token_ids == expected(r) for r in requests)


def test_arrival_joins_next_step_and_decodes_go_before_prefill_chunks() -> None:
    batcher, worker = make_pair(max_num_batched_tokens=10, num_blocks=64)
    decoder = make_request("decoder", prompt(4), max_tokens=12, ignore_eos=True)
    batcher.add(decoder)
    step(batcher, worker)
    step(batcher, worker)
    # A higher-priority long prompt sorts ahead of the decoder, yet must not take its token.
    urgent = make_request("urgent", prompt(60, 3), max_tokens=2, priority=5, arrival_s=1.0)
    batcher.add(urgent)
    plan, _ = step(batcher, worker)
    assert [n.request.request_id for n in plan.new_requests] == ["urgent"]
    assert [(c.request_id, c.num_scheduled_tokens) for c in plan.cached_requests] == [("decoder", 1)]
    assert plan.new_requests[0].num_scheduled_tokens == 9
    while urgent.num_computed_tokens < urgent.num_prompt_tokens:
        plan, _ = step(batcher, worker)
        scheduled = {c.request_id: c.num_scheduled_tokens for c in plan.cached_requests}
        assert scheduled["decoder"] == 1, "a running decode was starved by a prefill chunk"
        assert plan.num_scheduled_tokens <= 10
    run_until_idle(batcher, worker)
    assert decoder.output_token_ids == expected(decoder)
    assert urgent.output_token_ids == expected(urgent)


@pytest.mark.parametrize(("num_prompt_tokens", "num_hit_tokens"), [(18, 16), (16, 12), (17, 16), (3, 0)])
def test_prefix_hit_on_repeated_prompt_leaves_at_least_one_token(num_prompt_tokens: int,
                                                                 num_hit_tokens: int) -> None:
    batcher, worker = make_pair(block_size=4)
    first = make_request("first", prompt(num_prompt_tokens), max_tokens=3)
    batcher.add(first)
    run_until_idle(batcher, worker)
    assert first.num_cached_tokens == 0
    again = make_request("again", prompt(num_prompt_tokens), max_tokens=3)
    batcher.add(again)
    plan, _ = step(batcher, worker)
    [new] = plan.new_requests
    assert new.num_computed_tokens == num_hit_tokens
    assert new.num_scheduled_tokens == num_prompt_tokens - num_hit_tokens >= 1
    assert again.num_cached_tokens == num_hit_tokens
    run_until_idle(batcher, worker)
    assert again.output_token_ids == first.output_token_ids == expected(first)


def test_prefix_is_not_shared_across_cache_salts() -> None:
    batcher, worker = make_pair(block_size=4)
    batcher.add(make_request("a", prompt(20), cache_salt="alice"))
    run_until_idle(batcher, worker)
    other = make_request("b", prompt(20), cache_salt="bob")
    batcher.add(other)
    plan, _ = step(batcher, worker)
    assert plan.new_requests[0].num_computed_tokens == 0 and other.num_cached_tokens == 0


def test_a_prefix_being_computed_is_waited_for_not_computed_twice() -> None:
    # "first" needs three steps of 8 tokens for its 24-token prompt; "second" shares its first 20.
    batcher, worker = make_pair(block_size=4, max_num_batched_tokens=8)
    shared = prompt(20)
    first = make_request("first", [*shared, 1, 2, 3, 4], max_tokens=3)
    second = make_request("second", [*shared, 9, 9, 9, 9], max_tokens=3)
    other = make_request("other", prompt(6, 3), max_tokens=3)
    for request in (first, second, other):
        batcher.add(request)
    admitted = []
    for _ in range(3):
        plan, _ = step(batcher, worker)
        admitted.append([n.request.request_id for n in plan.new_requests])
    # "second" lets "other" (no shared prefix) go ahead and starts only once the prefix is published.
    assert admitted[0] == ["first"] and "second" not in admitted[1]
    assert "second" not in admitted[2]
    plan, _ = step(batcher, worker)
    [new] = [n for n in plan.new_requests if n.request.request_id == "second"]
    assert new.num_computed_tokens == 20 and second.num_cached_tokens == 20
    run_until_idle(batcher, worker)
    assert second.output_token_ids == expected(second) and other.output_token_ids == expected(other)


def owner_and_waiter() -> tuple[Batcher, FakeWorker, Request, Request]:
    """Two requests with one 24-token prompt; the owner's prompt takes three 8-token steps."""
    batcher, worker = make_pair(block_size=4, max_num_batched_tokens=8)
    owner = make_request("owner", prompt(24), max_tokens=3)
    waiter = make_request("waiter", prompt(24), max_tokens=3)
    batcher.add(owner)
    batcher.add(waiter)
    return batcher, worker, owner, waiter


def test_a_waiter_computes_the_rest_itself_when_its_owner_is_aborted() -> None:
    batcher, worker, owner, waiter = owner_and_waiter()
    plan, _ = step(batcher, worker)
    assert [n.request.request_id for n in plan.new_requests] == ["owner"]
    batcher.abort("owner")
    plan, _ = step(batcher, worker)
    [new] = plan.new_requests
    # The owner's first chunk was published before it left; the waiter computes only the rest.
    assert new.request.request_id == "waiter" and new.num_computed_tokens == 8
    run_until_idle(batcher, worker)
    assert waiter.output_token_ids == expected(waiter)


def test_a_preempted_owner_goes_first_again_and_the_waiter_keeps_waiting() -> None:
    batcher, worker, owner, waiter = owner_and_waiter()
    step(batcher, worker)
    batcher._preempt(owner, {})  # what a full pool does to the newest, lowest-priority request
    plan, _ = step(batcher, worker)
    assert [n.request.request_id for n in plan.new_requests] == ["owner"]
    run_until_idle(batcher, worker)
    assert waiter.num_cached_tokens == 20  # all five full blocks of its 23 cacheable tokens
    assert waiter.output_token_ids == owner.output_token_ids == expected(waiter)


def test_cached_tokens_are_kept_from_the_first_placement_only() -> None:
    batcher, worker = make_pair(block_size=4)
    batcher.add(make_request("warm", prompt(20), max_tokens=1))
    run_until_idle(batcher, worker)
    request = make_request("r", prompt(20), max_tokens=4)
    request.num_preemptions = 1  # as if it had been placed and preempted before
    batcher.add(request)
    step(batcher, worker)
    assert request.num_cached_tokens == 0 and request.num_computed_tokens == 20


STOP_PROMPT = prompt(6, 2)
GREEDY = greedy_tokens(STOP_PROMPT, max_tokens=40)[0]
EOS = GREEDY[2]
assert EOS not in GREEDY[:2] and GREEDY[3] not in GREEDY[:3], "pick another prompt for these tests"


@pytest.mark.parametrize(("kwargs", "max_model_len", "num_tokens", "reason"), [
    ({}, 256, 3, FinishReason.STOP),  # eos
    ({"ignore_eos": True}, 256, 6, FinishReason.LENGTH),
    ({"ignore_eos": True, "stop_token_ids": [GREEDY[3]]}, 256, 4, FinishReason.STOP),
    ({"max_tokens": 2}, 256, 2, FinishReason.LENGTH),
    ({"ignore_eos": True, "max_tokens": 20}, 6 + 4, 4, FinishReason.LENGTH),  # max_model_len
])
def test_stop_conditions(kwargs: dict, max_model_len: int, num_tokens: int, reason: FinishReason) -> None:
    batcher, worker = make_pair(eos_token_ids=[EOS], max_model_len=max_model_len)
    request = make_request("r", STOP_PROMPT, **{"max_tokens": 6, **kwargs})
    batcher.add(request)
    events = []
    while batcher.get("r") is not None:
        events += step(batcher, worker)[1]
    assert request.output_token_ids == GREEDY[:num_tokens]
    assert [t for e in events for t in e.token_ids] == GREEDY[:num_tokens]
    assert [e.finish_reason for e in events] == [None] * (num_tokens - 1) + [reason]
    assert (request.status, request.finish_reason) == (RequestStatus.FINISHED, reason)
    assert batcher.block_manager.num_blocks_used == 0
    assert batcher.schedule().finished_request_ids == ("r",)


def test_tokens_past_a_stop_are_dropped_and_logprobs_follow_tokens() -> None:
    batcher, _ = make_pair(eos_token_ids=[9])
    batcher.add(make_request("r", prompt(3), max_tokens=10))
    plan = batcher.schedule()
    lps = tuple(TokenLogprob(-0.1 * i, (i,), (-0.1 * i,)) for i in range(3))
    [event] = batcher.update(plan, [RequestOutput("r", (4, 9, 5), lps)])
    assert (event.token_ids, event.logprobs, event.finish_reason) == ((4, 9), lps[:2], FinishReason.STOP)


def test_worker_error_aborts_only_that_request() -> None:
    batcher, worker = make_pair()
    worker.fail_request_ids = {"bad"}
    bad, good = make_request("bad", prompt(5)), make_request("good", prompt(5, 2))
    batcher.add(bad)
    batcher.add(good)
    _, events = step(batcher, worker)
    by_id = {e.request_id: e for e in events}
    assert (by_id["bad"].finish_reason, by_id["bad"].error) == (
        FinishReason.ABORT, RequestError(ErrorKind.FAILED, "sampler failed"))
    assert by_id["good"].finish_reason is None and len(by_id["good"].token_ids) == 1
    assert bad.finish_reason is FinishReason.ABORT and batcher.get("bad") is None
    assert batcher.block_manager.block_ids("bad") == []
    plan, _ = step(batcher, worker)
    assert plan.finished_request_ids == ("bad",)
    run_until_idle(batcher, worker)
    assert good.output_token_ids == expected(good)


def test_missing_output_for_a_sampling_request_aborts_it() -> None:
    batcher, _ = make_pair()
    batcher.add(make_request("r", prompt(3)))
    [event] = batcher.update(batcher.schedule(), [])
    assert event.finish_reason is FinishReason.ABORT and event.error.kind is ErrorKind.FAILED


def test_abort_frees_blocks_at_once_and_tells_the_worker_exactly_once() -> None:
    batcher, worker = make_pair()
    request = make_request("r", prompt(9), max_tokens=20)
    batcher.add(request)
    step(batcher, worker)
    assert batcher.block_manager.num_blocks_used > 0
    assert batcher.abort("r") is request
    assert (request.status, request.finish_reason) == (RequestStatus.FINISHED, FinishReason.ABORT)
    assert batcher.block_manager.num_blocks_used == 0
    assert batcher.has_work()  # the worker still has to hear about it
    plan, _ = step(batcher, worker)
    assert plan.finished_request_ids == ("r",) and not plan.new_requests and not plan.cached_requests
    assert batcher.schedule().finished_request_ids == ()
    assert batcher.abort("r") is None and not batcher.has_work()


def test_abort_of_a_waiting_request_sends_nothing_to_the_worker() -> None:
    batcher, _ = make_pair()
    batcher.add(make_request("r", prompt(3)))
    assert batcher.abort("r") is not None
    assert batcher.schedule().is_empty and batcher.num_waiting == 0


def test_abort_while_its_step_is_in_flight() -> None:
    batcher, worker = make_pair()
    batcher.add(make_request("r", prompt(3)))
    plan = batcher.schedule()
    batcher.abort("r")
    assert batcher.update(plan, worker.execute(plan)) == []  # its token is nobody's any more
    assert step(batcher, worker)[0].finished_request_ids == ("r",)


def test_expire_aborts_requests_past_their_deadline() -> None:
    batcher, worker = make_pair()
    soon = make_request("soon", prompt(3), max_tokens=50, deadline_s=5.0, ignore_eos=True)
    late = make_request("late", prompt(3, 2), max_tokens=50, deadline_s=10.0, ignore_eos=True)
    never = make_request("never", prompt(3, 3), max_tokens=50, ignore_eos=True)
    queued = make_request("queued", prompt(3, 4), deadline_s=5.0)
    for request in (soon, late, never):
        batcher.add(request)
    step(batcher, worker)
    batcher.add(queued)
    assert batcher.expire(4.9) == []
    events = batcher.expire(5.0)
    assert {e.request_id for e in events} == {"soon", "queued"}
    assert all(e.finish_reason is FinishReason.ABORT and e.error.kind is ErrorKind.DEADLINE for e in events)
    assert soon.finish_reason is FinishReason.ABORT and late.status is RequestStatus.RUNNING
    assert step(batcher, worker)[0].finished_request_ids == ("soon",)  # "queued" was never on the worker
    assert [e.request_id for e in batcher.expire(100.0)] == ["late"]
    assert batcher.get("never") is not None


def test_higher_priority_then_earlier_arrival_is_admitted_first() -> None:
    batcher, worker = make_pair(max_num_seqs=1)
    batcher.add(make_request("low", prompt(3), priority=0, arrival_s=0.0))
    batcher.add(make_request("high-late", prompt(3), priority=5, arrival_s=2.0))
    batcher.add(make_request("high-early", prompt(3), priority=5, arrival_s=1.0))
    batcher.add(make_request("high-early-2", prompt(3), priority=5, arrival_s=1.0))
    order = []
    for plan in run_until_idle(batcher, worker):
        order += [n.request.request_id for n in plan.new_requests]
    assert order == ["high-early", "high-early-2", "high-late", "low"]


def test_a_waiting_request_without_blocks_stops_admission() -> None:
    batcher, worker = make_pair(num_blocks=9, block_size=4)  # 8 usable
    batcher.add(make_request("holder", prompt(22), max_tokens=2, ignore_eos=True))  # 6 blocks
    step(batcher, worker)
    batcher.add(make_request("big", prompt(12, 5), priority=1))  # needs 3 of the 2 free
    batcher.add(make_request("small", prompt(3, 6)))  # would fit, but must not overtake
    plan, _ = step(batcher, worker)
    assert plan.new_requests == ()
    order = [n.request.request_id for p in run_until_idle(batcher, worker) for n in p.new_requests]
    assert order == ["big", "small"]


def _decoders(batcher_args: dict, specs: list[tuple[str, int, int, int]]) -> tuple:
    batcher, worker = make_pair(**batcher_args)
    requests = {}
    for rid, n, priority, max_tokens in specs:
        requests[rid] = make_request(rid, prompt(n, len(requests)), priority=priority, arrival_s=len(requests),
                                     max_tokens=max_tokens, ignore_eos=True)
        batcher.add(requests[rid])
    return batcher, worker, requests


def test_preemption_picks_lowest_priority_then_newest() -> None:
    batcher, worker, reqs = _decoders({"num_blocks": 7, "block_size": 4},  # 6 usable
                                      [("a", 4, 1, 20), ("b", 4, 0, 20), ("c", 4, 0, 20)])
    while not any(r.num_preemptions for r in reqs.values()):
        plan, _ = step(batcher, worker)
    assert plan.finished_request_ids == ("c",)
    assert reqs["c"].status is RequestStatus.WAITING and reqs["c"].num_computed_tokens == 0
    assert batcher.block_manager.block_ids("c") == []
    assert {c.request_id for c in plan.cached_requests} == {"a", "b"}
    run_until_idle(batcher, worker)
    assert reqs["a"].num_preemptions == 0
    assert all(r.output_token_ids == expected(r) for r in reqs.values())


def test_a_request_that_cannot_grow_may_preempt_itself() -> None:
    batcher, worker, reqs = _decoders({"num_blocks": 4, "block_size": 4},  # 3 usable
                                      [("a", 4, 1, 8), ("b", 2, 0, 9)])
    while not reqs["b"].num_preemptions:
        plan, _ = step(batcher, worker)
    assert plan.finished_request_ids == ("b",)
    assert [c.request_id for c in plan.cached_requests] == ["a"]
    run_until_idle(batcher, worker)
    assert all(r.output_token_ids == expected(r) for r in reqs.values())


def test_no_admission_in_a_step_that_preempted() -> None:
    batcher, worker, reqs = _decoders({"num_blocks": 7, "block_size": 4},  # 6 usable
                                      [("a", 4, 1, 19), ("b", 12, 0, 8)])
    step(batcher, worker)
    # Outranks the victim "b" and needs one block: it would fit right after the preemption.
    batcher.add(make_request("w", prompt(3, 9), priority=1, arrival_s=5.0))
    while not reqs["b"].num_preemptions:
        plan, _ = step(batcher, worker)
    assert plan.finished_request_ids == ("b",)
    assert plan.new_requests == ()  # a pool known to be short takes no newcomers in this step
    assert batcher.block_manager.can_allocate(1)
    plan, _ = step(batcher, worker)
    assert [n.request.request_id for n in plan.new_requests] == ["w"]
    run_until_idle(batcher, worker)
    assert all(r.output_token_ids == expected(r) for r in reqs.values())


def test_preempted_request_is_resent_in_full_and_ends_with_the_same_tokens() -> None:
    specs = [(f"r{i}", 3 + 5 * i, i % 2, 12) for i in range(6)]
    batcher, worker, reqs = _decoders({"num_blocks": 13, "block_size": 4}, specs)
    resent = []  # (output tokens so far, computed) at each re-send after a preemption
    while batcher.has_work():
        plan = batcher.schedule()
        resent += [(list(n.request.output_token_ids), n.num_computed_tokens) for n in plan.new_requests
                   if n.request.num_preemptions]
        batcher.update(plan, worker.execute(plan))
    assert sum(r.num_preemptions for r in reqs.values()) > 0
    assert resent and any(out for out, _ in resent)
    assert all(computed % 4 == 0 for _, computed in resent)  # only whole cached blocks are reused
    big_batcher, big_worker, reference = _decoders({"num_blocks": 200, "block_size": 4}, specs)
    run_until_idle(big_batcher, big_worker)
    assert sum(r.num_preemptions for r in reference.values()) == 0
    for rid, request in reqs.items():
        assert request.output_token_ids == reference[rid].output_token_ids == expected(request)


def test_take_all_returns_every_live_request_and_empties_the_pool() -> None:
    batcher, worker = make_pair(max_num_seqs=2)
    requests = [make_request(f"r{i}", prompt(5 + i, i), max_tokens=6, ignore_eos=True) for i in range(4)]
    for request in requests:
        batcher.add(request)
    for _ in range(3):
        step(batcher, worker)
    taken = batcher.take_all()
    assert sorted(r.request_id for r in taken) == ["r0", "r1", "r2", "r3"]
    assert all(r.status is RequestStatus.WAITING and r.num_computed_tokens == 0 for r in taken)
    assert any(r.output_token_ids for r in taken)  # tokens so far are kept
    manager = batcher.block_manager
    assert (manager.num_blocks_used, manager.num_blocks_cached) == (0, 0)
    assert not batcher.has_work() and batcher.num_running == batcher.num_waiting == 0
    other, other_worker = make_pair()
    for request in taken:
        other.add(request)
    run_until_idle(other, other_worker)
    assert all(r.output_token_ids == expected(r) for r in requests)


def test_add_rejects_what_could_never_run() -> None:
    batcher, _ = make_pair(num_blocks=5, block_size=4, max_model_len=32)  # 4 usable blocks = 16 tokens
    batcher.add(make_request("r", prompt(3)))
    with pytest.raises(InvalidArgument, match="already queued"):
        batcher.add(make_request("r", prompt(3)))
    with pytest.raises(InvalidArgument, match="prompt_token_ids"):
        batcher.add(make_request("empty", []))
    with pytest.raises(InvalidArgument, match="max_model_len"):
        batcher.add(make_request("long", prompt(32)))
    with pytest.raises(InvalidArgument, match="KV blocks"):
        batcher.add(make_request("huge", prompt(10), max_tokens=10))
    batcher.add(make_request("fits", prompt(10), max_tokens=7))  # 16 computed tokens at most


def test_load_counters() -> None:
    batcher, worker = make_pair(max_num_batched_tokens=8, max_num_seqs=1)
    batcher.add(make_request("a", prompt(5)))
    batcher.add(make_request("b", prompt(20)))
    assert (batcher.num_queued_prefill_tokens, batcher.num_running_decode_requests) == (25, 0)
    step(batcher, worker)  # a: prompt done, one token sampled
    assert (batcher.num_queued_prefill_tokens, batcher.num_running_decode_requests) == (21, 1)


def test_new_request_carries_its_whole_block_table() -> None:
    batcher, worker = make_pair(block_size=4)
    batcher.add(make_request("warm", prompt(20), max_tokens=1))
    run_until_idle(batcher, worker)
    batcher.add(make_request("r", prompt(20)))
    [new] = batcher.schedule().new_requests
    assert isinstance(new, ScheduledNew)
    assert list(new.block_ids) == batcher.block_manager.block_ids("r") and len(new.block_ids) == 5


def test_take_waiting_hands_back_the_queue_and_keeps_the_running() -> None:
    batcher, worker = make_pair(max_num_seqs=1)
    running, queued = make_request("run", prompt(5), max_tokens=3), make_request("queued", prompt(5, 9), max_tokens=3)
    batcher.add(running)
    batcher.add(queued)
    step(batcher, worker)
    assert batcher.take_waiting() == [queued]
    assert queued.num_computed_tokens == 0 and batcher.get("queued") is None
    assert (batcher.num_running, batcher.num_waiting) == (1, 0)
    run_until_idle(batcher, worker)
    assert running.output_token_ids == expected(running)
    assert batcher.block_manager.num_blocks_used == 0


def test_events_that_queued_up_merge_into_one_in_order():
    from services.scheduler.plan import RequestEvent

    lp = [TokenLogprob(-0.1 * i, (i,), (-0.1 * i,)) for i in range(3)]
    first = RequestEvent("r", (5,), (lp[0],), None)
    second = RequestEvent("r", (6, 7), (lp[1], lp[2]), None)
    last = RequestEvent("r", (), (), FinishReason.LENGTH)
    merged = first.then(second).then(last)
    assert merged.token_ids == (5, 6, 7)
    assert merged.logprobs == tuple(lp)
    assert merged.finish_reason is FinishReason.LENGTH  # the end of the stream is kept, not lost
    worker_failed = RequestError(ErrorKind.FAILED, "worker failed")
    failed = first.then(RequestEvent("r", (), (), FinishReason.ABORT, error=worker_failed))
    assert failed.error == worker_failed and failed.token_ids == (5,)
