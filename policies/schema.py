"""Helpers each policy uses to parse its own table: every message names the key it is about."""

from __future__ import annotations

import math
from typing import Mapping

from proxy.app.config import ConfigError, _check_keys, _number


def check_keys(raw: Mapping, allowed: set[str], where: str) -> None:
    _check_keys(raw, allowed, where)


def choice(raw: Mapping, key: str, where: str, choices: tuple[str, ...], default: str) -> str:
    value = raw.get(key, default)
    if value not in choices:
        raise ConfigError(f"{where}.{key}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def count(raw: Mapping, key: str, where: str, default: int | None = None) -> int | None:
    """A positive integer, or `default` when absent."""
    if key not in raw:
        return default
    return _number(raw, key, where, 0, minimum=1, integer=True)


def seconds(raw: Mapping, key: str, where: str, default: float) -> float:
    value = float(_number(raw, key, where, default, minimum=0))
    if value == math.inf:  # TOML's `inf`: a wait, lease or TTL without end is what these keys exist to prevent
        raise ConfigError(f"{where}.{key}: must be a finite number of seconds, got inf")
    return value


def table(raw: Mapping, key: str, where: str) -> Mapping:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}.{key}: must be a table, got {type(value).__name__}")
    return value
