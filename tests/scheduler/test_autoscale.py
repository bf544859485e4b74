"""The desired-workers rule on synthetic pool loads: the queue and KV pressure scale a pool up,
idleness scales it down one worker at a time with a hysteresis band, the minimum holds, and bad
targets are refused with the field named."""

from __future__ import annotations

import math

import pytest

from services.scheduler.autoscale import AutoscalePolicy, PoolLoad, WorkerSample, desired_workers, needed_workers
from shared.errors import InvalidArgument

POLICY = AutoscalePolicy()  # 4 waiting per worker, 75% KV, 20% scale-down margin, min 1
BLOCKS = 1000  # usable KV blocks per worker


def pool(num_workers: int, waiting: int = 0, kv_used_ratio: float = 0.0, running: int = 0) -> PoolLoad:
    """A pool of identical workers, the load spread evenly."""
    per_worker = [WorkerSample(num_waiting=waiting // num_workers + (i < waiting % num_workers),
                               num_running=running // num_workers, kv_blocks_used=round(kv_used_ratio * BLOCKS),
                               kv_blocks_total=BLOCKS) for i in range(num_workers)]
    return PoolLoad.of(per_worker)


def test_the_load_of_a_pool_is_the_sum_of_its_workers() -> None:
    load = PoolLoad.of([WorkerSample(3, 10, 600, 1000), WorkerSample(1, 4, 100, 500)])
    assert (load.num_workers_up, load.num_waiting, load.num_running) == (2, 4, 14)
    assert load.kv_used_ratio == pytest.approx(700 / 1500)
    assert PoolLoad.of([]).kv_used_ratio == 0.0


@pytest.mark.parametrize("waiting, expected", [
    (0, 2), (8, 2),  # at most 4 waiting per worker: enough workers
    (9, 3),  # 9 / 4 = 2.25 workers' worth of queue
    (40, 10),  # a burst asks for all it needs at once, not one more at a time
])
def test_queue_growth_scales_up(waiting: int, expected: int) -> None:
    assert desired_workers(pool(2, waiting=waiting, kv_used_ratio=0.5), POLICY) == expected


def test_a_growing_queue_asks_for_more_and_more_workers() -> None:
    asked = [desired_workers(pool(2, waiting=w, kv_used_ratio=0.7), POLICY) for w in range(0, 41, 4)]
    assert asked == sorted(asked) and asked[0] == 2 and asked[-1] == 10


@pytest.mark.parametrize("kv_used_ratio, expected", [
    (0.75, 4),  # exactly at the target: hold (no float noise turns 4 * 0.75 / 0.75 into 5)
    (0.80, 5),  # 4 * 0.80 / 0.75 = 4.27
    (0.99, 6),  # 5.28
])
def test_kv_pressure_scales_up_with_nothing_waiting(kv_used_ratio: float, expected: int) -> None:
    assert desired_workers(pool(4, kv_used_ratio=kv_used_ratio), POLICY) == expected


def test_the_larger_of_the_two_signals_wins() -> None:
    load = pool(4, waiting=24, kv_used_ratio=0.9)  # queue: 6 workers; KV: 4.8 -> 5
    assert needed_workers(load, POLICY) == pytest.approx(6.0)
    assert desired_workers(load, POLICY) == 6
    assert desired_workers(pool(4, waiting=4, kv_used_ratio=0.9), POLICY) == 5  # KV wins


def test_idle_scales_down_one_worker_at_a_time_to_the_minimum() -> None:
    workers, seen = 8, []
    while True:  # the autoscaler applies each answer, a worker leaves, and the next evaluation runs
        desired = desired_workers(pool(workers), POLICY)
        seen.append(desired)
        if desired == workers:
            break
        assert desired == workers - 1, seen
        workers = desired
    assert seen == [7, 6, 5, 4, 3, 2, 1, 1]


