"""The lease record and the contract of a store that holds it.

Apart from lease.py, which decides what to write and holds the file store, so that another store
(k8s_lease.py) can build `Lease` records while `lease.open_store` picks among the stores: with the
record in lease.py, lease -> k8s_lease -> lease would be an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol


@dataclass(frozen=True)
class Lease:
    holder: str  # the holder's advertised address; "" once released
    epoch: int  # raised at each change of holder; never lowered
    renewed_s: float  # the holder's wall clock at its last renewal (a change marker, not compared across hosts)
    duration_s: float  # how long others wait, from seeing the last change, before taking it over

    @property
    def released(self) -> bool:
        return self.holder == ""


Decide = Callable[[Lease | None], Lease | None]


class LeaseStore(Protocol):
    def update(self, decide: Decide) -> Lease | None:
        """Atomically reads the lease and, when `decide(it)` is not None, writes that instead;
        returns the lease in force afterwards (None: there has never been one). Raises OSError when
        the store cannot be reached."""
