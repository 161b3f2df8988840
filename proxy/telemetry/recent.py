"""Counts of the last few minutes, per configured model: what the status page shows as requests and errors.

/metrics has the counters since the start, which a Prometheus turns into rates; an operator who opens the
status page without one wants "how is tier-fast doing now". So each row keeps `SLOTS` buckets of `SLOT_S`
seconds in a ring, and a count is the sum of the buckets still inside the window. Rows exist only for the
names the config gives (virtual models and real `provider:model` keys), made once at start-up: a name a
client sends falls into the `other` row, so memory is fixed by the config, whatever clients send.

Hot path: one dict lookup, one integer division and one list increment per count; a bucket is reset in
place when the ring comes round to it.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

SLOT_S = 10
SLOTS = 30  # 5 minutes
OTHER = "other"


class Row:
    """Buckets of one name: each `[epoch, count_0, count_1, ...]`, epoch being the slot's number since 0."""

    __slots__ = ("buckets",)

    def __init__(self, fields: int) -> None:
        self.buckets = [[-1] + [0] * fields for _ in range(SLOTS)]

    def add(self, epoch: int, field: int) -> None:
        bucket = self.buckets[epoch % SLOTS]
        if bucket[0] != epoch:  # the ring came round: this slot's counts are a window old
            bucket[0] = epoch
            for i in range(1, len(bucket)):
                bucket[i] = 0
        bucket[field + 1] += 1

    def totals(self, epoch: int, slots: int) -> list[int]:
        """Each field summed over the last `slots` buckets, the current one included."""
        out = [0] * (len(self.buckets[0]) - 1)
        oldest = epoch - slots
        for bucket in self.buckets:
            if oldest < bucket[0] <= epoch:
                for i in range(len(out)):
                    out[i] += bucket[i + 1]
        return out


class RecentCounts:
    """Named counters (`fields`) per configured name, over the last `SLOTS * SLOT_S` seconds."""

    def __init__(self, names: Iterable[str], fields: tuple[str, ...],
                 clock: Callable[[], float] = time.monotonic, previous: "RecentCounts | None" = None) -> None:
        """`previous`: the counts of the config a reload replaces; the rows of names still configured (and
        `other`) carry over, the rest are dropped."""
        self.fields = fields
        self._index = {name: i for i, name in enumerate(fields)}
        kept = previous._rows if previous is not None and previous.fields == fields else {}
        self._rows = {name: kept.get(name) or Row(len(fields)) for name in (*names, OTHER)}
        self._clock = previous._clock if previous is not None else clock

    def add(self, name: str, field: str) -> None:
        row = self._rows.get(name)
        if row is None:
            row = self._rows[OTHER]
        row.add(int(self._clock() // SLOT_S), self._index[field])

    def totals(self, name: str, seconds: int = SLOTS * SLOT_S) -> dict[str, int]:
        """The counts of the last `seconds` (rounded up to whole buckets, at most the whole window)."""
        row = self._rows.get(name)
        if row is None:
            return dict.fromkeys(self.fields, 0)
        slots = min(SLOTS, max(1, -(-seconds // SLOT_S)))
        return dict(zip(self.fields, row.totals(int(self._clock() // SLOT_S), slots)))

    def names(self) -> list[str]:
        return list(self._rows)
