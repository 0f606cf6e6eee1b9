"""``dynamo-ext bench replay``: trace synthesis, and a short replay of the sample trace with
every policy (and Dynamo's own simulator when installed) that must report every field and
show the property KV routing exists for: more prefix hits than round robin."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from dynamo_ext.errors import ConfigError
from dynamo_ext.hashing import BlockHasher
from dynamo_ext.sim import peers, replay, report, trace

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "synthetic_trace.jsonl"
if not SAMPLE.exists():  # a clone without the shared folder: the trace's first 200 requests
    SAMPLE = Path(__file__).parent / "fixtures" / "mooncake_synthetic_head200.jsonl"
FIELDS = (
    "ttft_p50_ms",
    "ttft_p90_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "e2e_p50_ms",
    "throughput_tok_s",
    "prefix_hit_rate",
    "load_imbalance",
)


def _trace(tmp_path: Path, rows: list[dict]) -> Path:
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_prompts_share_prefixes_as_their_hash_ids(tmp_path: Path) -> None:
    p = _trace(
        tmp_path,
        [
            {"timestamp": 5, "input_length": 1100, "output_length": 3, "hash_ids": [7, 8, 9]},
            {"timestamp": 0, "input_length": 700, "output_length": 2, "hash_ids": [7, 4]},
            {"timestamp": 9, "input_length": 600, "output_length": 1, "hash_ids": [7]},
        ],
    )
    rows = trace.load_trace(p)
    assert [r.input_length for r in rows] == [700, 1100, 600]  # sorted by arrival
    pr = trace.TracePrompts(rows, 64)
    a, b, c = (pr.tokens(i) for i in range(3))
    assert len(a) == 700 and len(b) == 1100 and len(c) == 600
    assert a[:512] == b[:512] and a[512:600] != b[512:600]  # same id, same 512 tokens
    assert c[:512] == a[:512]  # ids cover less than input_length: a unique tail follows
    for i, toks in enumerate((a, b, c)):
        assert pr.hashes[i].tolist() == BlockHasher(64).hash_tokens(toks)
    assert pr.hashes[0][:8] == pr.hashes[1][:8] and pr.hashes[0][8] != pr.hashes[1][8]
    # Block sizes that do not divide the trace's are hashed without the block cache.
    odd = trace.TracePrompts(rows, 48)
    assert odd.hashes[1].tolist() == BlockHasher(48).hash_tokens(b)


def test_bad_trace_line_is_named(tmp_path: Path) -> None:
    p = _trace(tmp_path, [{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}])
    p.write_text(p.read_text() + '{"timestamp": 1}\n')
    with pytest.raises(ConfigError, match=r"t.jsonl:2"):
        trace.load_trace(p)


def test_replay_sample_trace_all_policies(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ap = argparse.ArgumentParser()
    replay.add_arguments(ap)
    png = tmp_path / "replay.png"
    args = ap.parse_args([str(SAMPLE), "--limit", "200", "--workers", "8", "--plot", str(png)])
    assert replay.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "ttft p50" in lines[0]  # the text table comes first
    out = json.loads(lines[-1])
    assert out["workers"] == 8 and out["requests"] == 200
    names = list(replay.ALL_POLICIES)
    if peers.dynamo_available():
        names += list(report.DYNAMO_ROWS) + list(replay.PEER_POLICIES)
    assert set(out["policies"]) == set(names)
    for name in names:
        pol = out["policies"][name]
        for f in FIELDS:
            assert isinstance(pol[f], int | float) and pol[f] >= 0, (name, f)
        assert pol["ttft_p50_ms"] <= pol["ttft_p90_ms"] <= pol["ttft_p99_ms"], name
    ours = {n: out["policies"][n] for n in replay.ALL_POLICIES}
    for pol in ours.values():
        assert pol["completed"] == 200 and 0 < pol["utilization"] <= 1
    # The property: routing on the prefix index finds more cached prefixes than rotation.
    assert ours["kv"]["prefix_hit_rate"] > ours["round_robin"]["prefix_hit_rate"]
    assert ours["kv"]["prefix_hit_rate"] > ours["random"]["prefix_hit_rate"]
    # What the router predicted was what the engines then found (events are exact).
    assert abs(ours["kv"]["router_predicted_hit_rate"] - ours["kv"]["gpu_hit_rate"]) < 0.02
    assert "ours_rr_over_kv_ttft_p50" in out["ratios"] and png.stat().st_size > 10_000


@pytest.mark.skipif(not peers.dynamo_available(), reason="needs ai-dynamo-runtime")
def test_dynamo_core_offline_and_live_on_the_same_fleet(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Dynamo's SelectionService as a replay arm: offline behind the barrier it agrees with
    our re-implementation of its cost (same events, same decisions up to ties), and live it
    routes the real mocker fleet over its KV streams and finds the prefixes it caches."""
    ap = argparse.ArgumentParser()
    replay.add_arguments(ap)
    common = [str(SAMPLE), "--workers", "4", "--plot", "none", "--json", "--no-dynamo"]
    args = ap.parse_args([*common, "--limit", "120", "--policies", "dynamo,dynamo_core"])
    assert replay.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["policies"]
    core, ours = out["dynamo_core"], out["dynamo"]
    assert core["completed"] == 120
    assert abs(core["prefix_hit_rate"] - ours["prefix_hit_rate"]) < 0.02
    # Its prediction is what the engines then found: the barrier holds.
    assert abs(core["router_predicted_hit_rate"] - core["gpu_hit_rate"]) < 0.02
    args = ap.parse_args(
        [*common, "--limit", "24", "--live", "--time-scale", "20", "--policies", "kv,dynamo_core"]
    )
    assert replay.main(args) == 0
    live = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert live["mode"] == "live" and set(live["policies"]) == {"kv", "dynamo_core"}
    for pol in live["policies"].values():
        assert pol["completed"] == 24 and pol["ttft_p50_ms"] > 0
