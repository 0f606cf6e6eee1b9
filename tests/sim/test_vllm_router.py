"""vLLM's own router (``vllm-router`` 0.1.17) as a live replay arm, over a real mocker fleet.

The cause of its kv_aware policy's collapse to round robin's hit rate, shown both ways:
with the fleet's KV topic ``kv`` or a ``--kv-event-block-size`` other than the engines',
its index never finds a block (every lookup a miss, every request a least-loaded pick),
while configured as its authors intend (vLLM's empty topic, the engines' block size) every
repeat of a prompt finds the worker holding it. A prompt is first cached on a worker
chosen by the test, not by the router, so its tie-break cannot pass for a cache hit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from dynamo_ext.errors import ConfigError
from dynamo_ext.sim import replay, workloads
from dynamo_ext.sim.fleet import MockerFleet
from dynamo_ext.sim.model import MockerConfig
from dynamo_ext.sim.vllm_router import (
    VllmRouterError,
    VllmRouterProc,
    binary,
    diagnose,
    knob_args,
    knobs_from_args,
)

pytestmark = pytest.mark.skipif(
    binary() is None, reason="vllm-router not installed (pip install vllm-router==0.1.17)"
)


def test_kv_aware_finds_the_holder_only_on_vllms_topic_and_block_size() -> None:
    out = asyncio.run(diagnose())
    right = out["as_configured"]
    assert right["served"] == [2] * 8, right
    assert right["kv_lookups"] == {"hit": 8, "miss": 0}, right
    # every repeat found 9 of its 10 blocks cached (the last prompt token is computed)
    assert right["cached_prompt_tokens"] == 8 * 9 * 64, right

    wrong_topic, wrong_bs = out["topic_kv"], out["block_size_16"]
    assert wrong_topic["kv_lookups"] == {"hit": 0, "miss": 8}, wrong_topic
    assert wrong_bs["router_block_size"] == 16, wrong_bs
    assert wrong_bs["kv_lookups"] == {"hit": 0, "miss": 8}, wrong_bs
    # Blind, it still sends every repeat to one worker (its least-loaded tie-break on an
    # idle fleet) and the engine caches them after the first: what passed for KV routing.
    for blind in (wrong_topic, wrong_bs):
        assert len(blind["served"]) == 8 and len(set(blind["served"])) == 1, blind


def test_the_settings_that_blind_kv_aware_are_refused_by_default() -> None:
    cfg = MockerConfig(block_size=64, num_gpu_blocks=64)
    with pytest.raises(VllmRouterError, match="topic"):
        VllmRouterProc(MockerFleet(2, cfg, topic="kv"), "kv_aware")
    with pytest.raises(VllmRouterError, match="block-size"):
        VllmRouterProc(MockerFleet(2, cfg, topic=""), "kv_aware", block_size=16)
    # cache_aware reads no events: any topic will do
    VllmRouterProc(MockerFleet(2, cfg, topic="kv"), "cache_aware")


def test_knobs_go_to_the_policy_that_has_them() -> None:
    assert knob_args("cache_aware", {"balance_abs_threshold": 16.0}) == [
        "--balance-abs-threshold",
        "16",
    ]
    with pytest.raises(ConfigError, match="not a kv_aware knob"):
        knob_args("kv_aware", {"cache_threshold": 0.5})
    ns = argparse.Namespace(vllm_router_knobs='{"cache_threshold": 0.5, "router_temperature": 0.1}')
    assert knobs_from_args(ns, "vllm_router_cache") == {"cache_threshold": 0.5}
    assert knobs_from_args(ns, "vllm_router_kv") == {"router_temperature": 0.1}
    with pytest.raises(ConfigError, match="unknown"):
        knobs_from_args(argparse.Namespace(vllm_router_knobs='{"nope": 1}'), "vllm_router_kv")


def test_live_replay_hit_rate_above_round_robin(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A short multi-turn chat replay, live: both vllm-router arms find more cached prefix
    than round robin, each request is booked on the worker that served it, and its index
    answered lookups."""
    rows = workloads.chat(60, 1.0)
    trace = tmp_path / "chat.jsonl"
    trace.write_text("".join(r.raw + "\n" for r in rows))
    ap = argparse.ArgumentParser()
    replay.add_arguments(ap)
    args = ap.parse_args(
        [str(trace), "--workers", "4", "--speedup", "1", "--live", "--time-scale", "10"]
        + ["--limit", "60"]
        + ["--plot", "none", "--json", "--policies", "round_robin,vllm_router_kv,vllm_router_cache"]
    )
    assert replay.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["policies"]
    rr = out["round_robin"]["prefix_hit_rate"]
    for name in ("vllm_router_kv", "vllm_router_cache"):
        pol = out[name]
        assert pol["completed"] == 60 and pol["ttft_p50_ms"] > 0, pol
        assert pol["prefix_hit_rate"] > rr + 0.1, (name, pol["prefix_hit_rate"], rr)
        info = pol["vllm_router"]
        assert info["unmatched"] == 0 and info["lost"] == 0, info
    assert out["vllm_router_kv"]["vllm_router"]["kv_lookups"]["hit"] > 10
    # not every request on one worker (the imbalance of 4 workers is at most 4)
    assert out["vllm_router_kv"]["load_imbalance"] < 3.5


def test_offline_replay_refuses_the_live_only_arm(tmp_path: Path) -> None:
    ap = argparse.ArgumentParser()
    replay.add_arguments(ap)
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(r.raw + "\n" for r in workloads.chat(4, 1.0)))
    args = ap.parse_args([str(trace), "--plot", "none", "--json", "--policies", "vllm_router_kv"])
    with pytest.raises(ConfigError, match="--live only"):
        replay.run_replay(args)
