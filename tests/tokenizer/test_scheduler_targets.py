"""The front door's scheduler addresses: lists, `dns:` names with several records, the walk order."""

from __future__ import annotations

import asyncio

import pytest

from services.tokenizer.scheduler_targets import SchedulerTargets, format_address, parse_targets
from shared.errors import InvalidArgument


def test_a_list_is_walked_in_order_and_wraps() -> None:
    async def walk() -> list[str]:
        targets = SchedulerTargets("10.0.0.1:50052, 10.0.0.2:50052")
        return [await targets.first(), await targets.next(), await targets.next()]
    assert asyncio.run(walk()) == ["10.0.0.1:50052", "10.0.0.2:50052", "10.0.0.1:50052"]


@pytest.mark.parametrize("bad", ["", " , ", "no-port", "host:", "dns:host:http", "host:70000"])
def test_bad_entries_name_the_field(bad: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_targets(bad)
    assert e.value.field == "scheduler"


def test_a_dns_name_stands_for_every_address_record() -> None:

    async def resolve() -> tuple[list[str], str, str]:
        targets = SchedulerTargets("dns:localhost:50052,10.9.9.9:50053")
        assert targets.several
        first = await targets.first()
        second = await targets.next()
        return targets.addresses, first, second
    addresses, first, second = asyncio.run(resolve())
    assert "127.0.0.1:50052" in addresses and addresses[-1] == "10.9.9.9:50053"
    assert first == addresses[0] and second == addresses[1]
    assert all(a != "localhost:50052" for a in addresses)


def test_a_failed_lookup_keeps_what_it_had() -> None:

    async def run() -> list[str]:
        targets = SchedulerTargets("dns:no-such-host.invalid:50052")
        await targets.refresh()
        return targets.addresses
    assert asyncio.run(run()) == ["no-such-host.invalid:50052"]  # gRPC's own resolver then tries it


def test_ipv6_addresses_are_bracketed() -> None:
    assert format_address("::1", 50052) == "[::1]:50052"
    assert format_address("10.0.0.1", 50052) == "10.0.0.1:50052"
