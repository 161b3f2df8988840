"""The status page's rolling counts: a window of buckets that forgets what is older than it, rows fixed by the
config whatever names come in, with an injected clock."""

from __future__ import annotations

from proxy.telemetry.recent import OTHER, SLOT_S, SLOTS, RecentCounts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_counts_fall_out_of_the_window_bucket_by_bucket():
    clock = Clock()
    counts = RecentCounts(["tier-fast"], ("requests", "errors"), clock)
    counts.add("tier-fast", "requests")
    counts.add("tier-fast", "errors")
    clock.now += 45  # four buckets later
    counts.add("tier-fast", "requests")
    assert counts.totals("tier-fast") == {"requests": 2, "errors": 1}
    assert counts.totals("tier-fast", 60) == {"requests": 2, "errors": 1}
    assert counts.totals("tier-fast", 10) == {"requests": 1, "errors": 0}  # the current bucket only
    clock.now += SLOT_S * SLOTS - 45  # the first bucket is now a whole window old
    assert counts.totals("tier-fast") == {"requests": 1, "errors": 0}
    clock.now += 45
    assert counts.totals("tier-fast") == {"requests": 0, "errors": 0}


def test_a_bucket_reused_by_the_ring_starts_from_zero():
    clock = Clock()
    counts = RecentCounts(["m"], ("answered",), clock)
    for _ in range(5):
        counts.add("m", "answered")
    clock.now += SLOT_S * SLOTS  # the same slot of the ring, one window later
    counts.add("m", "answered")
    assert counts.totals("m") == {"answered": 1}


def test_names_outside_the_config_share_one_row():
    counts = RecentCounts(["tier-fast"], ("requests",), Clock())
    for i in range(1000):
        counts.add(f"client-name-{i}", "requests")
    assert counts.names() == ["tier-fast", OTHER]
    assert counts.totals(OTHER) == {"requests": 1000}
    assert counts.totals("client-name-3") == {"requests": 0}


def test_a_reload_keeps_the_rows_of_names_still_configured():
    clock = Clock()
    before = RecentCounts(["tier-fast", "tier-old"], ("requests",), clock)
    for name in ("tier-fast", "tier-old", "made-up"):
        before.add(name, "requests")
    after = RecentCounts(["tier-fast", "tier-new"], ("requests",), previous=before)
    assert after.names() == ["tier-fast", "tier-new", OTHER]
    assert [after.totals(n)["requests"] for n in after.names()] == [1, 0, 1]
    after.add("tier-old", "requests")  # no longer configured: `other` now
    assert after.totals(OTHER) == {"requests": 2}
