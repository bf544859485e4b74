"""`python -m deploy.admin` against a leader and a standby: `schedulers` says which leads, and the
pool commands find the leader whatever the order of the addresses. Two real schedulers on one lease
file, served on loopback; the command runs in a thread (its gRPC calls are blocking) with its
output captured."""

from __future__ import annotations

import asyncio
import json

import pytest

from deploy import admin
from services.scheduler.lease import FileLeaseStore
from services.scheduler.router import PoolConfig
from tests.schedulers import fleet_maker, leased, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")

NOWHERE = "127.0.0.1:9"  # the pools' workers: nothing here needs one to answer


@pytest.fixture
async def pair(tmp_path):
    lease = tmp_path / "lease"
    pools = (PoolConfig("stable", "v1", 90.0, (NOWHERE,)), PoolConfig("canary", "v2", 10.0, ("127.0.0.1:7",)))
    leader = await leased(lease, fleet_maker(*pools), startup_wait_s=0.0)
    await wait_for(lambda: leader.leadership.fleet is not None, "the leader leads")
    standby = await leased(lease)
    await wait_for(lambda: standby.leadership.leader == leader.address, "the standby read the lease")
    yield leader, standby
    await standby.close()
    await leader.close()


async def run_admin(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(admin.main, ["--timeout-s", "3", *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def test_schedulers_names_the_leader_and_the_standby(pair, capsys, tmp_path) -> None:
    leader, standby = pair
    code, out, _ = await run_admin(capsys, "--scheduler", f"{standby.address},{leader.address}", "schedulers")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows[leader.address][1] == "leader" and rows[standby.address][1] == "standby"
    assert rows[standby.address][-1] == leader.address  # the leader its lease names

    code, out, _ = await run_admin(capsys, "--scheduler", f"{standby.address},{leader.address}", "schedulers",
                                   "--json")
    assert code == 0
    by_address = {r["address"]: r for r in json.loads(out)}
    lease = FileLeaseStore(tmp_path / "lease").update(lambda current: None)
    assert by_address[leader.address]["role"] == "leader" and by_address[leader.address]["epoch"] == lease.epoch
    assert by_address[leader.address]["num_workers"] == 2
    assert by_address[standby.address] == {
        "address": standby.address, "role": "standby", "epoch": 0, "leader": leader.address, "num_workers": 0,
        "num_live_requests": 0}


async def test_pool_commands_go_to_the_leader_whatever_the_order(pair, capsys) -> None:
    leader, standby = pair
    both = f"{standby.address},{leader.address}"
    code, out, err = await run_admin(capsys, "--scheduler", both, "pools", "--json")
    assert code == 0, err
    assert [(p["name"], p["weight"]) for p in json.loads(out)["pools"]] == [("stable", 90.0), ("canary", 10.0)]

    code, out, err = await run_admin(capsys, "--scheduler", both, "set-weight", "canary", "0")
    assert code == 0, err
    assert "pool canary: weight 0" in out
    assert leader.leadership.fleet.router.weights()["canary"] == 0.0

    # Asked alone, the standby refuses and the command says why.
    code, _, err = await run_admin(capsys, "--scheduler", standby.address, "pools")
    assert code == 1 and "UNAVAILABLE" in err and leader.address in err


async def test_without_a_leader_both_commands_fail(pair, capsys) -> None:
    leader, standby = pair
    both = f"{standby.address},{leader.address}"
    await standby.leadership.stop()  # it still answers, as a standby that will never lead
    await leader.kill()
    code, out, _ = await run_admin(capsys, "--scheduler", both, "schedulers")
    assert code == 1
    assert "unreachable: UNAVAILABLE" in next(line for line in out.splitlines() if line.startswith(leader.address))
    code, _, err = await run_admin(capsys, "--scheduler", both, "pools")
    assert code == 1 and "no scheduler of" in err and "leads now" in err
