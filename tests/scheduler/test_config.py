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
