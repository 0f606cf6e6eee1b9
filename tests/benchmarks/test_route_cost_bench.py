"""``dynamo-ext bench route-cost`` at a small scale: every contender answers every prompt,
our routers and Dynamo's core see the same fleet (speed is the benchmark's own output,
never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dynamo_ext import native
from dynamo_ext.sim.peers import dynamo_available


@pytest.mark.skipif(not (native.available() and dynamo_available()), reason="needs both")
def test_bench_route_cost_json_fields() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "bench", "route-cost", "--workers", "8",
         "--blocks", "4096", "--queries", "20", "--ingest-blocks", "4096", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout  # fmt: skip
    res = json.loads(out.strip().splitlines()[-1])
    (fleet,) = res["fleets"]
    assert fleet["workers"] == 8 and fleet["blocks"] == 4096
    contenders = {"ours_socket", "ours_socket_hashes", "ours_socket_python", "dynamo",
                  "ours_embedded", "dynamo_embedded"}
    assert contenders | {"ours_inproc", "ours_inproc_python", "ours_socket_floor"} == set(
        fleet["route"]
    )
    for name in contenders:
        assert 0 < fleet["route"][name]["p50_us"] <= fleet["route"][name]["p99_us"]
        assert fleet["free"][name]["p50_us"] > 0
    # Prompts continue one worker's chain: both sides find the same cached prefix on
    # the worker they pick (the same index state, from the same streams).
    assert fleet["same_hit_blocks_as_dynamo"] >= 0.9
    # the embedded pair (each router in a process of its own) sees the same state too
    assert fleet["same_hit_blocks_embedded"] >= 0.9
    emb = fleet["route"]["ours_embedded"]
    assert emb["p99_x_faster_than_dynamo_embedded"] > 0
    ing = res["ingest"]
    # every stream (rounds at once + rounds alone, new tokens each) stays indexed
    assert ing["held_distinct_blocks"] >= 0.9 * 2 * ing["rounds"] * ing["heap_distinct_blocks"] > 0
    assert ing["ours_s"] > 0 and ing["dynamo_s"] > 0
    assert len(ing["at_once"]["ours_s"]) == len(ing["alone"]["dynamo_s"]) == ing["rounds"]
    assert ing["ours_cpu_s"] > 0 and ing["dynamo_cpu_s"] > 0
    assert res["zmq_asyncio_roundtrip"]["p50_us"] > 0
    assert 0 < res["zmq_blocking_roundtrip"]["p50_us"] <= res["zmq_blocking_roundtrip"]["p99_us"]
    assert set(res["targets"]) == {
        "transport_floor_p99_us",
        "route_p99_us_8w",
        "route_p99_x_faster_than_dynamo_8w",
        "ingest_x_faster_than_dynamo",
    }
    t = res["targets"]["route_p99_us_8w"]
    assert t["measured"] == emb["p99_us"] and t["socket_measured"] == fleet["route"]["ours_socket"]["p99_us"]
    # the README block renders from these results, the embedded pair in it
    from dynamo_ext.sim.render import route_cost_markdown

    md = "\n".join(route_cost_markdown(res, None))
    assert "ours, embedded" in md and "Dynamo, embedded" in md
    assert f"{res['host']['cpus']} CPUs, load average" in md  # as the run recorded it
    assert f"{emb['p50_us']:.0f} / {emb['p99_us']:.0f}" in md
