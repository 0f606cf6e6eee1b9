"""``dynamo-ext bench replay TRACE``: routing quality at fleet scale, by trace replay.

A Mooncake trace (JSON lines: ``timestamp`` ms, ``input_length``, ``output_length``,
``hash_ids`` of 512-token blocks) is replayed at its arrival times, compressed by
``--speedup`` (the load multiplier, as Dynamo's ``arrival_speedup_ratio``), in virtual time:
a discrete-event simulation of ``--workers`` simulated vLLM engines (``MockerCore``: paged
prefix cache, chunked-prefill batching, roofline step times) behind OUR REAL router logic, a
``RouterService`` embedded in this process. The router is fed what it would get over its
sockets: every step's KV events encoded as vLLM's msgpack ``KVEventBatch`` and passed
through its sequence-checking ingest (``KvIngest.on_live``), ``WorkerMetrics`` encoded and
decoded every ``--metrics-period`` virtual seconds, ``route`` for each arrival,
``PrefillFinished`` at the first token and ``RequestFinished`` at the last, as our frontend
sends them. Nothing waits on a clock, so an hour of trace replays in seconds to minutes.

Prompts: ``sim.trace`` (token ids synthesized from ``hash_ids``, hashed with the router's own
block hash). Figures, table and plot: ``sim.report``.

Policies, compared on the same trace and fleet in one call: ``round_robin``,
``least_loaded``, ``random``, ``dynamo`` (Dynamo's cost formula in our scorer), ``kv`` (our
scorer with the router's default weights), ``kv_offload`` (the same scorer, engines
with a CPU offload tier), and ``dynamo_core``: Dynamo's own selection core
(``SelectionService``, ``--dynamo-knobs`` for its ``KvRouterConfig`` knobs) fed the same
engines' KV events over real ZMQ, each of its decisions behind a barrier so that it sees
the same events applied as ours does. Beside them, Dynamo's own simulator and KV router on the same
trace (``dynamo._core.run_mocker_trace_replay`` of ``ai-dynamo-runtime``, rows
``dynamo_mocker_rr`` and ``dynamo_mocker_kv``), with its engines given our block size,
cache size and batching limits (``--dynamo-native`` keeps Dynamo's defaults); its timing
model is its own.

Output: a text table, a PNG (``--plot``: TTFT CDF and prefix hit rate per policy) and, last,
one JSON line: ``{"policies": {name: {ttft_p50_ms, ttft_p90_ms, ttft_p99_ms, itl_p50_ms,
e2e_p50_ms, throughput_tok_s, prefix_hit_rate, load_imbalance, ...}}, "workers", "requests",
"ratios", ...}``. ``throughput_tok_s`` is prompt plus output tokens per second of the
replay's span; ``prefix_hit_rate`` the share of prompt tokens found cached (GPU or CPU) when
the engine first admitted the request; ``load_imbalance`` the busiest worker's routed
tokens over the mean (1.0 = even), computed the same way for Dynamo's rows.

``--live``: the same trace through the real router process and mocker sockets (routing by
token ids over ZMQ, streaming over HTTP), or for ``dynamo_core`` through Dynamo's
SelectionService subscribed to the same fleet's KV streams, for small ``--limit``; its
latencies include this machine's scheduling noise.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import logging
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dynamo_ext.config import RouterConfig, ScorerConfig
from dynamo_ext.errors import ConfigError
from dynamo_ext.protocol import (
    KVEventBatch,
    PrefillFinished,
    RequestFinished,
    RouteRequest,
    RouteResponse,
    WorkerMetrics,
    WorkerRegistration,
    encode,
    metrics_decoder,
    seq_bytes,
)
from dynamo_ext.sim.model import MockerConfig, MockerCore, SimRequest, StepResult
from dynamo_ext.sim.peers import dynamo_available, run_dynamo
from dynamo_ext.sim.report import (
    SLO_TPOT_MS,
    SLO_TTFT_MS,
    PolicyRun,
    Rec,
    plot,
    ratios,
    summarize,
    table,
)
from dynamo_ext.sim.trace import TracePrompts, load_trace
from dynamo_ext.sim.vllm_router import VLLM_ROUTER_POLICIES, knobs_from_args, live_arm
from dynamo_ext.sim.workloads import physical_limit_hit_rate

ALL_POLICIES = ("round_robin", "least_loaded", "random", "dynamo", "kv", "kv_offload")
# Dynamo's own selection core (``peers.DynamoCore``), fed by the same engines' KV streams;
# ``dynamo_core_offload``: the same on the engines of ``kv_offload`` (a CPU tier, whose
# BlockStored events carry medium "CPU": its host-pinned tier, host_cache_hit_weight).
PEER_POLICIES = ("dynamo_core", "dynamo_core_offload")

# Our scorer as the `kv` and `kv_offload` policies run it: the router's defaults, which
# weigh a block still to prefill 16x a block held by a running request (decode_weight
# 1/16): for time to first token a prefill block costs ~2 ms of GPU time and a held decode
# block far less. `dynamo-ext bench tune` sweeps these knobs (and Dynamo's, with the same
# budget); `dynamo-ext bench report` reports both, tuned and not.
KV_POLICY = ScorerConfig(mode="kv", seed=0)  # the router's defaults

# CPU offload tier of the `kv_offload` engines: 100 GB of pinned host memory per GPU
# (a typical 8-GPU H100 node has 1-2 TB of RAM), ~2x the GPU KV cache.
OFFLOAD_CPU_KV_GB = 100.0


# ======================================================================================
# Policies: our router (any scorer) or Dynamo's SelectionService, behind one interface
# ======================================================================================
@dataclass(frozen=True, slots=True)
class Policy:
    """A replay arm. ``scorer`` for our router; ``knobs`` (``peers.DYNAMO_KNOBS``) for
    Dynamo's SelectionService (``dynamo_core``); ``offload``: engines with a CPU tier."""

    name: str
    scorer: ScorerConfig | None = None
    knobs: dict[str, float] | None = None
    offload: bool = False

    @property
    def is_dynamo_core(self) -> bool:
        return self.scorer is None and self.name not in VLLM_ROUTER_POLICIES


