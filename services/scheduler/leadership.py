"""This scheduler's role: the leader drives the workers through a Fleet; a standby waits.

Without a lease (`--leader-lease` unset) the scheduler leads from the start, alone, as before. With
one, it stands by until it holds the lease (lease.py), then builds a Fleet with the lease's epoch:
each worker loop Resets its worker under that epoch, which drops whatever the previous leader left
there (its requests come back from their front doors, resubmitted from prompt + tokens streamed).
The Fleet is published, and the scheduler reports SERVING, only once its workers answer, so a front
door does not resume requests into a fleet that cannot run them yet.

A leader stops leading when its renewal finds someone else's lease, when it cannot renew for
two-thirds of the lease (so it gives up before a standby can take over), or at once when a worker
refuses its epoch (a successor has reset it). Stopping closes every front door's stream with
UNAVAILABLE, the signal to resume elsewhere, and then the Fleet; the scheduler stands by again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import Awaitable, Callable

from services.scheduler.fleet import Fleet
from services.scheduler.lease import (
    Lease, LeaseStore, Observation, decide_claim, decide_release, decide_renewal,
)
from services.scheduler.request import ErrorKind, RequestError

logger = logging.getLogger(__name__)


class Role(enum.Enum):
    LEADER = "leader"
    STANDBY = "standby"


# Told when the Fleet is published (True) or withdrawn (False); the servicer closes its streams
# and the server flips the Scheduler service's health.
RoleListener = Callable[[bool], Awaitable[None]]


class Leadership:
    def __init__(self, make_fleet: Callable[[int], Fleet], *, store: LeaseStore | None = None, identity: str = "",
                 duration_s: float = 3.0, startup_wait_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._make_fleet = make_fleet
        self._store = store
        self.identity = identity
        self.duration_s = duration_s
        self._startup_wait_s = startup_wait_s
        self._clock, self._wall = clock, wall
        self.fleet: Fleet | None = None  # published while leading, once its workers answer
        self.role = Role.STANDBY
        self.epoch = 0
        self.leader = ""  # the holder named by the lease last read
        self._listeners: list[RoleListener] = []
        self._superseded = asyncio.Event()  # a worker refused our epoch
        self._mine: Lease | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def leading(cls, fleet: Fleet) -> Leadership:
        """Leads `fleet` (built and started by the caller) for good: tests, and embedding."""
        leadership = cls(lambda epoch: fleet)
        leadership.fleet, leadership.role, leadership.epoch = fleet, Role.LEADER, fleet.config.scheduler_epoch
        return leadership

    @property
    def leased(self) -> bool:
        return self._store is not None

    def on_change(self, listener: RoleListener) -> None:
        self._listeners.append(listener)

    async def run(self) -> None:
        """Leads for good without a lease; with one, alternates standing by and leading until cancelled."""
        if self._store is None:
            fleet = self._make_fleet(0)
            self.epoch = fleet.config.scheduler_epoch
            try:
                await self._publish_after_start(fleet, Lease(self.identity, self.epoch, 0.0, 0.0))
                await asyncio.Event().wait()  # until cancelled
            finally:
                await self._withdraw(fleet)
        observation = Observation()
        retry_s = self.duration_s / 6
        while True:
            claimed: list[Lease] = []

            def claim(current: Lease | None) -> Lease | None:
                lease = decide_claim(current, observation, self.identity, self._clock(), self.duration_s, self._wall())
                if lease is not None:
                    claimed.append(lease)
                return lease
            try:
                lease = await asyncio.to_thread(self._store.update, claim)
            except OSError as e:
                logger.warning("leadership lease unreachable: %s", e)
                await asyncio.sleep(retry_s)
                continue
            self.leader = lease.holder if lease is not None else ""
            if claimed and lease == claimed[-1]:
                await self._lead(lease)
                observation = Observation()  # what we saw before leading says nothing now
            else:
                await asyncio.sleep(retry_s)

    async def release(self) -> None:
        """A leader shutting down hands its lease back, so a standby takes over without waiting."""
        await self._release(self._mine)

    async def _release(self, mine: Lease | None) -> None:
        if self._store is None or mine is None:
            return
        try:
            await asyncio.to_thread(self._store.update, lambda current: decide_release(current, mine))
            logger.info("released the leadership lease (epoch %d)", mine.epoch)
        except OSError as e:
            logger.warning("could not release the leadership lease: %s", e)

    def superseded(self, reason: str) -> None:
        """A worker refused our epoch: a newer leader has reset it. Stop leading now."""
        if self.role is Role.LEADER and not self._superseded.is_set():
            logger.warning("superseded: %s", reason)
            self._superseded.set()

    async def _lead(self, lease: Lease) -> None:
        self._mine, self.epoch, self.leader, self.role = lease, lease.epoch, lease.holder, Role.LEADER
        self._superseded.clear()
        logger.info("leading with epoch %d", lease.epoch)
        fleet = self._make_fleet(lease.epoch)
        fleet.on_fenced = self.superseded
        starting = asyncio.create_task(self._publish_after_start(fleet, lease), name="fleet start")
        renew_every_s, give_up_after_s = self.duration_s / 3, self.duration_s * 2 / 3
        renewed_at = self._clock()
        try:
            while True:
                try:
                    await asyncio.wait_for(self._superseded.wait(), renew_every_s)
                    return
                except TimeoutError:
                    pass
                try:
                    current = await asyncio.to_thread(self._store.update,
                                                      lambda c: decide_renewal(c, lease, self._wall()))
                except OSError as e:
                    if self._clock() - renewed_at >= give_up_after_s:
                        logger.error("could not renew the leadership lease for %.1f s: %s; standing by",
                                     self._clock() - renewed_at, e)
                        return
                    continue
                if current is None or current.holder != lease.holder or current.epoch != lease.epoch:
                    self.leader = current.holder if current is not None else ""
                    logger.warning("lost the leadership lease to %r (epoch %d); standing by",
                                   self.leader, current.epoch if current else 0)
                    return
                lease, renewed_at = current, self._clock()
                self._mine = lease
        finally:
            starting.cancel()
            # Once begun, standing down runs to its end even if stop() cancels us meanwhile: cut
            # short, the fleet's worker loops would go on and later listeners would never hear of it.
            await _to_the_end(self._stand_down(starting, fleet))

    async def _stand_down(self, starting: asyncio.Task[None], fleet: Fleet) -> None:
        await asyncio.gather(starting, return_exceptions=True)
        await self._withdraw(fleet)

    async def _publish_after_start(self, fleet: Fleet, lease: Lease) -> None:
        self._mine, self.role = lease, Role.LEADER
        await fleet.start(wait_s=self._startup_wait_s)
        down = [loop.address for loop in fleet.loops.values() if not loop.up]
        if down:
            logger.warning("serving without workers %s; they join when they answer", down)
        self.fleet = fleet
        for listener in self._listeners:
            await listener(True)

    async def _withdraw(self, fleet: Fleet) -> None:
        published = self.fleet is fleet
        self.fleet, self.role, self._mine, self.epoch = None, Role.STANDBY, None, 0
        if published:
            for listener in self._listeners:
                await listener(False)  # closes the front doors' streams: they resume elsewhere
        # Whatever is still live (a Generate stream: the listeners close the Connect sessions) ends
        # now rather than waiting on a fleet that will not step again.
        fleet.fail_all(RequestError(ErrorKind.UNAVAILABLE, "this scheduler stopped leading; resubmit to the leader"))
        await fleet.stop()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="leadership")

    async def stop(self) -> None:
        """At shutdown (after the drain): stops leading, then hands back the lease it held. In the
        other order our own renewal could find the lease released and claim it again (the store
        may apply the release well before it answers), and a standby would wait for it to expire."""
        mine = self._mine
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._release(mine)


async def _to_the_end(step: Awaitable[None]) -> None:
    """Awaits `step` to its end even if the caller is cancelled meanwhile; then re-raises that."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise
