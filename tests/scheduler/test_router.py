from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from services.scheduler.router import CandidateCost, PoolConfig, Router, RoutingDecision, WorkerLoad
from shared.errors import InvalidArgument, Unavailable

NUM_DRAWS = 10_000
TOLERANCE = 0.03


def make_pool(name: str, weight: float, *addresses: str, version: str = "v1") -> PoolConfig:
    return PoolConfig(name=name, version=version, weight=weight, worker_addresses=addresses or (f"{name}-0",))


def make_router(weights: dict[str, float], seed: int = 7, **knobs: float) -> Router:
    pools = [make_pool(name, weight) for name, weight in weights.items()]
    return Router(pools, seed=seed, **knobs)  # type: ignore[arg-type]


def make_load(
    address: str, overlap: int = 0, queued: int = 0, decodes: int = 0, up: bool = True
) -> WorkerLoad:
    return WorkerLoad(
        address=address,
        up=up,
        overlap_tokens=overlap,
        num_queued_prefill_tokens=queued,
        num_running_decode_requests=decodes,
    )


def all_up(pool: str) -> bool:
    return True


def only(*pools: str) -> Callable[[str], bool]:
    return lambda pool: pool in pools


def shares(
    router: Router, draws: int = NUM_DRAWS, available: Callable[[str], bool] = all_up
) -> dict[str, float]:
    counts = Counter(router.choose_pool("", available)[0] for _ in range(draws))
    return {pool: count / draws for pool, count in counts.items()}