def policy(name: str, knobs: dict[str, float] | None = None) -> Policy:
    """The policy a name stands for (``knobs``: ``dynamo_core``'s, default Dynamo's own)."""
    if name in PEER_POLICIES:
        return Policy(name, knobs=dict(knobs or {}), offload=name == "dynamo_core_offload")
    if name in VLLM_ROUTER_POLICIES:  # vLLM's own router, --live only (--vllm-router-knobs)
        return Policy(name)
    return Policy(name, scorer=scorer_for(name), offload=name == "kv_offload")


class OfflineRouter(Protocol):
    """What the virtual-time replay asks of a router. ``sync`` runs before each decision
    (a router fed over sockets waits there until the events so far are applied)."""

    async def route(self, rid: str, hashes: list[int], tokens: list[int]) -> tuple[int, int]:
        """(worker index, predicted prefix hit blocks)."""
        ...

    async def sync(self) -> None: ...
    async def on_step(self, w: int, res: StepResult) -> None: ...
    def on_metrics(self, w: int, m: WorkerMetrics) -> None: ...
    async def prefill_done(self, rid: str) -> None: ...
    async def finished(self, rid: str) -> None: ...
    async def close(self) -> None: ...


class OurRouter:
    """Our router logic in this process, fed what its sockets would get: every step's KV
    events as vLLM's msgpack ``KVEventBatch`` through its sequence-checking ingest, and
    metrics through the wire format."""

    def __init__(self, scorer: ScorerConfig, mcfg: MockerConfig, workers: int) -> None:
        from dynamo_ext.router.service import RouterService

        bs = mcfg.block_size
        self.bs = bs
        # Worker registrations of a simulated fleet are not news: keep the router quiet.
        logging.getLogger("dynamo_ext.router").setLevel(logging.WARNING)
        self.srv = srv = RouterService(
            RouterConfig(
                bind="tcp://127.0.0.1:0",
                metrics_port=None,
                block_size=bs,
                request_ttl_s=1e12,  # virtual time outruns the wall clock the TTL counts in
                scorer=scorer,
            )
        )
        ids = [f"worker-{i}" for i in range(workers)]
        self.entries = [
            srv.register(WorkerRegistration(wid, block_size=bs), static=True) for wid in ids
        ]
        if not mcfg.emit_token_ids:
            for e in self.entries:  # nothing to check the engine's hashes against
                e.stream.hash_checked = True
        self.pos = {wid: i for i, wid in enumerate(ids)}
        self.seqs = [0] * workers

    async def route(self, rid: str, hashes: list[int], tokens: list[int]) -> tuple[int, int]:
        resp = self.srv.route(
            RouteRequest(request_id=rid, block_hashes=hashes, num_tokens=len(tokens))
        )
        if not isinstance(resp, RouteResponse):
            raise RuntimeError(f"router refused request {rid}: {resp}")
        return self.pos[resp.worker_id], sum(resp.chosen.prefix_hit_blocks.values())

    async def sync(self) -> None:
        return None

    async def on_step(self, w: int, res: StepResult) -> None:
        payload = encode(KVEventBatch(ts=res.end, events=res.events))
        self.srv.ingest.on_live(self.entries[w].stream, [b"kv", seq_bytes(self.seqs[w]), payload])
        self.seqs[w] += 1

    def on_metrics(self, w: int, m: WorkerMetrics) -> None:
        self.srv.on_metrics(metrics_decoder.decode(encode(m)))

    async def prefill_done(self, rid: str) -> None:
        self.srv.dispatch(PrefillFinished(rid))

    async def finished(self, rid: str) -> None:
        self.srv.dispatch(RequestFinished(rid))

    async def close(self) -> None:
        return None


