"""Groq's own rate limits, read from every answer, so a request that would earn a 429 goes elsewhere first.

Groq answers every request with what the model has left for this key (`x-ratelimit-remaining-requests`,
`-tokens`) and when that refills (`x-ratelimit-reset-requests`, `-tokens`, Go durations like `2m59.56s`). The
proxy keeps the last view per model and key, takes what it sends off it until the next answer corrects it,
and refuses to send a request whose estimated tokens would not fit before the reset. A 429's `retry-after`
rests that model and key until then. State is per configured model and pool key, bounded for the rest.
"""

from __future__ import annotations

import re
import time
from typing import Callable

import orjson

MAX_TRACKED = 1024
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")


def go_duration(text: str) -> float | None:
    """Seconds in a Go duration (`1h2m3s`, `2m59.56s`, `7.66s`, `100ms`); None when it is not one."""
    text = text.strip()
    if not text:
        return None
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    return total if pos == len(text) else None


def estimate_tokens(body: dict) -> int:
    """A cheap upper-ish estimate: prompt bytes / 4, plus the completion limit the request asks for."""
    prompt = body.get("messages") if "messages" in body else body.get("input")
    size = len(orjson.dumps(prompt)) if prompt is not None else 0
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return size // 4 + (limit if isinstance(limit, int) else 0)


class _State:
    __slots__ = ("requests", "requests_until", "tokens", "tokens_until", "rest_until")

    def __init__(self) -> None:
        self.requests: float | None = None
        self.requests_until = 0.0
        self.tokens: float | None = None
        self.tokens_until = 0.0
        self.rest_until = 0.0


class RateLimits:
    def __init__(self, clock: Callable[[], float] = time.monotonic, max_tracked: int = MAX_TRACKED) -> None:
        self._clock = clock
        self._max = max_tracked
        self._states: dict[tuple[str, int], _State] = {}

    def _state(self, key: tuple[str, int]) -> _State:
        state = self._states.get(key)
        if state is None:
            if len(self._states) >= self._max:
                del self._states[next(iter(self._states))]
            state = self._states[key] = _State()
        return state

    def observe(self, model: str, key: int, headers) -> None:
        """Takes the rate-limit view from an answer's headers (any status)."""
        remaining_tokens = headers.get("x-ratelimit-remaining-tokens")
        remaining_requests = headers.get("x-ratelimit-remaining-requests")
        if remaining_tokens is None and remaining_requests is None:
            return
        state = self._state((model, key))
        now = self._clock()
        for remaining, reset, attr in ((remaining_tokens, "x-ratelimit-reset-tokens", "tokens"),
                                       (remaining_requests, "x-ratelimit-reset-requests", "requests")):
            if remaining is None:
                continue
            try:
                value = float(remaining)
            except ValueError:
                continue
            seconds = go_duration(headers.get(reset) or "")
            setattr(state, attr, value)
            setattr(state, attr + "_until", now + (seconds if seconds is not None else 60.0))

    def rest(self, model: str, key: int, seconds: float) -> None:
        state = self._state((model, key))
        state.rest_until = max(state.rest_until, self._clock() + seconds)

    def blocked(self, model: str, key: int, tokens: Callable[[], int]) -> tuple[str, float] | None:
        """(reason, seconds to wait) when this model and key should not be sent this request; None when it
        may. `tokens` is called only when the answer depends on it (the estimate costs a serialization)."""
        state = self._states.get((model, key))
        if state is None:
            return None
        now = self._clock()
        if state.rest_until > now:
            return "rate_limited", state.rest_until - now
        if state.requests is not None and state.requests < 1 and state.requests_until > now:
            return "rate_limit_predicted", state.requests_until - now
        if state.tokens is not None and state.tokens_until > now and tokens() > state.tokens:
            return "rate_limit_predicted", state.tokens_until - now
        return None

    def view(self, model: str, key: int) -> dict | None:
        """What Groq last said this model and key have left, while that view holds (the status page)."""
        state = self._states.get((model, key))
        if state is None:
            return None
        now = self._clock()
        out = {}
        if state.requests is not None and state.requests_until > now:
            out["remaining_requests"] = max(0, int(state.requests))
        if state.tokens is not None and state.tokens_until > now:
            out["remaining_tokens"] = max(0, int(state.tokens))
        return out or None

    def spend(self, model: str, key: int, tokens: int | None) -> None:
        """Takes a request just sent off the last view, so requests in flight do not all count on it."""
        state = self._states.get((model, key))
        if state is None:
            return
        if state.requests is not None:
            state.requests -= 1
        if state.tokens is not None and tokens:
            state.tokens -= tokens
