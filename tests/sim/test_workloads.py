"""Generated workloads: the reuse each kind promises, and the infinite-cache hit rate."""

from __future__ import annotations

import pytest

from dynamo_ext.errors import ConfigError
from dynamo_ext.sim import workloads as W
from dynamo_ext.sim.trace import TraceRow


def _row(ts: float, ids: list[int], n: int) -> TraceRow:
    return TraceRow(ts, n, 1, ids, "")


def test_physical_limit_counts_blocks_whose_whole_prefix_was_seen() -> None:
    rows = [
        _row(0, [1, 2], 1024),  # nothing seen yet
        _row(1, [1, 2, 3], 1536),  # 1024 tokens seen: 16 blocks of 64
        _row(2, [1, 9], 1024),  # only the first 512 (8 blocks)
        _row(3, [1, 2], 1024),  # all but the last block (last token always computed)
    ]
    hit = (16 + 8 + 15) * 64
    assert W.physical_limit_hit_rate(rows, 64) == pytest.approx(hit / (1024 + 1536 + 1024 + 1024))
    assert W.physical_limit_hit_rate([_row(0, [5], 500), _row(1, [5], 500)], 64) == pytest.approx(
        7 * 64 / 1000
    )


def test_fleet_limit_is_one_lru_cache_of_the_given_size() -> None:
    # two 8-block prompts alternating: an infinite cache hits from the third request on;
    # a 10-block LRU never holds both, so each evicts the other (0 hits); 16 blocks hold both
    rows = [_row(i, [100 + i % 2], 512) for i in range(6)]
    inf = W.physical_limit_hit_rate(rows, 64)
    assert inf == pytest.approx(4 * 7 * 64 / (6 * 512))
    assert W.physical_limit_hit_rate(rows, 64, capacity_blocks=10) == 0.0
    assert W.physical_limit_hit_rate(rows, 64, capacity_blocks=16) == pytest.approx(inf)
    # a hit refreshes a block: A B A(hit) C evicts B, not A, from a 16-block LRU
    rows = [_row(0, [1], 512), _row(1, [2], 512), _row(2, [1], 512), _row(3, [3], 512)]
    rows += [_row(4, [1], 512)]
    assert W.physical_limit_hit_rate(rows, 64, capacity_blocks=16) == pytest.approx(
        2 * 7 * 64 / (5 * 512)
    )


def test_each_kind_has_its_reuse_and_arrives_in_order() -> None:
    limits = {}
    for kind in W.KINDS:
        rows = W.generate(kind, 300, 4.0, seed=1)
        assert len(rows) == 300
        ts = [r.arrival_ms for r in rows]
        assert ts == sorted(ts)
        assert all(0 < r.input_length <= 512 * len(r.hash_ids) for r in rows)
        limits[kind] = W.physical_limit_hit_rate(rows, 64)
    assert limits["noreuse"] == 0.0
    assert limits["agentic"] > limits["tenants"] > 0.5 and limits["chat"] > 0.4
    # Multi-turn chat: a later turn extends an earlier prompt of its conversation.
    rows = W.chat(100, 2.0)
    firsts = {r.hash_ids[0] for r in rows}
    assert len(firsts) < len(rows)
    with pytest.raises(ConfigError, match="unknown workload"):
        W.generate("nope", 10, 1.0)


def test_workload_command_writes_a_trace_the_replay_reads(tmp_path, capsys) -> None:
    import argparse
    import json

    from dynamo_ext.sim.trace import load_trace

    ap = argparse.ArgumentParser()
    W.add_arguments(ap)
    out = tmp_path / "t.jsonl"
    assert W.main(ap.parse_args(["tenants", "--requests", "50", "--out", str(out)])) == 0
    info = json.loads(capsys.readouterr().out)
    rows = load_trace(out)
    assert len(rows) == info["requests"] == 50
    assert info["physical_limit_hit_rate"] == round(W.physical_limit_hit_rate(rows, 64), 4)


def test_ttft_floor_is_the_prompts_own_prefill_past_what_an_infinite_cache_holds() -> None:
    calls: list[tuple[int, float]] = []

    def step(tokens: int, pairs: float, ctx: int) -> float:
        calls.append((tokens, pairs))
        return tokens / 1000  # 1 ms a token

    rows = [_row(0, [1, 2], 1024), _row(1, [1, 2], 1024)]
    floor = W.ttft_floor_ms(rows, 64, step, max_batched_tokens=512)
    # first: 1024 tokens in two chunks; second: all but the last block cached (64 left)
    assert floor == pytest.approx([1024.0, 64.0])
    assert [c[0] for c in calls] == [512, 512, 64]
    assert calls[1][1] == 512 * 513 / 2 + 512 * 512  # the second chunk attends to the first