class DynamoRouter:
    """Dynamo's SelectionService (``peers.DynamoCore``) over real ZMQ: each simulated
    engine gets a vLLM-framed KV publisher, and ``sync`` is the core's barrier, so each of
    its decisions sees every event published before it applied, as ours does."""

    def __init__(self, knobs: dict[str, float], mcfg: MockerConfig, workers: int) -> None:
        from dynamo_ext.publisher import KvEventPublisher
        from dynamo_ext.sim.peers import DynamoCore

        self.mcfg = mcfg
        self.core = DynamoCore(mcfg.block_size, knobs)
        self.pubs = [
            KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0") for _ in range(workers)
        ]
        self.dirty: dict[int, Any] = {}
        self._started = False

    async def _start(self) -> None:
        for i, p in enumerate(self.pubs):
            await self.core.add_worker(
                i,
                kv_events_endpoint=p.endpoint,
                replay_endpoint=p.replay_endpoint,
                http_endpoint=f"sim://worker-{i}",
                total_kv_blocks=self.mcfg.gpu_blocks(),
                max_num_batched_tokens=self.mcfg.max_num_batched_tokens,
            )
        await self.core.barrier(dict(enumerate(self.pubs)))  # every SUB has joined
        self._started = True

    async def route(self, rid: str, hashes: list[int], tokens: list[int]) -> tuple[int, int]:
        w, hit, _ = await self.core.select(rid, tokens)
        return w, hit

    async def sync(self) -> None:
        if not self._started:
            await self._start()
        if self.dirty:
            await self.core.barrier(self.dirty)
            self.dirty = {}

    async def on_step(self, w: int, res: StepResult) -> None:
        self.pubs[w].publish(res.events, res.end)
        self.dirty[w] = self.pubs[w]

    def on_metrics(self, w: int, m: WorkerMetrics) -> None:
        return None  # Dynamo's selector tracks load from its own reservations

    async def prefill_done(self, rid: str) -> None:
        await self.core.prefill_done(rid)

    async def finished(self, rid: str) -> None:
        await self.core.finished(rid)

    async def close(self) -> None:
        self.core.close()
        for p in self.pubs:
            p.close()


def offline_router(pol: Policy, mcfg: MockerConfig, workers: int) -> OfflineRouter:
    if pol.name in VLLM_ROUTER_POLICIES:
        raise ConfigError("policies", f"{pol.name} is a real vllm-router process: --live only")
    if pol.scorer is None:
        return DynamoRouter(pol.knobs or {}, mcfg, workers)
    return OurRouter(pol.scorer, mcfg, workers)


# ======================================================================================
# One policy, in virtual time
# ======================================================================================
def simulate(
    pol: Policy,
    mcfg: MockerConfig,
    prompts: TracePrompts,
    workers: int,
    speedup: float,
    metrics_period_s: float,
) -> PolicyRun:
    return asyncio.run(_simulate(pol, mcfg, prompts, workers, speedup, metrics_period_s))


