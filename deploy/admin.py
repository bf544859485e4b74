"""`python -m deploy.admin`: read the scheduler's worker pools and set a pool's traffic weight.

    python -m deploy.admin pools                       # table of pools, weights, workers, rollback state
    python -m deploy.admin pools --json                # the same, for scripts
    python -m deploy.admin set-weight canary 25        # send a quarter of new sessions' traffic... (relative)
    python -m deploy.admin set-weight canary 0         # roll back by hand
    python -m deploy.admin schedulers                  # which scheduler leads, with what epoch

The scheduler address comes from `--scheduler` or SWITCHYARD_SCHEDULER_ADDRESS (default
127.0.0.1:50052,127.0.0.1:50053, the leader and standby of `make up`); with several, the pool
commands go to the one that leads; `--tls-cert/--tls-key/--tls-ca` (or SWITCHYARD_TLS_*) reach a scheduler that
requires mutual TLS. Exit status: 0 on success, 1 when the scheduler refused or could not be reached.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from switchyard.scheduler.v1 import scheduler_pb2 as pb
from switchyard.scheduler.v1 import scheduler_pb2_grpc

from shared.channel import open_sync_channel
from shared.config import env_str
from shared.tls import add_tls_arguments, tls_from_args


def _pool_row(pool: pb.PoolStatus) -> dict:
    return {
        "name": pool.name, "version": pool.version, "weight": pool.weight,
        "workers": list(pool.worker_addresses), "num_workers_up": pool.num_workers_up, "dns": pool.dns,
        "rolled_back": pool.rolled_back, "rollback_reason": pool.rollback_reason,
        "window": {"num_requests": pool.num_window_requests, "num_errors": pool.num_window_errors,
                   "ttft_p99_s": pool.window_ttft_p99_s or None},
    }


def format_pools(reply: pb.ListPoolsResponse) -> str:
    total = sum(p.weight for p in reply.pools) or 1.0
    lines = [f"{'pool':<12} {'version':<10} {'weight':>8} {'share':>6} {'up':>5} {'errors':>11} "
             f"{'p99 TTFT':>9}  state"]
    for p in reply.pools:
        errors = f"{p.num_window_errors}/{p.num_window_requests}"
        ttft = f"{p.window_ttft_p99_s * 1000:.0f} ms" if p.window_ttft_p99_s else "-"
        state = "rolled back: " + p.rollback_reason if p.rolled_back else "ok"
        if p.name == reply.baseline_pool:
            state += " (baseline)"
        up = f"{p.num_workers_up}/{len(p.worker_addresses)}"
        lines.append(f"{p.name:<12} {p.version:<10} {p.weight:>8g} {p.weight / total:>6.0%} {up:>5} {errors:>11} "
                     f"{ttft:>9}  {state}")
    rollback = f"on, window {reply.rollback_window_s:g} s" if reply.rollback_enabled else "off"
    lines.append(f"automatic rollback: {rollback}")
    return "\n".join(lines)


_ROLES = {pb.SCHEDULER_ROLE_LEADER: "leader", pb.SCHEDULER_ROLE_STANDBY: "standby"}


def scheduler_roles(addresses: list[str], tls, timeout_s: float) -> list[dict]:
    """Each scheduler's role, epoch and the leader it names; `error` instead when it does not answer."""
    rows = []
    for address in addresses:
        with open_sync_channel(address, tls) as channel:
            try:
                stats = scheduler_pb2_grpc.SchedulerStub(channel).GetStats(pb.GetStatsRequest(), timeout=timeout_s)
            except grpc.RpcError as e:
                rows.append({"address": address, "error": f"{e.code().name}: {e.details()}"})
                continue
        rows.append({"address": address, "role": _ROLES.get(stats.role, "unknown"), "epoch": stats.scheduler_epoch,
                     "leader": stats.leader, "num_workers": len(stats.workers),
                     "num_live_requests": stats.num_live_requests})
    return rows


def format_roles(rows: list[dict]) -> str:
    lines = [f"{'scheduler':<22} {'role':<8} {'epoch':>20} {'workers':>7} {'live':>5}  leader per its lease"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['address']:<22} {'-':<8} {'-':>20} {'-':>7} {'-':>5}  unreachable: {r['error']}")
        else:
            lines.append(f"{r['address']:<22} {r['role']:<8} {r['epoch'] or '-':>20} {r['num_workers']:>7} "
                         f"{r['num_live_requests']:>5}  {r['leader'] or '-'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.admin", description=__doc__.split("\n")[0])
    parser.add_argument("--scheduler",
                        default=env_str("SWITCHYARD_SCHEDULER_ADDRESS", "127.0.0.1:50052,127.0.0.1:50053"),
                        help="scheduler host:port, or several comma-separated [SWITCHYARD_SCHEDULER_ADDRESS]")
    parser.add_argument("--timeout-s", type=float, default=5.0)
    add_tls_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    pools = commands.add_parser("pools", help="list pools, weights, workers and rollback state")
    pools.add_argument("--json", action="store_true", help="print JSON instead of a table")
    set_weight = commands.add_parser("set-weight", help="set one pool's traffic weight now")
    set_weight.add_argument("pool")
    set_weight.add_argument("weight", type=float)
    roles = commands.add_parser("schedulers", help="each scheduler's role (leader/standby), epoch and leader")
    roles.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    addresses = [a.strip() for a in args.scheduler.split(",") if a.strip()]
    tls = tls_from_args(args)
    if args.command == "schedulers":
        rows = scheduler_roles(addresses, tls, args.timeout_s)
        print(json.dumps(rows, indent=2) if args.json else format_roles(rows))
        return 0 if any(r.get("role") == "leader" for r in rows) else 1
    if len(addresses) > 1:  # the pools live in the leader
        leading = [r["address"] for r in scheduler_roles(addresses, tls, args.timeout_s) if r.get("role") == "leader"]
        if not leading:
            print(f"error: no scheduler of {', '.join(addresses)} leads now", file=sys.stderr)
            return 1
        addresses = leading
    with open_sync_channel(addresses[0], tls) as channel:
        admin = scheduler_pb2_grpc.SchedulerAdminStub(channel)
        try:
            if args.command == "set-weight":
                pool = admin.SetPoolWeight(pb.SetPoolWeightRequest(pool=args.pool, weight=args.weight),
                                           timeout=args.timeout_s)
                print(f"pool {pool.name}: weight {pool.weight:g}")
                return 0
            reply = admin.ListPools(pb.ListPoolsRequest(), timeout=args.timeout_s)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"baseline_pool": reply.baseline_pool, "rollback_enabled": reply.rollback_enabled,
                          "rollback_window_s": reply.rollback_window_s,
                          "pools": [_pool_row(p) for p in reply.pools]}, indent=2))
    else:
        print(format_pools(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
