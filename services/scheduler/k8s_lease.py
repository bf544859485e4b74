"""The leadership lease as a Kubernetes `coordination.k8s.io/v1` Lease object (`k8s:[<ns>/]<name>`).

The API server's optimistic concurrency gives the store its atomicity: the write of an update is a
PUT carrying the `metadata.resourceVersion` it read, and the API server refuses it with 409 when
anyone wrote in between, as it refuses a POST (create) with 409 when the object appeared meanwhile.
Either way the other scheduler's write stands and `update` returns it, without ours, exactly as
two processes serialized by the file store's lock would see it.

Only the standard library speaks to the API server (urllib and ssl): the scheduler needs three
verbs on one object, not a client package and its dependencies. In a pod, `from_spec` finds the
API server the way client-go's in-cluster config does: KUBERNETES_SERVICE_HOST/_PORT (the kubelet
sets them even with `enableServiceLinks: false`) and the service account's token, CA and namespace
under /var/run/secrets/kubernetes.io/serviceaccount. This module reads them because they belong
to the pod, not to the scheduler's configuration.

The object keeps what kubectl and other tools read (holderIdentity, leaseDurationSeconds,
renewTime, acquireTime, leaseTransitions), and annotations keep what `Lease` needs exactly: the
epoch, and `renewed_s` and `duration_s` as float reprs. A read must equal the write: a standby
decides expiry by seeing the record change, and a claimer knows it won when the lease in force
equals the one it decided, which whole seconds and a rounded MicroTime would both break. A Lease without the epoch annotation was made by something
else; taking it over could fight another program's leader election, so it is refused.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from datetime import datetime, timezone
from http.client import HTTPException
from pathlib import Path
from typing import Any

from services.scheduler.lease_record import Decide, Lease
from shared.errors import InvalidArgument

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
EPOCH_ANNOTATION = "switchyard.dev/scheduler-epoch"
RENEWED_ANNOTATION = "switchyard.dev/renewed-s"
DURATION_ANNOTATION = "switchyard.dev/duration-s"
API_PATH = "/apis/coordination.k8s.io/v1"
TIMEOUT_S = 5.0
FIELD = "leader_lease"

_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # DNS-1123 label
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")  # DNS-1123 subdomain

Object = dict[str, Any]


class KubernetesLeaseStore:
    """One Lease object, read and written through the API server at `base_url`."""

    def __init__(self, namespace: str, name: str, *, base_url: str, token: str | None = None,
                 token_file: str | Path | None = None, ssl_context: ssl.SSLContext | None = None,
                 timeout_s: float = TIMEOUT_S) -> None:
        """`token` is sent as is; `token_file` is read again for every request, because the
        kubelet rotates a projected service account token in place (hourly). `ssl_context` serves
        an https `base_url`; None with an http one is plain HTTP (tests on loopback)."""
        if not _NAMESPACE.fullmatch(namespace):
            raise InvalidArgument(f"namespace {namespace!r} is not a Kubernetes namespace name", field=FIELD)
        if not _NAME.fullmatch(name) or len(name) > 253:
            raise InvalidArgument(f"{name!r} is not a Kubernetes object name", field=FIELD)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.namespace, self.name = namespace, name
        self.timeout_s = timeout_s
        self._token = token
        self._token_file = Path(token_file) if token_file is not None else None
        collection = f"{base_url.rstrip('/')}{API_PATH}/namespaces/{namespace}/leases"
        self.collection_url = collection
        self.url = f"{collection}/{urllib.parse.quote(name)}"
        # No proxy: the API server is a cluster address, and an HTTPS_PROXY meant for egress (or a
        # developer's http_proxy on loopback) would only come in between.
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def from_spec(cls, rest: str, *, environ: Mapping[str, str] | None = None,
                  account_dir: str | Path = SERVICE_ACCOUNT_DIR, timeout_s: float = TIMEOUT_S) -> KubernetesLeaseStore:
        """`[<namespace>/]<name>` with the pod's own API server, token, CA and (by default) namespace."""
        environ = os.environ if environ is None else environ
        account = Path(account_dir)
        namespace, _, name = rest.rpartition("/")
        host, port = environ.get("KUBERNETES_SERVICE_HOST", ""), environ.get("KUBERNETES_SERVICE_PORT", "")
        if not host or not port:
            raise InvalidArgument(f"k8s:{rest} needs to run in a Kubernetes pod: KUBERNETES_SERVICE_HOST and "
                                  "KUBERNETES_SERVICE_PORT are not set", field=FIELD)
        for needed in ("token", "ca.crt") + (() if namespace else ("namespace",)):
            if not (account / needed).is_file():
                raise InvalidArgument(f"k8s:{rest}: {account / needed} is missing: the pod needs its service "
                                      "account token (automountServiceAccountToken: true)", field=FIELD)
        if not namespace:
            namespace = (account / "namespace").read_text().strip()
        try:
            context = ssl.create_default_context(cafile=str(account / "ca.crt"))
        except (OSError, ssl.SSLError) as e:
            raise InvalidArgument(f"k8s:{rest}: cannot load {account / 'ca.crt'}: {e}", field=FIELD) from None
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 API server address
        return cls(namespace, name, base_url=f"https://{netloc}", token_file=account / "token",
                   ssl_context=context, timeout_s=timeout_s)

    def update(self, decide: Decide) -> Lease | None:
        status, obj = self._call("GET", self.url, None, passes=(404,))
        current = None if status == 404 else self._lease(obj)
        new = decide(current)
        if new is None:
            return current
        if current is None:
            # A 404 on a create is no race but a missing namespace: an error, not "no lease yet".
            status, written = self._call("POST", self.collection_url, self._object(new, None, None),
                                         passes=(409,))
        else:
            # 404: deleted since our read; like a 409, someone else acted in between, and theirs stands.
            status, written = self._call("PUT", self.url, self._object(new, obj, current), passes=(404, 409))
        if status in (404, 409):
            status, obj = self._call("GET", self.url, None, passes=(404,))
            return None if status == 404 else self._lease(obj)
        return self._lease(written)

    # --- the object ---------------------------------------------------------------------------------

    def _lease(self, obj: Object) -> Lease:
        where = f"Lease {self.namespace}/{self.name}"
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        spec = obj.get("spec") or {}
        if EPOCH_ANNOTATION not in annotations:
            raise InvalidArgument(f"{where} has no {EPOCH_ANNOTATION} annotation: it belongs to something other "
                                  "than Switchyard's schedulers; name another lease or delete that one", field=FIELD)
        try:
            epoch_text = annotations[EPOCH_ANNOTATION]
            if not re.fullmatch(r"\d+", epoch_text):
                raise ValueError(f"epoch {epoch_text!r} is not a decimal integer")
            renewed = annotations.get(RENEWED_ANNOTATION)
            renewed_s = float(renewed) if renewed is not None else _from_micro_time(spec["renewTime"])
            duration = spec["leaseDurationSeconds"]
            if isinstance(duration, bool) or not isinstance(duration, int) or duration < 1:
                raise ValueError(f"leaseDurationSeconds {duration!r} is not a positive integer")
            if DURATION_ANNOTATION in annotations:
                duration = float(annotations[DURATION_ANNOTATION])
            holder = spec.get("holderIdentity") or ""
            if not isinstance(holder, str):
                raise ValueError(f"holderIdentity {holder!r} is not a string")
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(f"{where} is not a Switchyard scheduler lease: {e!r}", field=FIELD) from None
        return Lease(holder, int(epoch_text), renewed_s, float(duration))

    def _object(self, new: Lease, obj: Object | None, current: Lease | None) -> Object:
        """The object to write: the one read (so its resourceVersion, labels and owners go back),
        or a fresh one, with `new` in it."""
        if not math.isfinite(new.duration_s) or new.duration_s <= 0:
            raise InvalidArgument(f"must be a positive number of seconds, got {new.duration_s}",
                                  field="lease_duration_s")
        out = copy.deepcopy(obj) if obj is not None else {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace}}
        metadata = out.setdefault("metadata", {})
        metadata["annotations"] = {**(metadata.get("annotations") or {}),
                                   EPOCH_ANNOTATION: str(new.epoch), RENEWED_ANNOTATION: repr(new.renewed_s),
                                   DURATION_ANNOTATION: repr(new.duration_s)}
        spec = out.get("spec") or {}
        out["spec"] = spec
        spec["holderIdentity"] = new.holder
        # Whole seconds for other readers; rounding up makes them wait longer, never cut in early.
        spec["leaseDurationSeconds"] = max(1, math.ceil(new.duration_s))
        # The holder's wall clock, which is what the record carries; the store has no clock of its own.
        spec["renewTime"] = _micro_time(new.renewed_s)
        if current is None or current.holder != new.holder:
            spec["acquireTime"] = spec["renewTime"]
        transitions = int(spec.get("leaseTransitions") or 0)
        if current is not None and current.holder != new.holder and new.holder:
            transitions += 1  # a release is no transition; the next claim is
        spec["leaseTransitions"] = transitions
        return out

    # --- HTTP ---------------------------------------------------------------------------------------

    def _call(self, method: str, url: str, body: Object | None, *, passes: tuple[int, ...]) -> tuple[int, Object]:
        """(status, JSON body); statuses in `passes` come back with an empty body, every other
        failure is an OSError naming the request and what went wrong."""
        headers = {"Accept": "application/json", "User-Agent": "switchyard-scheduler"}
        token = self._token
        if self._token_file is not None:
            try:
                token = self._token_file.read_text().strip()
            except OSError as e:
                raise OSError(f"{method} {url}: cannot read the service account token: {e}") from e
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                answer = json.loads(response.read())
                if not isinstance(answer, dict):
                    raise ValueError(f"expected a JSON object, got {type(answer).__name__}")
                return response.status, answer
        except urllib.error.HTTPError as e:
            try:
                if e.code in passes:
                    return e.code, {}
                raise OSError(f"{method} {url}: HTTP {e.code} {e.reason}{_status_message(e)}") from None
            finally:
                e.close()
        except (OSError, HTTPException, ValueError) as e:
            # URLError (refused, DNS, TLS) and timeouts are OSErrors; a garbled answer is not, but
            # it means the same to the scheduler: the store cannot be read now.
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise OSError(f"{method} {url}: {reason!r}") from e


def _status_message(error: urllib.error.HTTPError) -> str:
    """The API server's Status.message (why RBAC said no, what was invalid), when there is one."""
    try:
        message = json.loads(error.read(4096)).get("message")
    except (OSError, HTTPException, ValueError, AttributeError):
        return ""
    return f": {str(message)[:300]}" if message else ""


def _micro_time(seconds: float) -> str:
    """Kubernetes MicroTime: RFC 3339 in UTC with microseconds, 2026-12-06T22:30:00.123456Z."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _from_micro_time(text: str) -> float:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"renewTime {text!r} has no time zone")
    return moment.timestamp()
