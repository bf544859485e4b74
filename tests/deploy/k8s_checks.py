"""Semantic checks of rendered Kubernetes objects: what schemas cannot see (see k8s_manifests.py).

That the objects fit each other and the services: selectors, ports, probes, the scheduler's pools
file, routes, GPUs, non-root, env names the services read; the scheduler's leadership setup is
checked in k8s_leader_checks.py. Every check returns a list of problems naming the object and the
field; the walking they share (finding objects, following references) is in k8s_objects.py.
"""

from __future__ import annotations

import re
from typing import Any

from tests.deploy.k8s_leader_checks import LEADER_CHECKS
from tests.deploy.k8s_manifests import (
    COMPONENT, GPU, LISTEN_HOSTS, MODULES, NAMESPACE, POOL, ROOT, probe_service, ref,
)
from tests.deploy.k8s_objects import (
    all_containers, component, env_of, find, main_containers, of_kind, pod_labels, pod_spec, pools_file,
    port_matches, selects, service_for_host, setting,
)


def check_service_selectors(objects: list[dict[str, Any]]) -> list[str]:
    """Every Service with a selector selects the pods of exactly one Deployment (so a stable
    Service can never also pick canary pods), and every targetPort is a port of those pods."""
    problems = []
    deployments = of_kind(objects, "Deployment")
    for service in of_kind(objects, "Service"):
        selector = service["spec"].get("selector") or {}
        if not selector:
            problems.append(f"{ref(service)}: spec.selector: missing (endpoints would be managed by hand)")
            continue
        matched = [d for d in deployments if selects(selector, pod_labels(d))]
        if len(matched) != 1:
            problems.append(f"{ref(service)}: spec.selector {selector} matches {len(matched)} Deployments "
                            f"({[ref(d) for d in matched]}); expected exactly 1")
            continue
        deployment = matched[0]
        selector_of_deployment = deployment["spec"]["selector"].get("matchLabels") or {}
        if not selects(selector_of_deployment, pod_labels(deployment)):
            problems.append(f"{ref(deployment)}: spec.selector does not match its own pod template labels")
        for port in service["spec"].get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            if not any(port_matches(target, c) for c in main_containers(deployment)):
                problems.append(f"{ref(service)}: ports[{port.get('name')}].targetPort {target!r} is no "
                                f"container port of {ref(deployment)}")
    return problems


def check_probes(objects: list[dict[str, Any]]) -> list[str]:
    """Readiness and liveness (and, for workers, startup) probes are native gRPC probes on a port
    the container declares, asking for the health service name each probe needs (k8s_manifests's
    PROBE_SERVICES: the component's own, or "" where a scheduler on standby must pass too)."""
    problems = []
    for deployment in of_kind(objects, "Deployment"):
        kind = component(deployment)
        wanted = ["readinessProbe", "livenessProbe"] + (["startupProbe"] if kind == "worker" else [])
        for container in main_containers(deployment):
            where = f"{ref(deployment)}: containers[{container.get('name')}]"
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(probe_name)
                if probe is None:
                    if probe_name in wanted:
                        problems.append(f"{where}: {probe_name}: missing")
                    continue
                grpc = probe.get("grpc")
                if grpc is None:
                    problems.append(f"{where}: {probe_name}: not a gRPC probe")
                    continue
                if not port_matches(grpc.get("port"), container):
                    problems.append(f"{where}: {probe_name}.grpc.port {grpc.get('port')!r} is no container port")
                wanted_service = probe_service(kind, probe_name)
                if wanted_service is not None and grpc.get("service", "") != wanted_service:
                    problems.append(f"{where}: {probe_name}.grpc.service {grpc.get('service')!r}; the {kind}'s "
                                    f"{probe_name} asks for {wanted_service!r}")
    return problems


