"""Worker discovery by DNS: a pool named by `host:port` has one worker per address record.

In Kubernetes a headless Service lists the ready pods of a Deployment as A records, so resolving
its name again every few seconds follows `kubectl scale` both ways: a new pod becomes a worker
of the pool, a pod that is gone (or no longer ready) leaves it. The fleet owns the I/O loop; this
module parses the target, resolves it once, and says what changed.

A failed lookup is not an empty answer: a temporary failure (the resolver is unreachable) keeps
the workers we have, because dropping a whole pool on a DNS hiccup would fail every request of
it. Only an authoritative "no such name / no records" (a pool scaled to zero) empties the pool.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from shared.errors import InvalidArgument


@dataclass(frozen=True)
class DnsTarget:
    host: str
    port: int

    @classmethod
    def parse(cls, value: str, field: str) -> DnsTarget:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(f"expected host:port, got {value!r}", field=field)
        return cls(host, int(port))


@dataclass(frozen=True)
class Membership:
    added: tuple[str, ...]
    removed: tuple[str, ...]


def diff(current: set[str], resolved: set[str]) -> Membership:
    return Membership(added=tuple(sorted(resolved - current)), removed=tuple(sorted(current - resolved)))


def format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def resolve(target: DnsTarget) -> set[str] | None:
    """Every address of the target as host:port, an empty set if the name has none, or None if
    the lookup failed for a reason that may pass (keep what you have)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return set()
        return None
    return {format_address(info[4][0], target.port) for info in infos}
