"""Every listener binds to loopback unless configured otherwise: the defaults of each service, the
local stack, and the metrics listener (which is told the service's host)."""

from __future__ import annotations

import inspect

import pytest

from deploy.stack import StackConfig
from services.scheduler.config import parse_config as scheduler_config
from services.tokenizer.config import parse_config as tokenizer_config
from services.worker.config import parse_config as worker_config
from shared.telemetry import start_metrics_server

HOST_VARS = ("SWITCHYARD_TOKENIZER_HOST", "SWITCHYARD_HTTP_HOST", "SWITCHYARD_SCHEDULER_HOST",
             "SWITCHYARD_WORKER_HOST")


@pytest.fixture(autouse=True)
def no_host_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in HOST_VARS:
        monkeypatch.delenv(name, raising=False)


def test_service_defaults_are_loopback() -> None:
    tokenizer = tokenizer_config([])
    assert (tokenizer.host, tokenizer.http_host) == ("127.0.0.1", "127.0.0.1")
    assert scheduler_config([]).host == "127.0.0.1"
    assert worker_config([]).host == "127.0.0.1"
    assert StackConfig().host == "127.0.0.1"
    assert inspect.signature(start_metrics_server).parameters["host"].default == "127.0.0.1"


def test_binding_elsewhere_is_an_explicit_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tokenizer_config(["--host", "0.0.0.0", "--http-host", "0.0.0.0"]).host == "0.0.0.0"
    monkeypatch.setenv("SWITCHYARD_WORKER_HOST", "0.0.0.0")
    assert worker_config([]).host == "0.0.0.0"

