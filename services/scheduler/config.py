"""Scheduler configuration: flags with environment fallbacks, and the worker pools.

Pools come from a JSON file (`--pools-file`, `SWITCHYARD_POOLS_FILE`):
    {"pools": [{"name": "stable", "version": "v1", "weight": 90, "workers": ["127.0.0.1:50061"]},
               {"name": "canary", "version": "v2", "weight": 10, "workers": ["127.0.0.1:50062"]}]}
or, for the simple case, from a worker list (`--workers`, `SWITCHYARD_WORKER_ADDRESSES`) that
forms one pool named "default". This is the only scheduler module that reads the environment.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from services.scheduler.fleet import FleetConfig
from services.scheduler.router import PoolConfig
from shared.config import ConfigError, env_float, env_int, env_list, env_str
from shared.tls import TlsConfig, add_tls_arguments, tls_from_args


@dataclass(frozen=True)
class SchedulerConfig:
    host: str
    port: int
    metrics_port: int
    fleet: FleetConfig
    startup_wait_s: float
    grace_s: float
    liveness_timeout_s: float = 60.0  # requests running and no token for this long: NOT_SERVING; 0: off
    tls: TlsConfig = TlsConfig()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def load_pools(path: str) -> tuple[PoolConfig, ...]:
    try:
        data = json.loads(Path(path).read_text())
        return tuple(
            PoolConfig(name=p["name"], version=p.get("version", "v1"), weight=float(p.get("weight", 1.0)),
                       worker_addresses=tuple(p["workers"]))
            for p in data["pools"]
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"pools file {path}: {e!r} (expected {{'pools': [{{'name', 'workers', ...}}]}})") from e


def parse_config(argv: list[str] | None = None) -> SchedulerConfig:
    p = argparse.ArgumentParser(prog="python -m services.scheduler", description="Switchyard scheduler")
    p.add_argument("--host", default=env_str("SWITCHYARD_SCHEDULER_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=env_int("SWITCHYARD_SCHEDULER_PORT", 50052, min_value=0))
    p.add_argument("--metrics-port", type=int, default=env_int("SWITCHYARD_SCHEDULER_METRICS_PORT", 9102, min_value=0))
    p.add_argument("--pools-file", default=env_str("SWITCHYARD_POOLS_FILE", ""),
                   help="JSON pools file; overrides --workers [SWITCHYARD_POOLS_FILE]")
    p.add_argument("--workers", default=",".join(env_list("SWITCHYARD_WORKER_ADDRESSES", ["127.0.0.1:50061", "127.0.0.1:50062"])),
                   help="comma-separated worker addresses forming pool 'default' [SWITCHYARD_WORKER_ADDRESSES]")
    p.add_argument("--max-num-batched-tokens", type=int, default=env_int("SWITCHYARD_MAX_NUM_BATCHED_TOKENS", 2048, min_value=1))
    p.add_argument("--max-num-seqs", type=int, default=env_int("SWITCHYARD_MAX_NUM_SEQS", 128, min_value=1))
    p.add_argument("--max-waiting-requests", type=int, default=env_int("SWITCHYARD_MAX_WAITING_REQUESTS", 1024, min_value=1))
    p.add_argument("--step-timeout-s", type=float, default=env_float("SWITCHYARD_STEP_TIMEOUT_S", 60.0))
    p.add_argument("--load-weight", type=float, default=env_float("SWITCHYARD_ROUTER_LOAD_WEIGHT", 1.0))
    p.add_argument("--decode-cost-tokens", type=float, default=env_float("SWITCHYARD_ROUTER_DECODE_COST_TOKENS", 8.0))
    p.add_argument("--routing", default=env_str("SWITCHYARD_ROUTING", "cache_aware"),
                   choices=["cache_aware", "round_robin"],
                   help="worker choice inside a pool; round_robin is a benchmark baseline [SWITCHYARD_ROUTING]")
    p.add_argument("--startup-wait-s", type=float, default=env_float("SWITCHYARD_STARTUP_WAIT_S", 120.0),
                   help="how long to wait for workers before serving")
    p.add_argument("--grace-s", type=float, default=env_float("SWITCHYARD_GRACE_S", 10.0))
    p.add_argument("--liveness-timeout-s", type=float,
                   default=env_float("SWITCHYARD_LIVENESS_TIMEOUT_S", 60.0, min_value=0),
                   help="health turns NOT_SERVING while requests run and no token came for this long; 0 "
                        "disables [SWITCHYARD_LIVENESS_TIMEOUT_S]")
    add_tls_arguments(p)
    a = p.parse_args(argv)
    if a.pools_file:
        pools = load_pools(a.pools_file)
    else:
        addresses = tuple(w.strip() for w in a.workers.split(",") if w.strip())
        if not addresses:
            raise ConfigError("--workers / SWITCHYARD_WORKER_ADDRESSES: no worker address given")
        pools = (PoolConfig(name="default", version="v1", weight=1.0, worker_addresses=addresses),)
    fleet = FleetConfig(
        pools=pools, max_num_batched_tokens=a.max_num_batched_tokens, max_num_seqs=a.max_num_seqs,
        max_waiting_requests=a.max_waiting_requests, step_timeout_s=a.step_timeout_s,
        load_weight=a.load_weight, decode_cost_tokens=a.decode_cost_tokens, routing=a.routing,
        tls=tls_from_args(a),
    )
    return SchedulerConfig(host=a.host, port=a.port, metrics_port=a.metrics_port, fleet=fleet,
                           startup_wait_s=a.startup_wait_s, grace_s=a.grace_s,
                           liveness_timeout_s=a.liveness_timeout_s, tls=fleet.tls)
