"""The local stack runner starts real processes the way `make up` does, on free ports and a tmp run dir."""

from __future__ import annotations

import importlib.util
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.stack import (
    HEALTH_NAMES,
    REPO_ROOT,
    Stack,
    StackConfig,
    StackError,
    StackRunning,
    check_health,
    load_stack,
    stack_status,
    start_stack,
    stop_stack,
)

pytestmark = pytest.mark.e2e

WORKER_ARGS = ("--num-blocks", "128", "--num-threads", "1")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (workers take base, base + 1, ...)."""
    for _ in range(200):
        base = random.randrange(20000, 32000)  # below the ephemeral range
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no block of free ports")


def make_config(run_dir: Path, model_dir: Path, services: tuple[str, ...] = ("worker", "scheduler"),
                **overrides: object) -> StackConfig:
    base = free_ports(11)
    ports = dict(worker_base_port=base, worker_base_metrics_port=base + 2, scheduler_port=base + 4,
                 scheduler_metrics_port=base + 5, tokenizer_port=base + 6, http_port=base + 7,
                 tokenizer_metrics_port=base + 8, standby_scheduler_port=base + 9,
                 standby_scheduler_metrics_port=base + 10)
    settings = dict(run_dir=run_dir, model_dir=model_dir, num_workers=2, worker_args=WORKER_ARGS,
                    grace_s=2.0, stop_grace_s=10.0, timeout_s=60.0, services=services, **ports)
    return StackConfig(**{**settings, **overrides})


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def run_cli(command: str, run_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SWITCHYARD_RUN_DIR": str(run_dir)}
    return subprocess.run([sys.executable, "-m", "deploy.stack", command], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    config = make_config(tmp_path_factory.mktemp("run"), tiny_model_dir)
    stack = start_stack(config)
    yield stack
    stop_stack(config.run_dir, grace_s=5.0, quiet=True)


def test_every_process_is_serving_and_recorded(stack: Stack) -> None:
    assert [p.name for p in stack.processes] == ["worker-1", "worker-2", "scheduler", "scheduler-2"]
    for p in stack.processes:
        # The standby is up but takes no requests: NOT_SERVING under the Scheduler's name only.
        expected = "NOT_SERVING" if p.name == "scheduler-2" else "SERVING"
        assert check_health(p.address, HEALTH_NAMES[p.kind]) == expected, p
        assert check_health(p.address, "") == "SERVING", p
        assert Path(p.log).is_file()
    assert load_stack(stack.run_dir) == stack
    assert stack.scheduler_address and len(stack.worker_addresses) == 2
    assert set(stack.metrics_urls) == {"worker-1", "worker-2", "scheduler", "scheduler-2"}


def test_status_reports_each_process(stack: Stack) -> None:
    statuses = stack_status(stack.run_dir)
    assert [(s.process.name, s.alive, s.health) for s in statuses] == [
        ("worker-1", True, "SERVING"), ("worker-2", True, "SERVING"), ("scheduler", True, "SERVING"),
        ("scheduler-2", True, "STANDBY")]
    cli = run_cli("status", stack.run_dir)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert all(name in cli.stdout for name in ("worker-1", "worker-2", "scheduler", "scheduler-2", "STANDBY"))


def test_second_start_is_refused_politely(stack: Stack, tiny_model_dir: Path) -> None:
    with pytest.raises(StackRunning, match="already running"):
        start_stack(make_config(stack.run_dir, tiny_model_dir))
    cli = run_cli("up", stack.run_dir)
    assert cli.returncode == 0 and "already running" in cli.stdout, cli.stdout + cli.stderr
    assert load_stack(stack.run_dir) == stack  # the running stack is untouched


def test_stop_leaves_no_process_behind(stack: Stack) -> None:
    assert stop_stack(stack.run_dir, quiet=True) is True
    for p in stack.processes:
        assert gone(p.pid), p
        with pytest.raises(ProcessLookupError):
            os.killpg(p.pid, 0)
    assert not (stack.run_dir / "pids.json").exists()
    assert stop_stack(stack.run_dir) is False  # idempotent
    cli = run_cli("down", stack.run_dir)
    assert cli.returncode == 0 and "no stack running" in cli.stdout


def test_busy_port_is_named(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = make_config(tmp_path / "run", tiny_model_dir)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", config.scheduler_port))
        busy.listen()
        with pytest.raises(StackError, match=rf"port {config.scheduler_port} \(scheduler gRPC\).*busy"):
            start_stack(config)
    assert load_stack(config.run_dir) is None  # nothing was started


def test_worker_that_fails_to_start_stops_everything(tmp_path: Path) -> None:
    config = make_config(tmp_path / "run", tmp_path / "no-such-model")
    with pytest.raises(StackError) as failure:
        start_stack(config)
    message = str(failure.value)
    assert "worker-" in message and "exited" in message
    assert "no-such-model has no config.json" in message  # the log's tail
    assert failure.value.started and all(gone(p.pid) for p in failure.value.started)
    assert load_stack(config.run_dir) is None


@pytest.mark.skipif(importlib.util.find_spec("services.tokenizer.__main__") is None, reason="no tokenizer yet")
def test_full_stack_streams_a_completion(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = make_config(tmp_path / "run", tiny_model_dir, services=("worker", "scheduler", "tokenizer"),
                         num_workers=1, num_schedulers=1)
    stack = start_stack(config)
    try:
        assert stack.tokenizer_address and stack.http_url
        assert [(s.process.name, s.health) for s in stack_status(config.run_dir)] == [
            ("worker-1", "SERVING"), ("scheduler", "SERVING"), ("tokenizer", "SERVING")]
        demo = subprocess.run([sys.executable, "-m", "deploy.demo", "--address", stack.tokenizer_address,
                               "--max-tokens", "8", "--raw", "def add(a, b):"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "def add(a, b):" in demo.stdout and "completion_tokens=" in demo.stdout
    finally:
        stop_stack(config.run_dir, quiet=True)
    assert all(gone(p.pid) for p in stack.processes)
