"""The Kubernetes lease store against a real HTTP server on loopback that keeps the API server's
rules for Leases (tests/scheduler/fake_apiserver.py): create, optimistic concurrency, races,
foreign objects, failures, the in-cluster setup over TLS, and the same decisions as the file store."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from services.scheduler.k8s_lease import (
    DURATION_ANNOTATION, EPOCH_ANNOTATION, RENEWED_ANNOTATION, KubernetesLeaseStore,
)
from services.scheduler.lease import (
    FileLeaseStore, Lease, LeaseStore, Observation, decide_claim, decide_release, decide_renewal, open_store,
)
from shared.errors import InvalidArgument
from tests.scheduler.fake_apiserver import FakeApiServer

NAME = "switchyard-scheduler"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/switchyard/leases"
WALL_S = datetime(2026, 12, 6, 22, 30, tzinfo=timezone.utc).timestamp() + 0.123456


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer().running() as server:
        yield server


def store_of(api: FakeApiServer, **kwargs: object) -> KubernetesLeaseStore:
    options: dict = {"base_url": api.url, "token": api.token, "timeout_s": 5.0, **kwargs}
    return KubernetesLeaseStore("switchyard", NAME, **options)


def put(lease: Lease) -> Callable[[Lease | None], Lease]:
    return lambda current: lease


def stored(api: FakeApiServer) -> dict:
    return api.leases[NAME]


# ---- the object -----------------------------------------------------------------------------------


def test_the_first_claim_creates_the_lease(api: FakeApiServer) -> None:
    seen = []
    lease = Lease("10.0.0.7:50052", 42, WALL_S, 10.0)
    assert store_of(api).update(lambda current: seen.append(current) or lease) == lease
    assert seen == [None]
    assert api.requests == [("GET", f"{LEASES}/{NAME}"), ("POST", LEASES)]
    obj = stored(api)
    assert obj["metadata"]["annotations"] == {EPOCH_ANNOTATION: "42", RENEWED_ANNOTATION: repr(WALL_S),
                                              DURATION_ANNOTATION: "10.0"}
    assert obj["spec"] == {"holderIdentity": "10.0.0.7:50052", "leaseDurationSeconds": 10,
                           "renewTime": "2026-12-06T22:30:00.123456Z", "acquireTime": "2026-12-06T22:30:00.123456Z",
                           "leaseTransitions": 0}


def test_a_decision_of_none_writes_nothing(api: FakeApiServer) -> None:
    store = store_of(api)
    assert store.update(lambda current: None) is None
    assert NAME not in api.leases
    lease = store.update(put(Lease("a:1", 1, WALL_S, 10.0)))
    before = stored(api)["metadata"]["resourceVersion"]
    assert store.update(lambda current: None) == lease
    assert stored(api)["metadata"]["resourceVersion"] == before
    assert [method for method, _ in api.requests] == ["GET", "GET", "POST", "GET"]


def test_renewal_replaces_it_at_the_version_read(api: FakeApiServer) -> None:
    store = store_of(api)
    mine = store.update(put(Lease("a:1", 7, WALL_S, 10.0)))
    assert mine is not None
    version = stored(api)["metadata"]["resourceVersion"]
    renewed = store.update(lambda current: decide_renewal(current, mine, WALL_S + 2.5))
    assert renewed == Lease("a:1", 7, WALL_S + 2.5, 10.0)
    assert api.requests[-1] == ("PUT", f"{LEASES}/{NAME}")
    spec = stored(api)["spec"]
    assert stored(api)["metadata"]["resourceVersion"] != version
    assert spec["renewTime"] == "2026-12-06T22:30:02.623456Z"
    assert spec["acquireTime"] == "2026-12-06T22:30:00.123456Z"  # the same holder: no new acquisition
    assert spec["leaseTransitions"] == 0


@pytest.mark.parametrize("renewed_s", [0.1 + 0.2, WALL_S + 1e-6, 1.7e9 + 1 / 3])
def test_times_and_epochs_round_trip_exactly(api: FakeApiServer, renewed_s: float) -> None:
    """A standby sees expiry as "unchanged for long enough", so a read must equal the write."""
    lease = Lease("a:1", 1_796_596_200_123_456_789, renewed_s, 15.0)
    store_of(api).update(put(lease))
    assert store_of(api).update(lambda current: None) == lease


@pytest.mark.parametrize("duration_s, seconds", [(2.5, 3), (0.3, 1), (30.0, 30)])
def test_durations_show_as_whole_seconds_rounded_up_and_read_back_exactly(api: FakeApiServer, duration_s: float,
                                                                         seconds: int) -> None:
    """kubectl and other readers see whole seconds (never shorter); the scheduler reads back the
    exact duration, since it knows it won a claim by the lease in force equalling its own."""
    lease = Lease("a:1", 1, WALL_S, duration_s)
    assert store_of(api).update(put(lease)) == lease
    assert stored(api)["spec"]["leaseDurationSeconds"] == seconds
    assert store_of(api).update(lambda current: None) == lease


def test_without_the_duration_annotation_the_whole_seconds_count(api: FakeApiServer) -> None:
    api.put_object({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": NAME, "annotations": {EPOCH_ANNOTATION: "5", RENEWED_ANNOTATION: "1.5"}},
                    "spec": {"holderIdentity": "a:1", "leaseDurationSeconds": 4}})
    assert store_of(api).update(lambda current: None) == Lease("a:1", 5, 1.5, 4.0)


def test_handovers_count_as_transitions_and_set_the_acquire_time(api: FakeApiServer) -> None:
    store = store_of(api)
    store.update(put(Lease("a:1", 1, WALL_S, 10.0)))
    store.update(put(Lease("", 1, WALL_S + 1, 10.0)))  # released: no holder, no transition
    assert stored(api)["spec"]["leaseTransitions"] == 0
    assert stored(api)["spec"]["acquireTime"] == "2026-12-06T22:30:01.123456Z"
    store.update(put(Lease("b:1", 2, WALL_S + 2, 10.0)))
    store.update(put(Lease("c:1", 3, WALL_S + 3, 10.0)))
    store.update(put(Lease("c:1", 3, WALL_S + 4, 10.0)))  # a renewal
    assert stored(api)["spec"]["leaseTransitions"] == 2
    assert stored(api)["spec"]["holderIdentity"] == "c:1"
    assert stored(api)["spec"]["acquireTime"] == "2026-12-06T22:30:03.123456Z"


def test_labels_and_annotations_of_others_survive_a_write(api: FakeApiServer) -> None:
    store = store_of(api)
    store.update(put(Lease("a:1", 1, WALL_S, 10.0)))
    stored(api)["metadata"]["labels"] = {"team": "serving"}
    stored(api)["metadata"]["annotations"]["note"] = "kept"
    store.update(put(Lease("a:1", 1, WALL_S + 1, 10.0)))
    assert stored(api)["metadata"]["labels"] == {"team": "serving"}
    assert stored(api)["metadata"]["annotations"]["note"] == "kept"


# ---- races ----------------------------------------------------------------------------------------


def test_two_schedulers_creating_at_once_one_wins(api: FakeApiServer) -> None:
    """B creates the lease between A's read (404) and A's create: A's POST gets 409, and A
    returns B's lease, not its own."""
    a, b = store_of(api), store_of(api)
    theirs = Lease("b:1", 9, WALL_S, 10.0)

    def a_decides(current: Lease | None) -> Lease:
        assert current is None
        assert b.update(put(theirs)) == theirs
        return Lease("a:1", 8, WALL_S, 10.0)

    assert a.update(a_decides) == theirs
    assert stored(api)["spec"]["holderIdentity"] == "b:1"
    assert [method for method, _ in api.requests] == ["GET", "GET", "POST", "POST", "GET"]