def test_asking_again_before_the_worker_left_asks_for_the_same_number() -> None:
    # The rule is relative to the workers up now: a second scrape does not take another one off.
    load = pool(5)
    assert {desired_workers(load, POLICY) for _ in range(3)} == {4}


@pytest.mark.parametrize("kv_used_ratio, expected", [
    (0.60, 4),  # 4 * 0.60 / 0.75 = 3.2 workers: one fewer would run at 80% of the target: hold
    (0.45, 3),  # 2.4 <= 3 * 0.8: three workers would sit at 60% KV, under the band: one fewer
    (0.10, 3),  # nearly idle: still only one fewer per evaluation
])
def test_scale_down_waits_for_the_hysteresis_band(kv_used_ratio: float, expected: int) -> None:
    assert desired_workers(pool(4, kv_used_ratio=kv_used_ratio), POLICY) == expected


def test_a_worker_removed_for_idleness_is_not_asked_back() -> None:
    """After scaling down, the same total load on one worker fewer must not scale up again."""
    for kv_used_ratio in [i / 100 for i in range(0, 76)]:
        before = pool(4, waiting=3, kv_used_ratio=kv_used_ratio)
        if desired_workers(before, POLICY) != 3:
            continue
        used = before.kv_blocks_used  # the running requests finish where they are; count them on 3 anyway
        after = PoolLoad(3, before.num_waiting, before.num_running, used, 3 * BLOCKS)
        assert desired_workers(after, POLICY) <= 3, kv_used_ratio


def test_no_margin_scales_down_as_soon_as_the_load_fits() -> None:
    eager = AutoscalePolicy(scale_down_margin=0.0)
    assert desired_workers(pool(4, kv_used_ratio=0.5625), eager) == 3  # 3 workers at exactly 75%
    assert desired_workers(pool(4, kv_used_ratio=0.5625), POLICY) == 4


def test_the_minimum_is_respected() -> None:
    assert desired_workers(pool(1), POLICY) == 1
    assert desired_workers(pool(3), AutoscalePolicy(min_workers=3)) == 3
    assert desired_workers(pool(2), AutoscalePolicy(min_workers=4)) == 4  # below the minimum: ask for it
    assert desired_workers(PoolLoad(), POLICY) == 1  # no worker up yet (or all down): the minimum


def test_running_requests_alone_do_not_scale() -> None:
    # They hold KV blocks, so KV use counts them; the count itself is exported, not used.
    assert desired_workers(pool(2, running=200, kv_used_ratio=0.5), POLICY) == 2


@pytest.mark.parametrize("changes, field", [
    ({"target_waiting_per_worker": 0.0}, "autoscale.target_waiting_per_worker"),
    ({"target_waiting_per_worker": -1.0}, "autoscale.target_waiting_per_worker"),
    ({"target_waiting_per_worker": math.inf}, "autoscale.target_waiting_per_worker"),
    ({"target_kv_used_ratio": 0.0}, "autoscale.target_kv_used_ratio"),
    ({"target_kv_used_ratio": 1.5}, "autoscale.target_kv_used_ratio"),
    ({"target_kv_used_ratio": math.nan}, "autoscale.target_kv_used_ratio"),
    ({"scale_down_margin": -0.1}, "autoscale.scale_down_margin"),
    ({"scale_down_margin": 1.0}, "autoscale.scale_down_margin"),
    ({"min_workers": 0}, "autoscale.min_workers"),
    ({"min_workers": 1.5}, "autoscale.min_workers"),
    ({"min_workers": True}, "autoscale.min_workers"),
])
def test_bad_targets_are_refused(changes: dict, field: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^{field}: ") as raised:
        AutoscalePolicy(**changes)
    assert raised.value.field == field


def test_the_edges_of_the_ranges_are_allowed() -> None:
    AutoscalePolicy(target_kv_used_ratio=1.0, scale_down_margin=0.0, target_waiting_per_worker=0.5)
