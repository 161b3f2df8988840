"""A config file read over the built-in defaults: what the file leaves out, the packaged default gives.

A file used to have to be whole: one holding only `[[policies]]` was refused ("providers: at least one provider
is required", even with `--simulate`), so a user who wanted the default tiers and one policy copied
`default_config.toml`, and kept a copy that went stale as Groq retired models. Now a file says what it changes,
section by section:

- `[server]`, `[routing]`, `[telemetry]`: key by key over the defaults' (which hold only `server.host`, `port`).
- `[providers]`: given, the file's providers are all the providers (one it does not name is never called);
  left out, the defaults' (`groq`, `local`). A file's provider with no `base_url` named as a built-in one
  (`[providers.groq] timeout_s = 30`) changes that provider key by key; one with a `base_url` is the file's whole.
- `[models]`, `[aliases]`: the default tiers and aliases are used unless the file gives both `[providers]` and
  `[models]`: such a file describes its own routing, as every file had to before, and means what it meant.
  When they are used, the file's tiers and aliases are added to them by name (a name the file gives, as a tier
  or an alias, replaces the default's of that name whole; but a file's tier with no `chain`, as
  `[models.tier-fast] params = {...}`, changes the built-in tier of its name key by key: a user who sets a
  tier's params means that tier's models, not a tier with none), and the default tiers and aliases that name a
  provider the file's `[providers]` does not have are left out, so a user's providers never meet an error
  from a default tier.
- `[auth]`, `[store]`, `[[policies]]`: the file's (the defaults have none).

The result is an ordinary raw table: `parse_config` checks it as it checks any, and its messages name the
file's keys. A message that names a built-in tier the merge did not keep (`routing.request_types.embed: must
name a virtual model (...), got 'tier-embed'`) gets a note saying why (`explain`): the user who names
`tier-embed` believes it exists, since the README lists it.
"""

from __future__ import annotations

from typing import Any, Mapping

from proxy.app.config import ConfigError

_KEY_BY_KEY = ("server", "routing", "telemetry")


def over_defaults(raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`raw` (a file's tables) with what it leaves out taken from `defaults` (the packaged file's)."""
    merged = dict(raw)
    for key in _KEY_BY_KEY:
        mine = raw.get(key, {})
        if key in defaults and isinstance(mine, Mapping):  # a non-table is left for parse_config to name
            merged[key] = {**defaults[key], **mine}
    own_providers = "providers" in raw
    providers = raw["providers"] if own_providers else defaults["providers"]
    if own_providers and isinstance(providers, Mapping):
        providers = {name: _provider_over_built_in(p, defaults["providers"].get(name)) for name, p in providers.items()}
    merged["providers"] = providers
    models, aliases = raw.get("models", {}), raw.get("aliases", {})
    if not (isinstance(providers, Mapping) and isinstance(models, Mapping) and isinstance(aliases, Mapping)):
        return merged
    if own_providers and "models" in raw:
        return merged
    named = set(models) | set(aliases)  # the file's names win over the defaults', tier or alias alike
    models = {name: _over_built_in(tier, defaults["models"].get(name)) for name, tier in models.items()}
    tiers = {name: tier for name, tier in defaults["models"].items()  # a replaced tier keeps its place
             if name not in aliases and (name in models or _served(tier["chain"], providers))}
    if providers and not tiers and not models:
        raise ConfigError("models: at least one virtual model is required (the built-in tiers name only the "
                          f"providers {', '.join(defaults['providers'])}, and [providers] gives neither)")
    merged["models"] = {**tiers, **models}
    merged["aliases"] = {**{name: to for name, to in defaults["aliases"].items()
                            if name not in named and (to in merged["models"] or _served([to], providers))},
                         **aliases}
    return merged


def explain(message: str, raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """`message` (an error in the merged file) with a note when it names a built-in tier the merge left out."""
    providers = raw.get("providers")
    if not isinstance(providers, Mapping):
        return message
    for name, tier in defaults["models"].items():
        if f"'{name}'" not in message:
            continue
        if "models" in raw:
            if name not in (raw["models"] if isinstance(raw["models"], Mapping) else {}):
                return (f"{message} (the built-in tier '{name}' is not added: a file with both [providers] and "
                        "[models] gives all its tiers)")
            continue
        absent = [entry.split(":", 1)[0] for entry in tier["chain"] if entry.split(":", 1)[0] not in providers]
        if absent:
            return (f"{message} (the built-in tier '{name}' is left out: its chain names the provider "
                    f"'{absent[0]}', which [providers] does not give)")
    return message


def _provider_over_built_in(provider: Any, built_in: Mapping | None) -> Any:
    """A file's provider with no `base_url` named as a built-in one changes that provider: its keys over the
    built-in's (a key pool, `api_key_envs`, in place of the built-in's `api_key_env`). One with a `base_url` is
    whole: the built-in's `api_key_env` would send the Groq key to the file's host."""
    if built_in is None or not isinstance(provider, Mapping) or "base_url" in provider:
        return provider
    keys = {k: v for k, v in built_in.items() if not ("api_key_envs" in provider and k == "api_key_env")}
    return {**keys, **provider}


def _over_built_in(tier: Any, built_in: Mapping | None) -> Any:
    """A file's tier with no `chain` named as a built-in one changes that tier: its keys over the built-in's. One
    with a `chain` is a new tier under an old name, whole: the built-in's `params` (`reasoning_effort`) belong
    to the built-in's models."""
    if built_in is None or not isinstance(tier, Mapping) or "chain" in tier:
        return tier
    return {**built_in, **tier}


def _served(chain: list, providers: Mapping) -> bool:
    """Every entry of a default chain (all 'provider:model' strings) names a configured provider."""
    return all(entry.split(":", 1)[0] in providers for entry in chain)
