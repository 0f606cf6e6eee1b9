"""Round robin in our simulator vs in Dynamo's (``ai-dynamo-runtime``'s
``run_mocker_trace_replay``), part 2 of ``dynamo-ext bench simcheck``.

The same trace and engine limits (block size, KV blocks, batch budget, sequence limit) in
both; first each with its own timing (our ``llama-3-8b-bf16@h100-sxm`` roofline, Dynamo's
default mocker timing), then both with every step the same fixed length (our
``LinearTiming`` with only a per-step constant, Dynamo's ``fixed`` timing model:
``{"type": "fixed", "prefill_ms", "decode_ms"}`` in its engine args), which leaves only
how each schedules and prices a batch. Probes beside the trace: one request alone (its
TTFT and decode step in each, for several prompt lengths) and one step that mixes a
prefill with a decode (how each prices it).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from dynamo_ext.sim.model import H100_PRESET, LinearTiming, MockerConfig, timing_preset
from dynamo_ext.sim.trace import TracePrompts, TraceRow, load_trace

TRACE_BLOCK = 512


def dynamo_engine_args(mcfg: MockerConfig, fixed_ms: float | None = None) -> dict[str, Any]:
    """Dynamo's mocker engine with our engine's limits (as ``peers.run_dynamo``), and with
    ``fixed_ms`` its ``fixed`` timing model (every prefill and decode step that long)."""
    engine: dict[str, Any] = {
        "block_size": mcfg.block_size,
        "num_gpu_blocks": mcfg.gpu_blocks(),
        "max_num_batched_tokens": mcfg.max_num_batched_tokens,
        "max_num_seqs": mcfg.max_num_seqs,
        "enable_prefix_caching": mcfg.enable_prefix_caching,
    }
    if fixed_ms is not None:
        engine["timing_model"] = {"type": "fixed", "prefill_ms": fixed_ms, "decode_ms": fixed_ms}
    return {"engine": engine, "num_gpu_blocks_is_explicit": True}


def dynamo_rr(
    trace_lines: list[str],
    workers: int,
    speedup: float,
    mcfg: MockerConfig,
    trace_block_size: int,
    fixed_ms: float | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Dynamo's simulator, round robin: (its summary in our figure names, per request)."""
    from dynamo._core import run_mocker_trace_replay  # type: ignore[import-not-found]

    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.jsonl"
        trace.write_text("".join(line + "\n" for line in trace_lines))
        res = run_mocker_trace_replay(
            [str(trace)],
            extra_engine_args=dynamo_engine_args(mcfg, fixed_ms),
            num_workers=workers,
            router_mode="round_robin",
            replay_mode="offline",
            arrival_speedup_ratio=speedup,
            trace_block_size=trace_block_size,
            capture_per_request=True,
        )
    s = res.summary
    per = list(res.per_request or [])
    fig = {
        "ttft_p50_ms": round(s["median_ttft_ms"], 2),
        "ttft_p90_ms": round(s["p90_ttft_ms"], 2),
        "ttft_p99_ms": round(s["p99_ttft_ms"], 2),
        "itl_p50_ms": round(s["median_itl_ms"], 3),
        "itl_p99_ms": round(s["p99_itl_ms"], 3),
        "e2e_p50_ms": round(s["median_e2e_latency_ms"], 2),
        "prefix_hit_rate": round(s["prefix_cache_reused_ratio"], 4),
        "throughput_tok_s": round(s["total_throughput_tok_s"], 1),
    }
    return fig, per


def _ours_rr(
    rows: list[TraceRow], workers: int, speedup: float, mcfg: MockerConfig, tbs: int
) -> dict[str, Any]:
    from dynamo_ext.sim.replay import policy, simulate
    from dynamo_ext.sim.report import summarize

    prompts = TracePrompts(rows, mcfg.block_size, tbs, mcfg.hash_algo)
    s = summarize(simulate(policy("round_robin"), mcfg, prompts, workers, speedup, 0.5))
    keep = ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
    return {k: s[k] for k in (*keep, "e2e_p50_ms", "prefix_hit_rate", "throughput_tok_s")}


def step_probe(mcfg: MockerConfig, fixed_ms: float | None = None) -> list[dict[str, Any]]:
    """Per-step time of each simulator for the same batches: one request alone (ISL,
    8 output tokens) on one engine; Dynamo's TTFT and median ITL beside ours."""
    t = mcfg.timing
    out = []
    for k, isl in enumerate((128, 1024, 4096, 8192, 16384)):
        line = json.dumps(
            {
                "timestamp": 0,
                "input_length": isl,
                "output_length": 8,
                "hash_ids": list(range(k * 100, k * 100 + math.ceil(isl / TRACE_BLOCK))),
            }
        )
        fig, per = dynamo_rr([line], 1, 1.0, mcfg, TRACE_BLOCK, fixed_ms)
        p = per[0] if per else {}
        ours_ttft = sum(
            t.step_seconds(c, c * s + c * (c + 1) / 2, 0)
            for s, c in _chunks(isl, mcfg.max_num_batched_tokens)
        )
        out.append(
            {
                "isl": isl,
                "dynamo_ttft_ms": round(float(p.get("ttft_ms") or float("nan")), 3),
                "ours_ttft_ms": round(ours_ttft * 1e3, 3),
                "dynamo_decode_step_ms": fig["itl_p50_ms"],
                "ours_decode_step_ms": round(t.step_seconds(1, 0, isl + 4) * 1e3, 3),
            }
        )
    return out


