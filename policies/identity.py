"""Who is asking: proxy keys (`[auth]`), the request's `user` field without them, and what the request is for.

Keys are stored as SHA-256 digests only. A presented key is hashed and compared with every configured digest
by `hmac.compare_digest`, without stopping at a match, so the time taken says nothing about which key came
close. The key itself is never kept, logged or echoed: errors say only that it was missing or wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Mapping

from proxy.app.errors import ProxyError


@dataclass(frozen=True, slots=True)
class Identity:
    """`key` is the key's configured id (never the key), None without [auth]."""

    key: str | None = None
    user: str | None = None
    team: str | None = None


ANONYMOUS = Identity(None, "anonymous", None)


@dataclass(frozen=True, slots=True)
class ProxyKey:
    id: str
    digest: bytes
    identity: Identity


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh proxy key and its hex SHA-256: the key goes to its user, the hash into the config."""
    key = "gp-" + secrets.token_urlsafe(32)
    return key, hash_key(key)


def presented_key(headers: Mapping[str, str]) -> str | None:
    value = headers.get("Authorization")
    if value:
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if token and scheme.lower() == "bearer":
            return token
    return headers.get("x-api-key") or None


class KeyRing:
    """The configured proxy keys."""

    def __init__(self, keys: tuple[ProxyKey, ...]) -> None:
        self.keys = keys
        self.ids = frozenset(k.id for k in keys)

    def identify(self, headers: Mapping[str, str]) -> Identity:
        """The identity of the request's key; 401 `invalid_api_key` when it is missing or unknown."""
        key = presented_key(headers)
        if key is None:
            raise ProxyError(401, "You didn't provide an API key. Send your proxy key as `Authorization: Bearer "
                             "KEY` or `x-api-key: KEY`.", code="invalid_api_key")
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for k in self.keys:
            if hmac.compare_digest(digest, k.digest):
                found = k
        if found is None:
            raise ProxyError(401, "Incorrect API key provided. Check the proxy key you were given.",
                             code="invalid_api_key")
        return found.identity


def body_identity(body: dict) -> Identity:
    """Without [auth]: the request's `user` field, else `anonymous`."""
    user = body.get("user")
    if isinstance(user, str) and user:
        return Identity(None, user[:256], None)
    return ANONYMOUS
