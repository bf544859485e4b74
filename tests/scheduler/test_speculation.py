"""Prompt-lookup speculative decoding in the scheduler: the proposer, and the Batcher's drafts,
rollbacks and block frees, against the fake deterministic worker (which verifies drafts greedily)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from services.scheduler import metrics
from services.scheduler.batcher import RequestOutput
from services.scheduler.plan import ScheduledCached, StepPlan
from services.scheduler.request import FinishReason, RequestStatus
from services.scheduler.speculation import MAX_BACKOFF_PLANS, NgramProposer
from shared.errors import InvalidArgument
from tests.scheduler.fakes import greedy_tokens, lookahead_steps, make_pair, make_request, run_until_idle, step


def reference_propose(token_ids: list[int], k: int, min_n: int = 2, max_n: int = 4) -> tuple[int, ...]:
    """The proposer's rule, written the slow obvious way."""
    for n in range(min(max_n, len(token_ids) - 1), min_n - 1, -1):
        suffix = token_ids[-n:]
        for start in range(len(token_ids) - n - 1, -1, -1):
            if token_ids[start:start + n] == suffix:
                return tuple(token_ids[start + n:start + n + k])
    return ()


def test_proposes_what_followed_the_latest_earlier_occurrence() -> None:
    proposer = NgramProposer(3)
    assert proposer.propose([1, 2, 3, 4, 9, 1, 2, 3], 8) == (4, 9, 1)
    assert proposer.propose([1, 2, 5, 1, 2, 6, 7, 1, 2], 8) == (6, 7, 1)  # the latest [1, 2]
    assert proposer.propose([7, 1, 2, 5, 1, 2, 6, 7, 1, 2], 8) == (5, 1, 2)  # the longer [7, 1, 2] first
    assert proposer.propose([1, 2, 3, 4, 9, 1, 2, 3], 2) == (4, 9)  # the caller's cap
    assert proposer.propose([1, 2, 3, 4, 5], 8) == ()
    assert proposer.propose([5, 5], 8) == ()  # no room for an earlier occurrence
    assert proposer.propose([5, 5, 5], 8) == (5,)


def test_proposer_equals_the_obvious_rule_across_byte_boundaries() -> None:
    # Ids whose int32 bytes shift into each other: a byte-level match off the id grid must not count.
    alphabet = [0, 1, 256, 65536, 1 << 24, 257, 49151]
    rng = random.Random(0)
    proposer = NgramProposer(4)
    for _ in range(3000):
        tokens = [rng.choice(alphabet) for _ in range(rng.randrange(1, 24))]
        assert proposer.propose(tokens, 4) == reference_propose(tokens, 4), tokens


def test_proposer_checks_its_knobs() -> None:
    with pytest.raises(InvalidArgument, match="num_speculative_tokens"):
        NgramProposer(0)
    with pytest.raises(InvalidArgument, match="ngram"):
        NgramProposer(2, min_n=3, max_n=2)


def grounded_prompt(num_right: int, seed: int = 0) -> list[int]:
    """A prompt ending in a bigram that occurs earlier, followed there by the fake model's next
    `num_right` tokens after the whole prompt (found by search). The first of them is sampled by
    the prefill; the next ones are drafts the fake worker accepts."""
    rng = random.Random(seed)
    while True:
        guess = [rng.randrange(1, 64) for _ in range(num_right)]
        prompt = [60, 61, *guess, *(rng.randrange(1, 50) for _ in range(12)), 60, 61]
        if greedy_tokens(prompt, max_tokens=num_right)[0] == guess:
            return prompt


def decoded(batcher, request, first_token: int) -> None:  # noqa: ANN001
    """Runs the request's prefill, as if the worker had sampled `first_token`."""
    batcher.add(request)
    plan = batcher.schedule()
    batcher.update(plan, [RequestOutput(request.request_id, (first_token,))])


def test_greedy_tokens_are_those_of_plain_decoding_with_drafts_accepted_and_rejected() -> None:
    batcher, worker = make_pair(num_speculative_tokens=4)
    requests = [make_request("grounded", grounded_prompt(2), max_tokens=12)]
    requests += [make_request(f"r{i}", [(3 * i + j) % 7 + 1 for j in range(9 + i)], max_tokens=10) for i in range(4)]
    for request in requests:
        batcher.add(request)
    plans = run_until_idle(batcher, worker)
    for request in requests:
        assert request.output_token_ids == greedy_tokens(request.prompt_token_ids, max_tokens=request.max_tokens)[0]
    assert any(c.draft_token_ids for p in plans for c in p.cached_requests)
    assert worker.num_accepted_tokens >= 1 and batcher.speculation.num_accepted_tokens_total == worker.num_accepted_tokens
    assert batcher.block_manager.num_blocks_used == 0