def check_workers(objects: list[dict[str, Any]]) -> list[str]:
    """Worker pods ask for a GPU and run on it; every pool has a headless Service that lists only
    ready pods."""
    problems = []
    workers = [d for d in of_kind(objects, "Deployment") if component(d) == "worker"]
    if not workers:
        problems.append("no worker Deployment")
    for deployment in workers:
        if not pod_labels(deployment).get(POOL):
            problems.append(f"{ref(deployment)}: pod label {POOL} missing")
        for container in main_containers(deployment):
            where = f"{ref(deployment)}: containers[{container.get('name')}]"
            limits = (container.get("resources") or {}).get("limits") or {}
            gpus = str(limits.get(GPU, 0))
            if not gpus.isdigit() or int(gpus) < 1:
                problems.append(f"{where}: resources.limits[{GPU}] must be >= 1, got {limits.get(GPU)!r}")
            device = setting(container, "--device", "SWITCHYARD_DEVICE")
            if device != "cuda":
                problems.append(f"{where}: runs on device {device!r}, expected 'cuda' (--device cuda)")
    for service in of_kind(objects, "Service"):
        if (service["spec"].get("selector") or {}).get(COMPONENT) != "worker":
            continue
        if service["spec"].get("clusterIP") != "None":
            problems.append(f"{ref(service)}: worker Services must be headless (clusterIP: None), got "
                            f"{service['spec'].get('clusterIP')!r}")
        if service["spec"].get("publishNotReadyAddresses") is not False:
            problems.append(f"{ref(service)}: publishNotReadyAddresses must be false, so unready workers "
                            "leave DNS")
    return problems


def check_pod_security(objects: list[dict[str, Any]]) -> list[str]:
    """Every container (init containers too) runs as non-root without privilege escalation and
    requests CPU and memory."""
    problems = []
    for deployment in of_kind(objects, "Deployment"):
        pod_ctx = pod_spec(deployment).get("securityContext") or {}
        for where, container in all_containers(deployment):
            ctx = container.get("securityContext") or {}
            non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
            user = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
            if non_root is not True:
                problems.append(f"{where}: runAsNonRoot must be true (pod or container securityContext)")
            if user == 0:
                problems.append(f"{where}: runAsUser is 0 (root)")
            if ctx.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: securityContext.allowPrivilegeEscalation must be false")
            if (ctx.get("privileged")) is True:
                problems.append(f"{where}: privileged")
            requests = (container.get("resources") or {}).get("requests") or {}
            for resource in ("cpu", "memory"):
                if resource not in requests:
                    problems.append(f"{where}: resources.requests.{resource} missing")
    return problems


def check_containers(objects: list[dict[str, Any]]) -> list[str]:
    """Each main container runs its component's module, listens on 0.0.0.0, exports traces to an
    OTLP endpoint, and has Prometheus scrape annotations that name its metrics port."""
    problems = []
    for deployment in of_kind(objects, "Deployment"):
        kind = component(deployment)
        if kind not in MODULES:
            problems.append(f"{ref(deployment)}: pod label {COMPONENT} {kind!r} is none of {sorted(MODULES)}")
            continue
        annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
        for container in main_containers(deployment):
            where = f"{ref(deployment)}: containers[{container.get('name')}]"
            command = container.get("command") or []
            if command[:3] != ["python", "-m", MODULES[kind]]:
                problems.append(f"{where}: command {command} does not run python -m {MODULES[kind]}")
            env = env_of(container)
            for name in LISTEN_HOSTS[kind]:
                if env.get(name) != "0.0.0.0":
                    problems.append(f"{where}: env {name} must be 0.0.0.0 (the default listens on loopback)")
            if not env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
                problems.append(f"{where}: env OTEL_EXPORTER_OTLP_ENDPOINT missing")
            if annotations.get("prometheus.io/scrape") != "true":
                problems.append(f"{ref(deployment)}: pod annotation prometheus.io/scrape must be \"true\"")
            metrics_port = annotations.get("prometheus.io/port")
            metrics = [p for p in container.get("ports") or [] if p.get("name") == "metrics"]
            if not metrics or str(metrics[0]["containerPort"]) != str(metrics_port):
                problems.append(f"{ref(deployment)}: prometheus.io/port {metrics_port!r} is not the container's "
                                "port named metrics")
            if kind == "tokenizer":
                problems += _check_scheduler_address(objects, where, env.get("SWITCHYARD_SCHEDULER_ADDRESS"))
    return problems


