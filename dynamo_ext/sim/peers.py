"""Dynamo, run as its authors ship it, on the simulator's workloads (``ai-dynamo-runtime``).

* ``DynamoCore`` (from ``dynamo_ext.frontend.dynamo_core``, the frontend's ``dynamo_core``
  routing backend uses it too): Dynamo's own worker-selection core,
  ``dynamo._core.SelectionService`` (its KV indexer, active-sequence tracker and
  scheduler), subscribed to the same vLLM-format ZMQ KV streams of the same mocker fleet
  as our router. It hashes the token ids itself
  (prompts and ``BlockStored.token_ids``), tracks its own reservations
  (``select_and_reserve`` / ``prefill_complete`` / ``free_reservation``); its knobs are
  ``KvRouterConfig``'s (``DYNAMO_KNOBS``: overlap credit, prefill load scale, temperature,
  host and disk hit weights, queue threshold). ``barrier`` waits until it has applied every
  batch published so far, so that in a virtual-time replay each of its decisions sees the
  same events applied as ours does.
* ``run_dynamo``: its own simulator and KV router (``run_mocker_trace_replay``) on the same
  trace, with its engines given our block size, cache size and batching limits unless
  asked for its defaults; its timing model is its own.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynamo_ext.frontend.dynamo_core import DYNAMO_KNOBS, DynamoCore, dynamo_available
from dynamo_ext.sim.model import MockerConfig
from dynamo_ext.sim.report import DYNAMO_ROWS, imbalance
from dynamo_ext.sim.trace import TraceRow

__all__ = ["DYNAMO_KNOBS", "DynamoCore", "dynamo_available", "run_dynamo"]


def run_dynamo(
    rows: Sequence[TraceRow],
    workers: int,
    speedup: float,
    mcfg: MockerConfig | None,
    trace_block_size: int,
) -> dict[str, tuple[dict[str, Any], list[float]]]:
    """``{row name: (figures, sorted TTFTs ms)}`` from Dynamo's offline replay."""
    os.environ.setdefault("DYN_LOG", "error")  # before the import: its logger reads it once
    from dynamo._core import run_mocker_trace_replay  # type: ignore[import-not-found]

    engine: dict[str, Any] | None = None
    if mcfg is not None:
        engine = {
            "engine": {
                "block_size": mcfg.block_size,
                "num_gpu_blocks": mcfg.gpu_blocks(),
                "max_num_batched_tokens": mcfg.max_num_batched_tokens,
                "max_num_seqs": mcfg.max_num_seqs,
                "enable_prefix_caching": mcfg.enable_prefix_caching,
            },
            "num_gpu_blocks_is_explicit": True,
        }
    out: dict[str, tuple[dict[str, Any], list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.jsonl"
        trace.write_text("".join(r.raw + "\n" for r in rows))
        for mode, name in (("round_robin", DYNAMO_ROWS[0]), ("kv_router", DYNAMO_ROWS[1])):
            t = time.perf_counter()
            res = run_mocker_trace_replay(
                [str(trace)],
                extra_engine_args=engine,
                num_workers=workers,
                router_mode=mode,
                replay_mode="offline",
                arrival_speedup_ratio=speedup,
                trace_block_size=trace_block_size,
                capture_per_request=True,
            )
            wall = time.perf_counter() - t
            s = res.summary
            per = res.per_request or []
            load = [0.0] * workers
            for p in per:
                w = p.get("decode_worker_idx")
                if isinstance(w, int) and 0 <= w < workers:
                    load[w] += (p.get("input_length") or 0) + (p.get("output_length") or 0)
            ttfts = sorted(float(p["ttft_ms"]) for p in per if p.get("ttft_ms") is not None)
            fig = {
                "ttft_p50_ms": round(s["median_ttft_ms"], 2),
                "ttft_p90_ms": round(s["p90_ttft_ms"], 2),
                "ttft_p99_ms": round(s["p99_ttft_ms"], 2),
                "ttft_mean_ms": round(s["mean_ttft_ms"], 2),
                "itl_p50_ms": round(s["median_itl_ms"], 3),
                "itl_p99_ms": round(s["p99_itl_ms"], 3),
                "e2e_p50_ms": round(s["median_e2e_latency_ms"], 2),
                "e2e_p99_ms": round(s["p99_e2e_latency_ms"], 2),
                "throughput_tok_s": round(s["total_throughput_tok_s"], 1),
                "output_tok_s": round(s["output_throughput_tok_s"], 1),
                "prefix_hit_rate": round(s["prefix_cache_reused_ratio"], 4),
                "load_imbalance": round(imbalance(load), 3) if per else None,
                "completed": s.get("completed_requests"),
                "sim_span_s": round(s["duration_ms"] / 1e3, 2),
                "wall_s": round(wall, 2),
            }
            out[name] = (fig, ttfts)
    return out
