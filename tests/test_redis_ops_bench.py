"""`python -m bench.redis_ops`, the measurement behind the README's Redis-per-request table, run small: each
feature's figures come from a real redis-server's commandstats, and they say what the README says."""

from __future__ import annotations

from bench.redis_ops import FEATURES, main_async


async def test_redis_commands_per_request_by_feature():
    rows = {row["feature"]: row for row in await main_async(40, 8)}
    assert set(rows) == set(FEATURES)
    for name in ("auth only", "request_budget"):  # nothing reaches Redis
        for mode in ("sequential", "8 at a time"):
            assert rows[name][mode]["round_trips_per_request"] == 0
            assert rows[name][mode]["commands_in_scripts_per_request"] == 0
    for name in ("token_budget", "rate_limit", "concurrency", "all four"):
        alone, together = rows[name]["sequential"], rows[name]["8 at a time"]
        assert alone["round_trips_per_request"] == 2  # admit and settle, whatever the policies
        assert together["round_trips_per_request"] < 2  # requests in flight share calls
        assert alone["commands_in_scripts_per_request"] > 0 and alone["redis_script_us_per_request"] > 0
    one = max(rows[n]["sequential"]["commands_in_scripts_per_request"]
              for n in ("token_budget", "rate_limit", "concurrency"))
    assert rows["all four"]["sequential"]["commands_in_scripts_per_request"] > one