def _check_scheduler_address(objects: list[dict[str, Any]], where: str, address: str | None) -> list[str]:
    if not address:
        return [f"{where}: env SWITCHYARD_SCHEDULER_ADDRESS missing"]
    host, _, port = address.rpartition(":")
    service, why = service_for_host(objects, host, NAMESPACE)
    if service is None:
        return [f"{where}: SWITCHYARD_SCHEDULER_ADDRESS: {why}"]
    if (service["spec"].get("selector") or {}).get(COMPONENT) != "scheduler":
        return [f"{where}: SWITCHYARD_SCHEDULER_ADDRESS names {ref(service)}, which is not the scheduler's"]
    if not any(str(p["port"]) == port for p in service["spec"].get("ports") or []):
        return [f"{where}: SWITCHYARD_SCHEDULER_ADDRESS port {port} is not a port of {ref(service)}"]
    return []


def check_pools(objects: list[dict[str, Any]]) -> list[str]:
    """Every pool's "dns" names a headless worker Service of this namespace on its gRPC port, whose
    pods carry the pool's name and version; weights are non-negative and not all zero."""
    pools, problems = pools_file(objects)
    if pools is None:
        return problems
    entries = pools.get("pools") if isinstance(pools, dict) else None
    if not isinstance(entries, list) or not entries:
        return problems + ["pools file: expected {\"pools\": [...]} with at least one pool"]
    names = [p.get("name") for p in entries]
    if len(set(names)) != len(names):
        problems.append(f"pools file: pool names repeat: {names}")
    weights = []
    workers = [d for d in of_kind(objects, "Deployment") if component(d) == "worker"]
    for pool in entries:
        where = f"pools file: pool {pool.get('name')!r}"
        unknown = set(pool) - {"name", "version", "weight", "dns", "workers"}
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)}")
        weight = pool.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            problems.append(f"{where}: weight must be a number >= 0, got {weight!r}")
        else:
            weights.append(weight)
        if not isinstance(pool.get("version"), str) or not pool.get("version"):
            problems.append(f"{where}: version missing")
        dns = pool.get("dns")
        if not isinstance(dns, str) or not re.fullmatch(r"[a-z0-9.-]+:\d{1,5}", dns):
            problems.append(f"{where}: dns must be \"host:port\", got {dns!r}")
            continue
        host, _, port = dns.rpartition(":")
        service, why = service_for_host(objects, host, NAMESPACE)
        if service is None:
            problems.append(f"{where}: dns {why}")
            continue
        if service["spec"].get("clusterIP") != "None":
            problems.append(f"{where}: dns names {ref(service)}, which is not headless")
        service_ports = [p for p in service["spec"].get("ports") or [] if str(p["port"]) == port]
        if not service_ports:
            problems.append(f"{where}: dns port {port} is not a port of {ref(service)}")
        selector = service["spec"].get("selector") or {}
        selected = [d for d in workers if selects(selector, pod_labels(d))]
        if len(selected) != 1:
            problems.append(f"{where}: {ref(service)} selects {len(selected)} worker Deployments, expected 1")
            continue
        deployment = selected[0]
        if pod_labels(deployment).get(POOL) != pool.get("name"):
            problems.append(f"{where}: {ref(deployment)} pods are labelled {POOL}="
                            f"{pod_labels(deployment).get(POOL)!r}, not the pool's name")
        for container in main_containers(deployment):
            env = env_of(container)
            if env.get("SWITCHYARD_MODEL_VERSION") != pool.get("version"):
                problems.append(f"{where}: version {pool.get('version')!r} but {ref(deployment)} runs "
                                f"SWITCHYARD_MODEL_VERSION={env.get('SWITCHYARD_MODEL_VERSION')!r}")
            if service_ports and not port_matches(service_ports[0].get("targetPort", int(port)), container):
                problems.append(f"{where}: {ref(service)} port {port} targets no port of {ref(deployment)}")
            if env.get("SWITCHYARD_WORKER_PORT") not in (None, port):
                problems.append(f"{where}: workers listen on {env.get('SWITCHYARD_WORKER_PORT')}, dns says {port}")
    if weights and sum(weights) <= 0:
        problems.append(f"pools file: weights {weights} send no traffic anywhere")
    return problems


