"""Scheduler configuration: flags with environment fallbacks, and the worker pools.

Pools come from a JSON file (`--pools-file`, `SWITCHYARD_POOLS_FILE`):
    {"pools": [{"name": "stable", "version": "v1", "weight": 90, "workers": ["127.0.0.1:50061"]},
               {"name": "canary", "version": "v2", "weight": 10, "workers": ["127.0.0.1:50062"]}]}
where a pool may name `"dns": "host:port"` instead of (or besides) `workers`: every address record of
the host is a worker, re-resolved every `--discovery-interval-s` (a Kubernetes headless Service),
or, for the simple case, from a worker list (`--workers`, `SWITCHYARD_WORKER_ADDRESSES`) that
forms one pool named "default". This is the only scheduler module that reads the environment.
"""

from __future__ import annotations

import argparse
import math
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.scheduler.autoscale import AutoscalePolicy
from services.scheduler.batch_wait import BatchWait
from services.scheduler.canary import RollbackPolicy
from services.scheduler.eviction import DEFAULT_EVICTION, EVICTION_POLICIES
from services.scheduler.fleet import FleetConfig
from services.scheduler.router import PoolConfig
from services.scheduler.speculation import SPECULATIVE_METHODS
from shared.errors import InvalidArgument
from shared.config import ConfigError, env_float, env_int, env_list, env_str
from shared.tls import TlsConfig, add_tls_arguments, tls_from_args


# How long a silent leader keeps the lease: the failover time after a kill -9, and how long a stall
# (a paused process, a lost store) may last before a standby takes over. Renewals go every third.
DEFAULT_LEASE_DURATION_S = 5.0


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
    leader_lease: str = ""  # "": lead alone; "file:<path>" or "k8s:[<ns>/]<name>": active/standby (lease.py)
    lease_duration_s: float = DEFAULT_LEASE_DURATION_S
    advertise_address: str = ""  # how front doors and operators reach this scheduler; default host:port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def load_pools(path: str) -> tuple[PoolConfig, ...]:
    try:
        data = json.loads(Path(path).read_text())
        pools = tuple(
            PoolConfig(name=p["name"], version=p.get("version", "v1"), weight=float(p.get("weight", 1.0)),
                       worker_addresses=tuple(p.get("workers", ())), dns=str(p.get("dns", "")))
            for p in data["pools"]
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"pools file {path}: {e!r} (expected {{'pools': [{{'name', 'workers' or 'dns', "
                          f"...}}]}})") from e
    for pool in pools:
        if not pool.worker_addresses and not pool.dns:
            raise ConfigError(f"pools file {path}: pools[{pool.name}]: give 'workers' (host:port list) or 'dns' "
                              "(host:port)")
    return pools


# (flag, env, default, meaning); the defaults are AutoscalePolicy's, and the README explains them.
_AUTOSCALE_FLAGS = (
    ("--autoscale-target-waiting-per-worker", "SWITCHYARD_AUTOSCALE_TARGET_WAITING_PER_WORKER",
     AutoscalePolicy.target_waiting_per_worker,
     "waiting requests per worker above which a pool asks for more workers"),
    ("--autoscale-target-kv-used-ratio", "SWITCHYARD_AUTOSCALE_TARGET_KV_USED_RATIO",
     AutoscalePolicy.target_kv_used_ratio,
     "KV blocks used / usable per worker above which a pool asks for more workers, in (0, 1]"),
    ("--autoscale-scale-down-margin", "SWITCHYARD_AUTOSCALE_SCALE_DOWN_MARGIN", AutoscalePolicy.scale_down_margin,
     "a pool asks for one worker fewer only when the rest would stay below (1 - this) of both targets, "
     "in [0, 1)"),
    ("--autoscale-min-workers", "SWITCHYARD_AUTOSCALE_MIN_WORKERS", AutoscalePolicy.min_workers,
     "the fewest workers a pool asks for, >= 1"),
)
_AUTOSCALE_ENV = {float: env_float, int: env_int}