async def _simulate(
    pol: Policy,
    mcfg: MockerConfig,
    prompts: TracePrompts,
    workers: int,
    speedup: float,
    metrics_period_s: float,
) -> PolicyRun:
    rows = prompts.rows
    bs = mcfg.block_size
    t_wall = time.perf_counter()
    router = offline_router(pol, mcfg, workers)
    cores = [MockerCore(mcfg, f"worker-{i}") for i in range(workers)]
    heartbeat = [0] * workers
    sched: list[float | None] = [None] * workers
    recs = [Rec(r.arrival_ms / 1e3 / speedup, r.input_length, r.output_length) for r in rows]
    itl: array[float] = array("d")
    routed = [0] * workers
    run = PolicyRun(pol.name, recs, itl, cores, routed, 0.0, bs)
    # Events: (time, kind, order, arg). At equal times a finished step's KV events reach
    # the router before an arrival is routed, and metrics come last.
    WAKE, ARRIVE, METRICS = 0, 1, 2
    heap: list[tuple[float, int, int, int]] = [
        (rec.arrival, ARRIVE, i, i) for i, rec in enumerate(recs)
    ]
    heapq.heapify(heap)
    order = len(recs)
    heapq.heappush(heap, (0.0, METRICS, order, 0))
    order += 1
    pending = len(recs)

    async def on_step(w: int, res: StepResult) -> None:
        nonlocal pending
        if res.events:
            await router.on_step(w, res)
            run.kv_events += len(res.events)
        end = res.end
        for r in res.emitted:
            rec: Rec = r.tag
            if rec.first is None:
                rec.first = end
                await router.prefill_done(r.rid)
            else:
                itl.append(end - rec.last)  # type: ignore[operator]
            rec.last = end
        for r in res.finished:
            rec = r.tag
            rec.finish = end
            await router.finished(r.rid)
            r.tokens = []  # the prompt's token list is the bulk of a request's memory
            pending -= 1

    def reschedule(w: int) -> None:
        nonlocal order
        nt = cores[w].next_time()
        if nt is not None and nt != sched[w]:
            sched[w] = nt
            heapq.heappush(heap, (nt, WAKE, order, w))
            order += 1

    try:
        while heap and pending:
            t, kind, _, arg = heapq.heappop(heap)
            if kind == WAKE:
                if sched[arg] != t:
                    continue  # superseded
                sched[arg] = None
                res = cores[arg].advance(t)
                if res is not None:
                    await on_step(arg, res)
                reschedule(arg)
            elif kind == ARRIVE:
                i = arg
                row = rows[i]
                rec = recs[i]
                rid = f"r{i}"
                hashes = prompts.hashes[i].tolist()
                tokens = prompts.tokens(i)
                await router.sync()
                w, rec.predicted_hit_blocks = await router.route(rid, hashes, tokens)
                rec.worker = w
                routed[w] += row.input_length + row.output_length
                req = SimRequest(
                    rid, tokens, row.output_length, t, hashes, prompts.digests[i], tag=rec
                )
                if not cores[w].add_request(req, t):
                    rec.error = req.error
                    await router.finished(rid)
                    pending -= 1
                    continue
                res = cores[w].advance(t)
                if res is not None:
                    await on_step(w, res)
                reschedule(w)
            else:
                for w, core in enumerate(cores):
                    heartbeat[w] += 1
                    router.on_metrics(w, core.metrics(heartbeat[w], t))
                    run.metrics_msgs += 1
                heapq.heappush(heap, (t + metrics_period_s, METRICS, order, 0))
                order += 1
    finally:
        await router.close()
    run.wall_s = time.perf_counter() - t_wall
    return run


# ======================================================================================
# Entry points
# ======================================================================================
def mocker_config(args: argparse.Namespace, offload: bool = False) -> MockerConfig:
    cfg: dict[str, Any] = {
        "block_size": args.block_size,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
        # The router never checks hashes per block in a replay of trusted engines; token
        # ids are still sent (vLLM does) unless --no-token-ids.
        "emit_token_ids": not args.no_token_ids,
    }
    if args.num_gpu_blocks:
        cfg["num_gpu_blocks"] = args.num_gpu_blocks
    if args.gpu_kv_gb:
        cfg["gpu_kv_gb"] = args.gpu_kv_gb
    if offload:
        cfg["cpu_kv_gb"] = args.cpu_kv_gb
    from dynamo_ext.config import load_config

    # The file, then DYNAMO_EXT_MOCKER__* (as `dynamo-ext mocker` reads them), then flags.
    return load_config(MockerConfig, args.mocker_config, cfg, env_prefix="DYNAMO_EXT_MOCKER__")


