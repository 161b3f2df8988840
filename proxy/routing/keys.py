"""Key pools: a provider with several API keys spreads requests over them, and rests a key that stopped working.

Round robin over the keys not resting. A key that answers 401/403 rests for `routing.key_rest_s` on every
model (it is the key that is wrong); a 429 rests only that model and key (Groq's limits are per model), which
`RateLimits` holds. Keys are named by their variable's name, never their value: that name is what spans,
logs and metrics show, and it comes from the config, so it is a bounded label.
"""

from __future__ import annotations

import time
from typing import Callable


class KeyPool:
    __slots__ = ("names", "_next", "_until", "_clock")

    def __init__(self, names: tuple[str, ...], clock: Callable[[], float] = time.monotonic) -> None:
        self.names = names or ("",)  # a provider without a key is a pool of one key that sends none
        self._next = 0
        self._until = [0.0] * len(self.names)
        self._clock = clock

    def __len__(self) -> int:
        return len(self.names)

    def order(self) -> list[int]:
        """The keys to try for one model, in order: round robin from the next key, resting keys left out."""
        count = len(self.names)
        if count == 1:
            return [0] if self._until[0] <= self._clock() else []
        start = self._next
        self._next = (start + 1) % count
        now = self._clock()
        until = self._until
        return [i % count for i in range(start, start + count) if until[i % count] <= now]

    def rest(self, index: int, seconds: float) -> None:
        self._until[index] = max(self._until[index], self._clock() + seconds)

    def rest_left(self, index: int) -> float:
        """Seconds key `index` still rests (0 when it may be used): what the status page shows."""
        return max(0.0, self._until[index] - self._clock())

    def resting_for(self) -> float:
        """Seconds until the first resting key may be used again (0 when one may be used now)."""
        return max(0.0, min(self._until) - self._clock())