def test_a_stale_resource_version_loses_the_renewal(api: FakeApiServer) -> None:
    """A read the lease, B took it over before A's write: A's PUT carries the old
    resourceVersion, gets 409, and A sees B's lease."""
    a, b = store_of(api), store_of(api)
    mine = a.update(put(Lease("a:1", 1, WALL_S, 10.0)))
    assert mine is not None
    theirs = Lease("b:1", 2, WALL_S + 20, 10.0)

    def a_renews(current: Lease | None) -> Lease | None:
        b.update(put(theirs))
        return decide_renewal(current, mine, WALL_S + 21)  # still A's lease as A read it

    assert a.update(a_renews) == theirs
    assert stored(api)["spec"]["holderIdentity"] == "b:1"
    assert api.requests[-2:] == [("PUT", f"{LEASES}/{NAME}"), ("GET", f"{LEASES}/{NAME}")]


def test_a_lease_deleted_under_a_renewal_is_gone(api: FakeApiServer) -> None:
    store = store_of(api)
    mine = store.update(put(Lease("a:1", 1, WALL_S, 10.0)))

    def renew_after_delete(current: Lease | None) -> Lease | None:
        del api.leases[NAME]
        return decide_renewal(current, mine, WALL_S + 1)  # type: ignore[arg-type]

    assert store.update(renew_after_delete) is None


