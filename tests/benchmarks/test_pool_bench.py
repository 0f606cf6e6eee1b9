"""``dynamo-ext bench pool`` at a tiny size: it runs through the CLI and its last line is the
JSON the issue asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamo_ext.cli import main


def test_bench_pool_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "pool", "--root", str(tmp_path), "--chunk-mb", "0.25", "--total-mb", "2"]
    assert main([*argv, "--repeats", "2", "--sweep-chunks", "300", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    for k in (
        "write_ratio_vs_plain",
        "read_ratio_vs_plain",
        "write_mb_s_pool",
        "write_mb_s_plain",
        "read_mb_s_pool",
        "read_mb_s_plain",
    ):
        assert res[k] > 0, k
    assert isinstance(res["target_met"], bool)
    assert res["regime"] == "cold" and set(res["regimes"]) == {"cold", "hot"}
    assert res["chunk_bytes"] == 1 << 18 and res["chunks_per_repeat"] == 8
    for r in res["regimes"].values():
        assert r["pool_hits"] == 2 * 2 * 8 and r["pool_corrupt"] == 0
    sw = res["sweep"]
    assert sw["chunks"] == 300 and sw["removed"] == 3  # the follower got all 3 removals
    assert sw["full_scan_ms"] > 0 and sw["follow_journal_ms"] > 0
    assert list(tmp_path.iterdir()) == []  # the bench cleans up after itself