def test_an_accepted_step_advances_by_the_accepted_drafts_and_one_more() -> None:
    batcher, worker = make_pair(block_size=4, num_speculative_tokens=4)
    prompt = grounded_prompt(2)
    request = make_request("r", prompt, max_tokens=20)
    batcher.add(request)
    step(batcher, worker)  # the prompt, and the first token
    plan, [event] = step(batcher, worker)
    [entry] = plan.cached_requests
    assert len(entry.draft_token_ids) >= 2 and entry.num_scheduled_tokens == 1 + len(entry.draft_token_ids)
    expected = greedy_tokens(prompt, max_tokens=20)[0]
    assert len(event.token_ids) >= 2 and list(event.token_ids) == expected[1:1 + len(event.token_ids)]
    assert request.num_computed_tokens == request.num_tokens - 1
    assert len(batcher.block_manager.block_ids("r")) == -(-request.num_computed_tokens // 4)


def test_rejected_drafts_give_their_blocks_back() -> None:
    batcher, _ = make_pair(num_blocks=32, block_size=4, num_speculative_tokens=4)
    manager = batcher.block_manager
    request = make_request("r", [9, 9, 9, 1, 2, 3, 4, 5, 6, 8, 1, 2], max_tokens=30)
    decoded(batcher, request, 3)  # history ends [1, 2, 3]: drafts (4, 5, 6, 8)
    assert manager.num_blocks_used == 3
    plan = batcher.schedule()
    [entry] = plan.cached_requests
    assert entry.draft_token_ids == (4, 5, 6, 8) and entry.num_scheduled_tokens == 5
    assert manager.num_blocks_used == 5  # 17 slots
    [event] = batcher.update(plan, [RequestOutput("r", (7,))])  # the first draft is rejected
    assert event.token_ids == (7,) and request.output_token_ids == [3, 7]
    assert request.num_computed_tokens == request.num_tokens - 1 == 13
    assert manager.block_ids("r") == manager.block_ids("r")[:4] and manager.num_blocks_used == 4  # as plain decoding
    plan = batcher.schedule()  # history ends [3, 7]: no drafts; the next slot is in the kept block
    assert plan.cached_requests[0].draft_token_ids == () and plan.cached_requests[0].new_block_ids == ()
    batcher.update(plan, [RequestOutput("r", (1,))])
    batcher.abort("r")
    assert manager.num_blocks_used == 0 and manager.num_blocks_free + manager.num_blocks_cached == 31


def test_a_stop_among_accepted_drafts_ends_the_request_there() -> None:
    batcher, _ = make_pair(block_size=4, num_speculative_tokens=4)
    request = make_request("r", [9, 1, 2, 3, 4, 5, 1, 2], max_tokens=30, stop_token_ids=[4])
    decoded(batcher, request, 3)  # history ends [1, 2, 3]: drafts (4, 5, 1, 2)
    plan = batcher.schedule()
    assert plan.cached_requests[0].draft_token_ids == (4, 5, 1, 2)
    [event] = batcher.update(plan, [RequestOutput("r", (4, 5, 6))])  # two accepted, then 6
    assert event.token_ids == (4,) and event.finish_reason is FinishReason.STOP
    assert request.output_token_ids == [3, 4]
    assert request.status is RequestStatus.FINISHED and batcher.block_manager.num_blocks_used == 0


def test_drafts_never_go_past_max_tokens_or_max_model_len() -> None:
    prompt = [9, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2]  # + 3: drafts (4, 5, 6, 7, 8, 1, 2) as far as allowed
    for kwargs, max_tokens, num_drafts in (({}, 3, 1), ({"max_model_len": 15}, 30, 2), ({}, 2, 0)):
        batcher, _ = make_pair(block_size=4, num_speculative_tokens=8, **kwargs)
        request = make_request("r", prompt, max_tokens=max_tokens)
        decoded(batcher, request, 3)
        plan = batcher.schedule()
        [entry] = plan.cached_requests
        assert entry.draft_token_ids == (4, 5, 6, 7, 8)[:num_drafts], kwargs
        # Every token the step may return fits: the drafts, and one more.
        assert len(request.output_token_ids) + num_drafts + 1 <= max_tokens
        assert entry.num_computed_tokens + entry.num_scheduled_tokens <= batcher.max_model_len - 1
        [event] = batcher.update(plan, [RequestOutput("r", (4, 5, 6)[:num_drafts + 1])])
        assert len(request.output_token_ids) <= max_tokens and request.num_tokens <= batcher.max_model_len


def test_drafts_take_spare_blocks_only_and_never_preempt() -> None:
    batcher, _ = make_pair(num_blocks=6, block_size=4, num_speculative_tokens=4)
    a = make_request("a", [9, 9, 9, 1, 2, 3, 4, 5, 6, 8, 1, 2], max_tokens=8)  # 3 blocks
    b = make_request("b", [8, 8, 8], max_tokens=8)  # 1 block
    batcher.add(a)
    batcher.add(b)
    plan = batcher.schedule()
    batcher.update(plan, [RequestOutput("a", (3,)), RequestOutput("b", (7,))])
    # a's plain decode (position 12) takes the last free block; its drafts (4, 5, 6, 8) get only the
    # three slots left in that block, and nobody is preempted for them.
    plan = batcher.schedule()
    assert plan.num_preemptions == 0 and batcher.block_manager.num_blocks_free == 0
    assert {c.request_id: c.draft_token_ids for c in plan.cached_requests} == {"a": (4, 5, 6), "b": ()}
    assert {c.request_id: c.num_scheduled_tokens for c in plan.cached_requests} == {"a": 4, "b": 1}


def test_may_match_next_needs_the_last_token_earlier() -> None:
    proposer = NgramProposer(4)
    assert proposer.may_match_next([1, 2, 3, 2])  # [2, ?] may match [2, 3]
    assert not proposer.may_match_next([1, 2, 3, 4])
    assert not proposer.may_match_next([256, 65536, 7, 0])  # 0 0 0 0 straddling 256 and 65536 does not count
    assert NgramProposer(4, min_n=3).may_match_next([1, 2, 9, 1, 2])
    assert not NgramProposer(4, min_n=3).may_match_next([1, 2, 9, 2, 1])


def test_a_decode_that_cannot_get_drafts_is_still_planned_ahead() -> None:
    batcher, worker = make_pair(num_speculative_tokens=4)
    request = make_request("r", [1, 2, 3, 4, 5], max_tokens=9)  # 5 occurs once: no n-gram can match next
    batcher.add(request)
    first = batcher.schedule()
    outputs = worker.execute(first)
    [entry] = batcher.schedule(lookahead=True).cached_requests
    assert (entry.num_computed_tokens, entry.num_scheduled_tokens, entry.draft_token_ids) == (5, 1, ())
    assert request.num_output_placeholders == 2
    batcher.update(first, outputs)


def test_with_speculation_a_decode_that_may_get_drafts_is_not_planned_ahead() -> None:
    batcher, worker = make_pair(num_speculative_tokens=4)
    request = make_request("r", grounded_prompt(2, seed=1), max_tokens=9)
    batcher.add(request)
    first = batcher.schedule()
    outputs = worker.execute(first)
    assert batcher.schedule(lookahead=True).is_empty  # its token is in flight: it waits for it
    batcher.update(first, outputs)
    events = [e for batch in lookahead_steps(batcher, worker) for e in batch]
    assert request.output_token_ids == greedy_tokens(request.prompt_token_ids, max_tokens=9)[0]
    assert sum(len(e.token_ids) for e in events) == 8 and worker.num_accepted_tokens >= 1


def test_metrics_count_drafts_sent_and_kept() -> None:
    loop, labels = SimpleNamespace(pool="p", address="w-spec"), {"pool": "p", "worker": "w-spec"}
    plan = StepPlan(1, (), (ScheduledCached("a", (), 9, 5, draft_token_ids=(1, 2, 3, 4)),
                            ScheduledCached("b", (), 9, 3, draft_token_ids=(5, 6)),
                            ScheduledCached("c", (), 9, 1)), ())
    metrics.observe_drafts(loop, plan, [RequestOutput("a", (1, 2, 7)), RequestOutput("b", (8,)),
                                        RequestOutput("c", (4,))])
    assert REGISTRY.get_sample_value("switchyard_spec_decode_draft_tokens_total", labels) == 6
    assert REGISTRY.get_sample_value("switchyard_spec_decode_accepted_tokens_total", labels) == 2


def test_a_request_whose_drafts_are_all_rejected_backs_off_until_it_keeps_half() -> None:
    """After each step that kept none of its drafts, a request goes 2, 4, 8, ... (at most
    MAX_BACKOFF_PLANS) plans without proposals; a step that keeps fewer than half shortens the
    streak by one, one that keeps half or more ends it."""
    batcher, _ = make_pair(num_blocks=128, block_size=4, num_speculative_tokens=4)
    def after(token: int) -> int:  # the history repeats 1..5, so every n-gram occurs 5 tokens back
        return token % 5 + 1

    request = make_request("r", [1, 2, 3, 4, 5] * 3, max_tokens=240)
    decoded(batcher, request, 1)
    proposed_at: list[int] = []
    for index in range(200):
        plan = batcher.schedule()
        [entry] = plan.cached_requests
        drafts = entry.draft_token_ids
        reply: tuple[int, ...] = (after(request.output_token_ids[-1]),)
        if drafts:
            proposed_at.append(index)
            assert len(drafts) == 4
            if len(proposed_at) == 5:  # keeps one of four
                reply = (reply[0], drafts[1])
            elif len(proposed_at) == 8:  # keeps all four
                reply = (*drafts, after(drafts[-1]))
        batcher.update(plan, [RequestOutput("r", reply)])
    gaps = [b - a - 1 for a, b in zip(proposed_at, proposed_at[1:])]
    # misses 1-4; one of four kept (misses 3, no wait); misses 4, 5; all kept (misses 0, no wait);
    # then misses 1, 2, ...
    assert gaps[:11] == [2, 4, 8, 16, 0, 16, 32, 0, 2, 4, 8], gaps
    assert max(gaps) <= MAX_BACKOFF_PLANS
