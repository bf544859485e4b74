"""The router's overlap on one worker: cached prefixes, and prompts promised there but not yet computed."""

from services.scheduler.request import Request
from tests.scheduler.fakes import make_pair, make_request, run_until_idle, step


def probe(prompt: list[int], cache_salt: str = "") -> Request:
    return make_request("probe", prompt, cache_salt=cache_salt)


def test_a_routed_prompt_counts_before_any_step_has_cached_it() -> None:
    batcher, _ = make_pair(block_size=4)
    prompt = list(range(10, 30))  # 5 full blocks
    assert batcher.overlap_tokens(probe(prompt)) == 0
    batcher.add(make_request("a", prompt))
    assert batcher.overlap_tokens(probe(prompt)) == 20
    assert batcher.overlap_tokens(probe(prompt[:9] + [99] * 11)) == 8  # shares two full blocks
    assert batcher.overlap_tokens(probe(prompt, cache_salt="other-salt")) == 0
    batcher.add(make_request("b", prompt[:12]))
    batcher.abort("a")
    assert batcher.overlap_tokens(probe(prompt)) == 12  # b is still promised
    batcher.abort("b")
    assert batcher.overlap_tokens(probe(prompt)) == 0


def test_the_promise_becomes_the_cache_at_the_first_token_and_outlives_the_request() -> None:
    batcher, worker = make_pair(block_size=4)
    prompt = list(range(10, 30))
    request = make_request("a", prompt, max_tokens=3)
    batcher.add(request)
    step(batcher, worker)  # the whole prompt in one step: first token out, prompt blocks published
    assert request.output_token_ids and not batcher._pending  # noqa: SLF001 - the promise is kept
    assert batcher.overlap_tokens(probe(prompt)) == 20
    run_until_idle(batcher, worker)
    assert batcher.overlap_tokens(probe(prompt)) == 20  # cached blocks stay after the request ends


def test_a_moved_request_promises_nothing_and_a_dead_worker_forgets_its_promises() -> None:
    batcher, _ = make_pair(block_size=4)
    prompt = list(range(10, 30))
    moved = make_request("moved", prompt)
    moved.output_token_ids.extend([1, 2])  # came from a dead worker with tokens already streamed
    batcher.add(moved)
    assert batcher.overlap_tokens(probe(prompt)) == 0
    batcher.add(make_request("fresh", prompt[:8]))
    assert batcher.overlap_tokens(probe(prompt)) == 8
    batcher.take_all()
    assert batcher.overlap_tokens(probe(prompt)) == 0
