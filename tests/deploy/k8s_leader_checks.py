"""Checks of the scheduler's active/standby setup in rendered Kubernetes objects.

Two scheduler replicas share the workers through a leader Lease (services/scheduler/lease.py,
k8s_lease.py): only the holder drives them. For that to work in a cluster the Deployment runs two
replicas with a `k8s:` lease and its pod address to advertise, its pods run as a ServiceAccount
that may get, create and update that Lease, and no other pod holds an API token. The probes that
tell leader from standby are checked with the others (k8s_checks.check_probes, PROBE_SERVICES).
"""

from __future__ import annotations

from typing import Any

from tests.deploy.k8s_manifests import NAMESPACE, ref
from tests.deploy.k8s_objects import (
    allows, bound_rules, component, find, main_containers, of_kind, pod_spec, setting,
)

LEASE_FLAG, LEASE_ENV = "--leader-lease", "SWITCHYARD_LEADER_LEASE"
ADVERTISE_FLAG, ADVERTISE_ENV = "--advertise-address", "SWITCHYARD_ADVERTISE_ADDRESS"
SCHEDULER_REPLICAS = 2  # a leader and one warm standby; a third would only idle
LEASE_GROUP, LEASE_RESOURCE = "coordination.k8s.io", "leases"


def _schedulers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in of_kind(objects, "Deployment") if component(d) == "scheduler"]


def lease_name(container: dict[str, Any]) -> tuple[str | None, str]:
    """The Lease a scheduler container claims, from `k8s:[<namespace>/]<name>`; (name, problem)."""
    spec = setting(container, LEASE_FLAG, LEASE_ENV)
    if not spec:
        return None, f"no leader lease ({LEASE_FLAG} or env {LEASE_ENV}): two replicas would both drive the workers"
    kind, _, rest = spec.partition(":")
    namespace, _, name = rest.rpartition("/")
    if kind != "k8s" or not name:
        return None, f"leader lease {spec!r} must be k8s:[<namespace>/]<name> (a file lease is per host)"
    if namespace not in ("", NAMESPACE):
        return None, f"leader lease {spec!r} names namespace {namespace!r}; the RBAC here is for {NAMESPACE!r}"
    return name, ""


def check_scheduler_replicas(objects: list[dict[str, Any]]) -> list[str]:
    """The scheduler runs a leader and a standby on a Kubernetes lease, recreated (not rolled) on
    change, each advertising its own pod address on its gRPC port."""
    problems = []
    for deployment in _schedulers(objects):
        replicas = deployment["spec"].get("replicas", 1)
        if replicas != SCHEDULER_REPLICAS:
            problems.append(f"{ref(deployment)}: replicas must be {SCHEDULER_REPLICAS} (a leader and a warm "
                            f"standby on the leader lease), got {replicas!r}")
        strategy = (deployment["spec"].get("strategy") or {}).get("type", "RollingUpdate")
        if strategy != "Recreate":
            problems.append(f"{ref(deployment)}: strategy {strategy!r} must be Recreate: a standby never turns "
                            "Ready, so a rolling update would wait for it forever")
        for container in main_containers(deployment)[:1]:
            where = f"{ref(deployment)}: containers[{container.get('name')}]"
            name, why = lease_name(container)
            if name is None:
                problems.append(f"{where}: {why}")
            problems += [f"{where}: {p}" for p in _advertise_problems(container)]
    return problems


