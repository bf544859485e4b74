"""`python -m deploy.admin`: read the scheduler's worker pools and set a pool's traffic weight.

    python -m deploy.admin pools                       # table of pools, weights, workers, rollback state
    python -m deploy.admin pools --json                # the same, for scripts
    python -m deploy.admin set-weight canary 25        # send a quarter of new sessions' traffic... (relative)
    python -m deploy.admin set-weight canary 0         # roll back by hand

The scheduler address comes from `--scheduler` or SWITCHYARD_SCHEDULER_ADDRESS (default
127.0.0.1:50052); `--tls-cert/--tls-key/--tls-ca` (or SWITCHYARD_TLS_*) reach a scheduler that
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.admin", description=__doc__.split("\n")[0])
    parser.add_argument("--scheduler", default=env_str("SWITCHYARD_SCHEDULER_ADDRESS", "127.0.0.1:50052"),
                        help="scheduler host:port [SWITCHYARD_SCHEDULER_ADDRESS]")
    parser.add_argument("--timeout-s", type=float, default=5.0)
    add_tls_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    pools = commands.add_parser("pools", help="list pools, weights, workers and rollback state")
    pools.add_argument("--json", action="store_true", help="print JSON instead of a table")
    set_weight = commands.add_parser("set-weight", help="set one pool's traffic weight now")
    set_weight.add_argument("pool")
    set_weight.add_argument("weight", type=float)
    args = parser.parse_args(argv)

    with open_sync_channel(args.scheduler, tls_from_args(args)) as channel:
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
