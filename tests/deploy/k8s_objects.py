"""Walking rendered Kubernetes objects: finding them, following their references, copying them.

No judgement here: the checks (k8s_checks.py, k8s_leader_checks.py) decide what is wrong; these
helpers find pods, containers, env values and flags, the Service behind a DNS name, the pools JSON
behind the scheduler's env, the RBAC rules a ServiceAccount holds, and make the deep copies that
negative tests break.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from typing import Any

from tests.deploy.k8s_manifests import COMPONENT, ref

def of_kind(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind]


def find(objects: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    for obj in objects:
        if obj.get("kind") == kind and obj["metadata"].get("name") == name:
            return obj
    return None


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"].get("labels") or {}


def component(deployment: dict[str, Any]) -> str:
    return pod_labels(deployment).get(COMPONENT, "")


def main_containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec(deployment).get("containers") or []


def all_containers(deployment: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = pod_spec(deployment)
    for field in ("initContainers", "containers"):
        for container in spec.get(field) or []:
            yield f"{ref(deployment)}: {field}[{container.get('name')}]", container


def env_of(container: dict[str, Any]) -> dict[str, str | None]:
    """Literal env values by name (None for valueFrom entries)."""
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def port_matches(port: int | str, container: dict[str, Any]) -> bool:
    """A probe's or Service targetPort's `port`, by number or name, is declared by the container."""
    for declared in container.get("ports") or []:
        if port == declared.get("containerPort") or port == declared.get("name"):
            return True
    return False


def setting(container: dict[str, Any], flag: str, env_name: str) -> str | None:
    """What a service sees for a flag with an environment fallback: `--flag VALUE` or
    `--flag=VALUE` in command + args wins over a literal env value; None if neither is given."""
    argv = [str(a) for a in list(container.get("command") or []) + list(container.get("args") or [])]
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return env_of(container).get(env_name)


def service_for_host(objects: list[dict[str, Any]], host: str, namespace: str) -> tuple[dict[str, Any] | None, str]:
    """The Service a cluster DNS name points at: NAME, NAME.NS, NAME.NS.svc, NAME.NS.svc.cluster.local."""
    parts = host.split(".")
    name = parts[0]
    if len(parts) > 1 and parts[1] != namespace:
        return None, f"{host!r} is in namespace {parts[1]!r}, not {namespace!r}"
    if len(parts) > 2 and ".".join(parts[2:]) not in ("svc", "svc.cluster.local"):
        return None, f"{host!r} is not a Service DNS name (NAME.NAMESPACE.svc.cluster.local)"
    service = find(objects, "Service", name)
    if service is None:
        return None, f"{host!r} names Service {name!r}, which does not exist"
    return service, ""


def pools_file(objects: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[str]]:
    """The scheduler's pools JSON, followed from SWITCHYARD_POOLS_FILE through its volume mount to
    the ConfigMap key; (parsed JSON, problems)."""
    schedulers = [d for d in of_kind(objects, "Deployment") if component(d) == "scheduler"]
    if len(schedulers) != 1:
        return None, [f"expected 1 scheduler Deployment, found {len(schedulers)}"]
    scheduler = schedulers[0]
    problems: list[str] = []
    container = main_containers(scheduler)[0]
    where = f"{ref(scheduler)}: containers[{container.get('name')}]"
    path = env_of(container).get("SWITCHYARD_POOLS_FILE")
    if not path:
        return None, problems + [f"{where}: env SWITCHYARD_POOLS_FILE missing"]
    mounts = [m for m in container.get("volumeMounts") or [] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        return None, problems + [f"{where}: SWITCHYARD_POOLS_FILE {path} is under no volumeMount"]
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    key = path[len(mount["mountPath"].rstrip("/")) + 1:]
    volume = next((v for v in pod_spec(scheduler).get("volumes") or [] if v["name"] == mount["name"]), None)
    if volume is None or "configMap" not in volume:
        return None, problems + [f"{where}: volume {mount['name']!r} is not a ConfigMap volume"]
    config_map = find(objects, "ConfigMap", volume["configMap"]["name"])
    if config_map is None:
        return None, problems + [f"{where}: ConfigMap {volume['configMap']['name']!r} does not exist"]
    data = config_map.get("data") or {}
    if key not in data:
        return None, problems + [f"{ref(config_map)}: no key {key!r} (SWITCHYARD_POOLS_FILE {path})"]
    try:
        return json.loads(data[key]), problems
    except ValueError as e:
        return None, problems + [f"{ref(config_map)}: {key} is not JSON: {e}"]


def bound_rules(objects: list[dict[str, Any]], namespace: str, service_account: str) -> list[dict[str, Any]]:
    """The rules granted to a ServiceAccount by the RoleBindings of its namespace (to Roles or
    ClusterRoles among `objects`)."""
    rules = []
    for binding in of_kind(objects, "RoleBinding"):
        if binding["metadata"].get("namespace") != namespace:
            continue
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == service_account
                   and s.get("namespace", namespace) == namespace for s in binding.get("subjects") or []):
            continue
        role_ref = binding["roleRef"]
        role = find(objects, role_ref["kind"], role_ref["name"])
        if role is not None and (role_ref["kind"] == "ClusterRole" or role["metadata"].get("namespace") == namespace):
            rules += role.get("rules") or []
    return rules


def allows(rules: list[dict[str, Any]], verb: str, group: str, resource: str, name: str | None = None) -> bool:
    """Whether RBAC `rules` allow `verb` on `resource` of API `group` (on the object `name`, or on
    any object when None, which a rule with resourceNames does not allow)."""
    for rule in rules:
        names = rule.get("resourceNames") or []
        if (any(g in (group, "*") for g in rule.get("apiGroups") or [])
                and any(r in (resource, "*") for r in rule.get("resources") or [])
                and any(v in (verb, "*") for v in rule.get("verbs") or [])
                and (not names or (name is not None and name in names))):
            return True
    return False


def mutated(objects: list[dict[str, Any]], kind: str, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A deep copy of `objects` and the copy of one object in it, to break in a negative test."""
    copies = copy.deepcopy(objects)
    target = find(copies, kind, name)
    if target is None:
        raise KeyError(f"{kind}/{name} not rendered")
    return copies, target
