"""Multi-tier KV offload for vLLM through its own offloading API, runnable on the CPU platform.

vLLM 0.32 ships the tiering stack we want (``OffloadingConnector`` + ``TieringOffloadingSpec``:
a CPU primary tier, secondary tiers such as the local-disk ``fs`` tier, promotion on lookup,
KV events with ``medium``/``locality``), but its GPU<->CPU copy worker asserts CUDA/XPU
tensors and CUDA streams. LMCache 0.5.6 imports here but has no CPU connector
(``RuntimeError: No supported cpu connector found.`` from ``CreateGPUConnector``) and degrades
to recompute. So on CPU we keep vLLM's whole stack and replace only the copy worker:

* ``DynamoExtOffloadingSpec`` — ``TieringOffloadingSpec`` whose ``get_worker`` returns
  ``CpuCopyOffloadingWorker`` (synchronous memmove between the engine's paged KV cache and
  the primary tier's shared region) on the CPU platform, vLLM's own worker elsewhere.
* ``PoolTier`` — a vLLM ``SecondaryTierManager`` over the shared KV pool
  (``dynamo_ext.pool.KvPool``: a 3FS mount or any directory), keyed by the chained block
  hash, emitting ``BlockStored(medium="STORAGE", locality="REMOTE")`` events, with a ZMQ
  prefetch endpoint: the router names block hashes, a background thread reads those chunks
  from the pool into a RAM staging area, and the engine's later promotion copies from RAM
  instead of reading the pool on the critical path.

Config (``--kv-transfer-config``), see ``offload_transfer_config`` for a builder::

    {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
     "kv_connector_extra_config": {
        "spec_name": "DynamoExtOffloadingSpec",
        "spec_module_path": "dynamo_ext.plugins.vllm.offload",
        "cpu_bytes_to_use": 268435456,
        "secondary_tiers": [
          {"type": "fs", "root_dir": "/local/kv", "enable_kv_events": true, "locality": "LOCAL"},
          {"type": "PoolTier", "module_path": "dynamo_ext.plugins.vllm.offload",
           "root": "/mnt/3fs/kv", "capacity_bytes": 1099511627776,
           "prefetch_endpoint": "tcp://*:5600"}]}}
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import sys
import threading
import time
import types
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal

import msgspec
import numpy as np
import torch
import zmq
from vllm.platforms import current_platform
from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import BlockHash, maybe_convert_block_hash
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    Locality,
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadingWorker,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
    TransferResult,
    get_offload_block_hash,
    get_offload_group_idx,
)
from vllm.v1.kv_offload.cpu.gpu_worker import SingleDirectionOffloadingHandler
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.file_mapper import FileMapper
from vllm.v1.kv_offload.tiering.async_lookup import AsyncLookupManager
from vllm.v1.kv_offload.tiering.base import (
    JobResult,
    ScheduleEndContext,
    SecondaryTierManager,
    TransferJob,
)
from vllm.v1.kv_offload.tiering.fs.thread_pool import DualQueueThreadPool
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

from dynamo_ext.hashing import to_external
from dynamo_ext.protocol import PrefetchRequest, decode_prefetch
from dynamo_ext.security import CurveConfig, load_curve, start_authenticator

logger = logging.getLogger(__name__)

SPEC_MODULE = "dynamo_ext.plugins.vllm.offload"


# --------------------------------------------------------------------------- copy worker
class _CpuCopyHandler(SingleDirectionOffloadingHandler):
    """One direction of engine-cache <-> primary-tier copies on the CPU platform.

    Reuses vLLM's descriptor builder (``_fill_direct_ops``: the same block/chunk arithmetic,
    partial first and last chunks included) and replaces the CUDA stream copy with a
    synchronous memmove: the engine's KV cache is host memory here, so a copy is finished
    when ``transfer_async`` returns and no stream ordering is needed (the model step that
    wrote the source blocks has returned before the connector runs).
    """

    def __init__(
        self,
        gpu_tensors: list[torch.Tensor],
        cpu_tensors: list[torch.Tensor],
        blocks_per_chunk: int,
        layer_refs_per_group: list,
        gpu_to_cpu: bool,
    ) -> None:
        for g, c in zip(gpu_tensors, cpu_tensors, strict=True):
            if g.dtype != torch.int8 or c.dtype != torch.int8 or g.ndim != 2 or c.ndim != 2:
                raise ValueError("offload copy tensors must be 2-D int8 views")
            if c.shape[1] != g.shape[1] * blocks_per_chunk:
                raise ValueError(
                    f"primary-tier page {c.shape[1]} B != engine page {g.shape[1]} B "
                    f"x {blocks_per_chunk} blocks per chunk"
                )
        self.src_tensors = gpu_tensors if gpu_to_cpu else cpu_tensors
        self.dst_tensors = cpu_tensors if gpu_to_cpu else gpu_tensors
        self.gpu_to_cpu = gpu_to_cpu
        self.layer_refs_per_group = layer_refs_per_group
        self.src_blocks_per_chunk = 1 if gpu_to_cpu else blocks_per_chunk
        self.dst_blocks_per_chunk = blocks_per_chunk if gpu_to_cpu else 1
        self._canonical_copy_plans = None
        self._fill_group_ops = self._fill_direct_ops
        self._finished: list[TransferResult] = []

    def transfer_async(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        if not isinstance(src_spec, BlockIDsLoadStoreSpec) or not isinstance(
            dst_spec, BlockIDsLoadStoreSpec
        ):
            raise TypeError(f"unexpected transfer specs {type(src_spec)}, {type(dst_spec)}")
        t0 = time.perf_counter()
        gpu_spec = src_spec if self.gpu_to_cpu else dst_spec
        assert isinstance(gpu_spec, GPULoadStoreSpec)
        n_ops = self._estimate_max_copy_ops(gpu_spec.group_sizes)
        all_src = np.empty(n_ops, dtype=np.uint64)
        all_dst = np.empty(n_ops, dtype=np.uint64)
        all_sizes = np.empty(n_ops, dtype=np.uint64)
        src_blocks, dst_blocks = src_spec.block_ids, dst_spec.block_ids
        src_off = dst_off = op_idx = nbytes = 0
        for g_idx, (group_size, block_idx) in enumerate(
            zip(gpu_spec.group_sizes, gpu_spec.block_indices, strict=True)
        ):
            if group_size == 0:
                continue
            src_skip = block_idx % self.src_blocks_per_chunk
            dst_skip = block_idx % self.dst_blocks_per_chunk
            src_end = src_off + cdiv(group_size + src_skip, self.src_blocks_per_chunk)
            dst_end = dst_off + cdiv(group_size + dst_skip, self.dst_blocks_per_chunk)
            op_idx, g_bytes = self._fill_group_ops(
                g_idx,
                group_src=src_blocks[src_off:src_end],
                group_dst=dst_blocks[dst_off:dst_end],
                group_size=group_size,
                src_skip_count=src_skip,
                dst_skip_count=dst_skip,
                all_src=all_src,
                all_dst=all_dst,
                all_sizes=all_sizes,
                op_idx=op_idx,
            )
            nbytes += g_bytes
            src_off, dst_off = src_end, dst_end
        memmove = ctypes.memmove
        for s, d, n in zip(
            all_src[:op_idx].tolist(),
            all_dst[:op_idx].tolist(),
            all_sizes[:op_idx].tolist(),
            strict=True,
        ):
            memmove(d, s, n)
        self._finished.append(
            TransferResult(
                job_id=job_id,
                success=True,
                transfer_size=nbytes,
                transfer_time=time.perf_counter() - t0,
            )
        )
        return True

    def get_finished(self) -> list[TransferResult]:
        out, self._finished = self._finished, []
        return out

    def wait(self, job_ids: set[int]) -> None:  # copies are synchronous
        return

    def shutdown(self) -> None:
        self._finished = []


class CpuCopyOffloadingWorker(OffloadingWorker):
    """``OffloadingWorker`` for engines whose KV cache is host memory (vLLM's CPU platform)."""

    def __init__(
        self, kv_caches: CanonicalKVCaches, blocks_per_chunk: int, region: SharedOffloadRegion
    ) -> None:
        self._region: SharedOffloadRegion | None = region
        gpu_tensors, cpu_tensors = [], []
        for t in kv_caches.tensors:
            page = t.page_size_bytes
            gpu_tensors.append(t.tensor.view(torch.int8).view((-1, page)))
            cpu_tensors.append(region.create_next_worker_view(page * blocks_per_chunk))
        refs = kv_caches.group_data_refs
        self._store = _CpuCopyHandler(gpu_tensors, cpu_tensors, blocks_per_chunk, refs, True)
        self._load = _CpuCopyHandler(gpu_tensors, cpu_tensors, blocks_per_chunk, refs, False)
        logger.info(
            "CPU-platform offload worker: %d KV tensors, %d blocks per chunk",
            len(gpu_tensors),
            blocks_per_chunk,
        )

    def submit_store(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        return self._store.transfer_async(job_id, src_spec, dst_spec)

    def submit_load(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        return self._load.transfer_async(job_id, src_spec, dst_spec)

    def get_finished(self) -> list[TransferResult]:
        return self._store.get_finished() + self._load.get_finished()

    def wait(self, job_ids: set[int]) -> None:
        return

    def shutdown(self) -> None:
        if self._region is not None:
            self._region.cleanup()
            self._region = None


class DynamoExtOffloadingSpec(TieringOffloadingSpec):
    """vLLM's tiering spec (CPU primary + secondary tiers) with a CPU-platform copy worker."""

    _cpu_worker: CpuCopyOffloadingWorker | None = None

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if current_platform.is_cuda_alike() or current_platform.is_xpu():
            return super().get_worker(kv_caches)
        if self._cpu_worker is None:
            if self.config.canonical_layout:
                raise ValueError(
                    "canonical_layout is not supported by the CPU-platform offload worker"
                )
            rank = 0 if self.replicated_layout else self.config.parallel.rank
            region = SharedOffloadRegion(
                engine_id=self._engine_id,
                num_chunks=self.num_chunks,
                rank=rank,
                kv_bytes_per_chunk=self.kv_bytes_per_chunk,
                cpu_page_size=self.cpu_page_size_per_worker,
            )
            try:
                self._cpu_worker = CpuCopyOffloadingWorker(kv_caches, self.blocks_per_chunk, region)
            except Exception:
                region.cleanup()
                raise
        return self._cpu_worker


# --------------------------------------------------------------------------- pool tier
def external_hash(key: OffloadKey) -> int:
    """The 64-bit block hash that KV events carry (what the router indexes) for a key."""
    h = maybe_convert_block_hash(BlockHash(get_offload_block_hash(key)))
    return to_external(h) if isinstance(h, bytes) else h  # VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0


def pool_key(namespace: str, block_hash: int, group_idx: int = 0) -> str:
    """Pool object name of one chunk: the chained prefix hash under a layout namespace."""
    return f"{namespace}/{block_hash & 0xFFFFFFFFFFFFFFFF:016x}-g{group_idx}"


def default_namespace(spec: Any, chunk_bytes: int) -> str:
    """Chunks are raw engine pages, so only workers with the same model and KV layout may
    share them: the namespace hashes what fixes the bytes of a chunk."""
    cfg = spec.config  # vLLM's OffloadingConfig
    par = cfg.parallel
    ident = (
        f"{os.path.basename(cfg.model.name.rstrip('/'))}|{cfg.model.dtype}|{chunk_bytes}|"
        f"{spec.blocks_per_chunk}|tp{par.tp_size}|pp{par.pp_size}|w{par.world_size}"
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


class _Staging:
    """RAM staging area for prefetched chunks: key -> bytes, LRU under a byte limit."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._d: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.used -= len(old)
            self._d[key] = data
            self.used += len(data)
            while self.used > self.limit and self._d:
                _, ev = self._d.popitem(last=False)
                self.used -= len(ev)

    def pop(self, key: str) -> bytes | None:
        with self._lock:
            data = self._d.pop(key, None)
            if data is not None:
                self.used -= len(data)
            return data

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._d

    def __len__(self) -> int:
        return len(self._d)


def _engine_waker() -> Callable[[], None] | Literal[False]:
    """How to wake this process's idle vLLM engine core: put vLLM's own no-op ``WAKEUP``
    request into its input queue (what vLLM does on shutdown); its busy loop then sees the
    connector's pending work and steps. Found by walking the scheduler thread's stack up to
    the engine core (``input_queue`` + ``has_work``); False where there is none (e.g. the
    in-process ``LLM`` engine of tests), then removals wait for the next step."""
    from vllm.v1.engine import EngineCoreRequestType

    f: types.FrameType | None = sys._getframe(1)
    while f is not None:
        obj = f.f_locals.get("self")
        q = getattr(obj, "input_queue", None)
        if q is not None and hasattr(obj, "has_work") and hasattr(q, "put_nowait"):
            return lambda: q.put_nowait((EngineCoreRequestType.WAKEUP, None))
        f = f.f_back
    logger.info("pool tier: no engine core input queue found; removals wait for a step")
    return False


class _PoolLookup(AsyncLookupManager):
    """vLLM's async lookup for the pool tier: the scheduler thread never stats the pool
    (a remote 3FS mount); a batch of keys per step is checked on a background thread."""

    def __init__(self, tier: PoolTier) -> None:
        super().__init__(tier_type=tier.tier_type)
        self._tier = tier

    def batch_lookup(self, keys: list[OffloadKey], req_context: ReqContext) -> Iterable[bool]:
        t = self._tier
        # Ordered before the disk tier: a chunk the local disk holds is the disk tier's
        # to promote (a local read beats the remote pool), unless prefetch staged it.
        return [
            n in t.staging or (not t.on_disk(k) and t.pool.contains(n))
            for k, n in ((k, t.key_of(k)) for k in keys)
        ]


class PoolTier(SecondaryTierManager):
    """Secondary tier on the shared KV pool (3FS or any shared directory), with prefetch.

    Store: primary-tier chunk bytes -> ``KvPool.put`` (temp + rename, checksummed) on
    vLLM's I/O thread pool; a ``BlockStored(STORAGE, REMOTE)`` event once it is durable.
    Load: staging RAM if the router prefetched the chunk, else ``KvPool.get_into`` straight
    into the primary-tier slot. A chunk another worker wrote is a hit here too: the pool is
    global, and keys are the chained block hash plus a layout namespace.
    """

    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        root: str,
        capacity_bytes: int | None = None,
        namespace: str | None = None,
        prefetch_endpoint: str | None = None,
        staging_bytes: int = 256 << 20,
        n_read_threads: int = 4,
        n_write_threads: int = 4,
        enable_kv_events: bool = True,
        locality: str | None = "REMOTE",
        read_latency_ms: float = 0.0,
        sweep_interval_s: float = 10.0,
        disk_root: str | None = None,
        disk_index_entries: int = 1 << 18,
        backpressure_detector: Any = None,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        self.locality = Locality(locality) if locality else None
        self._chunk = self.block_size_bytes
        self._kv = primary_kv_view.cast("B") if primary_kv_view.format != "B" else primary_kv_view
        self.namespace = namespace or default_namespace(offloading_spec, self._chunk)
        # Benchmarks only: added to every chunk read from the pool, to stand in for a remote
        # 3FS read of a real model's chunk (an 8B model's 128-token chunk is 16 MiB: ~2 ms
        # at 8 GB/s) when the "pool" is a local directory in page cache.
        self._read_latency_s = max(0.0, float(read_latency_ms)) / 1e3
        from dynamo_ext.pool import KvPool

        # chunk path -> (key, when announced): what this worker told the router the pool holds
        self._announced: dict[str, tuple[OffloadKey, float]] = {}
        # (when, path) of recent announcements: the pool's sweeper journals what vanished
        # between two of its scans, so a chunk written and removed before its next scan is
        # never journaled; chunks younger than a few sweeps are checked with a stat instead.
        self._young: deque[tuple[float, str]] = deque()
        self._young_s = 3 * sweep_interval_s
        self._gone: list[OffloadKey] = []
        self._ann_lock = threading.Lock()
        self.pool = KvPool(
            root,
            capacity_bytes,
            sweep_interval_s=sweep_interval_s,
            on_scan=self._on_scan,
            on_removed=self._on_removed,
        )
        want_events = enable_kv_events and offloading_spec.kv_events_config.enable_kv_cache_events
        self.events: list[OffloadingEvent] | None = [] if want_events else None
        self._io = DualQueueThreadPool(n_read_threads, n_write_threads, "dynamo_ext_pool")
        # job id -> (keys, pool names, is a store)
        self._jobs: dict[int, tuple[list[OffloadKey], list[str], bool]] = {}
        self._loaded: dict[int, int] = {}  # load job id -> chunks loaded (I/O threads write)
        self._lookups = _PoolLookup(self)
        self.staging = _Staging(staging_bytes)
        # Wakes an idle engine core (found on the first engine step) so that removals are
        # published without waiting for its next request; False: not found, don't look again.
        self._wake: Callable[[], None] | Literal[False] | None = None
        # The worker's disk tier (vLLM's fs tier at ``disk_root``), for prefetch: its files
        # are named by the full block hash, the router knows 64 bits of it, so keep the
        # keys this tier saw stored (every chunk is stored to every tier): (hash, group)->key.
        self._disk: FileMapper | None = None
        self._disk_keys: OrderedDict[tuple[int, int], OffloadKey] = OrderedDict()
        self._disk_index_entries = disk_index_entries
        if disk_root:
            self._disk = FileMapper.from_offloading_spec(
                root_dir=disk_root,
                offloading_spec=offloading_spec,
                blocks_per_file=offloading_spec.blocks_per_chunk,
                parallel_agnostic=True,
            )
        self.counters = {
            "staged_hits": 0,
            "pool_reads": 0,
            "prefetched": 0,
            "prefetched_from_disk": 0,
            "prefetch_misses": 0,
        }
        self._stop = threading.Event()
        self._prefetch_thread: threading.Thread | None = None
        self.prefetch_endpoint: str | None = None
        if prefetch_endpoint:
            self._start_prefetch(prefetch_endpoint)
        logger.info(
            "pool tier at %s (namespace %s, %d B chunks, prefetch %s)",
            root,
            self.namespace,
            self._chunk,
            self.prefetch_endpoint or "off",
        )

    # ---- keys
    def key_of(self, key: OffloadKey) -> str:
        return pool_key(self.namespace, external_hash(key), get_offload_group_idx(key))

    # ---- SecondaryTierManager
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        if self.key_of(key) in self.staging:  # prefetched: known now, no pool access
            return LookupResult.HIT
        found = self._lookups.lookup(key, req_context)
        if found is None:
            return LookupResult.RETRY  # checked on the lookup thread; answer next step
        return LookupResult.HIT if found else LookupResult.MISS

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self._lookups.flush()
        if self._wake is None:
            self._wake = _engine_waker()

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._lookups.cleanup(req_context.req_id)

    def submit_store(self, job_metadata: TransferJob) -> None:
        self._submit(job_metadata, store=True)

    def submit_load(self, job_metadata: TransferJob) -> None:
        self._submit(job_metadata, store=False)

    def on_disk(self, key: OffloadKey) -> bool:
        return self._disk is not None and os.path.exists(self._disk.get_file_name(key))

    def _submit(self, job: TransferJob, store: bool) -> None:
        keys = list(job.keys)
        offsets = [int(c) * self._chunk for c in job.chunk_ids]
        names = [self.key_of(k) for k in keys]
        if store and self._disk is not None:
            with self._ann_lock:
                for k in keys:
                    ident = (external_hash(k), get_offload_group_idx(k))
                    self._disk_keys[ident] = k
                    self._disk_keys.move_to_end(ident)
                while len(self._disk_keys) > self._disk_index_entries:
                    self._disk_keys.popitem(last=False)
        self._jobs[job.job_id] = (keys, names, store)
        if store:
            task = functools.partial(self._store_chunks, names, offsets)
            self._io.enqueue_store(job.job_id, 1, [task])
        else:
            task = functools.partial(self._load_chunks, job.job_id, names, offsets)
            self._io.enqueue_load(job.job_id, 1, [task])

    def _store_chunks(self, names: list[str], offsets: list[int]) -> None:
        for name, off in zip(names, offsets, strict=True):
            if not self.pool.contains(name):
                self.pool.put(name, self._kv[off : off + self._chunk])

    def _load_chunks(self, job_id: int, names: list[str], offsets: list[int]) -> None:
        t0 = time.perf_counter()
        from_staging = 0
        for i, (name, off) in enumerate(zip(names, offsets, strict=True)):
            dst = self._kv[off : off + self._chunk]
            staged = self.staging.pop(name)
            if staged is not None and len(staged) == self._chunk:
                dst[:] = staged
                from_staging += 1
            else:
                if self._read_latency_s:
                    time.sleep(self._read_latency_s)
                n = self.pool.get_into(name, dst)
                if n != self._chunk:
                    raise OSError(f"pool chunk {name} missing or corrupt (read {n})")
            self._loaded[job_id] = i + 1
        self.counters["staged_hits"] += from_staging
        self.counters["pool_reads"] += len(names) - from_staging
        logger.info(
            "pool load: %d chunks into CPU (%d from prefetch staging, %d read from the pool) "
            "in %.2f ms",
            len(names),
            from_staging,
            len(names) - from_staging,
            (time.perf_counter() - t0) * 1e3,
        )

    def get_finished_jobs(self) -> Iterable[JobResult]:
        results = []
        for job_id, success, transfer_time in self._io.get_finished():
            keys, names, is_store = self._jobs.pop(job_id, ([], [], False))
            if is_store and success and keys and self.events is not None:
                self.events.append(
                    OffloadingEvent(
                        keys=keys,
                        medium=self.medium,
                        removed=False,
                        locality=self.locality,
                        removal_expected=True,  # keep its metadata for the BlockRemoved
                    )
                )
                now = time.time()  # compared with the pool's (cross-process) scan times
                with self._ann_lock:
                    for k, name in zip(keys, names, strict=True):
                        path = self.pool.path_of(name)
                        self._announced[path] = (k, now)
                        self._young.append((now, path))
            loaded = self._loaded.pop(job_id, 0)
            successful = None
            if not success:
                logger.warning(
                    "pool %s of %d chunks failed (job %d)",
                    "store" if is_store else "load",
                    len(keys),
                    job_id,
                )
                if not is_store:
                    # The chunks before the bad one are in the primary tier; the rest are
                    # recomputed, and their cached "found" verdict must not send the
                    # scheduler back to the pool for them (vLLM's livelock #49176).
                    self._lookups.mark_miss(keys[loaded:])
                    successful = tuple(keys[:loaded]) or None
            results.append(
                JobResult(
                    job_id=job_id,
                    success=success,
                    successful_keys=successful,
                    transfer_time=transfer_time,
                    transfer_bytes=len(keys) * self._chunk if keys else None,
                )
            )
        return results

    def has_pending_work(self) -> bool:
        # Pending removal announcements keep the engine stepping until they are published
        # (vLLM steps while its offloading connector has pending work).
        return bool(self._jobs) or (bool(self._gone) and self.events is not None)

    def _on_removed(self, entries: list[tuple[float, str]]) -> None:
        """Sweeper thread, every sweep interval: the pool's removal journal since the last
        call. Chunks this worker announced before they were found missing are announced as
        removed at the engine's next step, which an idle engine is woken up for."""
        now = time.time()
        with self._ann_lock:
            young = list(self._young)
            while self._young and self._young[0][0] < now - self._young_s:
                self._young.popleft()
        entries = entries + [(now, p) for t, p in young if not os.path.exists(p)]
        with self._ann_lock:
            gone = {p for ts, p in entries if p in self._announced and self._announced[p][1] < ts}
            for p in gone:
                self._gone.append(self._announced.pop(p)[0])
        if gone:
            logger.info("pool tier: %d announced chunks left the pool", len(gone))
            wake = self._wake
            if wake:  # an idle engine blocks on its input queue: nudge it to step once
                wake()

    def _on_scan(self, existing: set[str], scan_started: float) -> None:
        """A full listing (the journal could not be followed): reconcile with it."""
        with self._ann_lock:
            missing = [p for p in self._announced if p not in existing]
        self._on_removed([(scan_started, p) for p in missing])

    def take_events(self) -> Iterable[OffloadingEvent]:
        if self.events is None:
            return ()
        with self._ann_lock:
            gone, self._gone = self._gone, []
        if gone:
            self.events.append(
                OffloadingEvent(keys=gone, medium=self.medium, removed=True, locality=self.locality)
            )
        if not self.events:
            return ()
        out, self.events = self.events, []
        return out

    def drain_jobs(self) -> None:
        self._io.wait_idle()

    def shutdown(self) -> None:
        self._stop.set()
        self._lookups.shutdown()
        if self._prefetch_thread is not None:
            self._prefetch_thread.join(timeout=2)
        try:
            self._io.shutdown()
        except Exception:
            logger.exception("pool tier I/O pool shutdown failed")
        self.pool.close()

    # ---- prefetch
    def prefetch(self, block_hashes: Sequence[int], group_idx: int = 0) -> tuple[int, int]:
        """Read the longest prefix of ``block_hashes`` that this worker's disk tier or the
        pool holds into RAM staging, now (the local disk first).

        Returns (chunks staged, chunks already staged). Stops at the first chunk neither
        holds: later blocks of the prefix are useless without it.
        """
        staged = already = from_disk = 0
        for h in block_hashes:
            name = pool_key(self.namespace, h, group_idx)
            if name in self.staging:
                already += 1
                continue
            data = self._read_disk(h, group_idx)
            if data is not None:
                from_disk += 1
            else:
                if self._read_latency_s:
                    time.sleep(self._read_latency_s)
                data = self.pool.get(name)
            if data is None or len(data) != self._chunk:
                self.counters["prefetch_misses"] += 1
                break
            self.staging.put(name, data)
            staged += 1
        self.counters["prefetched"] += staged
        self.counters["prefetched_from_disk"] += from_disk
        return staged, already

    def _read_disk(self, block_hash: int, group_idx: int) -> bytes | None:
        if self._disk is None:
            return None
        with self._ann_lock:
            key = self._disk_keys.get((block_hash & 0xFFFFFFFFFFFFFFFF, group_idx))
        if key is None:
            return None
        try:
            with open(self._disk.get_file_name(key), "rb", buffering=0) as f:
                data = f.read(self._chunk + 1)
        except OSError:
            return None
        return data if len(data) == self._chunk else None

    def _start_prefetch(self, endpoint: str) -> None:
        # With DYNAMO_EXT_WORKER_CURVE_* keys the PULL is a CURVE server admitting the router only:
        # nobody else can make this worker read its disk or the pool.
        curve = load_curve(CurveConfig.from_env(), "DYNAMO_EXT_WORKER_CURVE")
        ctx: zmq.Context = zmq.Context() if curve is not None else zmq.Context.instance()
        zap = start_authenticator(ctx, curve) if curve is not None else None
        sock: zmq.Socket = ctx.socket(zmq.PULL)
        if curve is not None:
            curve.server(sock)
        sock.setsockopt(zmq.LINGER, 0)
        if endpoint.endswith(":0"):
            port = sock.bind_to_random_port(endpoint.rsplit(":", 1)[0])
            endpoint = f"{endpoint.rsplit(':', 1)[0]}:{port}"
        else:
            sock.bind(endpoint)
        self.prefetch_endpoint = endpoint

        def loop() -> None:
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            bad = 0
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                raw = sock.recv()
                try:
                    req: PrefetchRequest = decode_prefetch(raw)
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    bad += 1
                    logger.warning("dropped malformed prefetch message (%d so far): %s", bad, e)
                    continue
                t0 = time.perf_counter()
                disk0 = self.counters["prefetched_from_disk"]
                try:
                    staged, already = self.prefetch(req.block_hashes, req.group_idx)
                except Exception:
                    logger.exception("prefetch %s failed", req.request_id)
                    continue
                logger.info(
                    "prefetch %s: staged %d chunks (%d from local disk, %d already) of %d "
                    "in %.1f ms",
                    req.request_id,
                    staged,
                    self.counters["prefetched_from_disk"] - disk0,
                    already,
                    len(req.block_hashes),
                    (time.perf_counter() - t0) * 1e3,
                )
            sock.close(0)
            if zap is not None:
                zap.stop()
                ctx.term()

        self._prefetch_thread = threading.Thread(
            target=loop, name="dynamo-ext-prefetch", daemon=True
        )
        self._prefetch_thread.start()


# --------------------------------------------------------------------------- config builder
def offload_transfer_config(
    cpu_bytes: int,
    *,
    disk_dir: str | None = None,
    pool_root: str | None = None,
    pool_capacity_bytes: int | None = None,
    prefetch_endpoint: str | None = None,
    pool_read_latency_ms: float = 0.0,
    pool_sweep_interval_s: float | None = None,
    nixl: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``--kv-transfer-config`` dict for CPU (+ disk) (+ pool) offload, optionally
    composed with NIXL disaggregation through vLLM's ``MultiConnector``.

    ``nixl`` is the DynamoExtConnector/NixlConnector config (``kv_role`` etc.); with it the
    result is a MultiConnector whose first connector serves P->D transfers and whose second
    offloads: one flag gives both.
    """
    tiers: list[dict[str, Any]] = []
    if pool_root:
        # First in lookup order: it answers for prefetched (RAM-staged) chunks, from the
        # local disk tier too, and leaves chunks on the local disk to the disk tier.
        pool: dict[str, Any] = {"type": "PoolTier", "module_path": SPEC_MODULE, "root": pool_root}
        if disk_dir:
            pool["disk_root"] = disk_dir
        if pool_capacity_bytes:
            pool["capacity_bytes"] = int(pool_capacity_bytes)
        if prefetch_endpoint:
            pool["prefetch_endpoint"] = prefetch_endpoint
        if pool_read_latency_ms:
            pool["read_latency_ms"] = float(pool_read_latency_ms)
        if pool_sweep_interval_s is not None:
            pool["sweep_interval_s"] = float(pool_sweep_interval_s)
        tiers.append(pool)
    if disk_dir:
        tiers.append(
            {"type": "fs", "root_dir": disk_dir, "enable_kv_events": True, "locality": "LOCAL"}
        )
    offload = {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "spec_name": "DynamoExtOffloadingSpec",
            "spec_module_path": SPEC_MODULE,
            "cpu_bytes_to_use": int(cpu_bytes),
            "secondary_tiers": tiers,
        },
    }
    if nixl is None:
        return offload
    role = nixl.get("kv_role", "kv_both")
    return {
        "kv_connector": "MultiConnector",
        "kv_role": role,
        "kv_connector_extra_config": {
            "connectors": [
                {"kv_connector": "DynamoExtConnector", **nixl, "kv_role": role},
                {**offload, "kv_role": role},
            ]
        },
    }