def _autoscale_policy(a: argparse.Namespace) -> AutoscalePolicy:
    try:
        return AutoscalePolicy(
            target_waiting_per_worker=a.autoscale_target_waiting_per_worker,
            target_kv_used_ratio=a.autoscale_target_kv_used_ratio,
            scale_down_margin=a.autoscale_scale_down_margin, min_workers=a.autoscale_min_workers,
        )
    except InvalidArgument as e:
        # e.field is "autoscale.min_workers": name the flag and the variable it may have come from.
        flag, env = next((flag, env) for flag, env, _, _ in _AUTOSCALE_FLAGS
                         if flag == "--" + (e.field or "").replace(".", "-").replace("_", "-"))
        raise ConfigError(f"{flag} / {env}: {str(e).removeprefix(f'{e.field}: ')}") from e


def _check_choice(flag: str, env_name: str, value: str, choices: Sequence[str]) -> None:
    # argparse checks `choices` on the command line only, never a default taken from the environment.
    if value not in choices:
        raise ConfigError(f"{flag} / {env_name}: must be one of {', '.join(choices)}, got {value!r}")


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
    p.add_argument("--batch-wait-ms", type=float, default=env_float("SWITCHYARD_BATCH_WAIT_MS", 0.0, min_value=0.0),
                   help="an idle worker's first step waits up to this long for more requests to batch with "
                        "(or until they fill a step); raises throughput under bursty load, adds up to this "
                        "much TTFT; 0 never waits [SWITCHYARD_BATCH_WAIT_MS]")
    p.add_argument("--max-waiting-requests", type=int, default=env_int("SWITCHYARD_MAX_WAITING_REQUESTS", 1024, min_value=1))
    p.add_argument("--step-timeout-s", type=float, default=env_float("SWITCHYARD_STEP_TIMEOUT_S", 60.0))
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                   default=env_str("SWITCHYARD_ASYNC_SCHEDULING", "on") not in ("off", "0", "false", "no"),
                   help="plan each worker's next step while it computes the current one; costs one "
                        "wasted token per request that stops on a sampled token [SWITCHYARD_ASYNC_SCHEDULING=on|off]")
    p.add_argument("--speculative", default=env_str("SWITCHYARD_SPECULATIVE", "none"), choices=SPECULATIVE_METHODS,
                   help="speculative decoding: 'ngram' proposes draft tokens by prompt lookup (the request's "
                        "own earlier tokens) and the worker verifies them in one pass; pays off where output "
                        "copies input (rewrite, summarise, extract) [SWITCHYARD_SPECULATIVE=none|ngram]")
    p.add_argument("--num-speculative-tokens", type=int,
                   default=env_int("SWITCHYARD_NUM_SPECULATIVE_TOKENS", 4, min_value=1),
                   help="most draft tokens per decode step with --speculative ngram "
                        "[SWITCHYARD_NUM_SPECULATIVE_TOKENS]")
    p.add_argument("--load-weight", type=float, default=env_float("SWITCHYARD_ROUTER_LOAD_WEIGHT", 1.0))
    p.add_argument("--decode-cost-tokens", type=float, default=env_float("SWITCHYARD_ROUTER_DECODE_COST_TOKENS", 8.0))
    p.add_argument("--host-hit-cost", type=float, default=env_float("SWITCHYARD_ROUTER_HOST_HIT_COST", 0.1),
                   help="router's charge per prompt token found in a worker's host KV tier, as a fraction of "
                        "computing it [SWITCHYARD_ROUTER_HOST_HIT_COST]")
    p.add_argument("--routing", default=env_str("SWITCHYARD_ROUTING", "cache_aware"),
                   choices=["cache_aware", "round_robin"],
                   help="worker choice inside a pool; round_robin is a benchmark baseline [SWITCHYARD_ROUTING]")
    p.add_argument("--kv-eviction", default=env_str("SWITCHYARD_KV_EVICTION", DEFAULT_EVICTION),
                   choices=EVICTION_POLICIES,
                   help="which cached KV block a worker's pool gives up first: lru (least recently used; "
                        "working sets that shift) or lfu (fewest recent hits; a few hot prefixes under "
                        "scans of one-off prompts) [SWITCHYARD_KV_EVICTION]")
    p.add_argument("--startup-wait-s", type=float, default=env_float("SWITCHYARD_STARTUP_WAIT_S", 120.0),
                   help="how long to wait for workers before serving")
    p.add_argument("--grace-s", type=float, default=env_float("SWITCHYARD_GRACE_S", 10.0))
    p.add_argument("--liveness-timeout-s", type=float,
                   default=env_float("SWITCHYARD_LIVENESS_TIMEOUT_S", 60.0, min_value=0),
                   help="health turns NOT_SERVING while requests run and no token came for this long; 0 "
                        "disables [SWITCHYARD_LIVENESS_TIMEOUT_S]")
    p.add_argument("--leader-lease", default=env_str("SWITCHYARD_LEADER_LEASE", ""),
                   help="run active/standby: 'file:<path>' (one host or a shared volume) or "
                        "'k8s:[<namespace>/]<name>' (a Kubernetes Lease); the holder drives the workers, "
                        "the others stand by and refuse requests; empty: lead alone [SWITCHYARD_LEADER_LEASE]")
    p.add_argument("--lease-duration-s", type=float,
                   default=env_float("SWITCHYARD_LEASE_DURATION_S", DEFAULT_LEASE_DURATION_S, min_value=0.3),
                   help="how long a leader that stopped renewing keeps the lease (the failover time after "
                        "a crash) [SWITCHYARD_LEASE_DURATION_S]")
    p.add_argument("--advertise-address", default=env_str("SWITCHYARD_ADVERTISE_ADDRESS", ""),
                   help="this scheduler's address as the lease names it (host:port); default --host:--port "
                        "[SWITCHYARD_ADVERTISE_ADDRESS]")
    p.add_argument("--discovery-interval-s", type=float,
                   default=env_float("SWITCHYARD_DISCOVERY_INTERVAL_S", 5.0, min_value=0.1),
                   help="how often pools with a 'dns' name are resolved again [SWITCHYARD_DISCOVERY_INTERVAL_S]")
    r = p.add_argument_group("automatic canary rollback", "a pool doing worse than the baseline pool over the "
                             "window gets weight 0")
    r.add_argument("--rollback", action=argparse.BooleanOptionalAction,
                   default=env_str("SWITCHYARD_ROLLBACK", "on") not in ("off", "0", "false", "no"),
                   help="judge canary pools against the baseline [SWITCHYARD_ROLLBACK=on|off]")
    r.add_argument("--rollback-baseline-pool", default=env_str("SWITCHYARD_ROLLBACK_BASELINE_POOL", ""),
                   help="the pool others are compared with; default the highest weight "
                        "[SWITCHYARD_ROLLBACK_BASELINE_POOL]")
    r.add_argument("--rollback-window-s", type=float, default=env_float("SWITCHYARD_ROLLBACK_WINDOW_S", 60.0),
                   help="sliding window of finished requests [SWITCHYARD_ROLLBACK_WINDOW_S]")
    r.add_argument("--rollback-min-requests", type=int,
                   default=env_int("SWITCHYARD_ROLLBACK_MIN_REQUESTS", 20, min_value=1),
                   help="requests each pool needs in the window before it is judged "
                        "[SWITCHYARD_ROLLBACK_MIN_REQUESTS]")
    r.add_argument("--rollback-max-error-rate-increase", type=float,
                   default=env_float("SWITCHYARD_ROLLBACK_MAX_ERROR_RATE_INCREASE", 0.05),
                   help="error rate above the baseline's that rolls back (absolute, 0.05 = 5 points) "
                        "[SWITCHYARD_ROLLBACK_MAX_ERROR_RATE_INCREASE]")
    r.add_argument("--rollback-max-ttft-p99-ratio", type=float,
                   default=env_float("SWITCHYARD_ROLLBACK_MAX_TTFT_P99_RATIO", 2.0),
                   help="p99 TTFT over the baseline's that rolls back [SWITCHYARD_ROLLBACK_MAX_TTFT_P99_RATIO]")
    s = p.add_argument_group("autoscaling signal", "switchyard_pool_desired_workers{pool}: the workers each pool "
                             "should have for its queue and KV use (services/scheduler/autoscale.py)")
    for flag, env, default, meaning in _AUTOSCALE_FLAGS:
        s.add_argument(flag, type=type(default), default=_AUTOSCALE_ENV[type(default)](env, default),
                       help=f"{meaning} [{env}]")
    add_tls_arguments(p)
    a = p.parse_args(argv)
    autoscale = _autoscale_policy(a)
    try:
        BatchWait(a.batch_wait_ms)  # fails at startup, not when the first worker connects
        rollback = RollbackPolicy(
            enabled=a.rollback, window_s=a.rollback_window_s, min_requests=a.rollback_min_requests,
            max_error_rate_increase=a.rollback_max_error_rate_increase,
            max_ttft_p99_ratio=a.rollback_max_ttft_p99_ratio, baseline_pool=a.rollback_baseline_pool,
        )
    except InvalidArgument as e:
        flag = "--" + (e.field or "rollback").replace(".", "-").replace("_", "-")
        raise ConfigError(f"{flag}: {str(e).removeprefix(f'{e.field}: ')}") from e
    for flag, value in (("--load-weight", a.load_weight), ("--decode-cost-tokens", a.decode_cost_tokens),
                        ("--host-hit-cost", a.host_hit_cost)):
        if not math.isfinite(value) or value < 0:  # the router would refuse it only when built
            raise ConfigError(f"{flag}: must be a finite number >= 0, got {value!r}")
    _check_choice("--speculative", "SWITCHYARD_SPECULATIVE", a.speculative, SPECULATIVE_METHODS)
    if a.num_speculative_tokens < 1:
        raise ConfigError(f"--num-speculative-tokens: must be >= 1, got {a.num_speculative_tokens}")
    _check_choice("--kv-eviction", "SWITCHYARD_KV_EVICTION", a.kv_eviction, EVICTION_POLICIES)
    if a.pools_file:
        pools = load_pools(a.pools_file)
    else:
        addresses = tuple(w.strip() for w in a.workers.split(",") if w.strip())
        if not addresses:
            raise ConfigError("--workers / SWITCHYARD_WORKER_ADDRESSES: no worker address given")
        pools = (PoolConfig(name="default", version="v1", weight=1.0, worker_addresses=addresses),)
    if rollback.baseline_pool and rollback.baseline_pool not in {pool.name for pool in pools}:
        raise ConfigError(f"--rollback-baseline-pool: unknown pool {rollback.baseline_pool!r}; known: "
                          f"{sorted(pool.name for pool in pools)}")
    fleet = FleetConfig(
        pools=pools, max_num_batched_tokens=a.max_num_batched_tokens, max_num_seqs=a.max_num_seqs,
        batch_wait_ms=a.batch_wait_ms,
        max_waiting_requests=a.max_waiting_requests, step_timeout_s=a.step_timeout_s,
        async_scheduling=a.async_scheduling,
        num_speculative_tokens=a.num_speculative_tokens if a.speculative == "ngram" else 0,
        load_weight=a.load_weight, decode_cost_tokens=a.decode_cost_tokens,
        host_hit_cost=a.host_hit_cost, routing=a.routing,
        tls=tls_from_args(a), rollback=rollback, discovery_interval_s=a.discovery_interval_s,
        kv_eviction=a.kv_eviction, autoscale=autoscale,
    )
    return SchedulerConfig(host=a.host, port=a.port, metrics_port=a.metrics_port, fleet=fleet,
                           startup_wait_s=a.startup_wait_s, grace_s=a.grace_s,
                           liveness_timeout_s=a.liveness_timeout_s, tls=fleet.tls,
                           leader_lease=_check_lease(a.leader_lease, a.lease_duration_s),
                           lease_duration_s=a.lease_duration_s,
                           advertise_address=a.advertise_address or f"{a.host}:{a.port}")


def _check_lease(spec: str, duration_s: float) -> str:
    if not spec:
        return ""
    if not math.isfinite(duration_s) or duration_s < 0.3:
        raise ConfigError(f"--lease-duration-s: must be a finite number >= 0.3, got {duration_s!r}")
    kind, _, rest = spec.partition(":")
    if kind not in ("file", "k8s") or not rest:
        raise ConfigError(f"--leader-lease / SWITCHYARD_LEADER_LEASE: expected 'file:<path>' or "
                          f"'k8s:[<namespace>/]<name>', got {spec!r}")
    return spec
