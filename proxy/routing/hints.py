"""What a request asks of the router in its headers: a latency target, hedging on or off and its delay, a tier.

Read once per request with four header look-ups; a request that sets none of them costs nothing more. A value
that is not what the header takes is the client's mistake: 400, naming the header.
"""

from __future__ import annotations

from proxy.app.errors import ProxyError

MAX_LATENCY = "x-max-latency-ms"
HEDGE = "x-hedge"
HEDGE_AFTER = "x-hedge-after-ms"
MODEL_TIER = "x-model-tier"
REQUEST_TYPE = "x-request-type"


class Hints:
    __slots__ = ("max_latency_ms", "hedge", "hedge_after_ms", "tier")

    def __init__(self) -> None:
        self.max_latency_ms: float | None = None
        self.hedge: bool | None = None  # None: as the tier says
        self.hedge_after_ms: float | None = None
        self.tier: str | None = None


NONE = Hints()


def _milliseconds(name: str, value: str, minimum: float) -> float:
    try:
        ms = float(value.strip())
    except ValueError:
        ms = float("nan")
    if not (ms >= minimum) or ms > 86_400_000:  # also refuses NaN and inf
        raise ProxyError(400, f"The header {name} must be a number of milliseconds from {minimum:g} to 86400000, "
                         f"got {value[:40]!r}.", param=name, code="invalid_header")
    return ms


def read_hints(headers) -> Hints:
    latency = headers.get(MAX_LATENCY)
    hedge = headers.get(HEDGE)
    after = headers.get(HEDGE_AFTER)
    tier = headers.get(MODEL_TIER)
    if latency is None and hedge is None and after is None and tier is None:
        return NONE
    hints = Hints()
    if latency is not None:
        hints.max_latency_ms = _milliseconds(MAX_LATENCY, latency, 1)
    if hedge is not None:
        word = hedge.strip().lower()
        if word not in ("on", "off"):
            raise ProxyError(400, f"The header {HEDGE} must be `on` or `off`, got {hedge[:40]!r}.", param=HEDGE,
                             code="invalid_header")
        hints.hedge = word == "on"
    if after is not None:
        hints.hedge_after_ms = _milliseconds(HEDGE_AFTER, after, 0)
    if tier is not None:
        hints.tier = tier.strip()
    return hints
