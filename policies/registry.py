"""Built-in policy names, and how a `use` string becomes a policy class.

`use` is a built-in name or `"package.module:ClassName"`. A class's `options(raw, where)` classmethod parses
its own table (the built-ins validate every key); a custom class without one is checked against its
constructor's signature, so an unknown option is a start-up error that names it either way.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Mapping

from policies.base import Policy
from proxy.app.config import ConfigError

BUILTINS = {
    "request_budget": "policies.request_budget:RequestBudget",
    "token_budget": "policies.token_budget:TokenBudget",
    "rate_limit": "policies.rate_limit:RateLimit",
    "concurrency": "policies.concurrency:Concurrency",
    "cache": "policies.cache.policy:ResponseCache",
}


def resolve(use: str, where: str) -> type[Policy]:
    target = BUILTINS.get(use, use)
    if not isinstance(use, str) or ":" not in target:
        raise ConfigError(f"{where}.use: {use!r} is neither a built-in policy ({', '.join(BUILTINS)}) nor "
                          "\"package.module:ClassName\"")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}.use: cannot import {module_name}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise ConfigError(f"{where}.use: {target} is not a subclass of policies.Policy")
    return cls


def build(cls: type[Policy], raw: Mapping, where: str) -> Policy:
    parse = getattr(cls, "options", None)
    if parse is not None:
        kwargs = parse(raw, where)
    else:
        kwargs = dict(raw)
        params = inspect.signature(cls).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            allowed = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
            unknown = sorted(set(kwargs) - allowed)
            if unknown:
                raise ConfigError(f"{where}.{unknown[0]}: unknown option of {cls.__name__} (it takes: "
                                  f"{', '.join(sorted(allowed)) or 'no options'})")
        missing = [n for n, p in params.items() if p.default is p.empty and p.kind is not p.VAR_KEYWORD
                   and p.kind is not p.VAR_POSITIONAL and n not in kwargs]
        if missing:
            raise ConfigError(f"{where}.{missing[0]}: required by {cls.__name__}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {cls.__name__} refused its options: {exc}") from None
