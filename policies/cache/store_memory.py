"""The response cache in this process: a cachetools TTLCache bounded by bytes, with a bound on entries too.

TTLCache evicts the expired first, then the least recently used, whenever an insert would pass `maxsize`;
its size here is each entry's bytes, so `max_bytes` bounds the memory the answers hold. `max_entries` is
kept by evicting the least recently used before an insert would pass it. An entry larger than
`max_entry_bytes` (a tenth of `max_bytes` at most) is not stored: one answer must not empty the cache.
"""

from __future__ import annotations

import time

from cachetools import TTLCache

from policies.cache.entry import Entry


class MemoryCache:
    backend = "memory"

    def __init__(self, ttl_s: float, max_entries: int, max_bytes: int, max_entry_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._data: TTLCache = TTLCache(max_bytes, ttl_s, timer=time.monotonic, getsizeof=_size)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._data.clear()

    async def get(self, key: str, model: str = "") -> Entry | None:
        try:
            return self._data[key]  # half the cost of TTLCache.get (a MutableMapping method over this)
        except KeyError:
            return None

    def keep(self, entry: Entry) -> bool:
        """Stores the entry at once; False when it is too large to keep."""
        if entry.size > self.max_entry_bytes:
            return False
        data = self._data
        if entry.key not in data:
            data.expire()
            while len(data) >= self.max_entries:
                data.popitem()
        data[entry.key] = entry
        return True

    async def delete(self, model: str | None = None, key: str | None = None) -> int:
        data = self._data
        if key is not None:
            return 1 if data.pop(key, None) is not None else 0
        if model is None:
            n = len(data)
            data.clear()
            return n
        doomed = [k for k, e in data.items() if e.model == model]
        for k in doomed:
            data.pop(k, None)
        return len(doomed)

    def held(self) -> tuple[int, int]:
        """(entries, bytes) held now."""
        self._data.expire()
        return len(self._data), int(self._data.currsize)


def _size(entry: Entry) -> int:
    return entry.size
