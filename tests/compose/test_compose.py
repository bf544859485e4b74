"""docker-compose.yml end to end, offline: build the images, start the stack, stream, trace, scrape.

`make test-compose` (`pytest -m compose tests/compose`); CI runs it after the chaos suite. From a
machine with no Docker at all it installs Debian's engine, the Compose v2 plugin and a debootstrap
base image (tests/compose/harness.py says how and why); it then builds the Switchyard image and the
two offline stand-ins of deploy/compose/offline.yml, starts
    model worker-stable worker-canary scheduler scheduler-standby tokenizer otel-collector prometheus
(Jaeger and Grafana have no image obtainable offline), and checks through the published ports only:
a completion streams in SSE chunks ending with [DONE] (HTTP) and in several messages (gRPC), the
collector received the spans of all three services in one trace, and Prometheus scraped every
Switchyard target and counts the requests. It tears everything down (`compose down -v`), keeps the
images as a build cache, and prints how long each phase took. Logs: .run/compose/.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from tests.compose.harness import (
    APP_IMAGE,
    LOG_DIR,
    OTEL_IMAGE,
    PROMETHEUS_IMAGE,
    REPO_ROOT,
    Compose,
    Engine,
    Phases,
    build,
    ensure_base_image,
    ensure_compose,
    ensure_docker_cli,
    ensure_engine,
    ensure_model_wheel,
    ensure_torch_wheel,
    free_port,
    log,
)

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

SERVICES = ("model", "worker-stable", "worker-canary", "scheduler", "scheduler-standby", "tokenizer", "otel-collector",
            "prometheus")
SCRAPE_TARGETS = {"tokenizer:9101", "scheduler:9102", "scheduler-standby:9102", "worker-stable:9111",
                  "worker-canary:9111"}
SPAN_NAMES = {"tokenizer.generate", "scheduler.request", "worker.step"}
SERVICE_NAMES = {"switchyard-tokenizer", "switchyard-scheduler", "switchyard-worker"}
MODEL = "smollm2-135m-instruct"


@dataclass
class Stack:
    compose: Compose
    http_url: str
    grpc_address: str
    prometheus_url: str


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def emit(message: str) -> None:  # progress shows even without -s
        with capture.global_and_fixture_disabled():
            log(message)

    phases = Phases(emit=emit)
    engine: Engine | None = None
    compose: Compose | None = None
    try:
        with phases.phase("docker CLI") as notes:
            ensure_docker_cli(notes)
        with phases.phase("docker engine") as notes:
            engine = ensure_engine(notes)
        with phases.phase("compose plugin") as notes:
            ensure_compose(notes)
        with phases.phase("base image") as notes:
            base = ensure_base_image(notes)
        with phases.phase("wheels (torch, default model)") as notes:
            ensure_torch_wheel(notes)
            ensure_model_wheel(notes)
        with phases.phase(f"build {APP_IMAGE}") as notes:
            notes.append("rebuilt on an existing image (layer cache)" if build(APP_IMAGE, base, REPO_ROOT)
                         else "first build")
        with phases.phase("build offline collector + prometheus") as notes:
            offline = REPO_ROOT / "deploy" / "compose" / "offline"
            for tag, dockerfile in ((OTEL_IMAGE, "otel-collector.Dockerfile"),
                                    (PROMETHEUS_IMAGE, "prometheus.Dockerfile")):
                notes.append(f"{tag}: {'cached' if build(tag, base, offline, offline / dockerfile) else 'built'}")
        http_port, grpc_port, prometheus_port = free_port(), free_port(), free_port()
        compose = Compose(env={
            "SWITCHYARD_IMAGE": APP_IMAGE, "SWITCHYARD_BASE_IMAGE": base,
            "SWITCHYARD_HTTP_PUBLISH": str(http_port), "SWITCHYARD_GRPC_PUBLISH": str(grpc_port),
            "PROMETHEUS_PUBLISH": str(prometheus_port),
        })
        compose.run("down", "-v", "--remove-orphans", check=False)  # what an interrupted run left
        with phases.phase("compose up until healthy") as notes:
            ready = compose.up_and_wait(SERVICES, one_shot=("model",), timeout_s=420)
            notes.append("ready after: " + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in ready.items()))
        with phases.phase("tests"):
            yield Stack(compose, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}",
                        f"http://127.0.0.1:{prometheus_port}")
    finally:
        if compose is not None:
            with phases.phase("compose down -v"):
                if request.session.testsfailed:
                    dump = LOG_DIR / "compose-logs.txt"
                    dump.write_text(compose.run("logs", "--no-color", "--timestamps", check=False).stdout)
                    emit(f"some test failed: every container's log is in {dump}")
                compose.run("down", "-v", "--remove-orphans", "--timeout", "30", check=False)
        if engine is not None and engine.process is not None:
            with phases.phase("stop dockerd"):
                engine.stop()
        emit("phase timings:\n" + phases.table())


def _completion(stack: Stack, prompt: str, max_tokens: int, *, stream: bool) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return httpx.post(f"{stack.http_url}/v1/completions", json=body, timeout=120)


def test_http_completion_streams_sse_chunks_and_done(stack: Stack) -> None:
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0,
            "stream": True, "ignore_eos": True}
    events: list[str] = []
    with httpx.stream("POST", f"{stack.http_url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(line[len("data:"):].strip())
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks]
    assert sum(1 for t in texts if t) >= 3, f"text came in {len(texts)} chunk(s): {texts}"
    assert "".join(texts).strip()
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert {c["model"] for c in chunks} == {MODEL}


def test_grpc_generate_streams_through_the_published_port(stack: Stack) -> None:
    from switchyard.api.v1 import generation_pb2 as pb  # noqa: PLC0415
    from switchyard.api.v1 import generation_pb2_grpc  # noqa: PLC0415

    request = pb.GenerateRequest(prompt="def main():\n", sampling=pb.SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True))
    with grpc.insecure_channel(stack.grpc_address) as channel:
        responses = list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=120))
    assert len([r for r in responses if r.text]) >= 2, responses
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert responses[-1].usage.completion_tokens == 12


_TRACE_ID = re.compile(r"Trace ID\s*:\s*([0-9a-f]{32})")
_SPAN_NAME = re.compile(r"\bName\s*:\s*(\S.*?)\s*$")
_SERVICE = re.compile(r"service\.name:\s*Str\(([^)]*)\)")


def _collector_spans(stack: Stack) -> tuple[dict[str, set[str]], set[str]]:
    """Span name -> trace ids, and the service names, from the stand-in collector's debug log."""
    spans: dict[str, set[str]] = {}
    trace_id = ""
    for line in stack.compose.logs("otel-collector").splitlines():
        if m := _TRACE_ID.search(line):
            trace_id = m.group(1)
        elif (m := _SPAN_NAME.search(line)) and trace_id:
            spans.setdefault(m.group(1), set()).add(trace_id)
    return spans, set(_SERVICE.findall(stack.compose.logs("otel-collector")))


