"""The upstream side: one shared HTTP client (proxy/upstream/http1.py), per-provider origins, paths and headers, and
the rule that decides whether a failed attempt falls over to the next model or goes back to the client."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from proxy.app.config import Config, ProviderConfig
from proxy.upstream.http1 import Client, Origin, split_url

# Statuses that say nothing about the request itself: the next model may well answer.
# 401/403 are here too: they are about the proxy's provider key, not the client's request; 407 likewise is about
# the operator's HTTP_PROXY credentials (a forward proxy answers an http origin's request itself).
FALLOVER_STATUSES = frozenset({401, 403, 407, 408, 409, 429, 498})
# Statuses that are failures only with these error codes (otherwise the request is at fault).
FALLOVER_CODES = {404: "model_not_found", 400: "model_decommissioned", 413: "rate_limit_exceeded"}


class AttemptFailed(Exception):
    """An attempt that failed in a way another model may not: the chain moves on."""

    def __init__(self, reason: str, detail: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    origin: Origin
    chat_path: str
    embeddings_path: str
    headers: dict[str, str]  # the first key's (or no key's): what a one-key provider always sends
    key_headers: tuple[dict[str, str], ...]  # one per pool key, in api_key_envs order
    key_names: tuple[str, ...]  # a pool's variables' names: what spans, logs and metrics call a key
    first_byte_s: float
    total_s: float
    connect_s: float
    pool_idle_s: float
    base: str = ""  # the base URL's path and query: where the other endpoints are (`path`)
    query: str = ""

    def path(self, endpoint: str) -> str:
        """The upstream path of an endpoint under the base URL ("responses", "audio/speech")."""
        return f"{self.base}/{endpoint}{self.query}"

    @classmethod
    def from_config(cls, cfg: ProviderConfig) -> "Provider":
        # No Accept-Encoding at all would let the upstream pick any encoding (RFC 9110, 12.5.3); the client
        # decodes none, so it says so.
        common = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        keys = cfg.api_keys or (cfg.api_key,)
        key_headers = tuple({**common, "Authorization": f"Bearer {key}"} if key else common for key in keys)
        origin, base, query = split_url(cfg.base_url)
        return cls(
            name=cfg.name,
            origin=origin,
            chat_path=f"{base}/chat/completions{query}",
            embeddings_path=f"{base}/embeddings{query}",
            headers=key_headers[0],
            key_headers=key_headers,
            # Named only in a pool: with one key there is nothing to tell apart (and nothing extra to record).
            key_names=cfg.api_key_envs if len(cfg.api_key_envs) > 1 else ("",),
            first_byte_s=cfg.first_byte_timeout_s,
            total_s=cfg.timeout_s,
            connect_s=cfg.connect_timeout_s,
            pool_idle_s=cfg.pool_idle_s,
            base=base,
            query=query,
        )


class Upstreams:
    """Owns the client every attempt goes through; opened and closed with the app."""

    def __init__(self, config: Config) -> None:
        self.providers = {name: Provider.from_config(cfg) for name, cfg in config.providers.items()}
        self.client: Client | None = None

    async def open(self) -> None:
        self.client = Client()
        self._limit_idle()

    def sharing(self, config: Config) -> "Upstreams":
        """A reload's providers over this client: its pooled connections stay warm (they are kept per origin).
        The one that opened the client closes it."""
        other = Upstreams(config)
        other.client = self.client
        other._limit_idle()
        return other

    def _limit_idle(self) -> None:
        for provider in self.providers.values():
            self.client.limit_idle(provider.origin, provider.pool_idle_s)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    @property
    def ready(self) -> bool:
        return self.client is not None and not self.client.closed


def retry_after_of(headers) -> float | None:
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return float(value)
        except ValueError:
            return None
    return None


def error_of(body: bytes) -> tuple[str | None, str | None]:
    """The (code, message) of an OpenAI/Groq error body, as far as it has them."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        code, message = err.get("code"), err.get("message")
        return (code if isinstance(code, str) else None), (message if isinstance(message, str) else None)
    if isinstance(err, str):
        return None, err
    return None, None


# Codes that say the model itself is not there. In a chain they fall over (the operator's config is stale and the
# next model may answer); when the client named the one model itself, they are the answer to its request.
MODEL_CODES = frozenset({"model_not_found", "model_decommissioned"})


def classify(status: int, body: bytes, headers, *, chain: bool = True) -> AttemptFailed | None:
    """An AttemptFailed when this non-200 answer should fall over; None when it belongs to the client.
    `chain` is False when the client named one real model rather than a virtual model."""
    code, message = error_of(body)
    # Only a 4xx can be the request's fault. Anything else but 200 (a redirect, which is not followed: the key
    # stays with its origin; a 204) is about the provider or its base_url, and means nothing to the client.
    if status in FALLOVER_STATUSES or not 400 <= status < 500:
        retry_after = retry_after_of(headers) if status == 429 else None
        reason = "rate_limited" if status == 429 else f"status_{status}"
        detail = f"{status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
        return AttemptFailed(reason, detail[:300], status=status, retry_after=retry_after)
    if code is not None and FALLOVER_CODES.get(status) == code and (chain or code not in MODEL_CODES):
        return AttemptFailed(code, f"{status} {code}" + (f": {message}" if message else ""), status=status)
    return None
