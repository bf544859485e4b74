"""`python -m services.scheduler`: lead (or stand by to lead) the worker pools, serve until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys

from dataclasses import replace

from services.scheduler import metrics
from services.scheduler.config import SchedulerConfig, parse_config
from services.scheduler.fleet import Fleet
from services.scheduler.leadership import Leadership
from services.scheduler.lease import open_store
from services.scheduler.servicer import AdminServicer, SchedulerServicer
from shared.config import ConfigError
from shared.errors import SwitchyardError
from shared.server import GrpcServer, serve
from shared.telemetry import setup_telemetry, start_metrics_server

logger = logging.getLogger("switchyard.scheduler")


async def run(config: SchedulerConfig) -> None:
    telemetry = setup_telemetry("switchyard-scheduler")
    # Three calls of an update within a third of the lease: a hung API server costs a renewal, not the lease.
    store = open_store(config.leader_lease, config.lease_duration_s / 9) if config.leader_lease else None

    def make_fleet(epoch: int) -> Fleet:
        return Fleet(replace(config.fleet, scheduler_epoch=epoch) if epoch else config.fleet)

    leadership = Leadership(make_fleet, store=store, identity=config.advertise_address,
                            duration_s=config.lease_duration_s, startup_wait_s=config.startup_wait_s)
    servicer = SchedulerServicer(leadership)
    admin = AdminServicer(leadership)
    metrics.observe_leadership(leadership)

    def register(server) -> list[str]:
        return servicer.register(server) + admin.register(server)

    async def on_started(server: GrpcServer) -> None:
        async def follow(leading: bool) -> None:
            await server.set_ready(leading)  # a standby: NOT_SERVING under the Scheduler's name
        leadership.on_change(follow)
        leadership.start()

    start_metrics_server(config.metrics_port, config.host, config.tls)
    liveness = None
    if config.liveness_timeout_s > 0:
        def liveness() -> bool:
            fleet = leadership.fleet
            return fleet is None or fleet.stalled_for_s() < config.liveness_timeout_s
    try:
        await serve(service_name="scheduler", register=register, address=config.address,
                    grace_s=config.grace_s, on_drain=servicer.drain, telemetry=telemetry, tls=config.tls,
                    liveness=liveness, liveness_period_s=min(1.0, config.liveness_timeout_s / 4),
                    ready=False, on_started=on_started)
    finally:
        await leadership.stop()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = parse_config(argv)
    except (ConfigError, SwitchyardError) as e:
        logger.error("%s", e)
        return 2
    asyncio.run(run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