def _advertise_problems(container: dict[str, Any]) -> list[str]:
    grpc_ports = [p["containerPort"] for p in container.get("ports") or [] if p.get("name") == "grpc"]
    wanted = f"$(POD_IP):{grpc_ports[0] if grpc_ports else 50052}"
    address = setting(container, ADVERTISE_FLAG, ADVERTISE_ENV)
    if address != wanted:
        return [f"{ADVERTISE_ENV} {address!r} must be {wanted!r}: the pod's own address on its gRPC port"]
    entries = [e["name"] for e in container.get("env") or []]
    pod_ip = next((e for e in container.get("env") or [] if e["name"] == "POD_IP"), None)
    field_path = ((pod_ip or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
    if field_path != "status.podIP":
        return [f"env POD_IP must come from the downward API (fieldRef status.podIP), got {field_path!r}"]
    if ADVERTISE_ENV in entries and entries.index("POD_IP") > entries.index(ADVERTISE_ENV):
        # The kubelet expands $(VAR) only from entries above; below, the text stays "$(POD_IP)".
        return [f"env POD_IP must come before {ADVERTISE_ENV}, which expands it"]
    return []


def _token_mounted(objects: list[dict[str, Any]], deployment: dict[str, Any]) -> bool:
    """The pod's automountServiceAccountToken, else its ServiceAccount's, else Kubernetes' true."""
    spec = pod_spec(deployment)
    if "automountServiceAccountToken" in spec:
        return bool(spec["automountServiceAccountToken"])
    account = find(objects, "ServiceAccount", spec.get("serviceAccountName") or "default")
    return bool((account or {}).get("automountServiceAccountToken", True))


def check_lease_access(objects: list[dict[str, Any]]) -> list[str]:
    """The scheduler runs as its own ServiceAccount, mounts its token, and is bound to get and
    update its lease by name and to create leases; every other pod mounts no token at all."""
    problems = []
    for deployment in of_kind(objects, "Deployment"):
        spec = pod_spec(deployment)
        account = spec.get("serviceAccountName") or "default"
        if component(deployment) != "scheduler":
            if _token_mounted(objects, deployment):
                problems.append(f"{ref(deployment)}: mounts a service account token ({account!r}) it has no use "
                                "for; set automountServiceAccountToken: false")
            continue
        name, _ = lease_name(main_containers(deployment)[0]) if main_containers(deployment) else (None, "")
        if name is None:
            continue  # check_scheduler_replicas says why
        if account == "default":
            problems.append(f"{ref(deployment)}: spec.template.spec.serviceAccountName missing: the lease needs "
                            "an account of its own, not the namespace's default")
            continue
        if find(objects, "ServiceAccount", account) is None:
            problems.append(f"{ref(deployment)}: ServiceAccount {account!r} does not exist")
        if not _token_mounted(objects, deployment):
            problems.append(f"{ref(deployment)}: automountServiceAccountToken is off: the scheduler cannot reach "
                            "the API for its lease")
        rules = bound_rules(objects, NAMESPACE, account)
        for verb in ("get", "update"):
            if not allows(rules, verb, LEASE_GROUP, LEASE_RESOURCE, name):
                problems.append(f"{ref(deployment)}: ServiceAccount {account!r} may not {verb} Lease {name!r} "
                                f"({LEASE_GROUP}); bind a Role that allows it")
        if not allows(rules, "create", LEASE_GROUP, LEASE_RESOURCE):
            problems.append(f"{ref(deployment)}: ServiceAccount {account!r} may not create leases ({LEASE_GROUP}); "
                            "create cannot be restricted by resourceNames, so the rule must name none")
        problems += _excess_rules(rules, account, name)
    return problems


def _excess_rules(rules: list[dict[str, Any]], account: str, lease: str) -> list[str]:
    """The scheduler's token may touch its lease and create leases, nothing more."""
    problems = []
    for rule in rules:
        groups, resources = set(rule.get("apiGroups") or []), set(rule.get("resources") or [])
        verbs, names = set(rule.get("verbs") or []), set(rule.get("resourceNames") or [])
        if groups != {LEASE_GROUP} or resources != {LEASE_RESOURCE}:
            problems.append(f"ServiceAccount {account!r}: a rule grants {sorted(verbs)} on {sorted(resources)} of "
                            f"{sorted(groups)}; the scheduler needs leases only")
        elif not names and verbs - {"create"}:
            problems.append(f"ServiceAccount {account!r}: {sorted(verbs - {'create'})} on every Lease of the "
                            f"namespace; restrict them with resourceNames: [{lease}]")
        elif names - {lease} or verbs - {"get", "update", "create"}:
            problems.append(f"ServiceAccount {account!r}: a rule grants {sorted(verbs)} on leases "
                            f"{sorted(names)}; the scheduler needs get and update on {lease!r}")
    return problems


LEADER_CHECKS = (check_scheduler_replicas, check_lease_access)