def scorer_for(name: str) -> ScorerConfig:
    if name in ("kv", "kv_offload"):
        return KV_POLICY
    if name == "dynamo":
        # Dynamo's KV router defaults: overlap_score_weight 1, temperature 0 (argmin).
        return ScorerConfig(mode="dynamo", overlap_weight=1.0, temperature=0.0, seed=0)
    if name in ("round_robin", "random", "least_loaded"):
        return ScorerConfig(mode=name, seed=0)  # type: ignore[arg-type]
    known = ", ".join(ALL_POLICIES + PEER_POLICIES)
    raise ConfigError("policies", f"unknown policy {name!r} (one of {known})")


def _dynamo_knobs(args: argparse.Namespace) -> dict[str, float]:
    raw = getattr(args, "dynamo_knobs", None)
    if not raw:
        return {}
    try:
        knobs = json.loads(raw)
    except ValueError as exc:
        raise ConfigError("dynamo_knobs", f"not JSON: {exc}") from exc
    if not isinstance(knobs, dict):
        raise ConfigError("dynamo_knobs", "must be a JSON object of KvRouterConfig knobs")
    return knobs


def _policies(args: argparse.Namespace) -> list[Policy]:
    names = [p.strip() for p in (args.policies or "").split(",") if p.strip()]
    if not names:
        names = list(ALL_POLICIES) + (list(PEER_POLICIES) if dynamo_available() else [])
    out = [policy(n, _dynamo_knobs(args)) for n in names]
    if any(p.is_dynamo_core for p in out) and not dynamo_available():
        raise ConfigError("policies", "dynamo_core needs ai-dynamo-runtime (extra 'bench')")
    return out


