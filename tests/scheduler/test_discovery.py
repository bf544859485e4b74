"""DNS discovery: targets, membership changes, and lookups that fail softly or hard."""

from __future__ import annotations

import pytest

from services.scheduler.discovery import DnsTarget, diff, format_address, resolve
from shared.errors import InvalidArgument


def test_target_parsing_names_the_field() -> None:
    assert DnsTarget.parse("switchyard-worker-stable.switchyard.svc.cluster.local:50061", "f") == \
        DnsTarget("switchyard-worker-stable.switchyard.svc.cluster.local", 50061)
    for bad in ("no-port", ":50061", "host:", "host:http", "host:0", "host:70000"):
        with pytest.raises(InvalidArgument, match="pools\\[x\\].dns"):
            DnsTarget.parse(bad, "pools[x].dns")


def test_diff_and_addresses() -> None:
    change = diff({"10.0.0.1:1", "10.0.0.2:1"}, {"10.0.0.2:1", "10.0.0.3:1"})
    assert change.added == ("10.0.0.3:1",) and change.removed == ("10.0.0.1:1",)
    assert format_address("fd00::1", 50061) == "[fd00::1]:50061"


async def test_resolve_real_names() -> None:
    assert "127.0.0.1:50061" in await resolve(DnsTarget("localhost", 50061))
    # .invalid never resolves (RFC 6761): an authoritative "no such name" empties the pool.
    assert await resolve(DnsTarget("no-such-worker.invalid", 50061)) == set()