def test_trace_of_a_request_reached_the_collector(stack: Stack) -> None:
    assert _completion(stack, "Once upon a time", 8, stream=False).status_code == 200
    deadline = time.monotonic() + 60
    while True:
        spans, services = _collector_spans(stack)
        shared = spans.get("tokenizer.generate", set()) & spans.get("scheduler.request", set())
        if SPAN_NAMES <= spans.keys() and SERVICE_NAMES <= services and shared:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"collector saw spans {sorted(spans)} from {sorted(services)}; "
                        f"tokenizer.generate and scheduler.request share a trace: {bool(shared)}")
        time.sleep(1)


def _query(stack: Stack, promql: str) -> list[dict]:
    reply = httpx.get(f"{stack.prometheus_url}/api/v1/query", params={"query": promql}, timeout=10)
    reply.raise_for_status()
    return reply.json()["data"]["result"]


def _wait_for(what: str, check, timeout_s: float = 60):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus: {what} not seen within {timeout_s:.0f} s")
        time.sleep(1)


def test_prometheus_scraped_every_service_and_counts_requests(stack: Stack) -> None:
    def all_up() -> bool:
        up = {r["metric"]["instance"]: r["value"][1] for r in _query(stack, 'up{job=~"switchyard-.*"}')}
        return SCRAPE_TARGETS <= up.keys() and all(up[t] == "1" for t in SCRAPE_TARGETS)

    _wait_for(f"up == 1 for {sorted(SCRAPE_TARGETS)}", all_up)
    assert _completion(stack, "import os\nimport sys\n", 8, stream=False).status_code == 200
    _wait_for("switchyard_frontend_requests_total > 0",
              lambda: _query(stack, "sum(switchyard_frontend_requests_total) > 0"))
    _wait_for("switchyard_generation_tokens_total > 0",
              lambda: _query(stack, "sum(switchyard_generation_tokens_total) > 0"))
    weights = {r["metric"].get("pool"): float(r["value"][1]) for r in _query(stack, "switchyard_pool_weight")}
    assert weights == {"stable": 90.0, "canary": 10.0}, weights
