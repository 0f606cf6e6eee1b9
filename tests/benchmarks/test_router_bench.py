"""``dynamo-ext bench router`` runs and reports every field (speed is judged by the
benchmark's own output, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_router_json_fields() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynamo_ext.cli",
            "bench",
            "router",
            "--workers",
            "8,64",
            "--blocks",
            "20000",
            "--queries",
            "50",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert [r["workers"] for r in res["results"]] == [8, 64]
    for r in res["results"]:
        for k in (
            "ingest_events_per_s",
            "route_p50_us",
            "route_p99_us",
            "route_p99_us_32k",
            "find_matches_p50_us_4k",
        ):
            assert r[k] > 0, k
        assert r["blocks"] >= 20000 and r["routed_hit_blocks"] > 0
    assert 0 < res["bytes_per_block"] < 1000
    assert set(res["targets"]) == {"ingest_events_per_s", "route_p99_us_64w_4k", "bytes_per_block"}
