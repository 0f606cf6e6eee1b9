"""``dynamo-ext bench prefetch`` at a tiny size, on the real vLLM-CPU engine: it runs through
the CLI, prefetched chunks come from staging (from the pool, then from the worker's own disk
tier) and its last line is the JSON with the TTFT ratio per run."""

from __future__ import annotations

import json

import pytest

from dynamo_ext.cli import main

pytestmark = pytest.mark.engine


def test_bench_prefetch_json(capsys: pytest.CaptureFixture[str], tiny_model) -> None:
    argv = ["bench", "prefetch", "--prefixes", "2", "--emulated-latency-ms", "0"]
    assert main([*argv, "--model", str(tiny_model), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["source"] for r in res["runs"]] == ["pool", "disk"]
    pool, disk = res["runs"]
    # one prefix per arm, 7 blocks each: the prefetched one is promoted from RAM staging
    assert pool["chunks_staged"] == 7 and pool["chunks_read_on_path"] == 7
    assert disk["chunks_staged"] == 7 and disk["chunks_prefetched_from_disk"] == 7
    assert disk["chunks_read_on_path"] == 0  # the baseline's chunks came from the disk tier
    assert set(res["ttft_ratio_prefetch_vs_baseline"]) == {"0.0", "disk"}
    assert all(r > 0 for r in res["ttft_ratio_prefetch_vs_baseline"].values())
