"""Dynamo, run as its authors ship it, on the simulator's workloads (``ai-dynamo-runtime``).

* ``DynamoCore``: Dynamo's own worker-selection core, ``dynamo._core.SelectionService``
  (its KV indexer, active-sequence tracker and scheduler), subscribed to the same vLLM-format
  ZMQ KV streams of the same mocker fleet as our router. It hashes the token ids itself
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

import asyncio
import itertools
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynamo_ext.errors import DynamoExtError
from dynamo_ext.protocol import MEDIUM_GPU, BlockRemoved, BlockStored
from dynamo_ext.sim.model import MockerConfig
from dynamo_ext.sim.report import DYNAMO_ROWS, imbalance
from dynamo_ext.sim.trace import TraceRow

if TYPE_CHECKING:
    from dynamo_ext.publisher import KvEventPublisher

# Dynamo's KvRouterConfig knobs that its SelectionService reads (from DYN_* environment
# variables, when it is constructed: the Python constructor takes no config, and a request's
# router_config_override is not applied by select_and_reserve in 1.6.1, measured).
DYNAMO_KNOBS = {
    "overlap_score_credit": "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT",
    "overlap_score_credit_decay": "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT_DECAY",
    "prefill_load_scale": "DYN_ROUTER_PREFILL_LOAD_SCALE",
    "router_temperature": "DYN_ROUTER_TEMPERATURE",
    "host_cache_hit_weight": "DYN_ROUTER_HOST_CACHE_HIT_WEIGHT",
    "disk_cache_hit_weight": "DYN_ROUTER_DISK_CACHE_HIT_WEIGHT",
    "router_queue_threshold": "DYN_ROUTER_QUEUE_THRESHOLD",
    "decode_active_request_weight": "DYN_ROUTER_DECODE_ACTIVE_REQUEST_WEIGHT",
}
# Sentinel blocks of the barrier: token ids past any vocabulary, hashes in their own range.
_SENTINEL_TOKEN = 1 << 30
_SENTINEL_HASH = 0x5E47_1E00_0000_0000


def dynamo_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("dynamo._core") is not None
    except (ImportError, ValueError):
        return False


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


class DynamoCore:
    """Dynamo's ``SelectionService`` over a fleet's KV streams; workers are 0..n-1."""

    def __init__(
        self,
        block_size: int,
        knobs: Mapping[str, Any] | None = None,
        *,
        model: str = "mocker",
        indexer_threads: int = 1,
    ) -> None:
        os.environ.setdefault("DYN_LOG", "error")  # before the import: its logger reads it once
        from dynamo._core import SelectionService  # type: ignore[import-not-found]

        bad = sorted(set(knobs or ()) - set(DYNAMO_KNOBS))
        if bad:
            raise DynamoExtError(f"unknown Dynamo knob(s) {bad}; one of {sorted(DYNAMO_KNOBS)}")
        self.block_size = block_size
        self.model = model
        self.knobs = dict(knobs or {})
        saved = {env: os.environ.get(env) for env in DYNAMO_KNOBS.values()}
        try:
            for env in DYNAMO_KNOBS.values():
                os.environ.pop(env, None)  # only the knobs given here, never a stray one
            for k, v in self.knobs.items():
                os.environ[DYNAMO_KNOBS[k]] = str(v)
            self._svc = SelectionService(indexer_threads=indexer_threads)
        finally:
            for env, v in saved.items():
                if v is None:
                    os.environ.pop(env, None)
                else:
                    os.environ[env] = v
        self._workers: list[int] = []
        self._barriers = itertools.count()

    async def add_worker(
        self,
        worker: int,
        *,
        kv_events_endpoint: str,
        replay_endpoint: str | None,
        http_endpoint: str,
        total_kv_blocks: int,
        max_num_batched_tokens: int,
    ) -> None:
        await self._svc.upsert_worker(
            {
                "worker_id": worker,
                "model_name": self.model,
                "endpoint": http_endpoint,
                "block_size": self.block_size,
                "kv_events_endpoint": kv_events_endpoint,
                "replay_endpoint": replay_endpoint,
                "total_kv_blocks": total_kv_blocks,
                "max_num_batched_tokens": max_num_batched_tokens,
            }
        )
        self._workers.append(worker)

    async def select(self, request_id: str, token_ids: Sequence[int]) -> tuple[int, int, str]:
        """Select and book: (worker, device-cached prefix blocks it predicts, endpoint)."""
        req: dict[str, Any] = {
            "model_name": self.model,
            "token_ids": list(token_ids),
            "selection_id": request_id,
        }
        d = await self._svc.select_and_reserve(req)
        hit = int((d.get("overlap") or {}).get("gpu") or 0) // self.block_size
        return int(d["worker_id"]), hit, str(d.get("endpoint") or "")

    async def book(self, request_id: str, worker: int, token_ids: Sequence[int]) -> None:
        """Book a request's load on a given worker (no selection)."""
        await self._svc.create_reservation(
            {
                "model_name": self.model,
                "token_ids": list(token_ids),
                "selection_id": request_id,
                "worker_id": worker,
            }
        )

    async def prefill_done(self, request_id: str) -> None:
        await self._svc.prefill_complete(request_id)

    async def finished(self, request_id: str) -> None:
        await self._svc.free_reservation(request_id)

    async def overlap_blocks(self, token_ids: Sequence[int]) -> dict[int, int]:
        """Device-cached prefix blocks per worker, as its indexer sees them now."""
        d = await self._svc.overlap_scores({"model_name": self.model, "token_ids": list(token_ids)})
        return {int(w["worker_id"]): int(w.get("device_blocks") or 0) for w in d["workers"]}

    async def barrier(self, pubs: Mapping[int, KvEventPublisher], timeout_s: float = 10.0) -> None:
        """Return once every batch published so far on ``pubs`` is applied.

        Each publisher sends one sentinel block after its batches; a worker's stream is
        applied in order, so once its indexer holds the sentinel it holds what came before.
        The sentinel is removed again right after (its tokens match no prompt)."""
        if not pubs:
            return
        k = next(self._barriers)
        bs = self.block_size
        tokens = [_SENTINEL_TOKEN + k] + [_SENTINEL_TOKEN] * (bs - 1)
        h = _SENTINEL_HASH + k
        stored = [BlockStored([h], None, tokens, bs, None, MEDIUM_GPU, None)]
        for p in pubs.values():
            p.publish(stored)  # type: ignore[arg-type]
        start = time.monotonic()
        resend = start + 0.2
        delay = 0.0002
        while True:
            seen = await self.overlap_blocks(tokens)
            missing = [w for w in pubs if seen.get(w, 0) < 1]
            if not missing:
                break
            now = time.monotonic()
            if now > start + timeout_s:
                raise DynamoExtError(f"SelectionService barrier timed out (workers {missing})")
            if now > resend:  # a SUB still joining drops what was sent before it joined
                for w in missing:
                    pubs[w].publish(stored)  # type: ignore[arg-type]
                resend = now + 0.2
            await asyncio.sleep(delay)
            delay = min(0.005, delay * 2)
        removed = [BlockRemoved([h], MEDIUM_GPU)]
        for p in pubs.values():
            p.publish(removed)  # type: ignore[arg-type]

    def close(self) -> None:
        self._svc.shutdown()
