"""Scheduler configuration: pools from a file or a worker list, errors that say what is wrong."""

from __future__ import annotations

import json

import pytest

from services.scheduler.config import parse_config
from shared.config import ConfigError


def test_worker_list_forms_default_pool() -> None:
    config = parse_config(["--workers", "127.0.0.1:1,127.0.0.1:2", "--max-num-seqs", "7"])
    (pool,) = config.fleet.pools
    assert pool.name == "default" and pool.worker_addresses == ("127.0.0.1:1", "127.0.0.1:2")
    assert config.fleet.max_num_seqs == 7 and config.address == "127.0.0.1:50052"


def test_pools_file(tmp_path) -> None:
    path = tmp_path / "pools.json"
    path.write_text(json.dumps({"pools": [
        {"name": "stable", "version": "v1", "weight": 90, "workers": ["127.0.0.1:1"]},
        {"name": "canary", "version": "v2", "weight": 10, "workers": ["127.0.0.1:2"]}]}))
    pools = parse_config(["--pools-file", str(path)]).fleet.pools
    assert [(p.name, p.version, p.weight) for p in pools] == [("stable", "v1", 90.0), ("canary", "v2", 10.0)]


def test_bad_pools_file_is_named(tmp_path) -> None:
    path = tmp_path / "pools.json"
    path.write_text('{"pools": [{"weight": 1}]}')
    with pytest.raises(ConfigError, match="pools file"):
        parse_config(["--pools-file", str(path)])


def test_dns_pools_and_rollback_flags(tmp_path) -> None:
    path = tmp_path / "pools.json"
    path.write_text(json.dumps({"pools": [
        {"name": "stable", "version": "v1", "weight": 90, "dns": "workers-stable.ns.svc:50061"},
        {"name": "canary", "version": "v2", "weight": 10, "workers": ["127.0.0.1:2"]}]}))
    config = parse_config(["--pools-file", str(path), "--rollback-min-requests", "7", "--discovery-interval-s", "2",
                           "--rollback-baseline-pool", "stable"])
    stable, canary = config.fleet.pools
    assert stable.dns == "workers-stable.ns.svc:50061" and stable.worker_addresses == () and canary.dns == ""
    assert config.fleet.rollback.min_requests == 7 and config.fleet.rollback.baseline_pool == "stable"
    assert config.fleet.discovery_interval_s == 2.0 and config.fleet.rollback.enabled
    assert not parse_config(["--pools-file", str(path), "--no-rollback"]).fleet.rollback.enabled
    with pytest.raises(ConfigError, match="--rollback-baseline-pool: unknown pool 'x'"):
        parse_config(["--pools-file", str(path), "--rollback-baseline-pool", "x"])
    with pytest.raises(ConfigError, match="--rollback-max-ttft-p99-ratio"):
        parse_config(["--pools-file", str(path), "--rollback-max-ttft-p99-ratio", "0"])
    path.write_text(json.dumps({"pools": [{"name": "empty", "version": "v1"}]}))
    with pytest.raises(ConfigError, match="pools\\[empty\\]: give 'workers'"):
        parse_config(["--pools-file", str(path)])


def test_batch_wait_ms_defaults_to_never_and_refuses_negative_values(monkeypatch) -> None:
    assert parse_config([]).fleet.batch_wait_ms == 0.0
    assert parse_config(["--batch-wait-ms", "2.5"]).fleet.batch_wait_ms == 2.5
    with pytest.raises(ConfigError, match="--batch-wait-ms: must be a finite number of milliseconds >= 0, got -1"):
        parse_config(["--batch-wait-ms", "-1"])
    monkeypatch.setenv("SWITCHYARD_BATCH_WAIT_MS", "5")
    assert parse_config([]).fleet.batch_wait_ms == 5.0
    monkeypatch.setenv("SWITCHYARD_BATCH_WAIT_MS", "-5")
    with pytest.raises(ConfigError, match="SWITCHYARD_BATCH_WAIT_MS must be >= 0"):
        parse_config([])


def test_router_costs_default_and_refuse_negative_or_nan_values(monkeypatch) -> None:
    fleet = parse_config([]).fleet
    assert (fleet.load_weight, fleet.decode_cost_tokens, fleet.host_hit_cost) == (1.0, 8.0, 0.1)
    assert parse_config(["--host-hit-cost", "0.25"]).fleet.host_hit_cost == 0.25
    for flag in ("--load-weight", "--decode-cost-tokens", "--host-hit-cost"):
        for bad in ("-1", "nan"):
            with pytest.raises(ConfigError, match=f"{flag}: must be a finite number >= 0"):
                parse_config([flag, bad])
    monkeypatch.setenv("SWITCHYARD_ROUTER_HOST_HIT_COST", "0.5")
    assert parse_config([]).fleet.host_hit_cost == 0.5


def test_autoscale_targets_default_and_refuse_bad_values_naming_the_flag(monkeypatch) -> None:
    policy = parse_config([]).fleet.autoscale
    assert (policy.target_waiting_per_worker, policy.target_kv_used_ratio, policy.scale_down_margin,
            policy.min_workers) == (4.0, 0.75, 0.2, 1)
    policy = parse_config(["--autoscale-target-waiting-per-worker", "8", "--autoscale-target-kv-used-ratio", "0.9",
                           "--autoscale-scale-down-margin", "0", "--autoscale-min-workers", "2"]).fleet.autoscale
    assert (policy.target_waiting_per_worker, policy.target_kv_used_ratio, policy.scale_down_margin,
            policy.min_workers) == (8.0, 0.9, 0.0, 2)
    for flag, bad, why in (("--autoscale-target-waiting-per-worker", "0", "must be a finite number > 0"),
                           ("--autoscale-target-kv-used-ratio", "1.5", "must be in \\(0, 1\\]"),
                           ("--autoscale-scale-down-margin", "1", "must be in \\[0, 1\\)"),
                           ("--autoscale-min-workers", "0", "must be an integer >= 1")):
        env = "SWITCHYARD_" + flag.removeprefix("--").replace("-", "_").upper()
        with pytest.raises(ConfigError, match=f"^{flag} / {env}: {why}"):
            parse_config([flag, bad])
    monkeypatch.setenv("SWITCHYARD_AUTOSCALE_TARGET_KV_USED_RATIO", "0.6")
    assert parse_config([]).fleet.autoscale.target_kv_used_ratio == 0.6
    monkeypatch.setenv("SWITCHYARD_AUTOSCALE_TARGET_KV_USED_RATIO", "2")
    with pytest.raises(ConfigError, match="SWITCHYARD_AUTOSCALE_TARGET_KV_USED_RATIO: must be in"):
        parse_config([])