# ---- refusals and failures ------------------------------------------------------------------------


def test_a_lease_of_someone_else_is_refused(api: FakeApiServer) -> None:
    """A client-go leader election's Lease has no epoch annotation: taking it over would fight it."""
    api.put_object({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": NAME, "namespace": "switchyard"},
                    "spec": {"holderIdentity": "controller-abc", "leaseDurationSeconds": 15,
                             "renewTime": "2026-12-06T22:30:00.000000Z", "leaseTransitions": 3}})
    with pytest.raises(InvalidArgument, match=EPOCH_ANNOTATION) as caught:
        store_of(api).update(put(Lease("a:1", 1, WALL_S, 10.0)))
    assert caught.value.field == "leader_lease"
    assert "Lease switchyard/switchyard-scheduler" in caught.value.message
    assert [method for method, _ in api.requests] == ["GET"]
    assert stored(api)["spec"]["holderIdentity"] == "controller-abc"


@pytest.mark.parametrize("annotations, spec", [
    ({EPOCH_ANNOTATION: "12.5"}, {"leaseDurationSeconds": 10, "renewTime": "2026-12-06T22:30:00.000000Z"}),
    ({EPOCH_ANNOTATION: "12", RENEWED_ANNOTATION: "soon"}, {"leaseDurationSeconds": 10}),
    ({EPOCH_ANNOTATION: "12", RENEWED_ANNOTATION: "1.5"}, {}),
    ({EPOCH_ANNOTATION: "12"}, {"leaseDurationSeconds": 10}),
])
def test_a_garbled_lease_is_refused(api: FakeApiServer, annotations: dict, spec: dict) -> None:
    api.put_object({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": NAME, "annotations": annotations}, "spec": spec})
    with pytest.raises(InvalidArgument) as caught:
        store_of(api).update(lambda current: None)
    assert caught.value.field == "leader_lease"


def test_without_the_renewed_annotation_the_renew_time_counts(api: FakeApiServer) -> None:
    api.put_object({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": NAME, "annotations": {EPOCH_ANNOTATION: "5"}},
                    "spec": {"holderIdentity": "a:1", "leaseDurationSeconds": 10,
                             "renewTime": "2026-12-06T22:30:00.123456Z"}})
    lease = store_of(api).update(lambda current: None)
    assert lease is not None and (lease.holder, lease.epoch, lease.duration_s) == ("a:1", 5, 10.0)
    assert lease.renewed_s == pytest.approx(WALL_S, abs=1e-6)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_api_server_that_is_down_is_an_os_error() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    store = KubernetesLeaseStore("switchyard", NAME, base_url=url, token="t")
    with pytest.raises(OSError, match=rf"GET {url}{LEASES}/{NAME}"):
        store.update(put(Lease("a:1", 1, WALL_S, 10.0)))


def test_an_api_server_that_does_not_answer_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (the backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        store = KubernetesLeaseStore("switchyard", NAME, base_url=url, token="t", timeout_s=0.3)
        with pytest.raises(OSError, match=rf"GET {url}.*timed out"):
            store.update(lambda current: None)


@pytest.mark.parametrize("status, words", [(500, "HTTP 500.*injected failure"), (403, "HTTP 403")])
def test_other_http_errors_are_os_errors_naming_url_and_status(api: FakeApiServer, status: int, words: str) -> None:
    api.fail_with = status
    with pytest.raises(OSError, match=rf"GET {api.url}{LEASES}/{NAME}: {words}"):
        store_of(api).update(lambda current: None)


def test_a_wrong_token_is_an_os_error(api: FakeApiServer) -> None:
    with pytest.raises(OSError, match="HTTP 401"):
        store_of(api, token="stolen").update(lambda current: None)


def test_a_failed_write_is_an_os_error_not_a_lost_race(api: FakeApiServer) -> None:
    def fail_then_claim(current: Lease | None) -> Lease:
        api.fail_with = 500
        return Lease("a:1", 1, WALL_S, 10.0)

    with pytest.raises(OSError, match=rf"POST {api.url}{LEASES}: HTTP 500"):
        store_of(api).update(fail_then_claim)


def test_a_missing_namespace_is_an_os_error(api: FakeApiServer) -> None:
    store = KubernetesLeaseStore("elsewhere", NAME, base_url=api.url, token=api.token)
    with pytest.raises(OSError, match="POST .*/namespaces/elsewhere/leases: HTTP 404"):
        store.update(put(Lease("a:1", 1, WALL_S, 10.0)))


# ---- in the cluster -------------------------------------------------------------------------------


def service_account(tmp_path: Path, token: str, ca_file: str, namespace: str = "switchyard") -> Path:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(token)
    (account / "ca.crt").write_bytes(Path(ca_file).read_bytes())
    (account / "namespace").write_text(namespace)
    return account


def test_in_cluster_over_tls_with_the_pods_token_ca_and_namespace(tmp_path: Path) -> None:
    from tests.security.certs import CertificateAuthority

    identity = CertificateAuthority(tmp_path / "ca", "cluster").issue("kubernetes")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(identity.cert_file, identity.key_file)
    with FakeApiServer().running(server_context) as api:
        account = service_account(tmp_path, api.token + "\n", identity.ca_file)
        port = api.url.rsplit(":", 1)[1]
        environ = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
        store = KubernetesLeaseStore.from_spec(NAME, environ=environ, account_dir=account)
        assert (store.namespace, store.url) == ("switchyard", f"https://127.0.0.1:{port}{LEASES}/{NAME}")
        lease = Lease("10.0.0.7:50052", 1, WALL_S, 10.0)
        assert store.update(put(lease)) == lease
        # The kubelet rotates the projected token in place; the next request must send the new one.
        api.token = "rotated-token"
        (account / "token").write_text("rotated-token")
        assert store.update(lambda current: None) == lease


def test_in_cluster_the_spec_may_name_the_namespace(tmp_path: Path) -> None:
    from tests.security.certs import CertificateAuthority

    ca = CertificateAuthority(tmp_path / "ca", "cluster")
    account = service_account(tmp_path, "t", str(ca.ca_file), namespace="switchyard")
    environ = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    store = KubernetesLeaseStore.from_spec("leaders/sched", environ=environ, account_dir=account)
    assert store.url == "https://[fd00::1]:443/apis/coordination.k8s.io/v1/namespaces/leaders/leases/sched"


@pytest.mark.parametrize("spec", ["", "Switchyard", "a/b/c", "ns/", "under_score", "-lead"])
def test_a_bad_spec_names_the_flag(tmp_path: Path, spec: str) -> None:
    from tests.security.certs import CertificateAuthority

    ca = CertificateAuthority(tmp_path / "ca", "cluster")
    account = service_account(tmp_path, "t", str(ca.ca_file))
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(InvalidArgument) as caught:
        KubernetesLeaseStore.from_spec(spec, environ=environ, account_dir=account)
    assert caught.value.field == "leader_lease"


def test_outside_a_pod_open_store_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(InvalidArgument, match="KUBERNETES_SERVICE_HOST") as caught:
        open_store(f"k8s:{NAME}")
    assert caught.value.field == "leader_lease"
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(InvalidArgument, match="automountServiceAccountToken"):
        KubernetesLeaseStore.from_spec(NAME, environ=environ, account_dir=tmp_path / "none")


# ---- the same decisions as the file store ---------------------------------------------------------


def failover(store: LeaseStore, duration_s: float) -> tuple[list[Lease | None], list[bool]]:
    """Two schedulers through one store, on their own monotonic clocks: A claims, B waits; A stops
    renewing and B takes over after a full duration unchanged; A's late renewal fails; B releases
    on shutdown and A claims at once. Times are in tenths of the duration. Returns what each step
    saw, and for each claim whether the claimer won it the way services/scheduler/leadership.py
    tells: the lease in force equals the one it decided."""
    a, b = Observation(), Observation()
    seen: list[Lease | None] = []
    won: list[bool] = []
    t = duration_s / 10

    def step(decide: Callable[[Lease | None], Lease | None]) -> Lease | None:
        seen.append(store.update(decide))
        return seen[-1]

    def claim(observation: Observation, me: str, now_s: float, wall_s: float) -> Lease | None:
        decided: list[Lease] = []

        def decide(current: Lease | None) -> Lease | None:
            lease = decide_claim(current, observation, me, now_s, duration_s, wall_s)
            if lease is not None:
                decided.append(lease)
            return lease

        lease = step(decide)
        won.append(bool(decided) and lease == decided[-1])
        return lease

    a_lease = claim(a, "a:50052", 100.0, WALL_S)
    claim(b, "b:50052", 500.0, WALL_S + 0.5 * t)  # B's monotonic clock differs from A's: no matter
    a_lease = step(lambda c: decide_renewal(c, a_lease, WALL_S + 3 * t))
    claim(b, "b:50052", 500.0 + 4 * t, WALL_S + 4 * t)  # a change seen: B waits anew
    claim(b, "b:50052", 500.0 + 13.9 * t, WALL_S + 13.9 * t)
    b_lease = claim(b, "b:50052", 500.0 + 14 * t, WALL_S + 14 * t)
    step(lambda c: decide_renewal(c, a_lease, WALL_S + 15 * t))  # A was paused: the renewal fails
    step(lambda c: decide_release(c, b_lease))
    claim(a, "a:50052", 100.0 + 16 * t, WALL_S + 16 * t)
    return seen, won


@pytest.mark.parametrize("duration_s", [10.0, 2.5, 0.3])
def test_failover_runs_the_same_through_kubernetes_as_through_a_file(api: FakeApiServer, tmp_path: Path,
                                                                     duration_s: float) -> None:
    through_file = failover(FileLeaseStore(tmp_path / "lease.json"), duration_s)
    through_k8s = failover(store_of(api), duration_s)
    assert through_k8s == through_file
    seen, won = through_k8s
    assert [lease.holder if lease else None for lease in seen] == [
        "a:50052", "a:50052", "a:50052", "a:50052", "a:50052", "b:50052", "b:50052", "", "a:50052"]
    assert won == [True, False, False, False, True, True]
    epochs = [lease.epoch for lease in seen if lease]
    assert epochs == sorted(epochs) and len(set(epochs)) == 3
    assert stored(api)["spec"]["leaseTransitions"] == 2
