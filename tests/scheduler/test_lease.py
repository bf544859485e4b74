"""The lease's decisions (claim, renewal, release) on injected clocks, and the file store."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from services.scheduler.lease import (
    FileLeaseStore, Lease, Observation, decide_claim, decide_release, decide_renewal, open_store,
)
from shared.errors import InvalidArgument

WALL_S = 1_796_596_200.25  # 2026-12-06T22:30:00.25Z on the deciding scheduler's wall clock
HELD = Lease("a:50052", 1_796_596_000_000_000_000, WALL_S - 200, 10.0)


def test_nobody_holds_it_so_the_first_claim_wins_at_once() -> None:
    claimed = decide_claim(None, Observation(), "b:50052", now_s=5.0, duration_s=10.0, wall_s=WALL_S)
    assert claimed == Lease("b:50052", int(WALL_S * 1e9), WALL_S, 10.0)


def test_a_standby_waits_a_full_duration_on_its_own_clock() -> None:
    """Expiry counts from when this observer first saw the record as it is, on its monotonic
    clock; the holder's renewed_s (200 s old by this wall clock) is no evidence of anything."""
    seen = Observation()
    assert decide_claim(HELD, seen, "b:50052", now_s=1000.0, duration_s=10.0, wall_s=WALL_S) is None
    assert decide_claim(HELD, seen, "b:50052", now_s=1009.999, duration_s=10.0, wall_s=WALL_S) is None
    claimed = decide_claim(HELD, seen, "b:50052", now_s=1010.0, duration_s=10.0, wall_s=WALL_S)
    assert claimed is not None and claimed.holder == "b:50052"


def test_a_renewal_seen_restarts_the_wait() -> None:
    seen = Observation()
    assert decide_claim(HELD, seen, "b:50052", now_s=1000.0, duration_s=10.0, wall_s=WALL_S) is None
    renewed = replace(HELD, renewed_s=HELD.renewed_s + 3)
    assert decide_claim(renewed, seen, "b:50052", now_s=1008.0, duration_s=10.0, wall_s=WALL_S) is None
    assert decide_claim(renewed, seen, "b:50052", now_s=1017.9, duration_s=10.0, wall_s=WALL_S) is None
    assert decide_claim(renewed, seen, "b:50052", now_s=1018.0, duration_s=10.0, wall_s=WALL_S) is not None


def test_the_wait_is_the_holders_duration_not_the_claimers() -> None:
    long_held = replace(HELD, duration_s=60.0)
    seen = Observation()
    decide_claim(long_held, seen, "b:50052", now_s=0.0, duration_s=5.0, wall_s=WALL_S)
    assert decide_claim(long_held, seen, "b:50052", now_s=59.0, duration_s=5.0, wall_s=WALL_S) is None
    claimed = decide_claim(long_held, seen, "b:50052", now_s=60.0, duration_s=5.0, wall_s=WALL_S)
    assert claimed is not None and claimed.duration_s == 5.0  # the new holder's own duration from now on


@pytest.mark.parametrize("wall_s", [0.0, WALL_S - 3600, WALL_S])
def test_a_claim_raises_the_epoch_by_at_least_one(wall_s: float) -> None:
    """However the claimer's wall clock stands (even far behind the last holder's), the epoch
    goes up, so the workers refuse the previous leader's steps."""
    seen = Observation()
    decide_claim(HELD, seen, "b:50052", now_s=0.0, duration_s=10.0, wall_s=wall_s)
    claimed = decide_claim(HELD, seen, "b:50052", now_s=10.0, duration_s=10.0, wall_s=wall_s)
    assert claimed is not None and claimed.epoch >= HELD.epoch + 1
    assert claimed.epoch >= int(wall_s * 1e9)  # never older than an unleased scheduler's time_ns epoch


def test_renewal_keeps_holder_and_epoch_and_always_changes_the_record() -> None:
    renewed = decide_renewal(HELD, HELD, WALL_S)
    assert renewed == replace(HELD, renewed_s=WALL_S)
    # A wall clock stepped back must still make a change the standbys can see.
    again = decide_renewal(renewed, HELD, WALL_S - 50)
    assert again is not None and again.renewed_s > renewed.renewed_s


