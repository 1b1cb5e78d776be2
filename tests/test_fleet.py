"""The fleet simulation of benchmarks/fleet.py, small: every sidecar and follower converges through deltas."""

from __future__ import annotations

from benchmarks import fleet

from .servers import require_binary


def test_a_small_fleet_follows_one_change_through_deltas() -> None:
    require_binary("redis-server", "redis-server")
    results = fleet.run(serve=2, follower_count=30, per_process=15, rules=300, repeats=2)
    serve, delta, full = results["serve"], results["followers_delta"], results["followers_full"]
    assert serve["all_serving"]
    assert (serve["via_delta"], serve["fallbacks"]) == (2, 0)
    assert (delta["serving"], delta["via_delta"], delta["fallbacks"], delta["rejections"]) == (30, 30, 0, 0)
    assert (full["serving"], full["via_delta"], full["rejections"]) == (30, 0, 0)
    # Even at 300 rules, the deltas move a fraction of what full fetches move.
    assert delta["redis_egress_bytes"] < full["redis_egress_bytes"] / 2
    assert results["apply"]["idle_bytes_per_poll"] < 200
    report = fleet.markdown(results)
    assert "Extrapolated to 10,000 sidecars" in report
    print(report)
