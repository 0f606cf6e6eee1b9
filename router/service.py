"""The router's decisions: workers as leases, routing, finishes, prefetch, over the index,
the scorer and the active sequences. No sockets: what needs one (subscribing to a worker's
KV stream, sending a prefetch hint) goes through a ``Transport`` the server implements and
the simulator, benchmarks and tests replace.

Workers are leases. Each sign of life (registration or keep-alive, metrics, a KV batch)
renews one; a worker silent past ``worker_timeout_s`` is down (no traffic), and past
``worker_expiry_s`` it is removed with its index, its sockets and its metric labels, so a
fleet whose pods restart under new names stays bounded. A registration with a new
``instance_id`` is a new process: its old index and stream are fenced off and dropped.
"""

from __future__ import annotations

import logging
import sys
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import msgspec

from dynamo_ext.config import RouterConfig
from dynamo_ext.errors import ConfigError
from dynamo_ext.hashing import BlockHasher, salt_extra_keys, salt_parent, token_block_hashes
from dynamo_ext.protocol import (
    MEDIUM_CPU,
    MEDIUM_DISK,
    MEDIUM_GPU,
    MEDIUM_REMOTE,
    Ack,
    ErrorReply,
    FleetState,
    PrefetchRequest,
    PrefillFinished,
    RequestFinished,
    RouteRequest,
    RouteResponse,
    RouterQuery,
    WorkerDeregistration,
    WorkerFailed,
    WorkerIndex,
    WorkerMetrics,
    WorkerRegistration,
    WorkerState,
    control_decoder,
    dp_worker_id,
)
from dynamo_ext.router.identity import IdentityGuard
from dynamo_ext.router.indexer import IndexFullError, KvIndex
from dynamo_ext.router.ingest import DECODE_ERRORS, KvIngest, StreamState
from dynamo_ext.router.metrics import RouterMetrics, remove_label
from dynamo_ext.router.scorer import Candidate, CostCache, Scorer
from dynamo_ext.router.sequences import ActiveSequences

log = logging.getLogger(__name__)

_ROLES_FOR = {
    "prefill": ("prefill", "both"),
    "decode": ("decode", "both"),
    # A decode worker can prefill locally (conditional disaggregation); prefill-only
    # workers stop after one token and never serve a whole request.
    "aggregated": ("both", "decode"),
}
# Blocks hashed per step when a route's hashing is spread over event-loop turns.
HASH_CHUNK_BLOCKS = 64


def prompt_tokens(req: RouteRequest) -> Sequence[int] | None:
    """The request's token ids, from ``token_ids`` or (zero-copy) ``token_bytes``."""
    if req.token_bytes is not None:
        mv = memoryview(req.token_bytes)
        if sys.byteorder == "little":
            return mv.cast("I")
        a = array("I", req.token_bytes)
        a.byteswap()
        return a
    return req.token_ids


class Transport(Protocol):
    """What the service asks of whoever owns the sockets."""

    def watch(self, w: WorkerEntry) -> None:
        """Subscribe to the worker's KV stream and metrics."""

    def unwatch(self, w: WorkerEntry) -> None:
        """Close the worker's KV stream and prefetch sockets, stop its metrics."""

    def prefetch(self, w: WorkerEntry, msg: PrefetchRequest) -> bool:
        """Send a prefetch hint without blocking; False if it was dropped."""


class NullTransport:
    """No sockets: the simulator and benchmarks feed the ingest themselves."""

    def watch(self, w: WorkerEntry) -> None:
        pass

    def unwatch(self, w: WorkerEntry) -> None:
        pass

    def prefetch(self, w: WorkerEntry, msg: PrefetchRequest) -> bool:
        return True


