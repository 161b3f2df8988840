"""The running config as JSON (GET /admin/config), with every secret masked.

What an operator needs to see is what the proxy runs on: the file's values with every default filled in, after
the start-up-only keys kept their running values across reloads. What must not show is any secret: a value
whose key names one (`*_key`, `*_keys`, `password`, `secret`, `token`: the provider keys, the admin key), the
collector's headers, and the password of a URL (`redis://:pw@host`). Proxy keys appear as their SHA-256, which
the file holds too. As a last guard the text goes through the log redactor, which knows every key loaded.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

from proxy.app.config import Config
from proxy.telemetry.logs import redact

MASK = "[masked]"
_SECRET_NAME = re.compile(r"(?:^|_)(?:keys?|password|secret|token)$")
_SECRET_TABLES = frozenset({"headers"})  # every value of these is a secret (OTEL_EXPORTER_OTLP_HEADERS)
_PRIVATE = frozenset({"digest"})  # shown under another name


def config_view(config: Config) -> dict:
    return _plain(config, "")


def masked_url(url: str) -> str:
    """`url` with the password of its userinfo masked (the user name stays: an ACL user is not a secret)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return MASK  # not a URL we can take apart: show none of it
    if password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def _plain(value: Any, name: str) -> Any:
    secret = bool(_SECRET_NAME.search(name))
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return MASK if secret else value
    if isinstance(value, str):
        if secret:
            return MASK
        return masked_url(value) if "://" in value and "@" in value else value
    if isinstance(value, bytes):
        return MASK if secret else value.hex()
    if isinstance(value, Mapping):
        if name in _SECRET_TABLES:
            return {str(k): MASK for k in value}
        return {str(k): _plain(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v, name) for v in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name), f.name) for f in dataclasses.fields(value)}
    return _object(value)


def _object(value: Any) -> dict:
    """A policy, the key ring, a proxy key: their public attributes (a policy's name, mode and on_error are
    class defaults the chain may have set on the instance)."""
    out: dict[str, Any] = {}
    for attr in ("name", "mode", "on_error"):
        if hasattr(value, attr) and isinstance(getattr(value, attr), str):
            out[attr] = getattr(value, attr)
    for attr, v in vars(value).items() if hasattr(value, "__dict__") else ():
        if attr.startswith("_") or callable(v) or not _data(v):
            continue
        if attr in _PRIVATE:
            out["sha256"] = v.hex() if isinstance(v, bytes) else MASK
            continue
        out[attr] = _plain(v, attr)
    for attr in getattr(type(value), "__slots__", ()):
        if not attr.startswith("_") and hasattr(value, attr):
            out[attr] = _plain(getattr(value, attr), attr)
    return out


def _data(value: Any) -> bool:
    """Config data rather than a live object a policy holds (which is not config, and may be large)."""
    return value is None or dataclasses.is_dataclass(value) or isinstance(
        value, (bool, int, float, str, bytes, Mapping, list, tuple, set, frozenset))


def render(config: Config) -> bytes:
    import orjson

    text = orjson.dumps(config_view(config), default=lambda v: MASK).decode()
    return redact(text).encode()
