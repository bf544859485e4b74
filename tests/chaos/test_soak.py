"""The soak's 3-minute version (tests/soak/soak.py; `make test-soak` runs it for 30): the real model
at ~70% of capacity with random aborts and a worker killed and restarted, then no failed request,
no leaked block, RSS flat after warm-up and p99 TTFT stable."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.soak.soak import _soak_config, soak

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]


def test_three_minute_soak(smollm2_model_dir, tmp_path) -> None:
    result = asyncio.run(soak(_soak_config(tmp_path / "run"), 3.0, restart_every_s=120.0))
    print(json.dumps(result, indent=1))
    assert result["worker_restarts"], "no worker was restarted"
    assert result["num_ok"] > 50 and result["num_aborted"] > 0, result
    assert not result["problems"], result["problems"]