@pytest.mark.parametrize("current", [
    None,
    replace(HELD, holder="b:50052", epoch=HELD.epoch + 1),  # taken over
    replace(HELD, epoch=HELD.epoch + 1),  # the same address, but a later incarnation's lease
    replace(HELD, holder=""),  # released
])
def test_renewal_fails_when_the_store_holds_someone_elses(current: Lease | None) -> None:
    assert decide_renewal(current, HELD, WALL_S) is None


def test_a_release_lets_a_standby_claim_at_once() -> None:
    standby = Observation()
    assert decide_claim(HELD, standby, "b:50052", now_s=50.0, duration_s=10.0, wall_s=WALL_S) is None
    released = decide_release(HELD, HELD)
    assert released is not None and released.released and released.epoch == HELD.epoch
    assert released.renewed_s > HELD.renewed_s
    claimed = decide_claim(released, standby, "b:50052", now_s=50.001, duration_s=10.0, wall_s=WALL_S)
    assert claimed is not None and claimed.holder == "b:50052" and claimed.epoch > HELD.epoch


def test_only_the_holder_releases() -> None:
    assert decide_release(replace(HELD, holder="b:50052"), HELD) is None
    assert decide_release(None, HELD) is None


# ---- the file store -------------------------------------------------------------------------------


def test_the_file_store_round_trips_exactly(tmp_path: Path) -> None:
    path = tmp_path / "run" / "lease.json"  # the folder is made on first use
    lease = Lease("a:50052", 1_796_596_200_123_456_789, 0.1 + 0.2, 7.5)
    assert FileLeaseStore(path).update(lambda current: lease) == lease
    assert FileLeaseStore(path).update(lambda current: None) == lease  # another process's view


def test_the_file_store_writes_nothing_when_decide_says_none(tmp_path: Path) -> None:
    path = tmp_path / "lease.json"
    store = FileLeaseStore(path)
    assert store.update(lambda current: None) is None
    assert path.read_text() == ""
    store.update(lambda current: HELD)
    before = path.read_text()
    seen = []
    assert store.update(lambda current: seen.append(current)) == HELD
    assert seen == [HELD] and path.read_text() == before


def test_the_file_store_serializes_concurrent_updates(tmp_path: Path) -> None:
    """Each update reads, decides and writes under the lock: none is lost."""
    path = tmp_path / "lease.json"

    def bump(current: Lease | None) -> Lease:
        return Lease("a:1", (current.epoch if current else 0) + 1, WALL_S, 10.0)

    def run() -> None:
        store = FileLeaseStore(path)  # one descriptor per update, as separate processes have
        for _ in range(25):
            store.update(bump)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = FileLeaseStore(path).update(lambda current: None)
    assert final is not None and final.epoch == 100


@pytest.mark.parametrize("text", ["{not json", '{"holder": "a"}', '["a", 1]', '{"holder": "a", "epoch": "x", '
                                  '"renewed_s": 1, "duration_s": 1}'])
def test_a_corrupt_file_names_the_flag(tmp_path: Path, text: str) -> None:
    path = tmp_path / "lease.json"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as caught:
        FileLeaseStore(path).update(lambda current: HELD)
    assert caught.value.field == "leader_lease"
    assert str(path) in caught.value.message
    assert path.read_text() == text  # nothing written over a stranger's file


def test_open_store_takes_a_file_spec_and_refuses_others(tmp_path: Path) -> None:
    store = open_store(f"file:{tmp_path / 'lease.json'}")
    assert isinstance(store, FileLeaseStore) and store.path == tmp_path / "lease.json"
    for spec in ("", "file:", "k8s:", "etcd:/leases/x", str(tmp_path / "lease.json")):
        with pytest.raises(InvalidArgument) as caught:
            open_store(spec)
        assert caught.value.field == "leader_lease"
