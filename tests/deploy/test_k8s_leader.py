"""The scheduler's active/standby setup in the Kubernetes manifests: two replicas on a leader
Lease, each advertising its pod address; RBAC for exactly that Lease; readiness only for the
leader, liveness for both. Offline, like test_k8s_manifests.py; the negative cases break one field
of a rendered object and assert that the checks name it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.scheduler.k8s_lease import KubernetesLeaseStore
from tests.deploy.k8s_checks import check_probes, semantic_problems
from tests.deploy.k8s_leader_checks import LEADER_CHECKS
from tests.deploy.k8s_manifests import K8S_DIR, render
from tests.deploy.k8s_objects import allows, bound_rules, env_of, find, mutated, pod_spec

OVERLAYS = {"base": K8S_DIR / "base", "canary": K8S_DIR / "overlays" / "canary"}
SCHEDULER = "switchyard-scheduler"
HEALTH = "switchyard.scheduler.v1.Scheduler"

Objects = list[dict[str, Any]]


@pytest.fixture(scope="module")
def rendered() -> dict[str, Objects]:
    return {name: render(path) for name, path in OVERLAYS.items()}


def scheduler_container(objects: Objects) -> dict[str, Any]:
    deployment = find(objects, "Deployment", SCHEDULER)
    assert deployment is not None
    return pod_spec(deployment)["containers"][0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_leader_and_standby_checks_pass(rendered: dict[str, Objects], overlay: str) -> None:
    assert [p for check in (*LEADER_CHECKS, check_probes) for p in check(rendered[overlay])] == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_two_schedulers_run_on_a_kubernetes_lease(rendered: dict[str, Objects], overlay: str) -> None:
    deployment = find(rendered[overlay], "Deployment", SCHEDULER)
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = scheduler_container(rendered[overlay])
    env = env_of(container)
    assert env["SWITCHYARD_LEADER_LEASE"] == "k8s:switchyard-scheduler"
    assert env["SWITCHYARD_ADVERTISE_ADDRESS"] == "$(POD_IP):50052"
    (pod_ip,) = [e for e in container["env"] if e["name"] == "POD_IP"]
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_the_lease_spec_opens_the_lease_the_role_names(rendered: dict[str, Objects], tmp_path: Path) -> None:
    """The manifest's spec, parsed by the store itself in a pod of namespace switchyard, names the
    one Lease the Role lets the scheduler get and update."""
    from tests.security.certs import CertificateAuthority

    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("t")
    (account / "namespace").write_text("switchyard")
    (account / "ca.crt").write_bytes(CertificateAuthority(tmp_path, "cluster").ca_file.read_bytes())
    spec = env_of(scheduler_container(rendered["base"]))["SWITCHYARD_LEADER_LEASE"]
    kind, _, rest = spec.partition(":")
    store = KubernetesLeaseStore.from_spec(rest, account_dir=account, environ={
        "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    assert (kind, store.namespace, store.name) == ("k8s", "switchyard", "switchyard-scheduler")
    role = find(rendered["base"], "Role", "switchyard-scheduler-lease")
    assert role is not None
    assert [rule.get("resourceNames") for rule in role["rules"] if "get" in rule["verbs"]] == [[store.name]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_scheduler_holds_a_token_and_it_opens_only_its_lease(rendered: dict[str, Objects],
                                                                      overlay: str) -> None:
    objects = rendered[overlay]
    for deployment in [o for o in objects if o["kind"] == "Deployment"]:
        spec = pod_spec(deployment)
        if deployment["metadata"]["name"] == SCHEDULER:
            assert (spec["serviceAccountName"], spec["automountServiceAccountToken"]) == (SCHEDULER, True)
        else:
            assert spec["automountServiceAccountToken"] is False, deployment["metadata"]["name"]
    account = find(objects, "ServiceAccount", SCHEDULER)
    assert account is not None and account["automountServiceAccountToken"] is False  # pods opt in
    rules = bound_rules(objects, "switchyard", SCHEDULER)
    lease = ("coordination.k8s.io", "leases")
    for verb in ("get", "update"):
        assert allows(rules, verb, *lease, SCHEDULER)
        assert not allows(rules, verb, *lease, "someone-elses-lease")
    assert allows(rules, "create", *lease)
    for verb in ("delete", "patch", "list", "watch"):
        assert not allows(rules, verb, *lease, SCHEDULER)
    assert not allows(rules, "get", "", "secrets", SCHEDULER)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_readiness_asks_for_the_leaders_service_and_liveness_for_the_process(rendered: dict[str, Objects],
                                                                             overlay: str) -> None:
    container = scheduler_container(rendered[overlay])
    services = {probe: container[probe]["grpc"].get("service", "")
                for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert services == {"startupProbe": "", "readinessProbe": HEALTH, "livenessProbe": ""}


# ---- the checks can fail --------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def container(obj: dict[str, Any]) -> dict[str, Any]:
    return pod_spec(obj)["containers"][0]


def set_env(d: dict[str, Any], name: str, value: str) -> None:
    (entry,) = [e for e in container(d)["env"] if e["name"] == name]
    entry.pop("valueFrom", None)
    entry["value"] = value


def drop_env(d: dict[str, Any], name: str) -> None:
    container(d)["env"] = [e for e in container(d)["env"] if e["name"] != name]


def move_pod_ip_last(d: dict[str, Any]) -> None:
    env = container(d)["env"]
    (pod_ip,) = [e for e in env if e["name"] == "POD_IP"]
    env.remove(pod_ip)
    env.append(pod_ip)


def rule_with(d: dict[str, Any], verb: str) -> dict[str, Any]:
    return next(rule for rule in d["rules"] if verb in rule["verbs"])


BREAKS: list[tuple[str, str, str, Mutation, str]] = [
    ("one scheduler replica", "Deployment", SCHEDULER, lambda d: d["spec"].__setitem__("replicas", 1),
     "replicas must be 2"),
    ("three scheduler replicas", "Deployment", SCHEDULER, lambda d: d["spec"].__setitem__("replicas", 3),
     "replicas must be 2"),
    ("rolling update", "Deployment", SCHEDULER, lambda d: d["spec"].__setitem__("strategy", {"type": "RollingUpdate"}),
     "must be Recreate"),
    ("no lease", "Deployment", SCHEDULER, lambda d: drop_env(d, "SWITCHYARD_LEADER_LEASE"), "no leader lease"),
    ("a file lease", "Deployment", SCHEDULER, lambda d: set_env(d, "SWITCHYARD_LEADER_LEASE", "file:/tmp/lease"),
     "must be k8s:"),
    ("a lease in another namespace", "Deployment", SCHEDULER,
     lambda d: set_env(d, "SWITCHYARD_LEADER_LEASE", "k8s:kube-system/switchyard-scheduler"),
     "names namespace 'kube-system'"),
    ("a lease flag overrides the env", "Deployment", SCHEDULER,
     lambda d: container(d).__setitem__("args", ["--leader-lease=file:/tmp/lease"]), "must be k8s:"),
    ("no advertised address", "Deployment", SCHEDULER, lambda d: drop_env(d, "SWITCHYARD_ADVERTISE_ADDRESS"),
     "SWITCHYARD_ADVERTISE_ADDRESS None must be '$(POD_IP):50052'"),
    ("advertised on the metrics port", "Deployment", SCHEDULER,
     lambda d: set_env(d, "SWITCHYARD_ADVERTISE_ADDRESS", "$(POD_IP):9102"), "must be '$(POD_IP):50052'"),
    ("advertised as the Service", "Deployment", SCHEDULER,
     lambda d: set_env(d, "SWITCHYARD_ADVERTISE_ADDRESS", "switchyard-scheduler:50052"), "the pod's own address"),
    ("POD_IP after its use", "Deployment", SCHEDULER, move_pod_ip_last, "POD_IP must come before"),
    ("POD_IP from the pod name", "Deployment", SCHEDULER,
     lambda d: next(e for e in container(d)["env"] if e["name"] == "POD_IP")["valueFrom"]["fieldRef"]
     .__setitem__("fieldPath", "metadata.name"), "fieldRef status.podIP"),
    ("readiness passes a standby", "Deployment", SCHEDULER,
     lambda d: container(d)["readinessProbe"]["grpc"].__setitem__("service", ""), "readinessProbe.grpc.service ''"),
    ("liveness kills a standby", "Deployment", SCHEDULER,
     lambda d: container(d)["livenessProbe"]["grpc"].__setitem__("service", HEALTH), "livenessProbe.grpc.service"),
    ("startup kills a standby", "Deployment", SCHEDULER,
     lambda d: container(d)["startupProbe"]["grpc"].__setitem__("service", HEALTH), "startupProbe.grpc.service"),
    ("the default service account", "Deployment", SCHEDULER, lambda d: pod_spec(d).pop("serviceAccountName"),
     "serviceAccountName missing"),
    ("no token", "Deployment", SCHEDULER, lambda d: pod_spec(d).__setitem__("automountServiceAccountToken", False),
     "automountServiceAccountToken is off"),
    ("a token in a worker", "Deployment", "switchyard-worker-stable",
     lambda d: pod_spec(d).pop("automountServiceAccountToken"), "mounts a service account token"),
    ("no update", "Role", "switchyard-scheduler-lease", lambda d: rule_with(d, "update")["verbs"].remove("update"),
     "may not update Lease 'switchyard-scheduler'"),
    ("get of another lease", "Role", "switchyard-scheduler-lease",
     lambda d: rule_with(d, "get").__setitem__("resourceNames", ["other"]), "may not get Lease"),
    ("update of every lease", "Role", "switchyard-scheduler-lease", lambda d: rule_with(d, "get").pop("resourceNames"),
     "on every Lease of the namespace"),
    ("create restricted by name", "Role", "switchyard-scheduler-lease",
     lambda d: rule_with(d, "create").__setitem__("resourceNames", [SCHEDULER]), "may not create leases"),
    ("delete too", "Role", "switchyard-scheduler-lease", lambda d: rule_with(d, "get")["verbs"].append("delete"),
     "the scheduler needs get and update"),
    ("secrets too", "Role", "switchyard-scheduler-lease",
     lambda d: d["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}),
     "the scheduler needs leases only"),
    ("bound to the default account", "RoleBinding", "switchyard-scheduler-lease",
     lambda d: d["subjects"][0].__setitem__("name", "default"), "may not get Lease"),
    ("bound to a missing Role", "RoleBinding", "switchyard-scheduler-lease",
     lambda d: d["roleRef"].__setitem__("name", "switchyard-scheduler"), "may not update Lease"),
    ("the account missing", "ServiceAccount", SCHEDULER, lambda d: d["metadata"].__setitem__("name", "scheduler"),
     "ServiceAccount 'switchyard-scheduler' does not exist"),
]


@pytest.mark.parametrize("kind, name, mutate, expected", [case[1:] for case in BREAKS],
                         ids=[case[0] for case in BREAKS])
def test_leader_checks_reject(rendered: dict[str, Objects], kind: str, name: str, mutate: Mutation,
                              expected: str) -> None:
    objects, target = mutated(rendered["canary"], kind, name)
    mutate(target)
    problems = semantic_problems(objects)
    assert any(expected in problem for problem in problems), problems
