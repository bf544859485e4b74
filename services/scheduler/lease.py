"""The leadership lease: which scheduler drives the workers, and with what epoch.

Schedulers run active/standby. Splitting the workers among several active schedulers would split
the prefix cache and the queues too, and routing is worth most over the whole fleet; one leader
with a warm standby keeps the one-owner-per-block-table design and costs one idle process.

The lease is a small record in a store every scheduler can write atomically: a file under an
exclusive lock for `make up` and compose (the volume is shared), a Kubernetes `Lease` object in a
cluster (k8s_lease.py). Both go through the same `decide` below, so the local path tests the
cluster's logic. Expiry is judged the way Kubernetes' own leader election judges it: by how long
the record has gone unchanged on the *observer's* monotonic clock, so no two machines' wall clocks
need to agree.

Each change of holder raises the epoch. The leader sends it with every Reset and Step and a worker
refuses any other, so a leader that was paused and comes back cannot write into blocks its
successor assigns, whatever it believes about the lease until its next renewal fails.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from services.scheduler.lease_record import Decide, Lease, LeaseStore
from shared.errors import InvalidArgument


@dataclass
class Observation:
    """What one scheduler last saw of the lease, and when (its own monotonic clock)."""

    lease: Lease | None = None
    seen_s: float = 0.0

    def note(self, lease: Lease | None, now_s: float) -> None:
        if lease != self.lease:
            self.lease, self.seen_s = lease, now_s

    def expired(self, now_s: float) -> bool:
        return self.lease is None or self.lease.released or now_s - self.seen_s >= self.lease.duration_s


def decide_claim(current: Lease | None, observation: Observation, me: str, now_s: float, duration_s: float,
                 wall_s: float) -> Lease | None:
    """A standby's decision: the lease it takes over now, or None to keep waiting."""
    observation.note(current, now_s)
    if not observation.expired(now_s):
        return None
    # At least one above the last epoch, and never below the wall clock's nanoseconds: a scheduler
    # run without a lease takes time.time_ns() as its epoch, and a leased one must not be older.
    epoch = max((current.epoch if current else 0) + 1, int(wall_s * 1e9))
    return Lease(me, epoch, wall_s, duration_s)


def decide_renewal(current: Lease | None, mine: Lease, wall_s: float) -> Lease | None:
    """The leader's decision: its renewed lease, or None when the store no longer holds its own."""
    if current is None or current.holder != mine.holder or current.epoch != mine.epoch:
        return None
    return replace(current, renewed_s=max(wall_s, current.renewed_s + 1e-6))  # always a visible change


def decide_release(current: Lease | None, mine: Lease) -> Lease | None:
    """A leader shutting down hands the lease back at once, so a standby need not wait it out."""
    if current is None or current.holder != mine.holder or current.epoch != mine.epoch:
        return None
    return replace(current, holder="", renewed_s=current.renewed_s + 1e-6)


class FileLeaseStore:
    """The lease as JSON in one file, read and written under an exclusive `flock` of that file:
    atomic between the processes of one host, and between containers sharing the volume."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def update(self, decide: Decide) -> Lease | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, or by the kernel if we die
            with os.fdopen(os.dup(fd), "r+") as f:
                current = _parse(f.read(), self.path)
                new = decide(current)
                if new is None:
                    return current
                f.seek(0)
                f.truncate()
                f.write(json.dumps({"holder": new.holder, "epoch": new.epoch, "renewed_s": new.renewed_s,
                                    "duration_s": new.duration_s}))
                f.flush()
                os.fsync(f.fileno())
                return new
        finally:
            os.close(fd)


def _parse(text: str, path: Path) -> Lease | None:
    if not text.strip():
        return None
    try:
        d = json.loads(text)
        return Lease(str(d["holder"]), int(d["epoch"]), float(d["renewed_s"]), float(d["duration_s"]))
    except (ValueError, KeyError, TypeError) as e:
        # Only ever written whole under the lock; anything else is a stranger's file.
        raise InvalidArgument(f"{path} is not a Switchyard lease file: {e}", field="leader_lease") from None


def open_store(spec: str, request_timeout_s: float = 5.0) -> LeaseStore:
    """`file:<path>` or `k8s:[<namespace>/]<name>` (the flag `--leader-lease`). `request_timeout_s`
    bounds each API call of the Kubernetes store (an update makes up to three)."""
    kind, _, rest = spec.partition(":")
    if kind == "file" and rest:
        return FileLeaseStore(rest)
    if kind == "k8s" and rest:
        from services.scheduler.k8s_lease import KubernetesLeaseStore  # noqa: PLC0415 - only in a cluster

        return KubernetesLeaseStore.from_spec(rest, timeout_s=request_timeout_s)
    raise InvalidArgument(f"expected 'file:<path>' or 'k8s:[<namespace>/]<name>', got {spec!r}",
                          field="leader_lease")
