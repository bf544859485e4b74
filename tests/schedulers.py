"""Active/standby schedulers in one process, for failover tests: real workers and real schedulers,
each a grpc.aio server on 127.0.0.1, served the way `python -m services.scheduler` serves them (the
Scheduler and SchedulerAdmin servicers over a `Leadership`, health ready only while it leads)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Callable

from switchyard.scheduler.v1 import scheduler_pb2_grpc

from services.scheduler.fleet import Fleet, FleetConfig
from services.scheduler.leadership import Leadership
from services.scheduler.lease import FileLeaseStore
from services.scheduler.lease_record import Lease
from services.scheduler.router import PoolConfig
from services.scheduler.servicer import AdminServicer, SchedulerServicer
from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from services.worker.servicer import WorkerServicer
from shared.channel import insecure_channel
from shared.server import GrpcServer
from tests.inprocess import BLOCK_SIZE

ELSEWHERE = "10.9.9.9:50052"  # a leader no test can reach: its lease keeps the schedulers here standing by


async def serve_worker(model_dir: Path, version: str = "v1", num_blocks: int = 256) -> GrpcServer:
    servicer = WorkerServicer(Executor(ModelRunner(model_dir, num_blocks=num_blocks, block_size=BLOCK_SIZE)),
                              version=version)
    server = GrpcServer(service_name="worker", register=servicer.register, address="127.0.0.1:0", grace_s=0.5)
    await server.start()
    return server


def fleet_maker(*pools: PoolConfig) -> Callable[[int], Fleet]:
    """What `python -m services.scheduler` gives its Leadership: a Fleet of these pools under an epoch."""
    def make_fleet(epoch: int) -> Fleet:
        return Fleet(FleetConfig(pools=pools, max_num_batched_tokens=256, probe_interval_s=0.1, router_seed=0,
                                 scheduler_epoch=epoch))
    return make_fleet


def never_leads(epoch: int) -> Fleet:
    raise AssertionError(f"a standby built a fleet (epoch {epoch})")


def hold_lease(path: Path, holder: str = ELSEWHERE, duration_s: float = 60.0) -> Lease:
    """Writes a fresh lease for `holder`, as a leader elsewhere would."""
    lease = FileLeaseStore(path).update(lambda current: Lease(holder, (current.epoch + 1) if current else 7,
                                                              time.time(), duration_s))
    assert lease is not None
    return lease


class Scheduler:
    """One scheduler process's worth: its leadership, server, and a channel to it."""

    def __init__(self, leadership: Leadership) -> None:
        self.leadership = leadership
        self.servicer = SchedulerServicer(leadership)
        self.admin_servicer = AdminServicer(leadership)

    async def start(self) -> Scheduler:
        # No drain and no grace: `kill` cuts every stream the way a dying process does.
        self.server = GrpcServer(
            service_name="scheduler", address="127.0.0.1:0", grace_s=0.0,
            register=lambda server: self.servicer.register(server) + self.admin_servicer.register(server),
            ready=self.leadership.fleet is not None)
        await self.server.start()
        self.address = self.server.target
        if not self.leadership.identity:
            self.leadership.identity = self.address  # --advertise-address

        async def follow(leading: bool) -> None:
            await self.server.set_ready(leading)
        self.leadership.on_change(follow)
        if self.leadership.leased:
            self.leadership.start()
        self.channel = insecure_channel(self.address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.admin = scheduler_pb2_grpc.SchedulerAdminStub(self.channel)
        return self

    async def kill(self) -> None:
        """Its server goes (every stream cut, no drain), then its leadership (the lease handed back)."""
        if not self.server.shutting_down:
            await self.server.shutdown()
        await self.leadership.stop()
        if not self.leadership.leased and self.leadership.fleet is not None:
            await self.leadership.fleet.stop()

    async def close(self) -> None:
        await self.channel.close()
        await self.kill()


async def leased(lease_path: Path, make_fleet: Callable[[int], Fleet] = never_leads,
                 duration_s: float = 0.6, startup_wait_s: float = 10.0) -> Scheduler:
    """A scheduler with `--leader-lease file:<lease_path>`: it leads once it holds the lease."""
    leadership = Leadership(make_fleet, store=FileLeaseStore(lease_path), duration_s=duration_s,
                            startup_wait_s=startup_wait_s)
    return await Scheduler(leadership).start()


async def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.01)
