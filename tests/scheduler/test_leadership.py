"""Leadership over a lease file: who leads, with what epoch, and when a leader stands down.

Real `Leadership` objects on a real `FileLeaseStore` in tmp_path, driven by asyncio with leases of
a fraction of a second. Each leader builds a real Fleet whose one worker address answers nothing
(nothing here needs a worker: the fleet is published once `start(wait_s=0)` returns)."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.scheduler.fleet import Fleet, FleetConfig
from services.scheduler.leadership import Leadership, Role
from services.scheduler.lease import FileLeaseStore
from services.scheduler.router import PoolConfig

pytestmark = pytest.mark.asyncio(loop_scope="session")

DURATION_S = 0.45
NOWHERE = "127.0.0.1:9"  # discard port: nothing answers, the worker loop just keeps probing


class Candidate:
    """One scheduler's leadership, with every fleet it built and every change its listener heard."""

    def __init__(self, store, identity: str, duration_s: float = DURATION_S) -> None:
        self.fleets: list[Fleet] = []
        self.heard: list[bool] = []
        self.epochs_asked: list[int] = []
        self.leadership = Leadership(self._make_fleet, store=store, identity=identity, duration_s=duration_s)
        self.leadership.on_change(self._listen)

    def _make_fleet(self, epoch: int) -> Fleet:
        self.epochs_asked.append(epoch)
        pool = PoolConfig("default", "v1", 1.0, (NOWHERE,))
        self.fleets.append(Fleet(FleetConfig(pools=(pool,), probe_interval_s=0.05, scheduler_epoch=epoch)))
        return self.fleets[-1]

    async def _listen(self, leading: bool) -> None:
        self.heard.append(leading)

    @property
    def leads(self) -> bool:
        return self.leadership.fleet is not None


class FailingStore:
    """The lease file behind a switch that makes every update raise OSError (an unreachable volume
    or API server), remembering when the last update went through."""

    def __init__(self, path) -> None:
        self._file = FileLeaseStore(path)
        self.failing = False
        self.last_written_s = 0.0

    def update(self, decide):
        if self.failing:
            raise OSError("lease store unreachable")
        lease = self._file.update(decide)
        self.last_written_s = time.monotonic()
        return lease


class SlowReleaseStore:
    """The lease file, except that the answer to a release comes late (an API server that applied
    the write and is slow to say so)."""

    def __init__(self, path) -> None:
        self._file = FileLeaseStore(path)

    def update(self, decide):
        released = []

        def spy(current):
            new = decide(current)
            if new is not None and new.released:
                released.append(new)
            return new
        lease = self._file.update(spy)
        if released:
            time.sleep(DURATION_S / 2)  # longer than a renewal interval
        return lease


