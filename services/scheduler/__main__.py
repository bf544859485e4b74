"""`python -m services.scheduler`: connect to the worker pools, serve Generate until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.scheduler.config import SchedulerConfig, parse_config
from services.scheduler.fleet import Fleet
from services.scheduler.servicer import AdminServicer, SchedulerServicer
from shared.config import ConfigError
from shared.errors import SwitchyardError
from shared.server import serve
from shared.telemetry import setup_telemetry, start_metrics_server

logger = logging.getLogger("switchyard.scheduler")


async def run(config: SchedulerConfig) -> None:
    telemetry = setup_telemetry("switchyard-scheduler")
    fleet = Fleet(config.fleet)
    await fleet.start(wait_s=config.startup_wait_s)
    down = [loop.address for loop in fleet.loops.values() if not loop.up]
    if down:
        logger.warning("serving without workers %s; they join when they answer", down)
    servicer = SchedulerServicer(fleet)
    admin = AdminServicer(fleet)

    def register(server) -> list[str]:
        return servicer.register(server) + admin.register(server)

    start_metrics_server(config.metrics_port, config.host, config.tls)
    liveness = None
    if config.liveness_timeout_s > 0:
        def liveness() -> bool:
            return fleet.stalled_for_s() < config.liveness_timeout_s
    try:
        await serve(service_name="scheduler", register=register, address=config.address,
                    grace_s=config.grace_s, on_drain=servicer.drain, telemetry=telemetry, tls=config.tls,
                    liveness=liveness, liveness_period_s=min(1.0, config.liveness_timeout_s / 4))
    finally:
        await fleet.stop()


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
