"""What makes two requests the same request: the cache key, whether a request may be cached at all, and what
the client's `Cache-Control` asks.

The key is a SHA-256 of the canonical request: the resolved model (the virtual model, or the real model named
directly), and every body field that shapes the answer (messages, tools, tool_choice, response_format, every
sampling parameter), taken after the tier's `params` are merged, serialised with sorted keys so field order
does not matter. Left out: `stream` and `stream_options` (one entry serves both shapes), `user` (who asks, not
what), `model` (replaced by the resolved name) and the proxy's own headers. With a scope other than global the
identity is part of the key, so one key's or team's answers are never another's.
"""

from __future__ import annotations

import hashlib
import re

import orjson

# Fields of the body that do not change the answer.
_NOT_KEYED = frozenset({"stream", "stream_options", "user", "model"})
_OPTIONAL_NOT_KEYED = _NOT_KEYED - {"model"}  # `model` is in every body that gets this far
_MAX_AGE = re.compile(r"max-age\s*=\s*\"?(\d+)\"?")


def cache_key(model: str, body: dict, who: str) -> str:
    """64 hex digits. `who` is the scope's identity ("all" for a global cache)."""
    canonical = dict(body)  # a copy and a few deletions cost less than a comprehension over every field
    canonical.pop("model", None)
    if not _OPTIONAL_NOT_KEYED.isdisjoint(canonical):
        for name in _OPTIONAL_NOT_KEYED:
            canonical.pop(name, None)
    data = orjson.dumps([model, who, canonical], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()


def deterministic(body: dict) -> bool:
    """`cacheable = "deterministic"`: temperature 0 or a seed, so the same request is meant to give the same
    answer."""
    return body.get("temperature") == 0 or body.get("seed") is not None


def single_choice(body: dict) -> bool:
    """Answers with several choices (`n` > 1) are never stored (nor looked up)."""
    n = body.get("n")
    return n is None or n == 1


class Control:
    """The request's `Cache-Control`: `no-cache` skips the lookup and stores the answer, `no-store` does
    neither, `max-age=N` accepts only entries younger than N seconds."""

    __slots__ = ("lookup", "store", "max_age")

    def __init__(self, lookup: bool = True, store: bool = True, max_age: int | None = None) -> None:
        self.lookup, self.store, self.max_age = lookup, store, max_age


DEFAULT = Control()


def control(header: str | None) -> Control:
    if not header:
        return DEFAULT
    value = header.lower()
    if "no-store" in value:
        return Control(False, False)
    if "no-cache" in value:
        return Control(False, True)
    match = _MAX_AGE.search(value)
    if match:
        return Control(True, True, min(int(match.group(1)[:12]), 10**9))
    return DEFAULT
