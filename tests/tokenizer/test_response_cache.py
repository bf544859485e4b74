"""The response cache on its own: keys, TTL on a fake clock, the byte budget, LRU order and the
routable pools that decide which answers may be served."""

from __future__ import annotations

import dataclasses
import random

import pytest

from services.tokenizer.api_types import GenerateChunk, ServingPool, TokenLogprob, Usage
from services.tokenizer.response_cache import (
    CacheControl, ResponseCache, cache_key, deep_size, entry_bytes, is_deterministic,
)
from shared.errors import InvalidArgument
from shared.sampling_rules import SamplingFields

STABLE = ServingPool("stable", "v1")
CANARY = ServingPool("canary", "v2")
GREEDY = SamplingFields(max_tokens=16, temperature=0.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(num_tokens: int = 4, text: str = "hello", finish: str | None = "length",
           num_logprobs: int = 0) -> tuple[GenerateChunk, ...]:
    """Two chunks, as a stream sends them: tokens first, then the rest with the finish and usage."""
    ids = tuple(range(1000, 1000 + num_tokens))
    lps = tuple(TokenLogprob(-0.5, ids[:num_logprobs], (-0.5,) * num_logprobs) for _ in ids) if num_logprobs else ()
    half = num_tokens // 2
    return (GenerateChunk("", text[: len(text) // 2], ids[:half], lps[:half], None),
            GenerateChunk("", text[len(text) // 2:], ids[half:], lps[half:], finish, Usage(7, num_tokens, 0)))


def key(n: int) -> bytes:
    return cache_key("", "", [n, n + 1, n + 2], GREEDY)


def cache(max_bytes: int = 1 << 20, ttl_s: float = 60.0, routable=(STABLE,), **kw) -> ResponseCache:
    c = ResponseCache(max_bytes, ttl_s, **kw)
    c.set_routable(routable)
    return c


# --- keys ----------------------------------------------------------------------------------------

def test_equal_requests_make_equal_keys_and_int_zero_is_float_zero() -> None:
    a = cache_key("alice", "salt", [1, 2, 3], SamplingFields(max_tokens=8, temperature=0.0, stop=("\n",)))
    b = cache_key("alice", "salt", (1, 2, 3), SamplingFields(max_tokens=8, temperature=0, stop=("\n",)))
    assert a == b and len(a) == 32


# Each a change that may change the answer; every one must make another key.
SAMPLING_CHANGES = {
    "max_tokens": 9, "temperature": 0.5, "top_k": 5, "top_p": 0.9, "min_p": 0.1, "repetition_penalty": 1.1,
    "presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": 7, "stop": ("x",), "stop_token_ids": (2,),
    "ignore_eos": True, "logprobs": 2, "logit_bias": ((5, 1.5),),
}


@pytest.mark.parametrize("name", list(SAMPLING_CHANGES))
def test_every_sampling_field_is_in_the_key(name) -> None:
    base = SamplingFields(max_tokens=8, temperature=0.0)
    changed = dataclasses.replace(base, **{name: SAMPLING_CHANGES[name]})
    assert cache_key("", "", [1, 2], base) != cache_key("", "", [1, 2], changed)


def test_tenant_salt_and_prompt_are_in_the_key() -> None:
    base = cache_key("alice", "s", [1, 2, 3], GREEDY)
    others = [cache_key("bob", "s", [1, 2, 3], GREEDY), cache_key("", "s", [1, 2, 3], GREEDY),
              cache_key("alice", "t", [1, 2, 3], GREEDY), cache_key("alice", "", [1, 2, 3], GREEDY),
              cache_key("alice", "s", [1, 2, 4], GREEDY), cache_key("alice", "s", [3, 2, 1], GREEDY),
              cache_key("alice", "s", [1, 2, 3, 0], GREEDY),
              # No field boundary can be moved to make two requests meet.
              cache_key("alice\"", "s", [1, 2, 3], GREEDY), cache_key("alic", "es", [1, 2, 3], GREEDY)]
    assert len({base, *others}) == len(others) + 1


@pytest.mark.parametrize("sampling,deterministic", [
    (SamplingFields(temperature=0.0), True), (SamplingFields(temperature=1e-7), True),
    (SamplingFields(seed=0), True), (SamplingFields(temperature=0.8, seed=42), True),
    (SamplingFields(), False), (SamplingFields(temperature=0.7), False), (SamplingFields(top_p=0.5), False),
])
def test_only_greedy_or_seeded_requests_are_deterministic(sampling, deterministic) -> None:
    assert is_deterministic(sampling) is deterministic


@pytest.mark.parametrize("value,read,write", [
    (None, True, True), ("", True, True), ("max-age=60, private", True, True), ("no-cache", False, True),
    ("No-Cache", False, True), ("max-age=0, no-cache", False, True), ("no-store", False, False),
    ("no-cache, no-store", False, False),
])
def test_cache_control(value, read, write) -> None:
    assert CacheControl.parse(value) == CacheControl(read=read, write=write)


# --- storing and serving -------------------------------------------------------------------------

def test_a_stored_answer_comes_back_whole() -> None:
    c = cache()
    stored = answer(6, "a longer text", num_logprobs=3)
    assert c.put(key(1), stored, STABLE)
    assert c.get(key(1)) == stored and c.get(key(2)) is None
    assert c.num_entries == 1 and c.num_bytes == entry_bytes(key(1), stored, STABLE)


@pytest.mark.parametrize("finish", [None, "abort"])
def test_only_complete_answers_are_stored(finish) -> None:
    c = cache()
    assert not c.put(key(1), answer(finish=finish), STABLE)
    assert not c.put(key(1), (), STABLE)
    assert c.get(key(1)) is None and c.num_bytes == 0


def test_entries_expire_after_the_ttl() -> None:
    clock, evicted = Clock(), []
    c = cache(ttl_s=10.0, clock=clock, on_evict=evicted.append)
    c.put(key(1), answer(), STABLE)
    clock.now += 5.0
    c.put(key(2), answer(), STABLE)
    clock.now += 4.999
    assert c.get(key(1)) is not None  # a read does not extend the TTL
    clock.now += 0.001
    assert c.get(key(1)) is None and c.get(key(2)) is not None
    assert evicted == ["expired"] and c.num_entries == 1
    clock.now += 5.0
    assert c.get(key(2)) is None and c.num_bytes == 0 and evicted == ["expired", "expired"]


def test_storing_again_restarts_the_ttl_and_is_no_eviction() -> None:
    clock, evicted = Clock(), []
    c = cache(ttl_s=10.0, clock=clock, on_evict=evicted.append)
    c.put(key(1), answer(), STABLE)
    clock.now += 8.0
    c.put(key(1), answer(text="fresh"), STABLE)
    clock.now += 8.0
    assert c.get(key(1))[0].text == "fr" and evicted == []
    assert c.num_bytes == entry_bytes(key(1), answer(text="fresh"), STABLE)


def test_least_recently_used_goes_first() -> None:
    size = entry_bytes(key(1), answer(), STABLE)
    evicted: list[str] = []
    c = cache(max_bytes=3 * size, on_evict=evicted.append)
    for n in (1, 2, 3):
        assert c.put(key(n), answer(), STABLE)
    assert c.get(key(1)) is not None  # 2 is now the least recently used
    c.put(key(4), answer(), STABLE)
    assert [n for n in (1, 2, 3, 4) if c.get(key(n)) is not None] == [1, 3, 4]
    assert evicted == ["capacity"] and c.num_bytes == 3 * size


def test_the_budget_is_never_exceeded() -> None:
    rng = random.Random(5)
    budget = 40_000
    c = cache(max_bytes=budget, routable=(STABLE, CANARY))
    for i in range(400):
        n = rng.randrange(60)
        stored = answer(rng.randrange(1, 200), "x" * rng.randrange(0, 3000), num_logprobs=rng.randrange(0, 4))
        fits = entry_bytes(key(n), stored, STABLE) <= budget
        assert c.put(key(n), stored, rng.choice((STABLE, CANARY))) == fits
        if rng.random() < 0.2:
            c.get(key(rng.randrange(60)))
        assert 0 <= c.num_bytes <= budget
    present = {n: c.get(key(n)) for n in range(60)}
    assert c.num_bytes == sum(entry_bytes(key(n), chunks, STABLE) for n, chunks in present.items() if chunks)
    assert c.num_entries == sum(1 for chunks in present.values() if chunks)


def test_an_answer_larger_than_the_budget_is_not_stored_and_evicts_nothing() -> None:
    c = cache(max_bytes=4000)
    assert c.put(key(1), answer(), STABLE)
    assert not c.put(key(2), answer(text="y" * 5000), STABLE)
    assert c.get(key(1)) is not None and c.num_entries == 1


def test_entry_size_counts_what_the_answer_holds() -> None:
    small = entry_bytes(key(1), answer(4, "hi"), STABLE)
    # A 10,000-character text, 500 tokens and 5 logprobs per token cost at least their raw bytes.
    big_chunks = answer(500, "z" * 10_000, num_logprobs=5)
    big = entry_bytes(key(1), big_chunks, STABLE)
    assert big >= small + 10_000 + 500 * 8 + 500 * 6 * 8
    assert big >= deep_size(big_chunks)


# --- routable pools ------------------------------------------------------------------------------

def test_nothing_is_served_or_stored_before_the_scheduler_says_what_is_routable() -> None:
    c = ResponseCache(1 << 20, 60.0)
    assert c.routable is None
    assert not c.put(key(1), answer(), STABLE) and c.get(key(1)) is None


def test_a_pool_that_stops_being_routable_loses_its_entries() -> None:
    evicted: list[str] = []
    c = cache(routable=(STABLE, CANARY), on_evict=evicted.append)
    c.put(key(1), answer(), STABLE)
    c.put(key(2), answer(), CANARY)
    c.set_routable([STABLE])  # the canary rolled back
    assert c.get(key(2)) is None and c.get(key(1)) is not None
    assert evicted == ["version"] and c.num_bytes == entry_bytes(key(1), answer(), STABLE)
    # An answer the canary finished after the rollback was announced is never stored.
    assert not c.put(key(2), answer(), CANARY)
    c.set_routable([STABLE, CANARY])  # an operator brings it back: its old answers are gone for good
    assert c.get(key(2)) is None


def test_the_pool_not_only_its_version_label_decides() -> None:
    same_label = ServingPool("canary", "v1")  # a new worker build that kept the stable label
    c = cache(routable=(STABLE, same_label))
    c.put(key(1), answer(), same_label)
    c.set_routable([STABLE])
    assert c.get(key(1)) is None and c.num_entries == 0


def test_a_broken_stream_hides_entries_until_the_next_announcement() -> None:
    c = cache(routable=(STABLE,))
    c.put(key(1), answer(), STABLE)
    c.set_routable(None)
    assert c.get(key(1)) is None and c.num_entries == 1
    assert not c.put(key(2), answer(), STABLE)
    c.set_routable([STABLE])
    assert c.get(key(1)) is not None


@pytest.mark.parametrize("max_bytes,ttl_s,field", [
    (0, 60.0, "response_cache_mib"), (-5, 60.0, "response_cache_mib"), (1.5, 60.0, "response_cache_mib"),
    (1024, 0.0, "response_cache_ttl_s"), (1024, -1.0, "response_cache_ttl_s"),
    (1024, float("nan"), "response_cache_ttl_s"), (1024, float("inf"), "response_cache_ttl_s"),
])
def test_bad_settings_name_the_setting(max_bytes, ttl_s, field) -> None:
    with pytest.raises(InvalidArgument) as err:
        ResponseCache(max_bytes, ttl_s)
    assert err.value.field == field and str(err.value).startswith(field)
