"""Turns the model name a client asked for into a route: the chain of real models to try, in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from proxy.app.config import Config, Target
from proxy.app.errors import ProxyError


OTHER = "other"  # the metric label of every name only a client knows


@dataclass(frozen=True, slots=True)
class Route:
    requested: str
    virtual: str | None  # the virtual model, when the name was one (or an alias of one)
    chain: tuple[Target, ...]
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # What metrics call this route: the virtual model, or a name the config spells (a real model a chain names,
    # an alias); `other` for a 'provider:model' only the client named, so client input never becomes a label.
    label: str = OTHER
    entry_params: bool = False  # a chain entry has params of its own (the client's fields are noted then)
    auto: bool = False  # the auto model: the tier is chosen per request (proxy.routing.tiers)


class Router:
    """Resolution order: virtual model, alias, 'provider:model', a bare real model a chain names."""

    def __init__(self, config: Config) -> None:
        self._providers = frozenset(config.providers)
        routes: dict[str, Route] = {}
        for name, vm in config.models.items():
            routes[name] = Route(name, name, vm.chain, vm.params, name, vm.entry_params)
        for target in config.real_targets():
            routes[target.key] = Route(target.key, None, (target,), label=target.key)
            if target.provider == config.default_provider:
                routes.setdefault(target.model, Route(target.model, None, (target,), label=target.model))
        for alias, to in config.aliases.items():
            resolved = routes[to] if to in routes else Route(alias, None, (Target(*to.split(":", 1)),))
            routes[alias] = Route(alias, resolved.virtual, resolved.chain, resolved.params,
                                  resolved.virtual or alias, resolved.entry_params)
        auto = config.routing.auto_model
        if auto is not None:
            routes[auto] = Route(auto, None, (), label=auto, auto=True)
        self._routes = routes
        self._listed = sorted(config.models) + sorted(t.key for t in config.real_targets())
        if auto is not None:
            self._listed.insert(0, auto)

    def virtual(self, name: str) -> Route:
        """The route of a virtual model the config names."""
        return self._routes[name]

    def resolve(self, name: str) -> Route:
        route = self._routes.get(name)
        if route is not None:
            return route
        provider, sep, model = name.partition(":")
        if sep and model and provider in self._providers and model.isprintable():
            # An explicit 'provider:model' is a deliberate choice: let the provider say whether it exists. A
            # name with a control character cannot exist, and would break the x-groq-proxy-model header.
            return Route(name, None, (Target(provider, model),))
        raise ProxyError(
            404,
            f"The model `{name}` does not exist. Available models: {', '.join(self._listed)}"
            " (or any 'provider:model').",
            param="model",
            code="model_not_found",
        )
