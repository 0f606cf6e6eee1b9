"""The router sidecar: one asyncio process that indexes the fleet's KV caches and answers
"which worker?" over ZeroMQ.

Sockets (all ``zmq.asyncio`` on one event loop):

* one SUB per worker, connected to the worker's vLLM KV event PUB (``[topic, seq, payload]``),
  with a DEALER to the publisher's replay ROUTER used when a sequence gap is seen and at
  start (the router may have missed history);
* one SUB connected to every worker's metrics PUB (``WorkerMetrics`` name their worker);
* one ROUTER bound at ``config.bind`` for the control plane: ``[header, corr, payload]``
  from a DEALER, answered ``[header, corr, reply]`` unless ``corr`` is zero.

Input never crashes the router: a malformed frame is counted, logged with its origin and
dropped, and the index is only changed by a fully decoded batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Iterable

import msgspec
import zmq
import zmq.asyncio

from dynamo_ext.config import RouterConfig
from dynamo_ext.errors import ConfigError
from dynamo_ext.hashing import BlockHasher, to_external, token_block_hashes
from dynamo_ext.protocol import (
    MEDIUM_CPU,
    MEDIUM_DISK,
    MEDIUM_GPU,
    MEDIUM_REMOTE,
    PROTOCOL_HEADER,
    REPLAY_END_SEQ,
    Ack,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Cleared,
    ErrorReply,
    FleetState,
    HashesBatch,
    KVEventBatch,
    PrefetchRequest,
    PrefillFinished,
    RemovedHashes,
    RequestFinished,
    RouteRequest,
    RouteResponse,
    RouterQuery,
    StoredHashes,
    WorkerDeregistration,
    WorkerFailed,
    WorkerMetrics,
    WorkerRegistration,
    WorkerState,
    control_decoder,
    encode,
    event_tier,
    hashes_batch_decoder,
    kv_batch_decoder,
    metrics_decoder,
    seq_bytes,
)
from dynamo_ext.router.indexer import KvIndex
from dynamo_ext.router.metrics import RouterMetrics
from dynamo_ext.router.scorer import Scorer
from dynamo_ext.router.sequences import ActiveSequences, WorkerLoad

log = logging.getLogger("dynamo_ext.router")

_ROLES_FOR = {
    "prefill": ("prefill", "both"),
    "decode": ("decode", "both"),
    # A decode worker can prefill locally (conditional disaggregation); prefill-only
    # workers stop after one token and never serve a whole request.
    "aggregated": ("both", "decode"),
}


class WorkerEntry:
    """Everything the router knows about one worker; doubles as a scorer candidate."""

    __slots__ = (
        "worker_id",
        "reg",
        "slot",
        "static",
        "metrics",
        "load",
        "last_seen",
        "failed_until",
        "up",
        "last_seq",
        "dup_floor",
        "kv_task",
        "xlat",
        "hash_checked",
        "m_up",
        "routed_blocks",
        "hit_blocks",
        "events_applied",
        "m_children",
        "dirty",
        "base",
        "kv_full",
    )

    def __init__(self, reg: WorkerRegistration, slot: int, load: WorkerLoad, static: bool):
        self.worker_id = reg.worker_id
        self.reg = reg
        self.slot = slot
        self.static = static
        self.metrics: WorkerMetrics | None = None
        self.load = load
        self.last_seen = time.monotonic()
        self.failed_until = 0.0
        self.up = True
        self.last_seq = -1  # last applied KV batch sequence number
        self.dup_floor = 0  # live seqs in [dup_floor, last_seq] are replay duplicates
        self.kv_task: asyncio.Task[None] | None = None
        # tokens mode only: engine hash -> router hash, per tier.
        self.xlat: dict[str, dict[int, int]] = {}
        self.hash_checked = False
        self.m_up: object = None
        self.routed_blocks = 0
        self.hit_blocks = 0
        self.events_applied = 0  # exported as a counter by a collector, not per event
        self.m_children: dict[str, object] = {}
        # Scorer cache: the request-independent part of this worker's cost.
        self.dirty = True
        self.base = 0.0
        self.kv_full = False


class RouterServer:
    def __init__(self, config: RouterConfig, ctx: zmq.asyncio.Context | None = None) -> None:
        self.config = config
        self.ctx = ctx or zmq.asyncio.Context()
        self._sync_ctx: zmq.Context = zmq.Context.instance()
        self._prefetch_socks: dict[str, zmq.Socket] = {}
        self._own_ctx = ctx is None
        self.index = KvIndex(config.max_blocks_per_worker)
        self.sequences = ActiveSequences(config.request_ttl_s)
        self.scorer = Scorer(config.scorer, config.block_size)
        self.hasher = BlockHasher(
            config.block_size, config.hash_mode, config.hash_algo, config.hash_seed
        )
        self.metrics = RouterMetrics(self._worker_counters)
        self.workers: dict[str, WorkerEntry] = {}
        self._cand_cache: dict[str, tuple[list[WorkerEntry], int, dict[str, int]]] = {}
        self._pool_mask: int | None = None  # workers with a pool tier (they registered one)
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_sub: zmq.asyncio.Socket | None = None
        self._metrics_endpoints: set[str] = set()
        self._router: zmq.asyncio.Socket | None = None
        self.bound_endpoint: str | None = None
        self.metrics_port: int | None = None
        self._http_server: object = None
        self._stopped = asyncio.Event()
        self._warned: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._router = self.ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._router.bind(self.config.bind)
        self.bound_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._metrics_sub = self.ctx.socket(zmq.SUB)
        self._metrics_sub.setsockopt(zmq.LINGER, 0)
        self._metrics_sub.setsockopt(zmq.SUBSCRIBE, b"")
        if self.config.metrics_port is not None:
            self._start_http()
        for reg in self.config.workers:
            self._add_worker(reg, static=True)
        self._tasks += [
            asyncio.create_task(self._serve_control(), name="router-control"),
            asyncio.create_task(self._serve_metrics(), name="router-metrics"),
            asyncio.create_task(self._housekeeping(), name="router-housekeeping"),
        ]
        # Start-up objects live as long as the process: keep them out of GC scans, which
        # would otherwise add pauses to routing decisions.
        gc.collect()
        gc.freeze()
        log.info(
            "router listening on %s (block_size=%d hash_mode=%s scorer=%s, %d static workers)",
            self.bound_endpoint,
            self.config.block_size,
            self.config.hash_mode,
            self.config.scorer.mode,
            len(self.config.workers),
        )

    def _start_http(self) -> None:
        from prometheus_client import start_http_server

        assert self.config.metrics_port is not None
        assert self.config.metrics_port is not None
        server, _thread = start_http_server(
            self.config.metrics_port,
            addr=self.config.metrics_host,
            registry=self.metrics.registry,
        )
        self._http_server = server
        self.metrics_port = server.server_port
        log.info(
            "router metrics on http://%s:%d/metrics", self.config.metrics_host, self.metrics_port
        )

    async def stop(self) -> None:
        tasks = self._tasks + [w.kv_task for w in self.workers.values() if w.kv_task]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for s in (self._router, self._metrics_sub):
            if s is not None:
                s.close(linger=0)
        for ps in self._prefetch_socks.values():
            ps.close(linger=0)
        self._prefetch_socks.clear()
        if self._http_server is not None:
            self._http_server.shutdown()  # type: ignore[attr-defined]
        if self._own_ctx:
            self.ctx.term()
        self._stopped.set()

    async def run_forever(self) -> None:
        await self.start()
        try:
            await self._stopped.wait()
        finally:
            if not self._stopped.is_set():
                await self.stop()

    # ------------------------------------------------------------------ workers
    def _add_worker(self, reg: WorkerRegistration, static: bool) -> WorkerEntry:
        if reg.block_size is not None and reg.block_size != self.config.block_size:
            raise ConfigError(
                "block_size",
                f"worker {reg.worker_id} uses block_size {reg.block_size}, router "
                f"{self.config.block_size}: prefixes would never match",
            )
        old = self.workers.get(reg.worker_id)
        if old is not None:
            if reg.instance_id and reg == old.reg:
                return old  # keep-alive from the same process: nothing changed
            # A new process (or new endpoints): its cache starts empty.
            self._drop_worker(old, remove_from_index=False)
            self.index.clear_worker(reg.worker_id)
        slot = self.index.add_worker(reg.worker_id)
        w = WorkerEntry(reg, slot, self.sequences.load(reg.worker_id), static)
        w.m_up = self.metrics.worker_up.labels(reg.worker_id)
        self.workers[reg.worker_id] = w
        if reg.kv_events_endpoint:
            w.kv_task = asyncio.create_task(self._kv_loop(w), name=f"kv-{reg.worker_id}")
        if reg.metrics_endpoint and reg.metrics_endpoint not in self._metrics_endpoints:
            assert self._metrics_sub is not None
            self._metrics_sub.connect(reg.metrics_endpoint)
            self._metrics_endpoints.add(reg.metrics_endpoint)
        self._set_up(w, True, "registered")
        log.info(
            "worker %s added (engine=%s role=%s kv=%s metrics=%s http=%s)",
            reg.worker_id,
            reg.engine,
            reg.role,
            reg.kv_events_endpoint,
            reg.metrics_endpoint,
            reg.http_endpoint,
        )
        return w

    def _drop_worker(self, w: WorkerEntry, remove_from_index: bool = True) -> None:
        if w.kv_task is not None:
            w.kv_task.cancel()
        ep = w.reg.metrics_endpoint
        if (
            ep
            and ep in self._metrics_endpoints
            and not any(o.reg.metrics_endpoint == ep for o in self.workers.values() if o is not w)
        ):
            assert self._metrics_sub is not None
            with contextlib.suppress(zmq.ZMQError):
                self._metrics_sub.disconnect(ep)
            self._metrics_endpoints.discard(ep)
        self.sequences.drop_worker(w.worker_id)
        self.workers.pop(w.worker_id, None)
        if remove_from_index:
            self.index.remove_worker(w.worker_id)
        self._cand_cache.clear()
        self._pool_mask = None
        self._refresh_up_gauges()

    def _set_up(self, w: WorkerEntry, up: bool, why: str) -> None:
        if w.up != up:
            log.warning("worker %s marked %s: %s", w.worker_id, "UP" if up else "DOWN", why)
        w.up = up
        w.m_up.set(1 if up else 0)  # type: ignore[attr-defined]
        self._cand_cache.clear()
        self._pool_mask = None
        self._refresh_up_gauges()

    def _refresh_up_gauges(self) -> None:
        n_up = sum(1 for w in self.workers.values() if w.up)
        self.metrics.workers_up.set(n_up)
        self.metrics.workers_down.set(len(self.workers) - n_up)

    def _candidates(self, role: str) -> tuple[list[WorkerEntry], int, dict[str, int]]:
        """Live workers for a request role, their index mask and positions (cached)."""
        c = self._cand_cache.get(role)
        if c is None:
            roles = _ROLES_FOR.get(role, ("both",))
            ups = [w for w in self.workers.values() if w.up]
            ws = [w for w in ups if w.reg.role in roles] or (ups if role == "aggregated" else [])
            c = self._cand_cache[role] = (
                ws,
                self.index.mask_of(w.worker_id for w in ws),
                {w.worker_id: i for i, w in enumerate(ws)},
            )
        return c

    # ------------------------------------------------------------------ KV events
    async def _kv_loop(self, w: WorkerEntry) -> None:
        reg = w.reg
        assert reg.kv_events_endpoint is not None
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.setsockopt(zmq.SUBSCRIBE, reg.kv_events_topic.encode())
        initial = bool(reg.replay_endpoint and self.config.initial_replay)
        monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED) if initial else None
        sub.connect(reg.kv_events_endpoint)
        resync_ms = int(self.config.resync_interval_s * 1000) or None
        try:
            if monitor is not None:
                # ZMQ's connect returns before the subscription reaches the publisher; a
                # batch published in between is dropped. Replay once the handshake is done,
                # so whatever the replay misses queues on `sub`.
                await self._joined(w, monitor)
                sub.disable_monitor()
                monitor.close(linger=0)
                monitor = None
                await self._replay(w, 0, initial=True)
            while True:
                if resync_ms and reg.replay_endpoint and not await sub.poll(resync_ms):
                    await self._replay(w, w.last_seq + 1, resync=True)
                    continue
                frames = await sub.recv_multipart(copy=True)
                await self._on_kv_frames(w, frames)
        except asyncio.CancelledError:
            raise
        except zmq.ZMQError as exc:
            log.error("KV event socket of worker %s failed: %s", w.worker_id, exc)
        finally:
            if monitor is not None:
                monitor.close(linger=0)
            sub.close(linger=0)

    async def _joined(self, w: WorkerEntry, monitor: zmq.asyncio.Socket) -> None:
        """Wait (bounded) until the KV SUB's handshake with the publisher succeeded."""
        if await monitor.poll(int(self.config.replay_timeout_s * 1000)):
            await monitor.recv_multipart()
            await asyncio.sleep(0.01)  # the subscription frame follows the handshake
        else:
            log.warning(
                "KV event socket of worker %s not connected after %.1fs; replaying anyway",
                w.worker_id,
                self.config.replay_timeout_s,
            )

    def _malformed(self, source: str, origin: str, why: object) -> None:
        self.metrics.malformed.labels(source).inc()
        key = (source, origin)
        if key not in self._warned:  # log the first of each kind; the counter has the rest
            self._warned.add(key)
            log.warning("dropped malformed %s message from %s: %s", source, origin, why)

    async def _on_kv_frames(self, w: WorkerEntry, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self._malformed("kv", w.worker_id, f"{len(frames)} frames")
            return
        seq = int.from_bytes(frames[1], "big")
        try:
            batch = self._decode_kv(w, frames[2])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._malformed("kv", w.worker_id, exc)
            # The batch is lost to us but its seq is not a gap: replaying it won't help.
            if seq == w.last_seq + 1:
                w.last_seq = seq
            return
        last = w.last_seq
        if last < 0 or seq == last + 1:
            self._apply_batch(w, batch)
        elif seq <= last:
            if seq >= w.dup_floor:
                return  # already applied from a replay
            # The publisher's counter went back: a new process with an empty cache.
            log.warning(
                "worker %s KV seq went back %d -> %d: restart, clearing its index",
                w.worker_id,
                last,
                seq,
            )
            self.metrics.restarts.labels(w.worker_id).inc()
            self.index.clear_worker(w.worker_id)
            w.xlat.clear()
            self._apply_batch(w, batch)
        else:
            self.metrics.seq_gaps.labels(w.worker_id).inc()
            log.warning("worker %s KV seq gap: expected %d got %d", w.worker_id, last + 1, seq)
            if w.reg.replay_endpoint:
                await self._replay(w, last + 1)
            if seq > w.last_seq:
                self._apply_batch(w, batch)
            return
        w.last_seq = seq
        w.dup_floor = seq + 1

    async def _replay(
        self, w: WorkerEntry, start: int, initial: bool = False, resync: bool = False
    ) -> bool:
        assert w.reg.replay_endpoint is not None
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(w.reg.replay_endpoint)
        timeout_ms = int(self.config.replay_timeout_s * 1000)
        applied = 0
        try:
            await dealer.send_multipart([b"", seq_bytes(start)])
            while True:
                if not await dealer.poll(timeout_ms):
                    self.metrics.replays.labels(w.worker_id, "timeout").inc()
                    if resync and not applied:
                        return False  # an idle worker that stopped answering: metrics tell
                    log.warning(
                        "replay from %s (seq %d) timed out after %d batches",
                        w.worker_id,
                        start,
                        applied,
                    )
                    return False
                frames = await dealer.recv_multipart()
                if len(frames) != 4 or len(frames[2]) != 8:
                    self._malformed("replay", w.worker_id, f"{len(frames)} frames")
                    continue
                if frames[2] == REPLAY_END_SEQ:
                    break
                seq = int.from_bytes(frames[2], "big")
                if seq <= w.last_seq:
                    continue
                try:
                    batch = self._decode_kv(w, frames[3])
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    self._malformed("replay", w.worker_id, exc)
                    continue
                if w.last_seq >= 0 and seq != w.last_seq + 1 and not initial:
                    # The publisher's buffer no longer holds what we missed.
                    self.metrics.replays.labels(w.worker_id, "incomplete").inc()
                self._apply_batch(w, batch)
                w.last_seq = seq
                applied += 1
        except zmq.ZMQError as exc:
            self.metrics.replays.labels(w.worker_id, "error").inc()
            log.warning("replay from %s failed: %s", w.worker_id, exc)
            return False
        finally:
            dealer.close(linger=0)
        w.dup_floor = start
        self.metrics.replays.labels(w.worker_id, "resync" if resync else "ok").inc()
        if applied:
            log.info(
                "replayed %d KV batches from worker %s (seq %d..%d)",
                applied,
                w.worker_id,
                start,
                w.last_seq,
            )
        return True

    def _decode_kv(self, w: WorkerEntry, payload: bytes) -> KVEventBatch | HashesBatch:
        # Token ids are only needed to hash them (tokens mode) or to check once that the
        # router reproduces the engine's hashes; otherwise skip them while decoding.
        if self.config.hash_mode == "tokens" or not w.hash_checked:
            return kv_batch_decoder.decode(payload)
        return hashes_batch_decoder.decode(payload)

    def _apply_batch(self, w: WorkerEntry, batch: KVEventBatch | HashesBatch) -> None:
        index = self.index
        slot = w.slot
        tokens_mode = self.config.hash_mode == "tokens"
        stored = removed = 0
        for ev in batch.events:
            t = type(ev)
            if t is StoredHashes:
                tier = event_tier(ev.medium, ev.locality)  # type: ignore[union-attr]
                stored += index.store(slot, _ints(ev.block_hashes), tier)  # type: ignore[union-attr]
            elif t is BlockStored:
                tier = event_tier(ev.medium, ev.locality)  # type: ignore[union-attr]
                hashes = _ints(ev.block_hashes)  # type: ignore[union-attr]
                if tokens_mode:
                    local = self._xlat_stored(w, ev, hashes, tier)  # type: ignore[arg-type]
                    if local is None:
                        continue
                    hashes = local
                elif not w.hash_checked and tier == MEDIUM_GPU:
                    self._check_hash(w, ev, hashes)  # type: ignore[arg-type]
                stored += index.store(slot, hashes, tier)
            elif t is BlockRemoved or t is RemovedHashes:
                tier = event_tier(ev.medium, ev.locality)  # type: ignore[union-attr]
                hashes = _ints(ev.block_hashes)  # type: ignore[union-attr]
                if tokens_mode:
                    x = w.xlat.get(tier)
                    if not x:
                        continue
                    hashes = [x.pop(h) for h in hashes if h in x]
                removed += index.remove(slot, hashes, tier)
            elif t is AllBlocksCleared or t is Cleared:
                index.clear_worker(w.worker_id, MEDIUM_GPU)
                w.xlat.pop(MEDIUM_GPU, None)
        w.events_applied += len(batch.events)
        if stored:
            self.metrics.kv_blocks.labels("stored").inc(stored)
        if removed:
            self.metrics.kv_blocks.labels("removed").inc(removed)

    def _xlat_stored(
        self, w: WorkerEntry, ev: BlockStored, hashes: list[int], tier: str
    ) -> list[int] | None:
        x = w.xlat.setdefault(tier, {})
        parent = ev.parent_block_hash
        if parent is None:
            p = 0
        else:
            ph = _ints([parent])[0]
            found = x.get(ph)
            if found is None:
                # The parent may sit in another tier (offload continues a GPU prefix).
                for other in w.xlat.values():
                    found = other.get(ph)
                    if found is not None:
                        break
            if found is None:
                self._malformed("kv_orphan", w.worker_id, "BlockStored with unknown parent")
                return None
            p = found
        local = token_block_hashes(ev.token_ids, ev.block_size, p)
        if len(local) != len(hashes):
            self._malformed("kv", w.worker_id, "token_ids do not cover block_hashes")
            return None
        x.update(zip(hashes, local, strict=True))
        return local

    def _check_hash(self, w: WorkerEntry, ev: BlockStored, hashes: list[int]) -> None:
        """Once per worker: can we reproduce the engine's hash from its tokens?"""
        if ev.parent_block_hash is not None or ev.extra_keys or ev.lora_name:
            return
        if ev.block_size != self.config.block_size:
            return
        w.hash_checked = True
        mine = self.hasher.engine_chain(None, ev.token_ids[: len(hashes) * ev.block_size])
        if mine != hashes:
            self.metrics.hash_mismatch.labels(w.worker_id).inc()
            log.error(
                "worker %s: engine block hashes differ from the router's (%s): check "
                "hash_algo / hash_seed (PYTHONHASHSEED) or use hash_mode 'tokens'",
                w.worker_id,
                self.config.hash_algo,
            )

    # ------------------------------------------------------------------ metrics events
    async def _serve_metrics(self) -> None:
        sub = self._metrics_sub
        assert sub is not None
        while True:
            frames = await sub.recv_multipart()
            if len(frames) != 3:
                self._malformed("metrics", "?", f"{len(frames)} frames")
                continue
            try:
                m = metrics_decoder.decode(frames[2])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._malformed("metrics", "?", exc)
                continue
            self.on_metrics(m)

    def on_metrics(self, m: WorkerMetrics) -> None:
        w = self.workers.get(m.worker_id)
        if w is None:
            self._malformed("metrics", m.worker_id, "metrics from an unregistered worker")
            return
        prev = w.metrics
        if prev is not None and m.heartbeat < prev.heartbeat:
            log.warning(
                "worker %s heartbeat went back %d -> %d: restarted, clearing its index",
                w.worker_id,
                prev.heartbeat,
                m.heartbeat,
            )
            self.metrics.restarts.labels(w.worker_id).inc()
            self.index.clear_worker(w.worker_id)
            w.xlat.clear()
        w.metrics = m
        w.dirty = True
        now = time.monotonic()
        w.last_seen = now
        if not w.up and now >= w.failed_until:
            self._set_up(w, True, "metrics resumed")

    # ------------------------------------------------------------------ housekeeping
    async def _housekeeping(self) -> None:
        period = min(0.25, self.config.worker_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            self.check_liveness()
            for wid in self.sequences.expire():
                self._touch(wid)
            self.metrics.active_requests.set(len(self.sequences))
            for tier, d in self.index._tiers.items():
                self.metrics.indexed_blocks.labels(tier).set(len(d))

    def check_liveness(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        timeout = self.config.worker_timeout_s
        for w in list(self.workers.values()):
            if w.up:
                if w.reg.metrics_endpoint and now - w.last_seen > timeout:
                    self._set_up(w, False, f"no metrics for {now - w.last_seen:.1f}s")
            elif not w.reg.metrics_endpoint and now >= w.failed_until:
                # Without metrics there is no other sign of life: retry after the holdoff.
                self._set_up(w, True, "failure holdoff over")

    # ------------------------------------------------------------------ control plane
    async def _serve_control(self) -> None:
        sock = self._router
        assert sock is not None
        while True:
            frames = await sock.recv_multipart()
            ident = frames[0]
            body = frames[1:]
            if body and body[0] == b"":  # a REQ peer adds an empty delimiter
                body = body[1:]
                ident_frames = [ident, b""]
            else:
                ident_frames = [ident]
            if len(body) != 3:
                self._malformed("control", ident.hex(), f"{len(body)} frames")
                continue
            header, corr, payload = body
            if header != PROTOCOL_HEADER:
                self._malformed("control", ident.hex(), f"protocol header {header[:32]!r}")
                reply: msgspec.Struct = ErrorReply(
                    "version", f"router speaks {PROTOCOL_HEADER.decode()}, got {header[:32]!r}"
                )
            else:
                reply = self.handle(payload, origin=ident.hex())
            if corr != b"\x00" * 8 and reply is not None:
                await sock.send_multipart(ident_frames + [PROTOCOL_HEADER, corr, encode(reply)])

    def handle(self, payload: bytes, origin: str = "local") -> msgspec.Struct:
        try:
            msg = control_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._malformed("control", origin, exc)
            return ErrorReply("bad_request", f"malformed message: {exc}")
        try:
            return self.dispatch(msg)
        except ConfigError as exc:
            return ErrorReply("bad_request", str(exc))
        except Exception as exc:  # one bad request must not take the router down
            log.exception("error handling %s from %s", type(msg).__name__, origin)
            return ErrorReply("internal", f"{type(exc).__name__}: {exc}")

    def dispatch(self, msg: msgspec.Struct) -> msgspec.Struct:
        t = type(msg)
        if t is RouteRequest:
            return self.route(msg)  # type: ignore[arg-type]
        if t is RequestFinished:
            return Ack(self._touch(self.sequences.finish(msg.request_id)))  # type: ignore[attr-defined]
        if t is PrefillFinished:
            return Ack(self._touch(self.sequences.prefill_done(msg.request_id)))  # type: ignore[attr-defined]
        if t is WorkerRegistration:
            self._add_worker(msg, static=False)  # type: ignore[arg-type]
            return Ack(True, f"registered {msg.worker_id}")  # type: ignore[attr-defined]
        if t is WorkerDeregistration:
            w = self.workers.get(msg.worker_id)  # type: ignore[attr-defined]
            if w is not None:
                self._drop_worker(w)
                log.info("worker %s deregistered", w.worker_id)
            return Ack(w is not None)
        if t is WorkerFailed:
            return Ack(self.report_failure(msg.worker_id, msg.reason))  # type: ignore[attr-defined]
        if t is RouterQuery:
            return self.fleet_state()
        return ErrorReply("bad_request", f"unexpected message {t.__name__}")

    def _touch(self, worker_id: str | None) -> bool:
        """The worker's load changed: its cached scorer cost is stale."""
        if worker_id is None:
            return False
        w = self.workers.get(worker_id)
        if w is not None:
            w.dirty = True
        return True

    def report_failure(self, worker_id: str, reason: str) -> bool:
        w = self.workers.get(worker_id)
        if w is None:
            return False
        w.failed_until = time.monotonic() + self.config.failure_holdoff_s
        self._set_up(w, False, f"reported failed: {reason or 'no reason given'}")
        return True

    def fleet_state(self) -> FleetState:
        return FleetState(
            [
                WorkerState(
                    worker_id=w.worker_id,
                    role=w.reg.role,
                    up=w.up,
                    http_endpoint=w.reg.http_endpoint,
                    indexed_blocks=self.index.block_counts(w.worker_id),
                    last_metrics=w.metrics,
                    active_requests=w.load.requests,
                )
                for w in self.workers.values()
            ]
        )

    def route(self, req: RouteRequest) -> msgspec.Struct:
        t0 = time.perf_counter()
        bs = self.config.block_size
        if req.block_hashes is not None:
            hashes: list[int] = req.block_hashes
            num_tokens = req.num_tokens if req.num_tokens is not None else len(hashes) * bs
        elif req.token_ids is not None:
            hashes = self.hasher.hash_tokens(req.token_ids)
            num_tokens = len(req.token_ids)
        else:
            return ErrorReply("bad_request", "give token_ids or block_hashes", req.request_id)
        cands, mask, pos = self._candidates(req.role)
        if req.exclude_workers:
            ex = set(req.exclude_workers)
            cands = [w for w in cands if w.worker_id not in ex]
            mask = self.index.mask_of(w.worker_id for w in cands)
            pos = {w.worker_id: i for i, w in enumerate(cands)}
        if not cands:
            return ErrorReply("no_worker", f"no live worker for role {req.role}", req.request_id)
        if self._pool_mask is None:
            self._pool_mask = self.index.mask_of(
                x.worker_id for x in self.workers.values() if x.reg.prefetch_endpoint
            )
        shared = {MEDIUM_REMOTE: self._pool_mask} if self._pool_mask else None
        matches = self.index.find_matches(hashes, mask, shared)
        chosen, scores = self.scorer.select(cands, matches, req.explain, pos)  # type: ignore[arg-type]
        w = self.workers[chosen.worker_id]
        if req.track:
            cached_tokens = matches.gpu.get(w.worker_id, 0) * bs
            self.sequences.add(
                req.request_id, w.worker_id, len(hashes) + 1, max(0, num_tokens - cached_tokens)
            )
            w.dirty = True
        dt = time.perf_counter() - t0
        m = self.metrics
        m.decision_seconds.observe(dt)
        kids = w.m_children
        key = "d:" + req.role
        child = kids.get(key)
        if child is None:
            child = kids[key] = m.decisions.labels(w.worker_id, req.role)
        child.inc()  # type: ignore[attr-defined]
        if hashes:
            hit = 0
            for tier, k in chosen.prefix_hit_blocks.items():
                key = "h:" + tier
                child = kids.get(key)
                if child is None:
                    child = kids[key] = m.hit_blocks.labels(w.worker_id, tier)
                child.inc(k)  # type: ignore[attr-defined]
                hit += k
            w.routed_blocks += len(hashes)
            w.hit_blocks += hit
        # A what-if query (track=False) causes no work on the worker.
        if req.track and self.config.prefetch and w.reg.prefetch_endpoint and hashes:
            self._maybe_prefetch(req.request_id, w, hashes, chosen.prefix_hit_blocks)
        if self.config.log_decisions:
            log.info(
                "route %s (%s, %d blocks) -> %s cost=%.1f hits=%s offload_score=%.1f load=%d/%d",
                req.request_id,
                req.role,
                len(hashes),
                w.worker_id,
                chosen.cost,
                chosen.prefix_hit_blocks,
                chosen.offload_score,
                chosen.running,
                chosen.waiting,
            )
        return RouteResponse(
            request_id=req.request_id,
            worker_id=w.worker_id,
            worker_role=w.reg.role,
            http_endpoint=w.reg.http_endpoint,
            nixl_endpoint=w.reg.nixl_endpoint,
            num_blocks=len(hashes),
            block_size=bs,
            chosen=chosen,
            candidates=scores,
            decision_us=dt * 1e6,
            engine=w.reg.engine,
            bootstrap_endpoint=w.reg.bootstrap_endpoint,
        )

    def _maybe_prefetch(
        self, request_id: str, w: WorkerEntry, hashes: list[int], hits: dict[str, int]
    ) -> None:
        if self.config.hash_mode != "engine":
            return  # the worker's pool is keyed by engine hashes; tokens mode has none
        # Blocks in the worker's memory (GPU, CPU) need nothing; the rest of the prefix its
        # disk tier or the global pool (any writer) holds is worth staging in its RAM now.
        fast = hits.get(MEDIUM_GPU, 0) + hits.get(MEDIUM_CPU, 0)
        local = fast + hits.get(MEDIUM_DISK, 0)
        pooled = self.index.tier_prefix(hashes, MEDIUM_REMOTE)
        reach = max(local, pooled)
        if reach - fast < self.config.prefetch_min_blocks:
            return
        ep = w.reg.prefetch_endpoint
        assert ep is not None
        sock = self._prefetch_socks.get(ep)
        if sock is None:
            sock = self._sync_ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1024)
            sock.connect(ep)
            self._prefetch_socks[ep] = sock
        msg = PrefetchRequest(request_id=request_id, block_hashes=hashes[fast:reach])
        try:
            sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            self.metrics.prefetch_dropped.inc()
            return
        self.metrics.prefetch_blocks.labels(w.worker_id).inc(reach - fast)
        log.info(
            "prefetch %s: worker %s stages blocks %d..%d (disk to %d, pool to %d)",
            request_id,
            w.worker_id,
            fast,
            reach,
            local,
            pooled,
        )

    def _worker_counters(self) -> list[tuple[str, int, int, int]]:
        """(worker, KV events applied, routed prompt blocks, hit blocks) for the collector."""
        return [
            (w.worker_id, w.events_applied, w.routed_blocks, w.hit_blocks)
            for w in list(self.workers.values())
        ]

    # convenience for embedding (tests, the demo)
    def register(self, regs: Iterable[WorkerRegistration]) -> None:
        for r in regs:
            self._add_worker(r, static=False)


def _ints(hashes: list[int | bytes]) -> list[int]:
    """vLLM sends int hashes by default; raw sha256 bytes become the same 64-bit int.

    A publisher uses one representation for all its hashes, so the first one tells.
    """
    if hashes and type(hashes[0]) is not int:
        return [h if type(h) is int else to_external(h) for h in hashes]  # type: ignore[arg-type]
    return hashes  # type: ignore[return-value]