async def wait_for(predicate, what: str, timeout_s: float = 5.0) -> float:
    """Waits until `predicate()`; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic()


async def stop_all(*candidates: Candidate) -> None:
    for c in candidates:
        await c.leadership.stop()


async def test_exactly_one_of_two_leads_with_the_leases_epoch(tmp_path) -> None:
    store = FileLeaseStore(tmp_path / "lease")
    a, b = Candidate(store, "a:1"), Candidate(store, "b:1")
    a.leadership.start()
    b.leadership.start()
    try:
        await wait_for(lambda: a.leads or b.leads, "someone leads")
        # Several lease durations: the renewals keep the standby from taking over.
        for _ in range(int(3 * DURATION_S / 0.05)):
            assert [a.leads, b.leads].count(True) == 1
            await asyncio.sleep(0.05)
        leader, standby = (a, b) if a.leads else (b, a)
        lease = store.update(lambda current: None)
        assert lease is not None and lease.holder == leader.leadership.identity
        assert leader.leadership.role is Role.LEADER and leader.leadership.epoch == lease.epoch
        assert leader.leadership.fleet.config.scheduler_epoch == lease.epoch == leader.epochs_asked[-1]
        assert len(leader.fleets) == 1 and leader.heard == [True]
        assert standby.leadership.role is Role.STANDBY and standby.leadership.epoch == 0
        assert standby.leadership.leader == leader.leadership.identity  # what its servicer names
        assert standby.fleets == [] and standby.heard == []
    finally:
        await stop_all(a, b)


async def test_a_leader_that_stops_hands_over_at_once_with_a_higher_epoch(tmp_path) -> None:
    store = FileLeaseStore(tmp_path / "lease")
    a = Candidate(store, "a:1")
    a.leadership.start()
    await wait_for(lambda: a.leads, "a leads")
    b = Candidate(store, "b:1")
    b.leadership.start()
    try:
        await asyncio.sleep(DURATION_S)  # b has seen a's lease renewed: it would wait a whole duration
        assert not b.leads and b.leadership.leader == "a:1"
        old_epoch, old_fleet = a.leadership.epoch, a.leadership.fleet
        stopped_s = time.monotonic()
        await a.leadership.stop()  # release, then stop leading
        assert a.heard == [True, False] and a.leadership.role is Role.STANDBY
        assert all(loop.done for loop in old_fleet.loops.values())
        released = store.update(lambda current: None)
        assert released.holder in ("", "b:1")  # handed back (and maybe already taken)
        led_s = await wait_for(lambda: b.leads, "b leads")
        assert led_s - stopped_s < DURATION_S / 2, "the standby waited for the lease to expire"
        assert b.leadership.epoch > old_epoch
        assert b.leadership.fleet.config.scheduler_epoch == b.leadership.epoch
        assert store.update(lambda current: None).epoch == b.leadership.epoch
    finally:
        await stop_all(a, b)


async def test_a_stopping_leader_does_not_take_back_the_lease_it_hands_back(tmp_path) -> None:
    a = Candidate(SlowReleaseStore(tmp_path / "lease"), "a:1")
    a.leadership.start()
    await wait_for(lambda: a.leads, "a leads")
    epoch = a.leadership.epoch
    await a.leadership.stop()
    lease = FileLeaseStore(tmp_path / "lease").update(lambda current: None)
    # Still handed back: a standby takes it at once. Had the stopping leader's own renewal seen the
    # release and claimed the lease again, a standby would wait a whole duration for it to expire.
    assert lease.released and lease.epoch == epoch
    assert len(a.fleets) == 1 and a.heard == [True, False]


async def test_a_leader_that_cannot_renew_stands_down_before_its_lease_could_be_taken(tmp_path) -> None:
    store = FailingStore(tmp_path / "lease")
    a = Candidate(store, "a:1")
    a.leadership.start()
    try:
        await wait_for(lambda: a.leads, "a leads")
        await asyncio.sleep(DURATION_S)  # a few renewals
        fleet = a.leadership.fleet
        store.failing = True
        stood_down_s = await wait_for(lambda: a.leadership.role is Role.STANDBY, "a stands down", 3 * DURATION_S)
        # A standby waits one duration from the last change it saw: the leader is gone by then.
        assert stood_down_s - store.last_written_s < DURATION_S
        assert a.heard == [True, False] and a.leadership.fleet is None and a.leadership.epoch == 0
        assert all(loop.done for loop in fleet.loops.values())
        await asyncio.sleep(DURATION_S)
        assert not a.leads and len(a.fleets) == 1  # it cannot claim while the store is unreachable
    finally:
        store.failing = False
        await stop_all(a)


async def test_one_failed_renewal_does_not_cost_the_lease(tmp_path) -> None:
    store = FailingStore(tmp_path / "lease")
    a = Candidate(store, "a:1")
    a.leadership.start()
    try:
        await wait_for(lambda: a.leads, "a leads")
        epoch = a.leadership.epoch
        written_s = store.last_written_s
        store.failing = True
        await wait_for(lambda: time.monotonic() - written_s > DURATION_S / 3 + 0.05, "a renewal is due")
        store.failing = False
        await asyncio.sleep(DURATION_S)
        assert a.leads and a.leadership.epoch == epoch and a.heard == [True]
        assert store.last_written_s > written_s  # renewing again
    finally:
        await stop_all(a)


@pytest.mark.parametrize("how", ["superseded", "fleet fenced"])
async def test_a_superseded_leader_stands_down_at_once(tmp_path, how: str) -> None:
    a = Candidate(FileLeaseStore(tmp_path / "lease"), "a:1", duration_s=3.0)  # no renewal tick in the way
    a.leadership.start()
    try:
        await wait_for(lambda: a.leads, "a leads")
        fleet = a.leadership.fleet
        if how == "superseded":
            a.leadership.superseded("worker w refused our epoch")
        else:  # what a worker loop calls when a worker refuses this fleet's epoch
            fleet.on_fenced("worker w refused our Reset")
        await wait_for(lambda: a.leadership.role is Role.STANDBY, "a stands down", 0.5)
        await wait_for(lambda: a.heard == [True, False], "the listener hears the step-down", 0.5)
        assert a.leadership.fleet is None and all(loop.done for loop in fleet.loops.values())
    finally:
        await stop_all(a)


async def test_stop_during_a_step_down_still_stops_the_fleet_and_tells_every_listener(tmp_path) -> None:
    # The scheduler's own listener awaits (it sets the server's health). A shutdown that arrives
    # while the leader is standing down must not cut that short: the fleet's worker loops would go
    # on probing and stepping, and the listeners after the slow one would never hear of it.
    a = Candidate(FileLeaseStore(tmp_path / "lease"), "a:1", duration_s=3.0)
    gate = asyncio.Event()
    told_after: list[bool] = []

    async def slow(leading: bool) -> None:
        if not leading:
            await gate.wait()

    async def after(leading: bool) -> None:
        told_after.append(leading)

    a.leadership.on_change(slow)
    a.leadership.on_change(after)
    a.leadership.start()
    await wait_for(lambda: a.leads, "a leads")
    fleet = a.leadership.fleet
    a.leadership.superseded("worker w refused our epoch")
    await wait_for(lambda: a.heard == [True, False], "the step-down began", 0.5)
    asyncio.get_running_loop().call_later(0.1, gate.set)
    await asyncio.wait_for(a.leadership.stop(), 2.0)
    assert told_after == [True, False]
    assert all(loop.done for loop in fleet.loops.values()), "the withdrawn fleet's worker loops still run"
    assert a.leadership.role is Role.STANDBY and a.leadership.fleet is None


async def test_without_a_lease_it_leads_at_once_with_its_fleets_epoch() -> None:
    a = Candidate(None, "a:1")
    assert not a.leadership.leased and a.leadership.role is Role.STANDBY
    a.leadership.start()
    try:
        await wait_for(lambda: a.leads, "a leads", 1.0)
        fleet = a.leadership.fleet
        assert a.epochs_asked == [0]  # the fleet picks its own epoch: its start time
        assert a.leadership.role is Role.LEADER and a.heard == [True]
        assert a.leadership.epoch == fleet.config.scheduler_epoch > 0
        assert abs(fleet.config.scheduler_epoch - time.time_ns()) < 60 * 10**9
    finally:
        await a.leadership.stop()
    assert a.heard == [True, False] and a.leadership.role is Role.STANDBY
    assert all(loop.done for loop in fleet.loops.values())