def run_replay(args: argparse.Namespace) -> dict[str, Any]:
    policies = _policies(args)
    if args.workers <= 0:
        raise ConfigError("workers", "must be > 0")
    if args.speedup <= 0:
        raise ConfigError("speedup", "must be > 0")
    t0 = time.perf_counter()
    rows = load_trace(args.trace, args.limit)
    base = mocker_config(args)
    prompts = TracePrompts(rows, base.block_size, args.trace_block_size, base.hash_algo)
    # The precomputed hashes are the router's own: check on the first prompt.
    from dynamo_ext.hashing import BlockHasher

    check = BlockHasher(base.block_size, "engine", base.hash_algo).hash_tokens(prompts.tokens(0))
    if check != prompts.hashes[0].tolist():
        raise RuntimeError("replay prompt hashes differ from the router's BlockHasher")
    limit = physical_limit_hit_rate(rows, base.block_size)
    prep_s = time.perf_counter() - t0
    results: dict[str, dict[str, Any]] = {}
    ttfts: dict[str, list[float]] = {}
    for pol in policies:
        name = pol.name
        mcfg = mocker_config(args, offload=pol.offload)
        run = simulate(pol, mcfg, prompts, args.workers, args.speedup, args.metrics_period)
        results[name] = summarize(run, args.slo_ttft_ms, args.slo_tpot_ms, limit)
        ttfts[name] = sorted(
            (r.first - r.arrival) * 1e3  # type: ignore[operator]
            for r in run.recs
            if r.first is not None
        )
        if not args.json:
            print(f"  {name}: {results[name]['wall_s']} s", file=sys.stderr, flush=True)
    dynamo_note = None
    if not args.no_dynamo:
        if dynamo_available():
            dyn = run_dynamo(
                rows,
                args.workers,
                args.speedup,
                None if args.dynamo_native else base,
                args.trace_block_size,
            )
            for name, (fig, xs) in dyn.items():
                results[name] = fig
                ttfts[name] = xs
        else:
            dynamo_note = "ai-dynamo-runtime not installed (pip install 'dynamo-ext[bench]')"
    out: dict[str, Any] = {
        "policies": results,
        "workers": args.workers,
        "requests": len(rows),
        "ratios": ratios(results),
        "trace": str(args.trace),
        "speedup": args.speedup,
        "physical_limit_hit_rate": round(limit, 4),
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
        "block_size": base.block_size,
        "gpu_blocks_per_worker": base.gpu_blocks(),
        "cpu_blocks_per_worker_offload": mocker_config(args, offload=True).cpu_blocks()
        if any(p.offload for p in policies)
        else 0,
        "timing_model": base.timing.name,
        "kv_policy": {k: v for k, v in _struct_dict(KV_POLICY).items() if k != "seed"},
        "dynamo_core_knobs": _dynamo_knobs(args),
        "prep_s": round(prep_s, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    if dynamo_note:
        out["dynamo"] = dynamo_note
    if args.plot != "none":
        path = Path(args.plot or f"out/replay-{Path(args.trace).stem}-w{args.workers}.png")
        plot(
            path,
            ttfts,
            results,
            f"{Path(args.trace).name}: {len(rows)} requests, {args.workers} workers, "
            f"speedup {args.speedup}",
        )
        out["plot"] = str(path)
    return out


def _struct_dict(s: Any) -> dict[str, Any]:
    import msgspec

    return msgspec.to_builtins(s)  # type: ignore[no-any-return]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="Mooncake trace (JSON lines)")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument(
        "--policies",
        default="",
        help=f"comma separated, of {', '.join(ALL_POLICIES + PEER_POLICIES)} (default: all; "
        "dynamo_core when ai-dynamo-runtime is installed); with --live also "
        f"{', '.join(VLLM_ROUTER_POLICIES)} (vllm-router)",
    )
    p.add_argument(
        "--dynamo-knobs",
        help='dynamo_core\'s KvRouterConfig knobs as JSON, e.g. {"overlap_score_credit": 2}',
    )
    p.add_argument(
        "--vllm-router-knobs",
        help="--live vllm_router_kv/vllm_router_cache knobs as JSON, each to the policy that "
        'has it, e.g. {"balance_abs_threshold": 16, "router_temperature": 0.1}',
    )
    p.add_argument("--limit", type=int, default=0, help="first K requests only (0: all)")
    p.add_argument(
        "--speedup",
        type=float,
        default=4.0,
        help="arrival speedup: the trace's inter-arrival times are divided by it (load)",
    )
    p.add_argument("--block-size", type=int, default=64, help="KV block size (router, engines)")
    p.add_argument("--trace-block-size", type=int, default=512, help="tokens per hash_id")
    p.add_argument("--num-gpu-blocks", type=int, default=0, help="per engine (0: from GB)")
    p.add_argument("--gpu-kv-gb", type=float, default=0.0, help="per engine (0: default 52)")
    p.add_argument("--cpu-kv-gb", type=float, default=OFFLOAD_CPU_KV_GB, help="kv_offload tier")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--metrics-period", type=float, default=0.5, help="virtual s per metrics")
    p.add_argument("--mocker-config", help="YAML/TOML of MockerConfig fields (timing: ...)")
    p.add_argument("--no-token-ids", action="store_true", help="BlockStored without token ids")
    p.add_argument("--no-dynamo", action="store_true", help="skip Dynamo's own simulator")
    p.add_argument(
        "--dynamo-native",
        action="store_true",
        help="run Dynamo's mocker with its default cache and batching, not ours",
    )
    p.add_argument("--slo-ttft-ms", type=float, default=SLO_TTFT_MS, help="goodput: TTFT SLO")
    p.add_argument("--slo-tpot-ms", type=float, default=SLO_TPOT_MS, help="goodput: TPOT SLO")
    p.add_argument("--plot", default="", help="PNG path (default out/replay-...; 'none': off)")
    p.add_argument("--live", action="store_true", help="through the router process + sockets")
    p.add_argument("--time-scale", type=float, default=10.0, help="--live: virtual s per wall s")
    p.add_argument("--json", action="store_true", help="JSON line only (no table)")


def main(args: argparse.Namespace) -> int:
    if args.live:
        out = asyncio.run(run_live(args))
    else:
        out = run_replay(args)
    if not args.json:
        print(table(out["policies"]))
        r = out["ratios"]
        print(
            "\nTTFT over kv's, same simulator and run: round_robin p50 {} p99 {} | "
            "dynamo_core p50 {} p99 {} | dynamo (our formula) p50 {} p99 {}".format(
                r.get("ours_rr_over_kv_ttft_p50"),
                r.get("ours_rr_over_kv_ttft_p99"),
                r.get("dynamo_core_over_kv_ttft_p50"),
                r.get("dynamo_core_over_kv_ttft_p99"),
                r.get("ours_dynamo_over_kv_ttft_p50"),
                r.get("ours_dynamo_over_kv_ttft_p99"),
            )
        )
        if out.get("plot"):
            print(f"plot: {out['plot']}")
    print(json.dumps(out))
    return 0


# ======================================================================================
# --live: the real router process, mocker sockets, HTTP streaming
# ======================================================================================
async def run_live(args: argparse.Namespace) -> dict[str, Any]:
    policies = _policies(args)
    rows = load_trace(args.trace, args.limit or 50)
    base = mocker_config(args)
    prompts = TracePrompts(rows, base.block_size, args.trace_block_size, base.hash_algo)
    results: dict[str, dict[str, Any]] = {}
    ttfts: dict[str, list[float]] = {}
    t_all = time.perf_counter()
    limit = physical_limit_hit_rate(rows, base.block_size)
    for pol in policies:
        run = await _live_policy(pol, args, prompts)
        results[pol.name] = summarize(run, args.slo_ttft_ms, args.slo_tpot_ms, limit)
        if "vllm_router" in run.extra:  # its policy, knobs and index counters
            results[pol.name]["vllm_router"] = run.extra["vllm_router"]
        ttfts[pol.name] = sorted(
            (r.first - r.arrival) * 1e3  # type: ignore[operator]
            for r in run.recs
            if r.first is not None
        )
    out: dict[str, Any] = {
        "policies": results,
        "workers": args.workers,
        "requests": len(rows),
        "ratios": ratios(results),
        "mode": "live",
        "physical_limit_hit_rate": round(limit, 4),
        "time_scale": args.time_scale,
        "speedup": args.speedup,
        "dynamo_core_knobs": _dynamo_knobs(args),
        "wall_s": round(time.perf_counter() - t_all, 2),
    }
    if args.plot != "none":
        path = Path(args.plot or f"out/replay-live-{Path(args.trace).stem}-w{args.workers}.png")
        plot(path, ttfts, results, f"live: {len(rows)} requests, {args.workers} workers")
        out["plot"] = str(path)
    return out


class LiveRouter(Protocol):
    """What a live request asks of a router, as our frontend does."""

    async def route(self, rid: str, tokens: list[int]) -> tuple[int, int, str]:
        """(worker index, predicted prefix hit blocks, the worker's OpenAI base URL)."""
        ...

    async def prefill_done(self, rid: str) -> None: ...
    async def finished(self, rid: str) -> None: ...


class _OurLive:
    def __init__(self, client: Any, idx: dict[str, int]) -> None:
        self.client = client
        self.idx = idx
        self.retries = 0

    async def route(self, rid: str, tokens: list[int]) -> tuple[int, int, str]:
        from dynamo_ext.errors import ProtocolError

        delay = 0.002
        while True:
            try:
                d = await self.client.route(rid, tokens)
                break
            except ProtocolError as exc:
                # A router busy hashing long prompts sheds load ("unavailable"); a frontend
                # retries, and so does the replay, after a short backoff.
                if "unavailable" not in str(exc):
                    raise
                self.retries += 1
                await asyncio.sleep(delay)
                delay = min(0.05, delay * 2)
        hit = sum(d.chosen.prefix_hit_blocks.values())
        return self.idx[d.worker_id], hit, str(d.http_endpoint)

    async def prefill_done(self, rid: str) -> None:
        await self.client.prefill_done(rid)

    async def finished(self, rid: str) -> None:
        await self.client.finished(rid)


class _DynamoLive:
    def __init__(self, core: Any) -> None:
        self.core = core

    async def route(self, rid: str, tokens: list[int]) -> tuple[int, int, str]:
        w, hit, endpoint = await self.core.select(rid, tokens)
        return int(w), int(hit), str(endpoint)

    async def prefill_done(self, rid: str) -> None:
        await self.core.prefill_done(rid)

    async def finished(self, rid: str) -> None:
        await self.core.finished(rid)


async def _live_policy(pol: Policy, args: argparse.Namespace, prompts: TracePrompts) -> PolicyRun:
    """One policy through a fresh mocker fleet (empty caches) and a fresh router: our router
    process (routing by token ids over ZMQ), or Dynamo's SelectionService subscribed to the
    same fleet's KV streams. Requests stream over HTTP either way.

    Virtual time runs ``--time-scale`` times faster than the wall clock for arrivals and
    engines alike; latencies are measured on the wall clock and scaled back.
    """
    from dynamo_ext.sim.fleet import MockerFleet

    name = pol.name
    scale = args.time_scale
    mcfg = msgspec_replace(mocker_config(args, offload=pol.offload), speedup=scale)
    rows = prompts.rows
    recs = [Rec(r.arrival_ms / 1e3 / args.speedup, r.input_length, r.output_length) for r in rows]
    run = PolicyRun(name, recs, array("d"), [], [0] * args.workers, 0.0, mcfg.block_size)
    t_wall = time.perf_counter()

    async def drive(router: LiveRouter) -> None:
        start = time.monotonic()
        await asyncio.gather(
            *(_live_request(i, name, run, prompts, router, start, scale) for i in range(len(rows)))
        )

    if name in VLLM_ROUTER_POLICIES:
        async with live_arm(name, mcfg, args.workers, run, knobs_from_args(args, name)) as arm:
            await drive(arm)
        run.wall_s = time.perf_counter() - t_wall
        return run

    if pol.scorer is None:
        from dynamo_ext.sim.peers import DynamoCore

        fleet = MockerFleet(args.workers, mcfg, prefix=name)
        core = DynamoCore(mcfg.block_size, pol.knobs)
        try:
            await fleet.start()
            for i, w in enumerate(fleet.workers.values()):
                reg = fleet.registration(w)
                await core.add_worker(
                    i,
                    kv_events_endpoint=reg.kv_events_endpoint or "",
                    replay_endpoint=reg.replay_endpoint,
                    http_endpoint=reg.http_endpoint or "",
                    total_kv_blocks=mcfg.gpu_blocks(),
                    max_num_batched_tokens=mcfg.max_num_batched_tokens,
                )
            await core.barrier({i: w.kv for i, w in enumerate(fleet.workers.values())})
            await drive(_DynamoLive(core))
            run.cores = [w.core for w in fleet.workers.values()]
        finally:
            core.close()
            await fleet.stop()
        run.wall_s = time.perf_counter() - t_wall
        return run

    from dynamo_ext.router.client import RouterClient
    from dynamo_ext.testing import RouterProc, wait_for

    with tempfile.TemporaryDirectory() as tmp:
        cfg = {
            "block_size": mcfg.block_size,
            "scorer": _struct_dict(pol.scorer),
            "worker_timeout_s": 30.0,
        }
        router = RouterProc(Path(tmp), cfg).start()
        fleet = MockerFleet(args.workers, mcfg, router=router.endpoint, prefix=name)
        try:
            await fleet.start()
            await asyncio.wait_for(fleet.registered.wait(), 20)
            async with RouterClient(router.endpoint, timeout_s=10.0) as client:

                async def all_up() -> bool:
                    st = await client.workers()
                    return sum(1 for w in st.workers if w.up) == args.workers

                await wait_for(all_up, 20)
                idx = {wid: i for i, wid in enumerate(fleet.workers)}
                await drive(_OurLive(client, idx))
            run.cores = [w.core for w in fleet.workers.values()]
        finally:
            await fleet.stop()
            router.stop()
    run.wall_s = time.perf_counter() - t_wall
    return run


async def _live_request(
    i: int,
    name: str,
    run: PolicyRun,
    prompts: TracePrompts,
    router: LiveRouter,
    start: float,
    scale: float,
) -> None:
    """What our frontend does for one request: route by token ids, stream, report."""
    import aiohttp

    rec = run.recs[i]
    await asyncio.sleep(max(0.0, start + rec.arrival / scale - time.monotonic()))
    toks = prompts.tokens(i)
    rid = f"{name}-r{i}"
    rec.worker, rec.predicted_hit_blocks, endpoint = await router.route(rid, toks)
    run.routed_tokens[rec.worker] += rec.input_length + rec.output_length
    body = {"prompt": toks, "max_tokens": rec.output_length, "stream": True}
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{endpoint}/v1/completions", json=body) as resp,
        ):
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                now = (time.monotonic() - start) * scale
                if rec.first is None:
                    rec.first = now
                    await router.prefill_done(rid)
                else:
                    run.itl.append(now - rec.last)  # type: ignore[operator]
                rec.last = now
        rec.finish = rec.last
    finally:
        await router.finished(rid)


def msgspec_replace(s: MockerConfig, **changes: Any) -> MockerConfig:
    import msgspec

    return msgspec.structs.replace(s, **changes)


if __name__ == "__main__":  # pragma: no cover - the CLI is dynamo-ext bench replay
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
