"""Simulated vLLM workers (the "mocker"): a fleet of fake GPUs that speak exactly what a real
vLLM worker with our plugin speaks, so routing can be studied at fleet scale on one CPU.

Two layers:

* ``MockerCore``: a pure, deterministic, event-driven model of one vLLM V1 engine, driven in
  virtual seconds by whoever owns the clock. Inside: a paged KV cache with prefix caching
  (vLLM's ``BlockPool`` semantics: chained block hashes, ref-counted blocks, one LRU queue
  of free blocks where a freed request's tail blocks go first, at least one prompt token
  always recomputed), continuous batching with a token budget and chunked prefill
  (``max_num_batched_tokens``, running requests first, then waiting ones FCFS, LIFO
  preemption when blocks run out), an optional CPU offload tier (write-through of computed
  blocks, asynchronous loads of CPU hits, as vLLM's ``OffloadingConnector``), and the KV
  events vLLM emits for all of it (``BlockStored`` per request and step with its parent hash
  and token ids, ``BlockRemoved`` on eviction, ``medium`` "GPU" or "CPU"). The trace
  replayer (``dynamo-ext bench replay``) drives many cores in virtual time without sockets.
* ``MockerFleet``: many cores in one asyncio process, each with vLLM's KV event PUB + replay
  ROUTER (``KvEventPublisher``), our ``WorkerMetrics`` (one shared PUB), registration with a
  router (``RouterClient`` with keep-alive) and an OpenAI-compatible HTTP server (aiohttp)
  streaming dummy tokens: ``POST {http_endpoint}/v1/completions``. ``--speedup S`` runs
  virtual time S times faster than the wall clock.

Timing model (``TimingModel``, every coefficient in config). A step's time is a roofline:

    step = overhead + max(T * 2P / (peak * gemm_eff), P * bytes / (hbm * mem_eff))   GEMMs
         + pairs * 4 * L * H * D / (peak * attn_eff)                      prefill attention
         + ctx * kv_bytes_per_token / (hbm * mem_eff)                      decode attention

with ``T`` the tokens in the batch, ``pairs`` the causal query-key pairs of the prefill
chunks (a chunk of n tokens after s cached ones has n*s + n(n+1)/2), ``ctx`` the summed
context of the decoding requests. GEMMs are compute-bound for prefill and bound by reading
the weights for decode; prefill attention is compute-bound, decode attention reads the KV
cache. A CPU hit costs ``tokens * kv_bytes_per_token / h2d`` of transfer, overlapped with
other requests' steps. The default is Llama-3-8B in BF16 on one H100 SXM, from public
figures, not fitted to a measurement: the model's config (8.03 B parameters, 32 layers, 32
query and 8 KV heads of 128, so 128 KiB of KV per token); NVIDIA's H100 SXM datasheet (989
TFLOPS dense BF16, 3.35 TB/s HBM3, PCIe Gen5 x16 of which ~50 GB/s is reached); efficiencies
of 60 % for GEMMs and FlashAttention-3 (its paper reports 600+ TFLOPS forward on H100) and
80 % of HBM bandwidth; 1 ms of scheduling and launch overhead per step; 52 GB of KV cache
(80 GB x 0.9 utilization - 16 GB of weights - ~4 GB activations and CUDA graphs, ~400 k
tokens). This gives 7 ms per decode step at batch 1 (public vLLM figures for this model and
GPU: 6-8 ms), ~37 k prompt tokens/s for short prompts and 0.26 s for an 8 k-token prompt.
Not modelled: tensor parallelism, speculative decoding, quantization, CPU-side stalls,
network time, D2H offload bandwidth (vLLM overlaps it with compute).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import signal
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_ext.errors import ConfigError, DynamoExtError
from dynamo_ext.hashing import BlockHasher, engine_hash_fn
from dynamo_ext.protocol import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    BlockRemoved,
    BlockStored,
    KVEvent,
    WorkerMetrics,
    WorkerRegistration,
)

if TYPE_CHECKING:  # the socket layer's imports stay out of the replayer's import time
    from aiohttp import web

    from dynamo_ext.publisher import KvEventPublisher, MetricsPublisher
    from dynamo_ext.router.client import RouterClient

log = logging.getLogger("dynamo_ext.sim.mocker")

_MASK64 = (1 << 64) - 1


# ======================================================================================
# Configuration
# ======================================================================================
class TimingModel(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Step time of one engine; defaults: Llama-3-8B BF16 on one H100 SXM (module doc)."""

    name: str = "llama-3-8b-bf16@h100-sxm"
    params_b: float = 8.03  # billions of parameters (weights read per step, 2 FLOPs/token)
    num_layers: int = 32
    num_heads: int = 32  # query heads
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2
    peak_tflops: float = 989.0  # dense BF16
    hbm_tb_s: float = 3.35
    h2d_gb_s: float = 50.0  # CPU -> GPU KV loads (PCIe Gen5 x16, achieved)
    gemm_efficiency: float = 0.6
    attn_efficiency: float = 0.6
    mem_efficiency: float = 0.8
    step_overhead_ms: float = 1.0

    def __post_init__(self) -> None:
        for f in self.__struct_fields__:
            v = getattr(self, f)
            if isinstance(v, int | float) and not isinstance(v, bool) and v <= 0:
                if f == "step_overhead_ms" and v == 0:
                    continue
                raise ConfigError(f"timing.{f}", f"must be > 0, got {v}")
        for f in ("gemm_efficiency", "attn_efficiency", "mem_efficiency"):
            if getattr(self, f) > 1:
                raise ConfigError(f"timing.{f}", "an efficiency is at most 1")

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def coefficients(self) -> tuple[float, float, float, float, float, float]:
        """(overhead s, GEMM s/token, weight read s, s/prefill pair, s/decode ctx token,
        s/loaded token)."""
        flops = self.peak_tflops * 1e12
        bw = self.hbm_tb_s * 1e12 * self.mem_efficiency
        attn_pair = 4.0 * self.num_layers * self.num_heads * self.head_dim
        return (
            self.step_overhead_ms / 1e3,
            2.0 * self.params_b * 1e9 / (flops * self.gemm_efficiency),
            self.params_b * 1e9 * self.dtype_bytes / bw,
            attn_pair / (flops * self.attn_efficiency),
            max(self.kv_bytes_per_token / bw, attn_pair / (flops * self.attn_efficiency)),
            self.kv_bytes_per_token / (self.h2d_gb_s * 1e9),
        )

    def step_seconds(self, tokens: int, prefill_pairs: float, decode_ctx: int) -> float:
        o, g, w, p, d, _ = self.coefficients()
        return o + max(tokens * g, w) + prefill_pairs * p + decode_ctx * d


class MockerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One simulated engine. Capacities follow vLLM's flags of the same names."""

    block_size: int = 16
    num_gpu_blocks: int = 0  # 0: gpu_kv_gb / (block_size * kv_bytes_per_token)
    gpu_kv_gb: float = 52.0
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    num_cpu_blocks: int = 0  # offload tier; 0: cpu_kv_gb / block bytes (0 GB: no tier)
    cpu_kv_gb: float = 0.0
    emit_token_ids: bool = True  # vLLM sends them in BlockStored; off saves encode time
    hash_algo: str = "sha256"
    hash_seed: str | None = None
    speedup: float = 1.0  # virtual seconds per wall second (sockets layer only)
    metrics_period_s: float = 0.5
    timing: TimingModel = msgspec.field(default_factory=TimingModel)

    def __post_init__(self) -> None:
        for f in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, f) <= 0:
                raise ConfigError(f, f"must be > 0, got {getattr(self, f)}")
        for f in ("num_gpu_blocks", "num_cpu_blocks", "cpu_kv_gb"):
            if getattr(self, f) < 0:
                raise ConfigError(f, f"must be >= 0, got {getattr(self, f)}")
        for f in ("speedup", "metrics_period_s", "gpu_kv_gb"):
            if getattr(self, f) <= 0:
                raise ConfigError(f, f"must be > 0, got {getattr(self, f)}")
        if self.gpu_blocks() < 1:
            raise ConfigError("gpu_kv_gb", "leaves no KV cache block")

    def _block_bytes(self) -> int:
        return self.block_size * self.timing.kv_bytes_per_token

    def gpu_blocks(self) -> int:
        return self.num_gpu_blocks or int(self.gpu_kv_gb * 1e9 // self._block_bytes())

    def cpu_blocks(self) -> int:
        return self.num_cpu_blocks or int(self.cpu_kv_gb * 1e9 // self._block_bytes())


# ======================================================================================
# Hashing with the digest kept, so a request's chain extends over its output tokens
# ======================================================================================
class ChainHasher:
    """vLLM's chained prefix-cache hash (``BlockHasher`` engine mode), digest kept.

    ``BlockHasher.engine_chain`` returns the published 64-bit ints only; continuing a chain
    (output blocks, a trace's next 512-token block) needs the parent's full digest, so this
    keeps it. Same function, same ``(parent, tuple(tokens), extra_keys)`` key, same seed.
    """

    def __init__(self, block_size: int, algo: str = "sha256", seed: str | None = None) -> None:
        self.block_size = block_size
        self._fn = engine_hash_fn(algo)
        self.none_hash: bytes = BlockHasher(block_size, "engine", algo, seed).none_hash

    def chain(self, parent: bytes | None, tokens: Sequence[int]) -> tuple[list[int], bytes | None]:
        """Hashes of the full blocks of ``tokens`` after ``parent``; and the last digest."""
        fn = self._fn
        bs = self.block_size
        prev = parent if parent is not None else self.none_hash
        out: list[int] = []
        for i in range(len(tokens) // bs):
            prev = fn((prev, tuple(tokens[i * bs : (i + 1) * bs]), None))
            out.append(int.from_bytes(prev, "big") & _MASK64)
        return out, (prev if out else parent)


def output_token(i: int) -> int:
    """The ``i``-th generated token: the same for every request, as greedy decoding of a
    shared prompt would give, so identical conversations share output blocks too."""
    return 1000 + (i * 7919) % 30000


# ======================================================================================
# The engine model
# ======================================================================================
WAITING, LOADING, RUNNING, FINISHED = 0, 1, 2, 3


class SimRequest:
    """One request inside a core. ``tokens`` is owned (output ids are appended to it)."""

    __slots__ = (
        "rid",
        "tokens",
        "prompt_len",
        "max_tokens",
        "hashes",
        "digest",
        "arrival",
        "computed",
        "generated",
        "blocks",
        "cached",
        "status",
        "first_token",
        "last_token",
        "finish",
        "hit_gpu",
        "hit_cpu",
        "admitted",
        "load_tokens",
        "expected_hit",
        "error",
        "preemptions",
        "tag",
    )

    def __init__(
        self,
        rid: str,
        tokens: list[int],
        max_tokens: int,
        arrival: float,
        hashes: list[int] | None = None,
        digest: bytes | None = None,
        tag: Any = None,
    ) -> None:
        self.rid = rid
        self.tokens = tokens
        self.prompt_len = len(tokens)
        self.max_tokens = max(1, max_tokens)
        self.hashes = hashes
        self.digest = digest  # digest of hashes[-1]: where the chain continues
        self.arrival = arrival
        self.computed = 0  # tokens whose KV is in the cache (or being computed this step)
        self.generated = 0
        self.blocks: list[int] = []  # block hash when cached by us, else a negative id
        self.cached = 0  # leading entries of `blocks` that are cached hashes
        self.status = WAITING
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.finish: float | None = None
        self.hit_gpu = 0  # prompt tokens found in the GPU cache at first admission
        self.hit_cpu = 0  # ... loaded from the CPU tier
        self.admitted = False
        self.load_tokens = 0
        self.expected_hit = 0  # GPU prefix at arrival, for the prefill queue metric
        self.error: str | None = None
        self.preemptions = 0
        self.tag = tag  # free for the driver (the replayer keeps its record here)

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.generated


class StepResult:
    """What one finished step produced: KV events to publish, tokens, finished requests."""

    __slots__ = ("start", "end", "events", "emitted", "finished")

    def __init__(
        self,
        start: float,
        end: float,
        events: list[KVEvent],
        emitted: list[SimRequest],
        finished: list[SimRequest],
    ) -> None:
        self.start = start
        self.end = end
        self.events = events
        self.emitted = emitted  # each produced exactly one token at `end`
        self.finished = finished


class MockerCore:
    """One simulated vLLM V1 engine in virtual time. Deterministic; no I/O, no clock.

    Drive it with ``add_request(req, now)``, then ``advance(now)`` whenever ``now`` reaches
    ``next_time()`` (and after each add): it finishes a step that is due and starts the
    next one. A step's KV events are returned with its result, at its end, as vLLM
    publishes them after the forward pass.
    """

    def __init__(self, config: MockerConfig, worker_id: str = "mocker-0") -> None:
        self.cfg = config
        self.worker_id = worker_id
        self.block_size = config.block_size
        self.num_blocks = config.gpu_blocks()
        self.num_cpu_blocks = config.cpu_blocks()
        self.timing = config.timing
        self._coef = config.timing.coefficients()
        self.hasher = ChainHasher(config.block_size, config.hash_algo, config.hash_seed)
        # Prefix cache: hash -> refcount (0: free but still cached, in `_free`).
        self._ref: dict[int, int] = {}
        # vLLM's free block queue, oldest first: cached hashes and uncached (negative) ids.
        self._free: OrderedDict[int, None] = OrderedDict()
        self._fresh = self.num_blocks  # never used yet: the head of vLLM's initial queue
        self._used = 0  # blocks held by requests
        self._anon = itertools.count(-1, -1)
        self._cpu: OrderedDict[int, None] | None = OrderedDict() if self.num_cpu_blocks else None
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self._loading: list[tuple[float, int, SimRequest]] = []
        self._load_seq = itertools.count()
        self._step: list[tuple[SimRequest, int]] | None = None
        self._step_start = 0.0
        self._step_end = 0.0
        self._events: list[KVEvent] = []
        # Counters (monotonic) for metrics and reports.
        self.busy_s = 0.0
        self.steps = 0
        self.preemptions = 0
        self.rejected = 0
        self.prefix_queries = 0  # prompt tokens looked up at first admission
        self.prefix_hits = 0  # ... found in the GPU cache
        self.cpu_hits = 0  # ... loaded from the CPU tier
        self.prefill_tokens = 0  # tokens computed (prefill and recompute)
        self.decode_tokens = 0

    # ---------------------------------------------------------------- public API
    def add_request(self, r: SimRequest, now: float) -> bool:
        """Queue a request; False (and ``r.error``) when it can never fit this engine."""
        if r.hashes is None:
            r.hashes, r.digest = self.hasher.chain(None, r.tokens)
        need = -(-(r.prompt_len + r.max_tokens) // self.block_size)
        if need > self.num_blocks:
            r.status = FINISHED
            r.finish = now
            r.error = f"needs {need} KV blocks, the engine has {self.num_blocks}"
            self.rejected += 1
            return False
        if self.cfg.enable_prefix_caching:
            r.expected_hit = self._gpu_prefix(r, (r.prompt_len - 1) // self.block_size)[0]
            r.expected_hit *= self.block_size
        self.waiting.append(r)
        return True

    def advance(self, now: float) -> StepResult | None:
        """Bring the engine to ``now``: finish a due step, complete due loads, start the next
        step if there is work. Returns the finished step's result, if one finished."""
        if self._loading:
            self._complete_loads(now)
        res = None
        if self._step is not None and now >= self._step_end:
            res = self._finish_step()
        if self._step is None and (self.running or self.waiting):
            self._start_step(now)
        return res

    def next_time(self) -> float | None:
        """When ``advance`` has something to do next (None: idle until a request comes)."""
        t = self._step_end if self._step is not None else None
        if self._loading:
            lt = self._loading[0][0]
            t = lt if t is None else min(t, lt)
        return t

    def abort(self, r: SimRequest, now: float) -> None:
        """Drop a request (client gone): its blocks are freed, as vLLM's abort does."""
        if r.status == FINISHED:
            return
        if r.status == WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(r)
        elif r.status == RUNNING:
            with contextlib.suppress(ValueError):
                self.running.remove(r)
        # A loading request stays in the heap; _complete_loads skips it.
        self._free_request(r)
        r.status = FINISHED
        r.finish = now
        r.error = "aborted"

    @property
    def busy(self) -> bool:
        return self._step is not None

    def idle(self) -> bool:
        return self._step is None and not (self.running or self.waiting or self._loading)

    def free_blocks(self) -> int:
        return self.num_blocks - self._used

    def cached_blocks(self) -> int:
        return len(self._ref)

    def cpu_cached_blocks(self) -> int:
        return len(self._cpu) if self._cpu is not None else 0

    def is_cached(self, h: int, medium: str = MEDIUM_GPU) -> bool:
        if medium == MEDIUM_GPU:
            return h in self._ref
        return self._cpu is not None and h in self._cpu

    def prefill_queue_tokens(self) -> int:
        q = 0
        for r in self.waiting:
            q += r.num_tokens - max(r.computed, r.expected_hit)
        for r in self.running:
            if r.computed < r.num_tokens - 1:
                q += r.num_tokens - r.computed
        return q

    def metrics(self, heartbeat: int, ts: float, role: str = "both") -> WorkerMetrics:
        return WorkerMetrics(
            worker_id=self.worker_id,
            heartbeat=heartbeat,
            ts=ts,
            role=role,  # type: ignore[arg-type]
            running=len(self.running),
            waiting=len(self.waiting) + len(self._loading),
            kv_used_blocks=self._used,
            kv_total_blocks=self.num_blocks,
            offload_blocks={MEDIUM_CPU: len(self._cpu)} if self._cpu is not None else {},
            prefill_queue_tokens=self.prefill_queue_tokens(),
            prefix_cache_queries=self.prefix_queries,
            prefix_cache_hits=self.prefix_hits + self.cpu_hits,
        )

    # ---------------------------------------------------------------- the cache
    def _gpu_prefix(self, r: SimRequest, limit: int) -> tuple[int, int]:
        """(cached prefix blocks, how many of them are free and would leave the free pool)."""
        hashes = self._hashes_upto(r, limit)
        ref = self._ref
        k = ev = 0
        while k < limit:
            c = ref.get(hashes[k])
            if c is None:
                break
            if c == 0:
                ev += 1
            k += 1
        return k, ev

    def _hashes_upto(self, r: SimRequest, nblocks: int) -> list[int]:
        hashes = r.hashes
        assert hashes is not None
        if len(hashes) < nblocks:
            toks = r.tokens
            bs = self.block_size
            while len(toks) < nblocks * bs:
                toks.append(output_token(len(toks) - r.prompt_len))
            start = len(hashes)
            more, r.digest = self.hasher.chain(r.digest, toks[start * bs : nblocks * bs])
            hashes.extend(more)
        return hashes

    def _touch(self, r: SimRequest, k: int) -> None:
        """Take the first ``k`` (cached) blocks of the prompt for ``r``."""
        ref = self._ref
        free = self._free
        hashes = r.hashes
        assert hashes is not None
        for h in hashes[:k]:
            c = ref[h]
            if c == 0:
                del free[h]
                self._used += 1
            ref[h] = c + 1
        r.blocks = hashes[:k]
        r.cached = k

    def _alloc(self, n: int) -> list[int]:
        """``n`` new (uncached) blocks; evicts the least recently freed cached blocks."""
        fresh = min(n, self._fresh)
        self._fresh -= fresh
        rest = n - fresh
        if rest:
            free = self._free
            ref = self._ref
            removed: list[int] = []
            for _ in range(rest):
                key = free.popitem(last=False)[0]
                if key >= 0:
                    del ref[key]
                    removed.append(key)
            if removed:
                # vLLM sends one BlockRemoved per block; one per allocation carries the same
                # information to any consumer at a fraction of the frames.
                self._events.append(
                    BlockRemoved(removed, MEDIUM_GPU, group_idx=0)  # type: ignore[arg-type]
                )
        self._used += n
        anon = self._anon
        return [next(anon) for _ in range(n)]

    def _free_request(self, r: SimRequest) -> None:
        free = self._free
        ref = self._ref
        released = 0
        # vLLM frees a request's blocks tail first, so its prefix is evicted last.
        for b in reversed(r.blocks):
            if b < 0:
                free[b] = None
                released += 1
            else:
                c = ref[b] - 1
                ref[b] = c
                if c == 0:  # a block shared with another request stays in use
                    free[b] = None
                    released += 1
        self._used -= released
        r.blocks = []
        r.cached = 0

    def _cache_upto(self, r: SimRequest, ntok: int) -> None:
        """Cache the request's blocks that are full once ``ntok`` tokens are computed."""
        nfull = ntok // self.block_size
        first = r.cached
        if nfull <= first or not self.cfg.enable_prefix_caching:
            return
        hashes = self._hashes_upto(r, nfull)
        ref = self._ref
        blocks = r.blocks
        runs: list[tuple[int, int]] = []
        start = -1
        for i in range(first, nfull):
            h = hashes[i]
            if h in ref:
                # Computed twice (another request had it in flight): this copy stays
                # uncached, so the index never counts a block the engine does not hold.
                if start >= 0:
                    runs.append((start, i))
                    start = -1
            else:
                ref[h] = 1
                blocks[i] = h
                if start < 0:
                    start = i
        if start >= 0:
            runs.append((start, nfull))
        r.cached = nfull
        if runs:
            self._emit_stored(r, runs, MEDIUM_GPU)
        if self._cpu is not None:
            self._offload(r, first, nfull)

    def _emit_stored(self, r: SimRequest, runs: list[tuple[int, int]], medium: str) -> None:
        hashes = r.hashes
        assert hashes is not None
        bs = self.block_size
        emit_tokens = self.cfg.emit_token_ids
        for a, b in runs:
            self._events.append(
                BlockStored(
                    hashes[a:b],  # type: ignore[arg-type]
                    hashes[a - 1] if a else None,
                    r.tokens[a * bs : b * bs] if emit_tokens else [],
                    bs,
                    None,
                    medium,
                    None,
                    group_idx=0,
                )
            )

    def _offload(self, r: SimRequest, a: int, b: int) -> None:
        """Write-through of newly computed blocks to the CPU tier (LRU)."""
        cpu = self._cpu
        assert cpu is not None and r.hashes is not None
        hashes = r.hashes
        runs: list[tuple[int, int]] = []
        start = -1
        for i in range(a, b):
            h = hashes[i]
            if h in cpu:
                cpu.move_to_end(h)
                if start >= 0:
                    runs.append((start, i))
                    start = -1
            else:
                cpu[h] = None
                if start < 0:
                    start = i
        if start >= 0:
            runs.append((start, b))
        if runs:
            self._emit_stored(r, runs, MEDIUM_CPU)
        over = len(cpu) - self.num_cpu_blocks
        if over > 0:
            removed = [cpu.popitem(last=False)[0] for _ in range(over)]
            self._events.append(BlockRemoved(removed, MEDIUM_CPU, group_idx=0))  # type: ignore[arg-type]

    # ---------------------------------------------------------------- the scheduler
    def _preempt(self, v: SimRequest) -> None:
        self._free_request(v)
        v.computed = 0
        v.status = WAITING
        v.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(v)

    def _admit_stats(self, r: SimRequest, gpu_blocks: int, cpu_blocks: int) -> None:
        if not r.admitted:
            r.admitted = True
            bs = self.block_size
            r.hit_gpu = gpu_blocks * bs
            r.hit_cpu = cpu_blocks * bs
            self.prefix_queries += r.prompt_len
            self.prefix_hits += r.hit_gpu
            self.cpu_hits += r.hit_cpu

    def _schedule(self, now: float) -> list[tuple[SimRequest, int]]:
        bs = self.block_size
        budget = self.cfg.max_num_batched_tokens
        sched: list[tuple[SimRequest, int]] = []
        running = self.running
        preempted = False
        i = 0
        # 1. Running requests, in order: decodes take one token, partial prefills a chunk.
        while i < len(running) and budget > 0:
            r = running[i]
            n = min(r.num_tokens - r.computed, budget)
            need = -(-(r.computed + n) // bs) - len(r.blocks)
            if need > 0:
                while need > self.num_blocks - self._used:
                    victim = running.pop()  # LIFO: the latest admitted goes first
                    self._preempt(victim)
                    preempted = True
                    if victim is r:
                        break
                if r.status != RUNNING:
                    break
                r.blocks.extend(self._alloc(need))
            self._cache_upto(r, r.computed + n)
            sched.append((r, n))
            budget -= n
            i += 1
        # 2. Waiting requests, FCFS, unless this step had to preempt (vLLM's rule).
        if not preempted:
            waiting = self.waiting
            cpu = self._cpu
            caching = self.cfg.enable_prefix_caching
            while waiting and budget > 0 and len(running) < self.cfg.max_num_seqs:
                r = waiting[0]
                free = self.num_blocks - self._used
                if not r.blocks:
                    limit = (r.num_tokens - 1) // bs  # one token is always computed
                    k, ev = self._gpu_prefix(r, limit) if caching else (0, 0)
                    j = 0
                    if cpu is not None and caching:
                        hashes = r.hashes
                        assert hashes is not None
                        while k + j < limit and hashes[k + j] in cpu:
                            j += 1
                    if j:
                        # CPU hits load asynchronously; the request waits off the batch.
                        if j + ev > free:
                            break
                        self._touch(r, k)
                        r.blocks.extend(self._alloc(j))
                        hashes = r.hashes
                        assert hashes is not None
                        for h in hashes[k : k + j]:
                            cpu.move_to_end(h)  # type: ignore[union-attr]
                        r.computed = k * bs
                        r.load_tokens = j * bs
                        self._admit_stats(r, k, j)
                        r.status = LOADING
                        waiting.popleft()
                        ready = now + r.load_tokens * self._coef[5]
                        heapq.heappush(self._loading, (ready, next(self._load_seq), r))
                        continue
                    n = min(r.num_tokens - k * bs, budget)
                    need = -(-(k * bs + n) // bs) - k
                    if need + ev > free:
                        break
                    self._touch(r, k)
                    r.computed = k * bs
                    self._admit_stats(r, k, 0)
                else:  # back from a CPU load: its blocks are held already
                    n = min(r.num_tokens - r.computed, budget)
                    need = -(-(r.computed + n) // bs) - len(r.blocks)
                    if need > free:
                        break
                r.blocks.extend(self._alloc(need))
                waiting.popleft()
                r.status = RUNNING
                running.append(r)
                self._cache_upto(r, r.computed + n)
                sched.append((r, n))
                budget -= n
        return sched

    def _complete_loads(self, now: float) -> None:
        loading = self._loading
        back: list[SimRequest] = []
        while loading and loading[0][0] <= now:
            r = heapq.heappop(loading)[2]
            if r.status != LOADING:
                continue  # aborted while loading
            r.computed += r.load_tokens
            r.load_tokens = 0
            self._cache_upto(r, r.computed)  # loaded blocks join the GPU prefix cache
            r.status = WAITING
            back.append(r)
        # Back at the head of the queue, in load order: they arrived before those behind.
        for r in reversed(back):
            self.waiting.appendleft(r)

    def _start_step(self, now: float) -> None:
        sched = self._schedule(now)
        if not sched:
            return
        tokens = 0
        pairs = 0.0
        dctx = 0
        for r, n in sched:
            s = r.computed
            if r.generated and n == 1 and s == r.num_tokens - 1:
                dctx += s + 1
                self.decode_tokens += 1
            else:
                pairs += n * s + n * (n + 1) / 2
                self.prefill_tokens += n
            tokens += n
            r.computed = s + n
        o, g, w, p, d, _ = self._coef
        dur = o + max(tokens * g, w) + pairs * p + dctx * d
        self._step = sched
        self._step_start = now
        self._step_end = now + dur
        self.busy_s += dur
        self.steps += 1

    def _finish_step(self) -> StepResult:
        end = self._step_end
        sched = self._step
        assert sched is not None
        emitted: list[SimRequest] = []
        finished: list[SimRequest] = []
        for r, _n in sched:
            if r.status != RUNNING or r.computed < r.num_tokens:
                continue  # aborted, or a prefill chunk that is not the last
            r.generated += 1
            if r.first_token is None:
                r.first_token = end
            r.last_token = end
            emitted.append(r)
            if r.generated >= r.max_tokens:
                self._free_request(r)
                r.status = FINISHED
                r.finish = end
                finished.append(r)
        if finished:
            self.running = [r for r in self.running if r.status == RUNNING]
        events = self._events
        self._events = []
        self._step = None
        return StepResult(self._step_start, end, events, emitted, finished)


# ======================================================================================
# Sockets and HTTP: many cores in one asyncio process
# ======================================================================================
def _advertised(endpoint: str, host: str | None) -> str:
    """``tcp://0.0.0.0:5557`` -> ``tcp://HOST:5557`` (what a peer elsewhere connects to)."""
    if host is None:
        return endpoint
    scheme, _, rest = endpoint.partition("://")
    _, _, port = rest.rpartition(":")
    return f"{scheme}://{host}:{port}"


class MockerWorker:
    """One core in real time: its KV publisher, its run loop, its HTTP streams."""

    def __init__(
        self,
        worker_id: str,
        cfg: MockerConfig,
        kv: KvEventPublisher,
        t0: float,
    ) -> None:
        self.worker_id = worker_id
        self.cfg = cfg
        self.core = MockerCore(cfg, worker_id)
        self.kv = kv
        self.heartbeat = 0
        self.instance_id = uuid.uuid4().hex
        self._t0 = t0
        self._streams: dict[int, asyncio.Queue[tuple[int, str | None]]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count()

    def vnow(self) -> float:
        return (time.monotonic() - self._t0) * self.cfg.speedup

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"mocker-{self.worker_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(
        self, tokens: list[int], max_tokens: int
    ) -> tuple[SimRequest, asyncio.Queue[tuple[int, str | None]]]:
        rid = next(self._ids)
        r = SimRequest(f"{self.worker_id}-{rid}", tokens, max_tokens, self.vnow(), tag=rid)
        q: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
        if not self.core.add_request(r, r.arrival):
            q.put_nowait((-1, "error"))
            return r, q
        self._streams[rid] = q
        self._wake.set()
        return r, q

    def cancel(self, r: SimRequest) -> None:
        self._streams.pop(r.tag, None)
        self.core.abort(r, self.vnow())
        self._wake.set()

    async def _run(self) -> None:
        core = self.core
        speed = self.cfg.speedup
        while True:
            self._wake.clear()
            res = core.advance(self.vnow())
            if res is not None:
                self._deliver(res)
            nt = core.next_time()
            timeout = None if nt is None else max(0.0, (nt - self.vnow()) / speed)
            if timeout == 0.0:
                await asyncio.sleep(0)  # let the HTTP side run between back-to-back steps
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _deliver(self, res: StepResult) -> None:
        if res.events:
            self.kv.publish(res.events)
        streams = self._streams
        for r in res.emitted:
            q = streams.get(r.tag)
            if q is None:
                continue
            i = r.generated - 1
            done = r.generated >= r.max_tokens
            q.put_nowait((output_token(i), "length" if done else None))
            if done:
                del streams[r.tag]


def _prompt_tokens(prompt: Any) -> list[int]:
    """OpenAI ``prompt``: token ids as they are, text as its UTF-8 bytes (a byte-level
    tokenizer keeps equal text prefixes equal token prefixes, which is all routing needs)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list | str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return list(prompt.encode())
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise ValueError("prompt must be a string or a list of token ids (one prompt)")


class MockerFleet:
    """``n`` simulated workers in this asyncio loop, registered with a router.

    Sockets: one KV PUB + replay ROUTER per worker (vLLM's framing), one metrics PUB for all
    (each ``WorkerMetrics`` names its worker; the router subscribes once per endpoint), one
    HTTP server whose ``/<worker_id>`` prefix is each worker's OpenAI base URL.
    """

    def __init__(
        self,
        n: int,
        cfg: MockerConfig,
        *,
        router: str | None = None,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        http_port: int = 0,
        prefix: str = "mocker",
        model: str = "mocker",
        topic: str = "kv",
        keepalive_s: float = 5.0,
    ) -> None:
        if n <= 0:
            raise ConfigError("workers", f"must be > 0, got {n}")
        self.n = n
        self.cfg = cfg
        self.router = router
        self.host = host
        self.advertise_host = advertise_host or (None if host in ("0.0.0.0", "*") else host)
        if host in ("0.0.0.0", "*") and advertise_host is None:
            import socket

            self.advertise_host = socket.gethostname()
        self.http_port = http_port
        self.prefix = prefix
        self.model = model
        self.topic = topic
        self.keepalive_s = keepalive_s
        self.workers: dict[str, MockerWorker] = {}
        self.http_base = ""
        self.metrics_endpoint = ""
        self._metrics: MetricsPublisher | None = None
        self._client: RouterClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self.registered = asyncio.Event()

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        from dynamo_ext.publisher import KvEventPublisher, MetricsPublisher

        bind = "*" if self.host in ("0.0.0.0", "*") else self.host
        self._metrics = MetricsPublisher(f"tcp://{bind}:0")
        self.metrics_endpoint = _advertised(self._metrics.endpoint, self.advertise_host)
        t0 = time.monotonic()
        for i in range(self.n):
            wid = f"{self.prefix}-{i}"
            kv = KvEventPublisher(f"tcp://{bind}:0", f"tcp://{bind}:0", topic=self.topic)
            w = MockerWorker(wid, self.cfg, kv, t0)
            self.workers[wid] = w
            w.start()
        await self._start_http()
        self._tasks.append(asyncio.create_task(self._publish_metrics(), name="mocker-metrics"))
        if self.router:
            self._tasks.append(asyncio.create_task(self._register_loop(), name="mocker-register"))
        else:
            self.registered.set()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._client is not None:
            for wid in self.workers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._client.deregister(wid), 0.5)
            await self._client.close()
        for w in self.workers.values():
            await w.stop()
            w.kv.close()
        if self._metrics is not None:
            self._metrics.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def registration(self, w: MockerWorker) -> WorkerRegistration:
        assert w.kv.replay_endpoint is not None
        return WorkerRegistration(
            worker_id=w.worker_id,
            role="both",
            http_endpoint=f"{self.http_base}/{w.worker_id}",
            kv_events_endpoint=_advertised(w.kv.endpoint, self.advertise_host),
            kv_events_topic=self.topic,
            replay_endpoint=_advertised(w.kv.replay_endpoint, self.advertise_host),
            metrics_endpoint=self.metrics_endpoint,
            block_size=self.cfg.block_size,
            model=self.model,
            instance_id=w.instance_id,
        )

    async def _register_loop(self) -> None:
        from dynamo_ext.router.client import RouterClient

        assert self.router is not None
        self._client = RouterClient(self.router, timeout_s=2.0)
        warned = False
        while True:
            try:
                for w in self.workers.values():
                    await self._client.register(self.registration(w))
                if warned:
                    log.info("mocker fleet registered again with %s", self.router)
                warned = False
                self.registered.set()
            except (DynamoExtError, OSError) as exc:
                if not warned:  # a router that is down never stops the fleet
                    log.warning("registration with %s failed (%s); retrying", self.router, exc)
                    warned = True
            # Repeat as a keep-alive: a restarted router learns the fleet again.
            await asyncio.sleep(self.keepalive_s if not warned else 1.0)

    async def _publish_metrics(self) -> None:
        pub = self._metrics
        assert pub is not None
        while True:
            now = time.time()
            for w in self.workers.values():
                w.heartbeat += 1
                try:
                    pub.publish(w.core.metrics(w.heartbeat, now))
                except Exception as exc:  # never let one send kill the heartbeat
                    log.warning("metrics publish failed: %s", exc)
            await asyncio.sleep(self.cfg.metrics_period_s)  # wall seconds: liveness is wall time

    # ---------------------------------------------------------------- HTTP
    async def _start_http(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/workers", self._list_workers)
        app.router.add_get("/{worker}/health", self._health)
        app.router.add_get("/{worker}/v1/models", self._models)
        app.router.add_post("/{worker}/v1/completions", self._completions)
        app.router.add_post("/{worker}/v1/chat/completions", self._completions)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host if self.host != "*" else "0.0.0.0", self.http_port)
        await site.start()
        self._runner = runner
        port = int(runner.addresses[0][1])  # the bound port, when asked for 0
        self.http_port = port
        self.http_base = f"http://{self.advertise_host or self.host}:{port}"

    async def _health(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        wid = request.match_info.get("worker")
        if wid is not None and wid not in self.workers:
            return web.json_response({"error": f"no worker {wid}"}, status=404)
        return web.json_response({"status": "ok"})

    async def _list_workers(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        return web.json_response(
            [msgspec.to_builtins(self.registration(w)) for w in self.workers.values()]
        )

    async def _models(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "me"}]}
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        w = self.workers.get(request.match_info["worker"])
        if w is None:
            return web.json_response({"error": {"message": "no such worker"}}, status=404)
        chat = request.path.endswith("/chat/completions")
        try:
            body = await request.json()
            if chat:
                msgs = body["messages"]
                text = "".join(f"<{m.get('role', '')}>{m.get('content', '')}" for m in msgs)
                tokens = list(text.encode())
            else:
                tokens = _prompt_tokens(body.get("prompt"))
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response(
                {"error": {"message": str(exc), "type": "invalid_request_error"}}, status=400
            )
        if not tokens:
            return web.json_response({"error": {"message": "empty prompt"}}, status=400)
        r, q = w.submit(tokens, max_tokens)
        if r.error is not None:
            return web.json_response({"error": {"message": r.error}}, status=400)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        want_ids = bool(body.get("return_token_ids"))

        def choice(tok: list[int], finish: str | None) -> dict[str, Any]:
            text = "".join(f" t{t}" for t in tok)
            c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                c["delta" if body.get("stream") else "message"] = {
                    "role": "assistant",
                    "content": text,
                }
            else:
                c["text"] = text
            if want_ids:
                c["token_ids"] = tok
            return c

        usage = {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": 0}
        if not body.get("stream"):
            out: list[int] = []
            finish: str | None = None
            try:
                while finish is None:
                    tok, finish = await q.get()
                    if tok >= 0:
                        out.append(tok)
            except asyncio.CancelledError:
                w.cancel(r)
                raise
            usage["completion_tokens"] = len(out)
            usage["total_tokens"] = len(out) + len(tokens)
            return web.json_response(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": self.model,
                    "choices": [choice(out, finish)],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        n = 0
        try:
            finish = None
            while finish is None:
                tok, finish = await q.get()
                toks = [tok] if tok >= 0 else []
                # Tokens of one step arrive together: send what is queued as one chunk.
                while finish is None and not q.empty():
                    t2, finish = q.get_nowait()
                    toks.append(t2)
                n += len(toks)
                chunk = {
                    "id": rid,
                    "object": obj + (".chunk" if chat else ""),
                    "created": created,
                    "model": self.model,
                    "choices": [choice(toks, finish)],
                }
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if (body.get("stream_options") or {}).get("include_usage"):
                usage["completion_tokens"] = n
                usage["total_tokens"] = n + len(tokens)
                tail = {
                    "id": rid,
                    "object": obj,
                    "model": self.model,
                    "choices": [],
                    "usage": usage,
                }
                await resp.write(b"data: " + json.dumps(tail).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            w.cancel(r)  # client gone: free its blocks as vLLM's abort does
            raise
        return resp


# ======================================================================================
# CLI: dynamo-ext mocker
# ======================================================================================
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Simulated vLLM workers: KV events, metrics, registration, OpenAI HTTP."
    p.add_argument("--config", help="YAML or TOML file of MockerConfig fields (timing: ...)")
    p.add_argument("--workers", type=int, default=4, help="simulated workers in this process")
    p.add_argument("--router", help="router control socket, e.g. tcp://127.0.0.1:5600")
    p.add_argument("--host", default="127.0.0.1", help="bind address of every socket")
    p.add_argument("--advertise-host", help="host name peers use (default: --host)")
    p.add_argument("--http-port", type=int, default=0, help="one HTTP port for all (0: any)")
    p.add_argument("--prefix", default="mocker", help="worker ids are PREFIX-0 .. PREFIX-N-1")
    p.add_argument("--model", default="mocker", help="served model name")
    p.add_argument("--block-size", type=int)
    p.add_argument("--num-gpu-blocks", type=int)
    p.add_argument("--gpu-kv-gb", type=float)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--cpu-kv-gb", type=float, help="CPU offload tier size (0: none)")
    p.add_argument("--speedup", type=float, help="virtual seconds per wall-clock second")
    p.add_argument("--metrics-period", type=float, help="seconds between WorkerMetrics")
    p.add_argument("--json", action="store_true", help="print the fleet's endpoints as JSON")


def config_from_args(args: argparse.Namespace) -> MockerConfig:
    from dynamo_ext.config import load_config

    overrides = {
        "block_size": getattr(args, "block_size", None),
        "num_gpu_blocks": getattr(args, "num_gpu_blocks", None),
        "gpu_kv_gb": getattr(args, "gpu_kv_gb", None),
        "max_num_batched_tokens": getattr(args, "max_num_batched_tokens", None),
        "max_num_seqs": getattr(args, "max_num_seqs", None),
        "cpu_kv_gb": getattr(args, "cpu_kv_gb", None),
        "speedup": getattr(args, "speedup", None),
        "metrics_period_s": getattr(args, "metrics_period", None),
    }
    return load_config(
        MockerConfig, getattr(args, "config", None), overrides, env_prefix="DYNAMO_EXT_MOCKER__"
    )


async def run_fleet(
    args: argparse.Namespace, cfg: MockerConfig, ready: Callable[[MockerFleet], None]
) -> None:
    fleet = MockerFleet(
        args.workers,
        cfg,
        router=args.router,
        host=args.host,
        advertise_host=args.advertise_host,
        http_port=args.http_port,
        prefix=args.prefix,
        model=args.model,
    )
    await fleet.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    ready(fleet)
    try:
        await stop.wait()
    finally:
        await fleet.stop()


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)

    def ready(fleet: MockerFleet) -> None:
        regs = [msgspec.to_builtins(fleet.registration(w)) for w in fleet.workers.values()]
        info = {
            "workers": len(regs),
            "http": fleet.http_base,
            "metrics": fleet.metrics_endpoint,
            "router": fleet.router,
            "gpu_blocks": cfg.gpu_blocks(),
            "cpu_blocks": cfg.cpu_blocks(),
            "block_size": cfg.block_size,
            "timing": cfg.timing.name,
        }
        if args.json:
            print(json.dumps({**info, "registrations": regs}), flush=True)
        else:
            log.info("mocker fleet up: %s", json.dumps(info))

    asyncio.run(run_fleet(args, cfg, ready))
    return 0
