"""Automatic rollback judgements: worse than the baseline over the window, enough requests, once."""

from __future__ import annotations

import pytest

from services.scheduler.canary import RollbackGuard, RollbackPolicy, percentile
from services.scheduler.request import ErrorKind, RequestError
from shared.errors import InvalidArgument

WEIGHTS = {"stable": 90.0, "canary": 10.0}


def guard(**kw) -> RollbackGuard:
    return RollbackGuard(RollbackPolicy(**{"min_requests": 10, "window_s": 60.0, **kw}), WEIGHTS)


def feed(g: RollbackGuard, pool: str, n: int, *, at_s: float = 0.0, failed: int = 0, ttft_s: float = 0.05) -> None:
    for i in range(n):
        g.record(pool, at_s + i * 0.01, failed=i < failed, ttft_s=None if i < failed else ttft_s)


def test_baseline_defaults_to_the_heaviest_pool_and_can_be_named() -> None:
    assert guard().baseline_pool == "stable"
    assert guard(baseline_pool="canary").baseline_pool == "canary"
    with pytest.raises(InvalidArgument, match="rollback.baseline_pool"):
        guard(baseline_pool="nope")


def test_error_rate_above_the_margin_rolls_back_once() -> None:
    g = guard()
    feed(g, "stable", 50, failed=1)  # 2 %
    feed(g, "canary", 10, failed=1)  # 10 %: 8 points worse, margin 5
    (decision,) = g.evaluate(1.0, WEIGHTS)
    assert (decision.pool, decision.reason, decision.baseline_pool) == ("canary", "error_rate", "stable")
    assert decision.pool_stats.error_rate == pytest.approx(0.1)
    assert "error rate 0.100 vs 0.020" in decision.describe()
    assert g.evaluate(1.0, WEIGHTS) == []  # reported once
    assert "canary" in g.rolled_back and g.stats("canary", 1.0).num_requests == 0  # window forgotten


def test_within_the_margin_or_too_few_requests_stays() -> None:
    g = guard()
    feed(g, "stable", 50, failed=1)
    feed(g, "canary", 9, failed=9)  # all failed, but 9 < min_requests
    assert g.evaluate(1.0, WEIGHTS) == []
    g2 = guard()
    feed(g2, "stable", 100, failed=5)  # 5 %
    feed(g2, "canary", 10, failed=1)  # 10 %: exactly 5 points, not more
    assert g2.evaluate(1.0, WEIGHTS) == []


def test_a_failing_baseline_is_no_reason_to_roll_back_a_canary_failing_the_same() -> None:
    g = guard()
    feed(g, "stable", 20, failed=20)
    feed(g, "canary", 20, failed=20)
    assert g.evaluate(1.0, WEIGHTS) == []


def test_without_enough_baseline_traffic_nothing_is_judged() -> None:
    g = guard()
    feed(g, "stable", 5)
    feed(g, "canary", 50, failed=50)
    assert g.evaluate(1.0, WEIGHTS) == []


def test_p99_ttft_above_the_ratio_rolls_back() -> None:
    g = guard(max_ttft_p99_ratio=2.0)
    feed(g, "stable", 100, ttft_s=0.1)
    feed(g, "canary", 20, ttft_s=0.19)
    assert g.evaluate(1.0, WEIGHTS) == []  # 1.9x
    feed(g, "canary", 20, at_s=0.5, ttft_s=0.5)  # half of the canary's requests are slow now
    (decision,) = g.evaluate(1.0, WEIGHTS)
    assert decision.reason == "ttft_p99" and decision.pool_stats.ttft_p99_s == pytest.approx(0.5)
    assert "p99 TTFT 0.500 s vs 0.100 s" in decision.describe()


def test_old_requests_leave_the_window() -> None:
    g = guard(window_s=10.0)
    feed(g, "stable", 20)
    feed(g, "canary", 20, failed=20)
    assert g.stats("canary", 5.0).num_errors == 20
    assert g.stats("canary", 11.0).num_requests == 0
    assert g.evaluate(11.0, WEIGHTS) == []  # those failures are history


def test_weight_zero_pools_are_not_judged_and_rearm_clears_the_state() -> None:
    g = guard()
    feed(g, "stable", 20)
    feed(g, "canary", 20, failed=20)
    assert g.evaluate(1.0, {"stable": 90.0, "canary": 0.0}) == []
    assert [d.pool for d in g.evaluate(1.0, WEIGHTS)] == ["canary"]
    g.rearm("canary")
    assert "canary" not in g.rolled_back
    feed(g, "canary", 20, at_s=2.0, failed=20)
    assert [d.pool for d in g.evaluate(3.0, WEIGHTS)] == ["canary"]  # judged afresh


def test_disabled_policy_never_rolls_back() -> None:
    g = guard(enabled=False)
    feed(g, "stable", 20)
    feed(g, "canary", 20, failed=20)
    assert g.evaluate(1.0, WEIGHTS) == []


@pytest.mark.parametrize("field,value", [("window_s", 0.0), ("max_error_rate_increase", float("nan")),
                                         ("max_ttft_p99_ratio", -1.0), ("min_requests", 0)])
def test_bad_policy_names_the_field(field, value) -> None:
    with pytest.raises(InvalidArgument, match=f"rollback.{field}"):
        RollbackPolicy(**{field: value})


def test_percentile_is_nearest_rank_and_client_aborts_are_recognised() -> None:
    assert percentile([3.0, 1.0, 2.0], 99) == 3.0
    assert percentile(list(map(float, range(1, 101))), 99) == 99.0
    assert percentile([5.0], 50) == 5.0
    assert RequestError(ErrorKind.CANCELLED, "x").by_client and RequestError(ErrorKind.DEADLINE, "x").by_client
    assert not any(RequestError(k, "x").by_client for k in (ErrorKind.FAILED, ErrorKind.UNAVAILABLE))
