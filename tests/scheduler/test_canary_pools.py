"""Canary pools in a running scheduler: sessions stick to their pool while weights stay, the admin
RPC and CLI read and change weights, and a faulty canary worker is rolled back automatically.

Real workers and a real scheduler over gRPC on loopback (one process); the CLI runs as its own
process against that scheduler. The faulty canary serves a copy of the tiny model whose embedding
is NaN, so every request routed to it fails with "non-finite logits", the way a broken model
version would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys

import pytest
from prometheus_client import REGISTRY
from safetensors.torch import load_file, save_file
from switchyard.scheduler.v1 import scheduler_pb2 as pb

from services.scheduler.canary import RollbackPolicy
from tests.inprocess import PoolSpec, Stack
from tests.scheduler.test_service import collect, greedy_request

PROMPT = [11, 12, 13, 14, 15, 16, 17, 18]


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("faulty") / "nan-llama"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    name = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[name][:] = float("nan")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


async def window_counts(stack) -> dict[str, int]:
    reply = await stack.admin.ListPools(pb.ListPoolsRequest())
    return {p.name: p.num_window_requests for p in reply.pools}


async def served_by(stack, request: pb.GenerateRequest) -> tuple[str, bool]:
    """(the pool that served the request, whether it succeeded), told by the admin RPC's counts."""
    before = await window_counts(stack)
    try:
        await collect(stack.stub, request)
        ok = True
    except Exception:  # the faulty pool's requests fail; which pool it was is what we ask
        ok = False
    after = await window_counts(stack)
    grown = [name for name in after if after[name] > before.get(name, 0)]
    # The request that triggers a rollback is counted, then its pool's window is forgotten.
    (pool,) = grown or [name for name in after if after[name] < before.get(name, 0)]
    return pool, ok


async def admin_cli(stack, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deploy.admin", "--scheduler", stack.scheduler_address, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


async def test_sessions_stay_on_their_pool_until_its_weight_goes(tiny_model_dir) -> None:
    pools = (PoolSpec("stable", "v1", 50.0, tiny_model_dir), PoolSpec("canary", "v2", 50.0, tiny_model_dir))
    async with Stack(tiny_model_dir, pools=pools, router_seed=3) as stack:
        home: dict[str, str] = {}
        for turn in range(3):
            for s in range(10):
                session = f"session-{s}"
                pool, ok = await served_by(stack, greedy_request(f"{session}-{turn}", PROMPT, 4, session_id=session))
                assert ok
                assert home.setdefault(session, pool) == pool, f"{session} moved from {home[session]} to {pool}"
        assert set(home.values()) == {"stable", "canary"}, "a 50/50 split put every session in one pool"

        code, out, err = await admin_cli(stack, "pools", "--json")
        assert code == 0, err
        listed = {p["name"]: p for p in json.loads(out)["pools"]}
        assert listed["canary"]["weight"] == 50 and listed["canary"]["version"] == "v2"
        assert listed["stable"]["window"]["num_requests"] + listed["canary"]["window"]["num_requests"] == 30
        assert listed["canary"]["num_workers_up"] == 1 and not listed["canary"]["rolled_back"]

        code, out, err = await admin_cli(stack, "set-weight", "canary", "0")
        assert code == 0 and "pool canary: weight 0" in out, (out, err)
        for s in range(10):  # the canary's sessions move (and stick) to stable; nobody lands on canary
            session = f"session-{s}"
            pool, ok = await served_by(stack, greedy_request(f"{session}-after", PROMPT, 4, session_id=session))
            assert ok and pool == "stable"

        code, _, err = await admin_cli(stack, "set-weight", "nope", "1")
        assert code == 1 and "INVALID_ARGUMENT" in err and "pool" in err
        code, _, err = await admin_cli(stack, "set-weight", "canary", "-1")
        assert code == 1 and "weight" in err
        code, out, _ = await admin_cli(stack, "pools")
        assert code == 0 and "canary" in out and "stable" in out and "(baseline)" in out


async def test_faulty_canary_is_rolled_back_and_traffic_returns_to_stable(tiny_model_dir, nan_model_dir, caplog) -> None:
    pools = (PoolSpec("stable", "v1", 50.0, tiny_model_dir), PoolSpec("canary", "v2", 50.0, nan_model_dir))
    caplog.set_level(logging.WARNING, logger="services.scheduler.fleet")
    kw = dict(rollback=RollbackPolicy(min_requests=5, window_s=60.0), rollback_check_interval_s=0.05, router_seed=5)
    async with Stack(tiny_model_dir, pools=pools, **kw) as stack:
        outcomes: list[tuple[str, bool]] = []
        while True:
            reply = await stack.admin.ListPools(pb.ListPoolsRequest())
            canary = next(p for p in reply.pools if p.name == "canary")
            if canary.weight == 0:
                break
            assert len(outcomes) < 80, f"no rollback after {len(outcomes)} requests: {outcomes}"
            outcomes.append(await served_by(stack, greedy_request(f"r{len(outcomes)}", PROMPT, 4,
                                                                   session_id=f"s{len(outcomes)}")))
        print(f"rolled back after {len(outcomes)} requests: "
              f"{sum(p == 'stable' for p, _ in outcomes)} stable (ok), {sum(p == 'canary' for p, _ in outcomes)} canary "
              f"(failed); reason: {canary.rollback_reason}")
        # Every canary request failed, every stable one worked; judged once both had 5 requests.
        assert all(ok == (pool == "stable") for pool, ok in outcomes), outcomes
        assert min(sum(p == name for p, _ in outcomes) for name in ("stable", "canary")) >= 5
        assert canary.rolled_back and "error rate 1.000 vs 0.000" in canary.rollback_reason
        assert any("canary rollback" in r.message and "'canary'" in r.message for r in caplog.records)
        assert REGISTRY.get_sample_value("switchyard_pool_rolled_back", {"pool": "canary"}) == 1
        assert REGISTRY.get_sample_value("switchyard_pool_rollbacks_total",
                                         {"pool": "canary", "reason": "error_rate"}) >= 1

        for i in range(15):  # sessions that were on the canary move to stable and succeed
            pool, ok = await served_by(stack, greedy_request(f"after{i}", PROMPT, 4, session_id=f"s{i}"))
            assert (pool, ok) == ("stable", True)

        # An operator who restores the weight re-arms the guard: the state clears, judged afresh.
        restored = await stack.admin.SetPoolWeight(pb.SetPoolWeightRequest(pool="canary", weight=10))
        assert restored.weight == 10 and not restored.rolled_back
        assert REGISTRY.get_sample_value("switchyard_pool_rolled_back", {"pool": "canary"}) == 0
