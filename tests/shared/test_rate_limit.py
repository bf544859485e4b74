"""Token buckets per API key: burst, steady refill, retry hints, keys independent."""

from __future__ import annotations

import pytest

from shared.errors import InvalidArgument
from shared.rate_limit import RateLimiter


def test_burst_then_the_refill_rate() -> None:
    limiter = RateLimiter(rate_per_s=2.0, burst=3)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", 0.0) == pytest.approx(0.5)  # one token refills in 1/rate
    assert limiter.take("a", 0.25) == pytest.approx(0.25)  # half refilled; the hint shrinks
    assert limiter.take("a", 0.5) == 0.0
    assert limiter.take("a", 0.5) > 0


def test_idle_time_refills_only_up_to_the_burst() -> None:
    limiter = RateLimiter(rate_per_s=10.0, burst=2)
    limiter.take("a", 0.0)
    limiter.take("a", 0.0)
    allowed = sum(limiter.take("a", 100.0) == 0.0 for _ in range(5))
    assert allowed == 2


def test_keys_have_their_own_buckets() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1)
    assert limiter.take("alice", 0.0) == 0.0
    assert limiter.take("alice", 0.0) > 0
    assert limiter.take("bob", 0.0) == 0.0


def test_a_clock_going_backwards_refills_nothing() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1)
    limiter.take("a", 10.0)
    assert limiter.take("a", 5.0) > 0


@pytest.mark.parametrize(("rate", "burst", "field"), [(0.0, 1, "rate_limit_per_s"), (1.0, 0, "rate_limit_burst")])
def test_bad_settings_name_the_field(rate: float, burst: int, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        RateLimiter(rate, burst)
    assert e.value.field == field
