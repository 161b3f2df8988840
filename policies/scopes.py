"""Whose counter a request counts against (`per`), the calendar periods of budgets, and how times are written."""

from __future__ import annotations

import calendar
import hashlib
import time
from datetime import datetime, timezone

PERIODS = ("minute", "hour", "day", "month")


def scope(ctx, per: str) -> str:
    """The counter's owner. Without [auth], `key` and `user` are both the request's `user` (else anonymous);
    `team` falls back to the key when the key has none, so a key without a team is never pooled with others."""
    identity = ctx.identity
    if per == "global":
        return "all"
    if per == "model":
        value = ctx.route.virtual or ctx.route.requested
    elif per == "team" and identity.team:
        value = "t:" + identity.team
    elif per == "user" or identity.key is None:
        value = "u:" + (identity.user or "anonymous")
    else:
        value = "k:" + identity.key
    if len(value) > 80 or not value.isprintable() or " " in value:  # a client's `user` field: keep keys tidy
        value = "h:" + hashlib.sha1(value.encode(errors="replace")).hexdigest()
    return value


def period_bounds(period: str, now: float | None = None) -> tuple[int, int]:
    """(start, end) in epoch seconds of the UTC calendar period holding `now`."""
    now = time.time() if now is None else now
    if period == "minute":
        start = int(now // 60 * 60)
        return start, start + 60
    if period == "hour":
        start = int(now // 3600 * 3600)
        return start, start + 3600
    if period == "day":
        start = int(now // 86400 * 86400)
        return start, start + 86400
    t = datetime.fromtimestamp(now, timezone.utc)
    start = int(datetime(t.year, t.month, 1, tzinfo=timezone.utc).timestamp())
    days = calendar.monthrange(t.year, t.month)[1]
    return start, start + days * 86400


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: float) -> str:
    """Groq's way of writing a reset time: `7.66s`, `2m59.56s`."""
    if seconds < 0.005:  # the usual reset of a bucket far from its limit: no formatting
        return "0.00s"
    if seconds < 60:
        return "%.2fs" % (seconds if seconds > 0 else 0.0)
    minutes, rest = divmod(seconds, 60)
    return "%dm%.2fs" % (minutes, rest)
