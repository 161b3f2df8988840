"""The store seam: three atomic operations every shared counter needs, with a memory and a Redis version.

A claim is one of three kinds of counter:
- `gcra`: a throughput limit as a GCRA bucket (Generic Cell Rate Algorithm): `limit` units per `period_s`,
  a burst of the whole period's capacity, refilling continuously. One number per key (the theoretical
  arrival time), so a check is O(1) and a settlement that corrects a token estimate is one addition.
- `budget`: a calendar-period budget: `used` and `reserved` in one record that expires at `param` (epoch s).
- `slot`: a concurrency slot, held as a lease that expires `param` seconds after it was last renewed, so the
  slots of a replica that died free themselves.

`admit(claims)` checks every claim, and reserves all of them only if every hard claim fits: all or nothing.
A soft claim (a policy in shadow mode) is checked and reserved but never refuses. `settle(settlements)`
returns what was reserved and charges what was used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

GCRA, BUDGET, SLOT = "g", "b", "s"


class StoreUnavailable(Exception):
    """The store could not be reached; each policy's `on_error` says what happens next."""


@dataclass(slots=True)
class Claim:
    kind: str  # GCRA, BUDGET or SLOT
    key: str
    limit: int
    amount: int  # requests or tokens for GCRA, tokens for BUDGET, 1 for SLOT
    param: float  # GCRA: period in seconds; BUDGET: expiry (epoch seconds); SLOT: lease in seconds
    soft: bool = False
    lease: str = ""  # SLOT: the lease's id
    header: str | None = None  # GCRA: "requests" or "tokens" when it feeds the x-ratelimit-* headers


@dataclass(slots=True)
class Settlement:
    kind: str
    key: str
    reserved: int = 0
    used: int = 0
    limit: int = 0  # GCRA: to turn a token correction into time
    param: float = 0.0  # GCRA: the period; BUDGET: the expiry
    lease: str = ""


@dataclass(slots=True)
class Admission:
    """`ok` when every hard claim fitted. Otherwise `failed` is the index of the first that did not and
    `retry_after` how long until it might (0 when unknown, as for a slot). `over` lists the indexes of soft
    claims that would have failed. `remaining[i]` and `reset[i]` describe claim i after this admission."""

    ok: bool
    failed: int = -1
    retry_after: float = 0.0
    over: tuple[int, ...] = ()
    remaining: Sequence[float] = ()
    reset: Sequence[float] = ()


class Store(Protocol):
    backend: str
    available: bool

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def admit(self, claims: Sequence[Claim]) -> Admission: ...

    async def settle(self, settlements: Sequence[Settlement]) -> None: ...

    # Optional: `settle_soon(settlements) -> Future`, a settlement the caller does not wait for (the Redis store:
    # it rides the store's next call). The chain uses it when a store has it, and awaits `settle` otherwise.

    async def read(self, claims: Sequence[Claim]) -> list[tuple[float, float]]:
        """For each claim, (used, reserved) now: GCRA units in the last period, budget used and reserved,
        slots held. Reserves nothing."""
        ...

    async def changed(self, timeout: float) -> None:
        """Returns when a slot may have been freed, or after `timeout`: how a queued request waits."""
        ...

    def status(self) -> dict: ...


class Owners(Protocol):
    """Who made an object the proxy only passes on (an uploaded file, a batch): the name (`file:ID`) maps to
    the proxy key's id until `ttl_s` has passed, so what one key made can be hidden from every other key.
    Both stores implement it; raises StoreUnavailable as the counters do."""

    async def set_owner(self, name: str, owner: str, ttl_s: float) -> None: ...

    async def owners(self, names: Sequence[str]) -> list[str | None]:
        """Each name's owner, None when it has none (never recorded, expired or dropped)."""
        ...

    async def drop_owner(self, name: str) -> None: ...
