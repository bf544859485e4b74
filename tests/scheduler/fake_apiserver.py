"""A Kubernetes API server for one namespace's Leases, on loopback, in a thread.

It keeps the semantics the lease store relies on: GET 404 while absent, POST creates (201, a
resourceVersion; 409 AlreadyExists when it exists), PUT replaces only with the resourceVersion in
force (409 Conflict otherwise; 422 without one, as for Leases), a bearer token checked on every
request (401), and the shape of a Lease checked the way the API server validates it (422), so
that what the store writes would be accepted by a real one. Answers are Kubernetes `Status`
objects where the real server sends them.
"""

from __future__ import annotations

import copy
import json
import re
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFIX = "/apis/coordination.k8s.io/v1/namespaces/"
MICRO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


class FakeApiServer:
    def __init__(self, token: str = "secret-token", namespace: str = "switchyard") -> None:
        self.token = token
        self.namespace = namespace
        self.leases: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.fail_with: int | None = None  # answer every request with this status (e.g. 500, 403)
        self._version = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    def put_object(self, obj: dict[str, Any]) -> None:
        """Store an object as someone else would have (no checks), with a fresh resourceVersion."""
        with self._lock:
            stored = copy.deepcopy(obj)
            stored.setdefault("metadata", {})["resourceVersion"] = self._next_version()
            self.leases[stored["metadata"]["name"]] = stored

    @contextmanager
    def running(self, ssl_context: ssl.SSLContext | None = None) -> Iterator[FakeApiServer]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        if ssl_context is not None:
            server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
        scheme = "https" if ssl_context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    # --- the API -----------------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        self.requests.append((method, path))
        if self.fail_with is not None:
            return _status(self.fail_with, "InternalError", "injected failure")
        if headers.get("authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        match = re.fullmatch(rf"{re.escape(PREFIX)}([^/]+)/leases(?:/([^/]+))?", path)
        if match is None or match.group(1) != self.namespace:
            return _status(404, "NotFound", f"the server could not find the requested resource ({path})")
        name = match.group(2)
        with self._lock:
            if method == "GET" and name:
                if name not in self.leases:
                    return _status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
                return 200, copy.deepcopy(self.leases[name])
            obj = json.loads(body)
            if method == "POST" and not name:
                return self._create(obj)
            if method == "PUT" and name:
                return self._replace(name, obj)
        return _status(405, "MethodNotAllowed", f"{method} {path}")

    def _create(self, obj: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = obj.get("metadata", {}).get("name", "")
        if obj.get("metadata", {}).get("resourceVersion"):
            return _status(500, "InternalError", "resourceVersion should not be set on objects to be created")
        if problems := _invalid(obj):
            return _status(422, "Invalid", "; ".join(problems))
        if name in self.leases:
            return _status(409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists')
        stored = copy.deepcopy(obj)
        stored["metadata"].update(resourceVersion=self._next_version(), uid=f"uid-{name}",
                                  namespace=self.namespace)
        self.leases[name] = stored
        return 201, copy.deepcopy(stored)

    def _replace(self, name: str, obj: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if name not in self.leases:
            return _status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
        version = obj.get("metadata", {}).get("resourceVersion")
        if not version:
            return _status(422, "Invalid", "metadata.resourceVersion: must be specified for an update")
        if problems := _invalid(obj):
            return _status(422, "Invalid", "; ".join(problems))
        if version != self.leases[name]["metadata"]["resourceVersion"]:
            return _status(409, "Conflict", f'Operation cannot be fulfilled on leases.coordination.k8s.io "{name}": '
                                            "the object has been modified; please apply your changes to the latest "
                                            "version and try again")
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = self._next_version()
        self.leases[name] = stored
        return 200, copy.deepcopy(stored)


def _invalid(obj: dict[str, Any]) -> list[str]:
    problems = []
    if obj.get("apiVersion") != "coordination.k8s.io/v1" or obj.get("kind") != "Lease":
        problems.append(f"not a coordination.k8s.io/v1 Lease: {obj.get('apiVersion')} {obj.get('kind')}")
    annotations = obj.get("metadata", {}).get("annotations") or {}
    if not all(isinstance(v, str) for v in annotations.values()):
        problems.append("metadata.annotations: values must be strings")
    spec = obj.get("spec") or {}
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and (not isinstance(duration, int) or isinstance(duration, bool) or duration <= 0):
        problems.append(f"spec.leaseDurationSeconds: Invalid value: {duration!r}: must be greater than 0")
    if not isinstance(spec.get("holderIdentity", ""), str):
        problems.append("spec.holderIdentity: must be a string")
    for field in ("acquireTime", "renewTime"):
        if field in spec and not MICRO_TIME.fullmatch(str(spec[field])):
            problems.append(f"spec.{field}: {spec[field]!r} is not a MicroTime")
    transitions = spec.get("leaseTransitions", 0)
    if not isinstance(transitions, int) or transitions < 0:
        problems.append(f"spec.leaseTransitions: Invalid value: {transitions!r}: must be greater than or equal to 0")
    return problems


def _status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
    return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                  "reason": reason, "code": code}


def _handler(api: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            code, answer = api.handle(self.command, self.path, headers, body)
            data = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

    return Handler
