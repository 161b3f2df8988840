"""The live model-catalogue check: is every configured chain entry still served by its provider?

Groq retires model ids; a gateway that routes to a retired id fails every request with 404. This asks each
provider for its models (the groq SDK for Groq-style base URLs, a plain GET on the SDK's httpx client for others)
and reports. Both read the proxy variables as httpx does, which is how the requests read them too.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from proxy.app.config import Config
from proxy.telemetry.logs import redact

_GROQ_SUFFIX = "/openai/v1"


@dataclass(frozen=True)
class ProviderCatalogue:
    provider: str
    models: frozenset[str] | None  # None when the catalogue could not be fetched
    error: str | None = None


@dataclass(frozen=True)
class EntryStatus:
    where: str  # e.g. "models.tier-fast.chain[0]" or "aliases.llama3-8b-8192"
    target: str
    available: bool | None  # None: unknown (catalogue not fetched)


async def fetch_catalogue(provider_name: str, base_url: str, api_key: str | None, timeout_s: float = 10.0):
    try:
        if base_url.endswith(_GROQ_SUFFIX):
            from groq import AsyncGroq

            client = AsyncGroq(
                api_key=api_key or "none", base_url=base_url[: -len(_GROQ_SUFFIX)], timeout=timeout_s, max_retries=1
            )
            async with client:
                page = await client.models.list()
            return ProviderCatalogue(provider_name, frozenset(m.id for m in page.data))
        from groq import DefaultAsyncHttpxClient

        # The groq SDK's own httpx client: it reads HTTP(S)_PROXY and NO_PROXY as the Groq check does, and as the
        # requests do (proxy/upstream/proxy_env.py), so every provider is checked the way it will be reached.
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        async with DefaultAsyncHttpxClient(timeout=timeout_s) as http:
            resp = await http.get(f"{base_url}/models", headers=headers)
            resp.raise_for_status()
            body = orjson.loads(resp.content)
        return ProviderCatalogue(provider_name, frozenset(m["id"] for m in body.get("data", [])))
    except Exception as exc:  # any failure to fetch is reported, never fatal by itself
        return ProviderCatalogue(provider_name, None, redact(f"{type(exc).__name__}: {exc}")[:300])


async def check(config: Config) -> tuple[dict[str, ProviderCatalogue], list[EntryStatus]]:
    used = {t.provider for vm in config.models.values() for t in vm.chain}
    used |= {to.split(":", 1)[0] for to in config.aliases.values() if ":" in to}
    catalogues = {}
    for name in sorted(used):
        p = config.providers[name]
        catalogues[name] = await fetch_catalogue(name, p.base_url, p.api_key, min(p.timeout_s, 10.0))
    entries = []
    for vm in config.models.values():
        for i, target in enumerate(vm.chain):
            entries.append(_status(f"models.{vm.name}.chain[{i}]", target.key, catalogues))
    for alias, to in config.aliases.items():
        if ":" in to:
            entries.append(_status(f"aliases.{alias}", to, catalogues))
    return catalogues, entries


def _status(where: str, key: str, catalogues: dict[str, ProviderCatalogue]) -> EntryStatus:
    provider, model = key.split(":", 1)
    models = catalogues[provider].models
    return EntryStatus(where, key, None if models is None else model in models)


def render(config: Config, catalogues: dict[str, ProviderCatalogue], entries: list[EntryStatus]) -> str:
    lines = []
    for name, cat in catalogues.items():
        if cat.models is None:
            lines.append(f"provider {name}: catalogue unavailable ({cat.error})")
        else:
            lines.append(f"provider {name}: {len(cat.models)} models served")
    lines.append("")
    for e in entries:
        mark = {True: "available", False: "MISSING", None: "unknown"}[e.available]
        if e.where.startswith("aliases."):
            lines.append(f"  {e.where[8:]:<28} -> {e.target:<40} {mark}")
        else:
            lines.append(f"  {e.where:<28} {e.target:<43} {mark}")
    return "\n".join(lines)