ROUTE_PORT_NAMES = {"GRPCRoute": "grpc", "HTTPRoute": "http"}


def check_routes(objects: list[dict[str, Any]]) -> list[str]:
    """Gateway API routes attach to a listener of an existing Gateway that admits their kind, and
    send traffic, with weights that add up to something, to existing Services on ports of the
    right protocol."""
    problems = []
    for route in [o for o in objects if o.get("kind") in ROUTE_PORT_NAMES]:
        kind = route["kind"]
        for parent in route["spec"].get("parentRefs") or []:
            gateway = find(objects, "Gateway", parent.get("name"))
            if gateway is None or parent.get("namespace") not in (None, gateway["metadata"].get("namespace")):
                problems.append(f"{ref(route)}: parentRefs: Gateway {parent.get('name')!r} does not exist")
                continue
            listeners = [l for l in gateway["spec"]["listeners"]
                         if parent.get("sectionName") in (None, l["name"])]
            if not listeners:
                problems.append(f"{ref(route)}: parentRefs: {ref(gateway)} has no listener "
                                f"{parent.get('sectionName')!r}")
            for listener in listeners:
                kinds = [k["kind"] for k in (listener.get("allowedRoutes") or {}).get("kinds") or []]
                if kinds and kind not in kinds:
                    problems.append(f"{ref(route)}: {ref(gateway)} listener {listener['name']!r} admits {kinds}, "
                                    f"not {kind}")
        if not route["spec"].get("parentRefs"):
            problems.append(f"{ref(route)}: no parentRefs: the route attaches to nothing")
        for i, rule in enumerate(route["spec"].get("rules") or []):
            backends = rule.get("backendRefs") or []
            if not backends:
                problems.append(f"{ref(route)}: rules[{i}]: no backendRefs")
            total = 0
            for backend in backends:
                total += backend.get("weight", 1)
                if backend.get("kind", "Service") != "Service" or backend.get("group", "") != "":
                    problems.append(f"{ref(route)}: rules[{i}]: backend {backend.get('name')!r} is not a Service")
                    continue
                service = find(objects, "Service", backend.get("name"))
                if service is None:
                    problems.append(f"{ref(route)}: rules[{i}]: Service {backend.get('name')!r} does not exist")
                    continue
                ports = {p["port"]: p for p in service["spec"].get("ports") or []}
                if backend.get("port") not in ports:
                    problems.append(f"{ref(route)}: rules[{i}]: port {backend.get('port')!r} is not a port of "
                                    f"{ref(service)} ({sorted(ports)})")
                elif ports[backend["port"]].get("name") != ROUTE_PORT_NAMES[kind]:
                    problems.append(f"{ref(route)}: rules[{i}]: {kind} sends to {ref(service)} port "
                                    f"{backend['port']} ({ports[backend['port']].get('name')!r}), expected the "
                                    f"{ROUTE_PORT_NAMES[kind]!r} port")
            if backends and total <= 0:
                problems.append(f"{ref(route)}: rules[{i}]: weights add up to {total}: no traffic goes anywhere")
    return problems


def _env_names_read(component_name: str) -> str:
    """The source text of the modules that read a component's environment (its package and shared/)."""
    texts = []
    for folder in (ROOT / "services" / component_name, ROOT / "shared"):
        texts += [p.read_text(errors="replace") for p in sorted(folder.rglob("*.py"))]
    return "\n".join(texts)


