"""`python -m deploy.healthcheck`: exit 0 iff the gRPC health service says SERVING."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from deploy.healthcheck import main, resolve
from deploy.stack import HEALTH_NAMES


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_serving_is_exit_0_anything_else_exit_1(health_server, capsys: pytest.CaptureFixture[str]) -> None:
    address, servicer = health_server
    name = HEALTH_NAMES["scheduler"]
    servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    assert main([address, name]) == 0
    assert main([address, "scheduler"]) == 0  # a kind stands for its health name
    servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main([address, name]) == 1
    assert "NOT_SERVING" in capsys.readouterr().out
    assert main([address, HEALTH_NAMES["worker"]]) == 1  # unknown service


def test_unreachable_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["127.0.0.1:1", "worker", "--timeout-s", "1"]) == 1
    assert "UNREACHABLE" in capsys.readouterr().out


def test_defaults_come_from_the_container_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"SWITCHYARD_SERVICE": "worker", "SWITCHYARD_WORKER_PORT": "50099"}
    assert resolve(None, None, env) == ("127.0.0.1:50099", HEALTH_NAMES["worker"])
    assert resolve(None, None, {"SWITCHYARD_SERVICE": "tokenizer"}) == ("127.0.0.1:50051", HEALTH_NAMES["tokenizer"])
    assert resolve("scheduler:50052", "scheduler", {}) == ("scheduler:50052", HEALTH_NAMES["scheduler"])
    with pytest.raises(ValueError, match="SWITCHYARD_SERVICE"):
        resolve(None, None, {})
    with pytest.raises(ValueError, match="ADDRESS"):
        resolve(None, "switchyard.custom.v1.Thing", {})
    monkeypatch.delenv("SWITCHYARD_SERVICE", raising=False)
    assert main([]) == 1  # says what is missing instead of raising