class WorkerEntry(Candidate):
    """Everything the router knows about one worker; the scorer's candidate itself."""

    __slots__ = (
        "reg",
        "slot",
        "static",
        "stream",
        "last_seen",
        "failed_until",
        "up",
        "m_up",
        "routed_blocks",
        "hit_blocks",
        "counts",
        "hit_error",
        "last_heartbeat",
    )

    def __init__(self, reg: WorkerRegistration, slot: int, stream: StreamState, load, static):  # type: ignore[no-untyped-def]
        super().__init__(reg.worker_id, None, load)
        self.reg = reg
        self.slot = slot
        self.static = static
        self.stream = stream
        self.last_seen = time.monotonic()
        self.failed_until = 0.0
        self.up = True
        self.m_up: object = None
        self.routed_blocks = 0
        self.hit_blocks = 0
        self.counts: dict[str, int] = {}  # "d:<role>" decisions, "h:<tier>" hit blocks
        self.hit_error = 0.0  # EWMA of |predicted - reported| cached tokens
        self.last_heartbeat = -1


class RouterService:
    def __init__(
        self,
        config: RouterConfig,
        metrics: RouterMetrics | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.transport: Transport = transport or NullTransport()
        self.index = KvIndex(config.max_blocks_per_worker)
        self.sequences = ActiveSequences(config.request_ttl_s)
        self.scorer = Scorer(config.scorer, config.block_size)
        self.hasher = BlockHasher(
            config.block_size, config.hash_mode, config.hash_algo, config.hash_seed
        )
        self.metrics = metrics or RouterMetrics(self.worker_counters)
        self.ingest = KvIngest(
            self.index,
            self.hasher,
            self.metrics,
            self.malformed,
            block_size=config.block_size,
            hash_mode=config.hash_mode,
            hash_algo=config.hash_algo,
            buffer_batches=config.kv_buffer_batches,
        )
        self.workers: dict[str, WorkerEntry] = {}
        self._cand_cache: dict[tuple[str, str | None], tuple[list[WorkerEntry], int, dict]] = {}
        # The scorer's cached cost parts of each cached candidate list (same keys).
        self._cost_caches: dict[tuple[str, str | None], CostCache] = {}
        self._pool_mask: int | None = None  # live workers with a pool tier
        self._warned: set[tuple[str, str]] = set()
        # request id -> (worker, predicted cached tokens), for the finish's hit check
        self._predicted: dict[str, tuple[str, int]] = {}
        self.guard: IdentityGuard | None = None  # set by secure(): CURVE keys are identities

    # ------------------------------------------------------------------ errors
    def malformed(self, source: str, origin: str, why: object) -> None:
        """Count a dropped message and log the first of each kind from each origin."""
        self.metrics.malformed.labels(source).inc()
        key = (source, origin)
        if key not in self._warned and len(self._warned) < 10_000:
            self._warned.add(key)
            log.warning("dropped malformed %s message from %s: %s", source, origin, why)

    # ------------------------------------------------------------------ workers
    def register(self, reg: WorkerRegistration, static: bool = False) -> WorkerEntry:
        if reg.block_size is not None and reg.block_size != self.config.block_size:
            raise ConfigError(
                "block_size",
                f"worker {reg.worker_id} uses block_size {reg.block_size}, router "
                f"{self.config.block_size}: prefixes would never match",
            )
        if not reg.worker_id or len(reg.worker_id) > 256:
            raise ConfigError("worker_id", "must be 1..256 characters")
        key = dp_worker_id(reg.worker_id, reg.data_parallel_rank)
        if key != reg.worker_id:
            reg = msgspec.structs.replace(reg, worker_id=key)
        old = self.workers.get(key)
        if old is not None:
            if reg.instance_id and reg == old.reg:
                self._alive(old)  # keep-alive from the same process: nothing changed
                return old
            # A new process (or new endpoints): fence the old stream, its cache is gone.
            why = "new instance" if reg.instance_id != old.reg.instance_id else "new endpoints"
            log.info("worker %s re-registered (%s): its index starts over", key, why)
            self._drop(old)
        try:
            slot = self.index.add_worker(key)
        except IndexFullError:
            if not self._evict_one():
                raise
            slot = self.index.add_worker(key)
        stream = self.ingest.add_stream(key, slot, bool(reg.replay_endpoint))
        w = WorkerEntry(reg, slot, stream, self.sequences.load(key), static)
        w.m_up = self.metrics.worker_up.labels(key)
        self.workers[key] = w
        self.transport.watch(w)
        self._set_up(w, True, "registered")
        log.info(
            "worker %s added (engine=%s role=%s model=%s kv=%s metrics=%s http=%s)",
            key,
            reg.engine,
            reg.role,
            reg.model,
            reg.kv_events_endpoint,
            reg.metrics_endpoint,
            reg.http_endpoint,
        )
        return w

    def deregister(self, worker_id: str) -> bool:
        w = self.workers.get(worker_id)
        if w is None:
            return False
        self._drop(w)
        log.info("worker %s deregistered", worker_id)
        return True

    def _evict_one(self) -> bool:
        """The index is full: remove the dynamic worker down the longest, if any."""
        down = [w for w in self.workers.values() if not w.up and not w.static]
        if not down:
            return False
        victim = min(down, key=lambda w: w.last_seen)
        log.warning("index full: removing worker %s (down longest)", victim.worker_id)
        self.metrics.workers_expired.inc()
        self._drop(victim)
        return True

    def _drop(self, w: WorkerEntry) -> None:
        self.transport.unwatch(w)
        self.sequences.drop_worker(w.worker_id)
        self.workers.pop(w.worker_id, None)
        self.index.remove_worker(w.worker_id)
        self.ingest.remove_stream(w.worker_id)
        m = self.metrics
        for metric in (m.worker_up, m.seq_gaps, m.restarts, m.hash_mismatch, m.worker_staleness):
            remove_label(metric, w.worker_id)
        for metric in (m.replays, m.prefetch_blocks):
            for key in list(metric._metrics):  # type: ignore[attr-defined]
                if key and key[0] == w.worker_id:
                    remove_label(metric, *key)
        self._changed()

    def _changed(self) -> None:
        self._cand_cache.clear()
        self._cost_caches.clear()
        self._pool_mask = None
        n_up = sum(1 for w in self.workers.values() if w.up)
        self.metrics.workers_up.set(n_up)
        self.metrics.workers_down.set(len(self.workers) - n_up)

    def _set_up(self, w: WorkerEntry, up: bool, why: str) -> None:
        if w.up != up:
            log.warning("worker %s marked %s: %s", w.worker_id, "UP" if up else "DOWN", why)
        w.up = up
        w.m_up.set(1 if up else 0)  # type: ignore[attr-defined]
        self._changed()

    def _alive(self, w: WorkerEntry) -> None:
        now = time.monotonic()
        w.last_seen = now
        if not w.up and now >= w.failed_until:
            self._set_up(w, True, "alive again")

    def kv_alive(self, w: WorkerEntry) -> None:
        """A KV batch arrived: the publisher lives (cheap: called per batch)."""
        w.last_seen = time.monotonic()

    def report_failure(self, worker_id: str, reason: str) -> bool:
        w = self.workers.get(worker_id)
        if w is None:
            return False
        w.failed_until = time.monotonic() + self.config.failure_holdoff_s
        self._set_up(w, False, f"reported failed: {reason[:200] or 'no reason given'}")
        return True

    def on_metrics(self, m: WorkerMetrics) -> None:
        w = self.workers.get(m.worker_id)
        if w is None:
            self.malformed("metrics", m.worker_id[:64], "metrics from an unregistered worker")
            return
        prev = w.metrics
        if prev is not None and m.heartbeat < prev.heartbeat:
            self.ingest.reset(w.stream, f"heartbeat went back {prev.heartbeat} -> {m.heartbeat}")
        elif prev is not None and m.heartbeat > prev.heartbeat + 1:
            self.metrics.metrics_gaps.inc(m.heartbeat - prev.heartbeat - 1)
        self.scorer.observe(w, m)
        self._dirty(w)
        now = time.monotonic()
        w.last_seen = now
        if not w.up and now >= w.failed_until:
            self._set_up(w, True, "metrics resumed")

    def check_liveness(self, now: float | None = None) -> None:
        """Down after ``worker_timeout_s`` without metrics; removed after ``worker_expiry_s``
        without any sign of life (dynamic workers only)."""
        now = time.monotonic() if now is None else now
        timeout = self.config.worker_timeout_s
        expiry = self.config.worker_expiry_s
        for w in list(self.workers.values()):
            silent = now - w.last_seen
            if expiry and not w.static and silent > expiry:
                log.warning("worker %s removed: no sign of life for %.0fs", w.worker_id, silent)
                self.metrics.workers_expired.inc()
                self._drop(w)
                continue
            if w.up:
                if w.reg.metrics_endpoint and silent > timeout:
                    self._set_up(w, False, f"no metrics for {silent:.1f}s")
            elif not w.reg.metrics_endpoint and now >= w.failed_until:
                # Without metrics there is no other sign of life: retry after the holdoff.
                self._set_up(w, True, "failure holdoff over")

    def tick(self) -> None:
        """Periodic housekeeping (the server calls it a few times a second)."""
        self.check_liveness()
        for wid in self.sequences.expire():
            self._touch(wid)
            self._predicted.pop(wid, None)
        self.metrics.active_requests.set(len(self.sequences))
        for tier, n in self.index.tier_sizes().items():
            self.metrics.indexed_blocks.labels(tier).set(n)
        if len(self._predicted) > 4 * max(1, len(self.sequences)) + 10_000:
            self._predicted.clear()  # finishes never reported: keep it bounded

    # ------------------------------------------------------------------ identity (CURVE)
    def secure(self, guard: IdentityGuard) -> None:
        """From now on every message is checked against its peer's key (router/identity)."""
        self.guard = guard

    def authorize(self, msg: msgspec.Struct, key: str | None) -> ErrorReply | None:
        """None if the peer holding ``key`` may send ``msg`` (always, with security off)."""
        if self.guard is None:
            return None
        return self.guard.check(msg, key, self.workers)

    def metrics_from(self, m: WorkerMetrics, key: str | None) -> None:
        """``on_metrics`` for metrics from the publisher holding ``key``."""
        if self.guard is None or self.guard.may_publish(m.worker_id, key):
            self.on_metrics(m)

    # ------------------------------------------------------------------ control plane
    def handle(self, payload: bytes, origin: str = "local") -> msgspec.Struct:
        """Decode and answer one control message; nothing in it can raise."""
        try:
            msg = control_decoder.decode(payload)
        except DECODE_ERRORS as exc:
            self.malformed("control", origin, exc)
            return ErrorReply("bad_request", f"malformed message: {str(exc)[:200]}")
        except Exception as exc:  # noqa: BLE001
            self.malformed("control", origin, f"{type(exc).__name__}: {exc}")
            return ErrorReply("bad_request", f"malformed message: {type(exc).__name__}")
        return self.dispatch(msg, origin)

    def dispatch(self, msg: msgspec.Struct, origin: str = "local") -> msgspec.Struct:
        try:
            return self._dispatch(msg)
        except ConfigError as exc:
            return ErrorReply("bad_request", str(exc))
        except IndexFullError as exc:
            self.metrics.rejected.labels("index_full").inc()
            return ErrorReply("unavailable", str(exc))
        except Exception as exc:  # one bad request must not take the router down
            log.exception("error handling %s from %s", type(msg).__name__, origin)
            return ErrorReply("internal", f"{type(exc).__name__}: {exc}")

    def _dispatch(self, msg: msgspec.Struct) -> msgspec.Struct:
        t = type(msg)
        if t is RouteRequest:
            return self.route(msg)  # type: ignore[arg-type]
        if t is RequestFinished:
            return Ack(self.finish(msg))  # type: ignore[arg-type]
        if t is PrefillFinished:
            return Ack(self._touch(self.sequences.prefill_done(msg.request_id)))  # type: ignore[attr-defined]
        if t is WorkerRegistration:
            w = self.register(msg)  # type: ignore[arg-type]
            return Ack(True, f"registered {w.worker_id}")
        if t is WorkerDeregistration:
            return Ack(self.deregister(msg.worker_id))  # type: ignore[attr-defined]
        if t is WorkerFailed:
            return Ack(self.report_failure(msg.worker_id, msg.reason))  # type: ignore[attr-defined]
        if t is RouterQuery:
            if msg.what == "index":  # type: ignore[attr-defined]
                return self.audit(msg.worker_id or "")  # type: ignore[attr-defined]
            return self.fleet_state()
        return ErrorReply("bad_request", f"unexpected message {t.__name__}")

    def _touch(self, worker_id: str | None) -> bool:
        """The worker's load changed: its cached scorer cost is stale."""
        if worker_id is None:
            return False
        w = self.workers.get(worker_id)
        if w is not None:
            self._dirty(w)
        return True

    def finish(self, msg: RequestFinished) -> bool:
        wid = self.sequences.finish(msg.request_id)
        pred = self._predicted.pop(msg.request_id, None)
        if pred is not None and msg.actual_cached_tokens is not None:
            worker, predicted = pred
            if msg.predicted_cached_tokens is not None:
                predicted = msg.predicted_cached_tokens
            err = predicted - msg.actual_cached_tokens
            self.metrics.hit_error.observe(err)
            w = self.workers.get(worker)
            if w is not None:
                w.hit_error = 0.8 * w.hit_error + 0.2 * abs(err)
                self.metrics.worker_staleness.labels(worker).set(w.hit_error)
        return self._touch(wid)

    @property
    def hashing(self) -> str:
        """How this router hashes prompts (``FleetState.hashing``)."""
        return f"{self.hasher.mode}/{self.config.block_size}"

    def fleet_state(self) -> FleetState:
        return FleetState(
            hashing=self.hashing,
            workers=[
                WorkerState(
                    worker_id=w.worker_id,
                    role=w.reg.role,
                    up=w.up,
                    http_endpoint=w.reg.http_endpoint,
                    indexed_blocks=self.index.block_counts(w.worker_id),
                    last_metrics=w.metrics,
                    active_requests=w.load.requests,
                    stale=w.stream.stale,
                    last_seq=w.stream.last_seq,
                    hit_error_tokens=w.hit_error,
                    registration=w.reg,
                )
                for w in self.workers.values()
            ],
        )

    def audit(self, worker_id: str) -> msgspec.Struct:
        w = self.workers.get(worker_id)
        if w is None:
            return ErrorReply("bad_request", f"unknown worker {worker_id[:64]!r}")
        return WorkerIndex(
            worker_id, self.index.worker_blocks(worker_id), w.stream.last_seq, w.stream.stale
        )

    # ------------------------------------------------------------------ routing
    def candidates(
        self, role: str, model: str | None = None
    ) -> tuple[list[WorkerEntry], int, dict[str, int]]:
        """Live workers for a request role and model, their index mask and positions."""
        key = (role, model)
        c = self._cand_cache.get(key)
        if c is None:
            roles = _ROLES_FOR.get(role, ("both",))
            ups = [w for w in self.workers.values() if w.up]
            if model is not None:
                ups = [w for w in ups if w.reg.model is None or w.reg.model == model]
            ws = [w for w in ups if w.reg.role in roles] or (ups if role == "aggregated" else [])
            c = (
                ws,
                self.index.mask_of(w.worker_id for w in ws),
                {w.worker_id: i for i, w in enumerate(ws)},
            )
            if len(self._cand_cache) > 256:
                self._cand_cache.clear()
                self._cost_caches.clear()
            self._cand_cache[key] = c
            self._cost_caches[key] = CostCache(ws, c[2], self.sequences.first_holders)  # type: ignore[arg-type]
        return c

    def _dirty(self, w: WorkerEntry) -> None:
        """The worker's load or metrics changed: its cached scorer cost is stale."""
        w.dirty = True
        for cc in self._cost_caches.values():
            cc.touch(w.worker_id)

    def check_request(self, req: RouteRequest) -> ErrorReply | None:
        if req.token_bytes is not None and len(req.token_bytes) % 4:
            return ErrorReply("bad_request", "token_bytes: not uint32s", req.request_id)
        toks = prompt_tokens(req)
        n = len(toks) if toks is not None else len(req.block_hashes or ())
        if toks is None and req.block_hashes is None:
            return ErrorReply("bad_request", "give token_ids or block_hashes", req.request_id)
        if req.hashed_as is not None and req.hashed_as != self.hashing:
            self.metrics.rejected.labels("hash_mismatch").inc()
            return ErrorReply(
                "hash_mismatch",
                f"hashes computed as {req.hashed_as[:32]!r}, this router hashes {self.hashing}",
                req.request_id,
            )
        cap = self.config.max_route_tokens
        if toks is not None and n > cap:
            self.metrics.rejected.labels("too_many_tokens").inc()
            return ErrorReply(
                "bad_request", f"{n} token ids, the router takes at most {cap}", req.request_id
            )
        if req.block_hashes is not None and n * self.config.block_size > cap:
            self.metrics.rejected.labels("too_many_tokens").inc()
            return ErrorReply(
                "bad_request",
                f"{n} block hashes, the router takes at most {cap // self.config.block_size}",
                req.request_id,
            )
        return None

    def hash_chunks(
        self, token_ids: Sequence[int], cache_salt: str | None = None
    ) -> Iterator[list[int]]:
        """The prompt's block hashes, ``HASH_CHUNK_BLOCKS`` at a time (the server yields to
        its event loop between chunks, so one huge prompt never stalls other routes).
        ``cache_salt`` enters the first block as vLLM hashes it."""
        bs = self.config.block_size
        step = HASH_CHUNK_BLOCKS * bs
        n_full = len(token_ids) // bs * bs
        if self.hasher.mode == "tokens":
            parent = salt_parent(cache_salt)
            for i in range(0, n_full, step):
                out = token_block_hashes(token_ids[i : i + step], bs, parent)
                if out:
                    parent = out[-1]
                yield out
            return
        digest: bytes | None = None
        extra = salt_extra_keys(cache_salt)
        for i in range(0, n_full, step):
            out, digest = self.hasher.chain(digest, token_ids[i : i + step], extra)
            extra = None
            yield out

    def route(self, req: RouteRequest) -> msgspec.Struct:
        """Answer a route request in one call (hashes the whole prompt)."""
        bad = self.check_request(req)
        if bad is not None:
            return bad
        if req.block_hashes is not None:
            return self.route_hashed(req, req.block_hashes, req.num_tokens)
        toks = prompt_tokens(req) or ()
        if self.hasher.mode == "tokens":  # one native call: chunks only matter to a server
            bs = self.config.block_size
            hashes = token_block_hashes(toks, bs, salt_parent(req.cache_salt))
            return self.route_hashed(req, hashes, len(toks))
        hashes = []
        for chunk in self.hash_chunks(toks, req.cache_salt):
            hashes += chunk
        return self.route_hashed(req, hashes, len(toks))

    def dispatch_hashed(self, req: RouteRequest, hashes: list[int]) -> msgspec.Struct:
        """``route_hashed`` for a prompt hashed by the caller, errors as replies."""
        try:
            return self.route_hashed(req, hashes, len(prompt_tokens(req) or ()) or None)
        except Exception as exc:
            log.exception("error routing %s", req.request_id[:64])
            return ErrorReply("internal", f"{type(exc).__name__}: {exc}", req.request_id)

    def route_hashed(
        self, req: RouteRequest, hashes: list[int], num_tokens: int | None
    ) -> msgspec.Struct:
        t0 = time.perf_counter()
        bs = self.config.block_size
        if num_tokens is None:
            num_tokens = len(hashes) * bs
        cands, mask, pos = self.candidates(req.role, req.model)
        cache = self._cost_caches.get((req.role, req.model))
        if req.exclude_workers:
            ex = set(req.exclude_workers)
            cands = [w for w in cands if w.worker_id not in ex]
            mask = self.index.mask_of(w.worker_id for w in cands)
            pos = {w.worker_id: i for i, w in enumerate(cands)}
        if not cands:
            what = f"role {req.role}" + (f", model {req.model[:64]}" if req.model else "")
            return ErrorReply("no_worker", f"no live worker for {what}", req.request_id)
        if self._pool_mask is None:
            # Pool hits count only while some live worker vouches for the pool.
            self._pool_mask = self.index.mask_of(
                x.worker_id for x in self.workers.values() if x.up and x.reg.prefetch_endpoint
            )
        shared = {MEDIUM_REMOTE: self._pool_mask} if self._pool_mask else None
        matches = self.index.find_matches(hashes, mask, shared)
        # Dynamo's cost counts each active block once per worker, and ours credits prompts
        # in flight (inflight_credit): both need the prompt's hashes.
        sc = self.config.scorer
        dyn = hashes if sc.mode == "dynamo" or (sc.mode == "kv" and sc.inflight_credit) else None
        chosen, scores = self.scorer.select(
            cands,  # type: ignore[arg-type]
            matches,
            req.explain,
            pos,
            hashes=dyn,
            cache=cache,  # ignored unless it is this very list's (not after exclude_workers)
        )
        w = self.workers[chosen.worker_id]
        if req.track:
            cached_tokens = matches.gpu.get(w.worker_id, 0) * bs
            self.sequences.add(
                req.request_id,
                w.worker_id,
                len(hashes) + 1,
                max(0, num_tokens - cached_tokens),
                hashes=dyn,
            )
            self._dirty(w)
            predicted = sum(chosen.prefix_hit_blocks.values()) * bs
            self._predicted[req.request_id] = (w.worker_id, predicted)
        dt = time.perf_counter() - t0
        self._count_decision(w, req, hashes, chosen.prefix_hit_blocks, dt)
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

    def _count_decision(
        self,
        w: WorkerEntry,
        req: RouteRequest,
        hashes: list[int],
        hits: dict[str, int],
        dt: float,
    ) -> None:
        self.metrics.decision_seconds.observe(dt)
        counts = w.counts
        key = "d:" + req.role
        counts[key] = counts.get(key, 0) + 1
        if hashes:
            hit = 0
            for tier, k in hits.items():
                key = "h:" + tier
                counts[key] = counts.get(key, 0) + k
                hit += k
            w.routed_blocks += len(hashes)
            w.hit_blocks += hit

    def _maybe_prefetch(
        self, request_id: str, w: WorkerEntry, hashes: list[int], hits: dict[str, int]
    ) -> None:
        if self.config.hash_mode != "engine":
            return  # the worker's pool is keyed by engine hashes; tokens mode has none
        # Blocks in the worker's memory (GPU, CPU) need nothing; the rest of the prefix its
        # disk tier or the global pool (any writer) holds is worth staging in its RAM now.
        fast = hits.get(MEDIUM_GPU, 0) + hits.get(MEDIUM_CPU, 0)
        local = fast + hits.get(MEDIUM_DISK, 0)
        pooled = self.index.tier_prefix(hashes, MEDIUM_REMOTE) if self._pool_mask else 0
        reach = max(local, pooled)
        if reach - fast < self.config.prefetch_min_blocks:
            return
        msg = PrefetchRequest(request_id=request_id, block_hashes=hashes[fast:reach])
        if not self.transport.prefetch(w, msg):
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

    def worker_counters(self) -> list[tuple[str, int, int, int, dict[str, int]]]:
        """(worker, KV events applied, routed prompt blocks, hit blocks, decision and
        per-tier hit counts) for the collector."""
        return [
            (w.worker_id, w.stream.events_applied, w.routed_blocks, w.hit_blocks, w.counts)
            for w in list(self.workers.values())
        ]

    # convenience for embedding (tests, the demo, the simulator)
    def register_all(self, regs: Iterable[WorkerRegistration], static: bool = False) -> None:
        for r in regs:
            self.register(r, static=static)