def check_env_names(objects: list[dict[str, Any]]) -> list[str]:
    """Every SWITCHYARD_* variable set on a container is one its service reads (a misspelt name
    would be ignored silently, and the default listens on loopback)."""
    problems = []
    sources: dict[str, str] = {}
    for deployment in of_kind(objects, "Deployment"):
        for where, container in all_containers(deployment):
            command = container.get("command") or []
            module = command[2] if len(command) > 2 and command[:2] == ["python", "-m"] else ""
            component_name = module.split(".")[1] if module.startswith("services.") else ""
            if not component_name:
                continue
            if component_name not in sources:
                sources[component_name] = _env_names_read(component_name)
            for name in env_of(container):
                if name.startswith("SWITCHYARD_") and f'"{name}"' not in sources[component_name]:
                    problems.append(f"{where}: env {name} is read by neither services/{component_name}/ "
                                    "nor shared/")
    return problems


def check_namespace(objects: list[dict[str, Any]]) -> list[str]:
    problems = []
    for obj in objects:
        if obj["kind"] == "Namespace":
            continue
        if obj["metadata"].get("namespace") != NAMESPACE:
            problems.append(f"{ref(obj)}: namespace {obj['metadata'].get('namespace')!r}, expected {NAMESPACE!r}")
    if find(objects, "Namespace", NAMESPACE) is None:
        problems.append(f"Namespace {NAMESPACE!r} is not part of the manifests")
    return problems


# The prometheus scaler's metadata keys (KEDA v2.20, pkg/scalers/prometheus_scaler.go); a misspelt
# key is ignored by KEDA, so it is an error here.
PROMETHEUS_TRIGGER_KEYS = {"serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
                           "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout",
                           "identityOwner"}


def _grace_s(deployment: dict[str, Any]) -> float | None:
    """The main container's SWITCHYARD_GRACE_S (how long the service drains), None if unset."""
    value = env_of(main_containers(deployment)[0]).get("SWITCHYARD_GRACE_S") if main_containers(deployment) else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def check_grace(objects: list[dict[str, Any]]) -> list[str]:
    """A pod's terminationGracePeriodSeconds outlasts its service's drain (SWITCHYARD_GRACE_S), so
    the kubelet does not kill a worker or a front door in the middle of finishing its requests."""
    problems = []
    for deployment in of_kind(objects, "Deployment"):
        grace_s = _grace_s(deployment)
        termination_s = pod_spec(deployment).get("terminationGracePeriodSeconds", 30)
        if grace_s is not None and termination_s <= grace_s:
            problems.append(f"{ref(deployment)}: terminationGracePeriodSeconds {termination_s} must exceed "
                            f"SWITCHYARD_GRACE_S {grace_s:g} (the drain would be killed)")
    return problems


def _metric_names_exported() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "services").rglob("metrics.py")))


