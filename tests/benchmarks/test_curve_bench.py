"""``curve_bench`` end to end on a tiny workload: both arms run over real sockets, every
route is answered, and the ratios are reported."""

from __future__ import annotations

from dynamo_ext.benchmarks.curve_bench import bench_curve


def test_curve_bench_reports_both_arms_and_ratios() -> None:
    out = bench_curve(workers=2, blocks=1024, routes=40, rounds=1)
    for arm in ("plain", "curve"):
        assert out[f"{arm}_ingest_events_per_s"] > 0
        assert 0 < out[f"{arm}_route_p50_us"] <= out[f"{arm}_route_p99_us"]
    assert out["ingest_ratio"] > 0 and out["route_p50_ratio"] > 0