def mixed_step_probe(mcfg: MockerConfig, fixed_ms: float) -> dict[str, Any]:
    """How each simulator prices a step that mixes a prefill with decodes: one request
    decoding when a second arrives, every step ``fixed_ms``; the longest gap between the
    first request's tokens is that mixed step."""
    from dynamo_ext.sim.replay import policy, simulate

    rows = [
        TraceRow(
            0.0,
            128,
            40,
            [900],
            json.dumps(
                {"timestamp": 0, "input_length": 128, "output_length": 40, "hash_ids": [900]}
            ),
        ),
        TraceRow(
            10 * fixed_ms,
            128,
            2,
            [901],
            json.dumps(
                {
                    "timestamp": 10 * fixed_ms,
                    "input_length": 128,
                    "output_length": 2,
                    "hash_ids": [901],
                }
            ),
        ),
    ]
    cfg = msgspec.structs.replace(
        mcfg,
        timing=LinearTiming(name="fixed", overhead_s=fixed_ms / 1e3),
        num_gpu_blocks=mcfg.gpu_blocks(),
    )
    run_ = simulate(
        policy("round_robin"), cfg, TracePrompts(rows, cfg.block_size, TRACE_BLOCK), 1, 1.0, 0.5
    )
    from dynamo._core import run_mocker_trace_replay  # type: ignore[import-not-found]

    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "mixed.jsonl"
        trace.write_text("".join(r.raw + "\n" for r in rows))
        res = run_mocker_trace_replay(
            [str(trace)],
            extra_engine_args=dynamo_engine_args(cfg, fixed_ms),
            num_workers=1,
            router_mode="round_robin",
            replay_mode="offline",
            trace_block_size=TRACE_BLOCK,
        )
    return {
        "step_ms": fixed_ms,
        "ours_longest_gap_ms": round(max(run_.itl) * 1e3, 3),
        "dynamo_longest_gap_ms": round(float(res.summary.get("max_itl_ms") or float("nan")), 3),
    }


def _chunks(isl: int, budget: int) -> list[tuple[int, int]]:
    out = []
    s = 0
    while s < isl:
        c = min(budget, isl - s)
        out.append((s, c))
        s += c
    return out


def rr_vs_dynamo(
    trace: Path, limit: int, workers: int, speedup: float, fixed_ms: float = 20.0
) -> dict[str, Any]:
    """Round robin on the same trace and engine limits: (1) our H100 preset vs Dynamo's own
    timing; (2) both simulators with every step ``fixed_ms`` long (our ``LinearTiming``
    with only a per-step constant, Dynamo's ``fixed`` timing model), which leaves only
    scheduling and cache differences."""
    from dynamo_ext.sim.peers import dynamo_available

    mcfg = MockerConfig(block_size=16, timing=timing_preset(H100_PRESET))
    rows = load_trace(trace, limit)
    out: dict[str, Any] = {
        "setup": {
            "trace": str(trace),
            "requests": len(rows),
            "workers": workers,
            "speedup": speedup,
            "block_size": mcfg.block_size,
            "gpu_blocks_per_worker": mcfg.gpu_blocks(),
            "max_num_batched_tokens": mcfg.max_num_batched_tokens,
            "max_num_seqs": mcfg.max_num_seqs,
        },
        "own_timing": {"ours_rr": _ours_rr(rows, workers, speedup, mcfg, TRACE_BLOCK)},
    }
    if not dynamo_available():
        return out
    lines = [r.raw for r in rows]
    own = out["own_timing"]
    own["dynamo_rr"] = dynamo_rr(lines, workers, speedup, mcfg, TRACE_BLOCK)[0]
    own["ratios_ours_over_dynamo"] = _ratio_keys(own["ours_rr"], own["dynamo_rr"])
    out["step_time_own"] = step_probe(mcfg)
    fixed = msgspec.structs.replace(
        mcfg,
        timing=LinearTiming(name=f"fixed-{fixed_ms}ms", overhead_s=fixed_ms / 1e3),
        num_gpu_blocks=mcfg.gpu_blocks(),  # the same cache as above (KV bytes differ)
    )
    same: dict[str, Any] = {"step_ms": fixed_ms}
    same["ours_rr"] = _ours_rr(rows, workers, speedup, fixed, TRACE_BLOCK)
    same["dynamo_rr"] = dynamo_rr(lines, workers, speedup, fixed, TRACE_BLOCK, fixed_ms)[0]
    same["ratios_ours_over_dynamo"] = _ratio_keys(same["ours_rr"], same["dynamo_rr"])
    out["same_step_cost"] = same
    out["step_time_fixed"] = step_probe(fixed, fixed_ms)
    out["mixed_step"] = mixed_step_probe(mcfg, fixed_ms)
    return out


def _ratio_keys(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    return {k: round(a[k] / b[k], 3) if b.get(k) else None for k in a if k in b}