def check_autoscalers(objects: list[dict[str, Any]]) -> list[str]:
    """Every worker pool has one KEDA ScaledObject on the scheduler's signal for that pool; each
    ScaledObject targets an existing Deployment that leaves `replicas` to it, queries metrics the
    services export, holds on an empty answer, and scales workers down no faster than they drain."""
    problems = []
    exported = _metric_names_exported()
    scaled: dict[str, dict[str, Any]] = {}
    for so in of_kind(objects, "ScaledObject"):
        spec = so["spec"]
        target_ref = spec["scaleTargetRef"]
        if target_ref.get("kind", "Deployment") != "Deployment" or target_ref.get("apiVersion", "apps/v1") != "apps/v1":
            problems.append(f"{ref(so)}: scaleTargetRef must be an apps/v1 Deployment")
            continue
        target = find(objects, "Deployment", target_ref["name"])
        if target is None:
            problems.append(f"{ref(so)}: scaleTargetRef: Deployment {target_ref['name']!r} does not exist")
            continue
        if target_ref["name"] in scaled:
            problems.append(f"{ref(so)}: {ref(target)} already has a ScaledObject (two HPAs would fight)")
        scaled[target_ref["name"]] = so
        if "replicas" in target["spec"]:
            problems.append(f"{ref(target)}: spec.replicas is set, but {ref(so)} owns the count (kubectl apply "
                            "would reset it)")
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if low > high:
            problems.append(f"{ref(so)}: minReplicaCount {low} > maxReplicaCount {high}")
        is_worker = component(target) == "worker"
        if is_worker and low < 1:
            problems.append(f"{ref(so)}: minReplicaCount must be >= 1 (a pool with no worker up refuses "
                            "requests, so no queue would ever wake it)")
        for i, trigger in enumerate(spec["triggers"]):
            where = f"{ref(so)}: triggers[{i}]"
            if trigger["type"] != "prometheus":
                problems.append(f"{where}: type {trigger['type']!r}, expected 'prometheus'")
                continue
            meta = trigger["metadata"]
            unknown = set(meta) - PROMETHEUS_TRIGGER_KEYS
            if unknown:
                problems.append(f"{where}: metadata keys {sorted(unknown)} are not the prometheus scaler's")
            for key in ("serverAddress", "query", "threshold"):
                if not meta.get(key):
                    problems.append(f"{where}: metadata.{key} missing")
            try:
                if float(meta.get("threshold", "")) <= 0:
                    raise ValueError
            except ValueError:
                problems.append(f"{where}: metadata.threshold must be a number > 0, got {meta.get('threshold')!r}")
            if trigger.get("metricType") != "AverageValue":
                problems.append(f"{where}: metricType must be AverageValue (replicas = value / threshold; "
                                "KEDA's fallback needs it)")
            if meta.get("ignoreNullValues") != "false":
                problems.append(f"{where}: metadata.ignoreNullValues must be \"false\": an empty answer (Prometheus "
                                "or the exporter restarting) must hold the replicas, not read as 0")
            query = meta.get("query", "")
            for name in re.findall(r"switchyard_[a-z0-9_]+", query):
                if f'"{name}"' not in exported:
                    problems.append(f"{where}: query reads {name}, which no service exports")
            if is_worker:
                pool = pod_labels(target).get(POOL)
                if f'pool="{pool}"' not in query or "switchyard_pool_" not in query:
                    problems.append(f"{where}: query must read the scheduler's switchyard_pool_* series of pool "
                                    f"{pool!r} (pool=\"{pool}\"), got {query!r}")
        if is_worker:
            problems += _check_drain(so, target)
    for deployment in of_kind(objects, "Deployment"):
        if component(deployment) == "worker" and deployment["metadata"]["name"] not in scaled:
            problems.append(f"{ref(deployment)}: worker pool without a ScaledObject")
    return problems


def _check_drain(so: dict[str, Any], target: dict[str, Any]) -> list[str]:
    """A worker leaves one at a time, each given its whole termination grace before the next."""
    behavior = (((so["spec"].get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {})
                .get("behavior") or {})
    down = behavior.get("scaleDown") or {}
    termination_s = pod_spec(target).get("terminationGracePeriodSeconds", 30)
    policies = down.get("policies") or []
    if not policies or any(p["type"] != "Pods" or p["value"] != 1 or p["periodSeconds"] < termination_s
                           for p in policies):
        return [f"{ref(so)}: scaleDown policies must remove one Pod per periodSeconds >= the workers' "
                f"terminationGracePeriodSeconds ({termination_s}), so one worker drains at a time; got {policies}"]
    return []


CHECKS = (check_namespace, check_service_selectors, check_probes, check_workers, check_pod_security,
          check_containers, check_pools, check_routes, check_env_names, check_grace, check_autoscalers,
          *LEADER_CHECKS)


def semantic_problems(objects: list[dict[str, Any]]) -> list[str]:
    return [problem for check in CHECKS for problem in check(objects)]
