"""Where the front door finds its schedulers: a list of addresses, DNS names with several records.

`--scheduler` takes comma-separated entries. `host:port` is one scheduler. `dns:host:port` is every
address record of `host` (a Kubernetes headless Service over the scheduler pods, or a compose
service scaled up), looked up again each time the front door moves to the next scheduler, so a
replaced pod's new address is found. The front door keeps one stream to one of them and moves to the
next in order when it breaks or the scheduler steps down; a standby refuses at once, so the walk
ends at the leader. With TLS, the schedulers' certificates must name the addresses a `dns:` target
resolves to (IP SANs), or list the schedulers by name instead.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from shared.errors import InvalidArgument

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    dns: bool  # every address record of host, looked up at each move

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_targets(spec: str | list[str]) -> list[Target]:
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    targets = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        dns = entry.startswith("dns:")
        host, _, port = entry.removeprefix("dns:").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(f"expected host:port or dns:host:port, got {entry!r}", field="scheduler")
        targets.append(Target(host, int(port), dns))
    if not targets:
        raise InvalidArgument("no scheduler address given", field="scheduler")
    return targets


def format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class SchedulerTargets:
    """The addresses to try, in order, and which one is in use."""

    def __init__(self, spec: str | list[str]) -> None:
        self.targets = parse_targets(spec)
        # Until the first lookup a DNS target stands for itself (gRPC resolves it then).
        self.addresses = [t.address for t in self.targets]
        self.current = self.addresses[0]
        self._index = 0
        self._looked_up = not any(t.dns for t in self.targets)

    @property
    def several(self) -> bool:
        return len(self.targets) > 1 or any(t.dns for t in self.targets)

    async def refresh(self) -> None:
        """Looks the DNS targets up again (a failed lookup keeps the addresses it had)."""
        if not any(t.dns for t in self.targets):
            return
        loop = asyncio.get_running_loop()
        addresses: list[str] = []
        for target in self.targets:
            if not target.dns:
                addresses.append(target.address)
                continue
            try:
                infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
            except OSError as e:
                logger.warning("scheduler lookup of %s failed: %s; keeping %s", target.host, e, self.addresses)
                return
            for ip in sorted({info[4][0] for info in infos}):  # sorted: every front door walks in one order
                addresses.append(format_address(ip, target.port))
        if addresses:
            self.addresses = list(dict.fromkeys(addresses))
            self._looked_up = True

    async def next(self) -> str:
        """The address after the current one (after a fresh lookup), which becomes current."""
        await self.refresh()
        index = self.addresses.index(self.current) + 1 if self.current in self.addresses else self._index
        self._index = index % len(self.addresses)
        self.current = self.addresses[self._index]
        return self.current

    async def first(self) -> str:
        """The current address, looking DNS targets up the first time."""
        if not self._looked_up:
            await self.refresh()
            self.current = self.addresses[0]
        return self.current