# --- construction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pools", "field"),
    [
        ([], "pools"),
        ([make_pool("stable", 1), make_pool("stable", 1, "other")], "pools[stable].name"),
        ([make_pool("stable", 1), make_pool("canary", -0.5)], "pools[canary].weight"),
        ([make_pool("canary", float("nan"))], "pools[canary].weight"),
        ([make_pool("canary", 1, version="")], "pools[canary].version"),
        ([make_pool("", 1)], "pools[0].name"),
        ([make_pool("stable", 1, "w0"), make_pool("canary", 1, "w0")], "pools[canary].worker_addresses"),
    ],
)
def test_invalid_pool_config_names_the_field(pools: list[PoolConfig], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Router(pools)
    assert info.value.field == field
    assert info.value.message.startswith(field)


@pytest.mark.parametrize(
    ("knobs", "field"),
    [
        ({"load_weight": -1.0}, "load_weight"),
        ({"decode_cost_tokens": float("inf")}, "decode_cost_tokens"),
        ({"max_sessions": -1}, "max_sessions"),
    ],
)
def test_invalid_knob_names_the_field(knobs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Router([make_pool("stable", 1)], **knobs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_pools_lists_configured_pools_in_order() -> None:
    router = make_router({"stable": 90, "canary": 10})
    assert [(p.name, p.weight) for p in router.pools()] == [("stable", 90), ("canary", 10)]


# --- pool weights -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [{"stable": 90, "canary": 10}, {"a": 50, "b": 30, "c": 20}, {"a": 0.2, "b": 0.8}],
)
def test_pool_split_follows_weights(weights: dict[str, float]) -> None:
    observed = shares(make_router(weights))
    total = sum(weights.values())
    for pool, weight in weights.items():
        assert observed.get(pool, 0.0) == pytest.approx(weight / total, abs=TOLERANCE)


def test_zero_weight_pool_is_never_chosen() -> None:
    observed = shares(make_router({"stable": 1, "canary": 0}))
    assert observed == {"stable": 1.0}


def test_same_seed_gives_same_sequence() -> None:
    routers = [make_router({"a": 1, "b": 1}, seed=3) for _ in range(2)]
    sequences = [[r.choose_pool("", all_up)[0] for _ in range(200)] for r in routers]
    assert sequences[0] == sequences[1]


def test_unavailable_pool_is_skipped() -> None:
    observed = shares(make_router({"stable": 90, "canary": 10}), draws=1000, available=only("canary"))
    assert observed == {"canary": 1.0}


def test_set_weight_changes_the_split() -> None:
    router = make_router({"stable": 90, "canary": 10})
    router.set_weight("canary", 90)
    router.set_weight("stable", 10)
    observed = shares(router)
    assert observed["canary"] == pytest.approx(0.9, abs=TOLERANCE)
    assert {p.name: p.weight for p in router.pools()} == {"stable": 10, "canary": 90}

    router.set_weight("canary", 0)  # rollback
    assert shares(router, draws=1000) == {"stable": 1.0}


def test_set_weight_unknown_pool() -> None:
    router = make_router({"stable": 1})
    with pytest.raises(InvalidArgument) as info:
        router.set_weight("nope", 1)
    assert info.value.field == "pool"
    assert "nope" in info.value.message


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_set_weight_rejects_bad_weight(weight: float) -> None:
    router = make_router({"stable": 1})
    with pytest.raises(InvalidArgument) as info:
        router.set_weight("stable", weight)
    assert info.value.field == "weight"
    assert router.pools()[0].weight == 1  # unchanged


def test_no_pool_available_raises_unavailable() -> None:
    router = make_router({"stable": 1, "canary": 1})
    with pytest.raises(Unavailable):
        router.choose_pool("s", only())
    router.set_weight("stable", 0)
    router.set_weight("canary", 0)
    with pytest.raises(Unavailable):
        router.choose_pool("", all_up)


# --- sticky sessions ----------------------------------------------------------------------------


def test_session_sticks_to_its_first_pool() -> None:
    router = make_router({"a": 50, "b": 50})
    for session_id in ("s1", "s2", "s3", "s4"):
        first, sticky = router.choose_pool(session_id, all_up)
        assert not sticky
        results = {router.choose_pool(session_id, all_up) for _ in range(1000)}
        assert results == {(first, True)}


def test_sessions_spread_over_pools() -> None:
    router = make_router({"a": 50, "b": 50})
    firsts = Counter(router.choose_pool(f"s{i}", all_up)[0] for i in range(NUM_DRAWS))
    assert firsts["a"] / NUM_DRAWS == pytest.approx(0.5, abs=TOLERANCE)


def test_empty_session_id_is_not_sticky() -> None:
    router = make_router({"a": 50, "b": 50})
    results = [router.choose_pool("", all_up) for _ in range(100)]
    assert {pool for pool, _ in results} == {"a", "b"}
    assert not any(sticky for _, sticky in results)
    assert router.num_sessions == 0


def test_sticky_pool_unavailable_reroutes_and_resticks() -> None:
    router = make_router({"a": 50, "b": 50})
    first, _ = router.choose_pool("s", all_up)
    other = "b" if first == "a" else "a"

    assert router.choose_pool("s", only(other)) == (other, False)
    # Back up, the session now belongs to the pool it was moved to: no flip-flopping.
    assert router.choose_pool("s", all_up) == (other, True)


def test_sticky_pool_rolled_back_reroutes_and_resticks() -> None:
    router = make_router({"a": 50, "b": 50})
    first, _ = router.choose_pool("s", all_up)
    other = "b" if first == "a" else "a"

    router.set_weight(first, 0)
    assert router.choose_pool("s", all_up) == (other, False)
    router.set_weight(first, 50)
    assert router.choose_pool("s", all_up) == (other, True)


def test_sessions_are_lru_bounded() -> None:
    router = make_router({"a": 1}, max_sessions=2)
    for session_id in ("s1", "s2"):
        router.choose_pool(session_id, all_up)
    assert router.choose_pool("s1", all_up) == ("a", True)  # s1 now most recent; s2 oldest
    router.choose_pool("s3", all_up)  # forgets s2
    assert router.num_sessions == 2
    assert router.choose_pool("s1", all_up) == ("a", True)
    assert router.choose_pool("s3", all_up) == ("a", True)
    assert router.choose_pool("s2", all_up) == ("a", False)  # forgotten, re-stuck (forgets s1)
    assert router.choose_pool("s1", all_up) == ("a", False)


def test_max_sessions_zero_disables_stickiness() -> None:
    router = make_router({"a": 1}, max_sessions=0)
    router.choose_pool("s", all_up)
    assert router.choose_pool("s", all_up) == ("a", False)
    assert router.num_sessions == 0


# --- worker choice ------------------------------------------------------------------------------


def test_overlap_wins_with_modest_load() -> None:
    router = make_router({"p": 1})
    loads = [make_load("w-cached", overlap=480, queued=64, decodes=4), make_load("w-idle")]
    decision = router.choose_worker("p", 512, loads)
    # w-cached: 32 uncached + (64 + 4 * 8) = 128; w-idle: 512 uncached + 0 = 512.
    assert decision.worker == "w-cached"
    assert decision.overlap_tokens == 480
    assert decision.cost == 128


def test_overlap_loses_to_a_huge_queue() -> None:
    router = make_router({"p": 1})
    loads = [make_load("w-cached", overlap=480, queued=20_000, decodes=100), make_load("w-idle", decodes=2)]
    decision = router.choose_worker("p", 512, loads)
    # w-cached: 32 + 20_000 + 800 = 20_832; w-idle: 512 + 16 = 528.
    assert decision.worker == "w-idle"
    assert decision.overlap_tokens == 0
    assert decision.cost == 528


def test_load_weight_and_decode_cost_knobs() -> None:
    loads = [make_load("w-cached", overlap=480, queued=64, decodes=4), make_load("w-idle")]
    # load_weight 0: overlap alone decides, however loaded.
    assert make_router({"p": 1}, load_weight=0).choose_worker("p", 512, loads).worker == "w-cached"
    # Heavy load weight: 32 + 10 * (64 + 4 * 8) = 992 > 512.
    assert make_router({"p": 1}, load_weight=10).choose_worker("p", 512, loads).worker == "w-idle"
    # Expensive decodes: 32 + 64 + 4 * 200 = 896 > 512.
    assert make_router({"p": 1}, decode_cost_tokens=200).choose_worker("p", 512, loads).worker == "w-idle"


def test_down_workers_are_never_chosen() -> None:
    router = make_router({"p": 1})
    loads = [make_load("w0", overlap=512, up=False), make_load("w1", queued=5_000), make_load("w2", up=False)]
    decision = router.choose_worker("p", 512, loads)
    assert decision.worker == "w1"
    assert [c.address for c in decision.candidates] == ["w1"]


def test_no_worker_up_raises_unavailable() -> None:
    router = make_router({"p": 1})
    with pytest.raises(Unavailable):
        router.choose_worker("p", 10, [make_load("w0", up=False)])
    with pytest.raises(Unavailable):
        router.choose_worker("p", 10, [])


def test_choose_worker_unknown_pool() -> None:
    with pytest.raises(InvalidArgument) as info:
        make_router({"p": 1}).choose_worker("q", 10, [make_load("w0")])
    assert info.value.field == "pool"


def test_ties_prefer_fewest_queued_then_address() -> None:
    router = make_router({"p": 1})
    # Both cost 100 (w-a: 50 uncached + 50 queued; w-b: 92 uncached + 1 decode * 8); w-b queues
    # less, which beats address order: its queue drains sooner.
    tied_on_cost = [make_load("w-a", overlap=150, queued=50), make_load("w-b", overlap=108, decodes=1)]
    decision = router.choose_worker("p", 200, tied_on_cost)
    assert [c.cost for c in decision.candidates] == [100.0, 100.0]
    assert decision.worker == "w-b"
    assert router.choose_worker("p", 200, list(reversed(tied_on_cost))).worker == "w-b"
    # Fully tied: address order, whatever order the loads came in.
    identical = [make_load(address, queued=10) for address in ("w-c", "w-a", "w-b")]
    assert router.choose_worker("p", 50, identical).worker == "w-a"
    assert router.choose_worker("p", 50, list(reversed(identical))).worker == "w-a"


def test_decision_records_every_up_worker() -> None:
    router = make_router({"p": 1}, load_weight=0.5, decode_cost_tokens=10)
    loads = [
        make_load("w0", overlap=256, queued=300, decodes=3),
        make_load("w1", up=False, overlap=512),
        make_load("w2", overlap=0, queued=0, decodes=1),
        make_load("w3", overlap=512, queued=2_000),
    ]
    decision = router.choose_worker("p", 512, loads, sticky=True)
    assert decision.candidates == (
        CandidateCost("w0", 256, 256, 330.0, 256 + 0.5 * 330),
        CandidateCost("w2", 0, 512, 10.0, 512 + 0.5 * 10),
        CandidateCost("w3", 512, 0, 2000.0, 0.5 * 2000),
    )
    assert decision == RoutingDecision(
        pool="p", worker="w0", overlap_tokens=256, cost=421.0, candidates=decision.candidates, sticky=True
    )
    assert router.choose_worker("p", 512, loads).sticky is False


def test_overlap_beyond_prompt_is_clamped() -> None:
    decision = make_router({"p": 1}).choose_worker("p", 64, [make_load("w0", overlap=128)])
    assert decision.candidates[0].uncached_prompt_tokens == 0
    assert decision.overlap_tokens == 64


def test_round_robin_policy_cycles_and_ignores_overlap() -> None:
    from services.scheduler.router import PoolConfig, Router, WorkerLoad

    router = Router([PoolConfig("p", "v1", 1.0, ("a:1", "b:2", "c:3"))], policy="round_robin", seed=0)
    loads = [WorkerLoad("a:1", True, 500, 0, 0), WorkerLoad("b:2", True, 0, 10_000, 50),
             WorkerLoad("c:3", False, 0, 0, 0)]
    chosen = [router.choose_worker("p", 512, loads).worker for _ in range(4)]
    assert chosen == ["a:1", "b:2", "a:1", "b:2"]  # down worker c skipped; overlap and load ignored


def test_unknown_policy_names_the_field() -> None:
    import pytest

    from services.scheduler.router import PoolConfig, Router
    from shared.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="routing"):
        Router([PoolConfig("p", "v1", 1.0, ("a:1",))], policy="random")
