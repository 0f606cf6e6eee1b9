"""Dynamo's own worker-selection core, in process: the frontend's ``dynamo_core`` routing
backend and the simulator's Dynamo peer.

* ``DynamoCore``: ``dynamo._core.SelectionService`` of ``ai-dynamo-runtime`` (its KV
  indexer, active-sequence tracker and scheduler) subscribed to vLLM-format ZMQ KV streams.
  It hashes the token ids itself (prompts and ``BlockStored.token_ids``) and tracks its own
  reservations (``select_and_reserve`` / ``prefill_complete`` / ``free_reservation``); its
  knobs are ``KvRouterConfig``'s (``DYNAMO_KNOBS``: overlap credit, prefill load scale,
  temperature, host and disk hit weights, queue threshold). ``barrier`` waits until it has
  applied every batch published so far (the simulator's virtual-time replays need that).
* ``DynamoCoreRouter``: what the dispatcher calls a router, with the choice made by Dynamo's
  core instead of ours. Our router stays the fleet's registry: every ``refresh_s`` its
  ``FleetState`` (each worker's registration: KV and replay endpoints, HTTP endpoint, block
  size, instance id) is mirrored into the core (workers up are upserted, gone or down ones
  deleted; a worker registered anew is a new worker there, its old cache dropped). A request
  is selected and booked under its attempt id, its prefill marked complete at the first
  token, its booking freed when the attempt ends, however it ends. A worker the dispatcher
  reports failed is deleted from the core at once (and reported to our router, which holds it
  down). Aggregated vLLM workers only: no P/D roles, no tenants' ``cache_salt`` (the core
  hashes prompts without it), no CURVE-secured KV streams (it connects in plaintext), no
  data-parallel ranks; ``FrontendConfig`` refuses what it can see at load.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dynamo_ext.errors import ApiError, DynamoExtError, NoWorkerAvailable, RouterUnavailable
from dynamo_ext.frontend.auth import current_salt
from dynamo_ext.protocol import (
    MEDIUM_CPU,
    MEDIUM_DISK,
    MEDIUM_GPU,
    BlockRemoved,
    BlockStored,
    RequestRole,
    RouteResponse,
    WorkerRegistration,
    WorkerScore,
)
from dynamo_ext.router.client import RouterClient
from dynamo_ext.security import Curve

if TYPE_CHECKING:
    from dynamo_ext.frontend.metrics import FrontendMetrics
    from dynamo_ext.publisher import KvEventPublisher

log = logging.getLogger(__name__)

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
_LOAD_FIELDS = ("active_requests", "potential_prefill_tokens", "potential_decode_blocks")


def dynamo_available() -> bool:
    try:
        return importlib.util.find_spec("dynamo._core") is not None
    except (ImportError, ValueError):
        return False


class DynamoCore:
    """Dynamo's ``SelectionService`` over a fleet's KV streams, workers keyed by int."""

    def __init__(
        self,
        block_size: int,
        knobs: Mapping[str, Any] | None = None,
        *,
        model: str = "mocker",
        indexer_threads: int = 1,
    ) -> None:
        os.environ.setdefault("DYN_LOG", "error")  # before the import: its logger reads it once
        try:
            from dynamo._core import SelectionService  # type: ignore[import-not-found]
        except ImportError as exc:
            raise DynamoExtError(
                f"Dynamo's selection core needs ai-dynamo-runtime (import dynamo._core: {exc})"
            ) from exc

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
        total_kv_blocks: int | None,
        max_num_batched_tokens: int | None,
        block_size: int | None = None,
    ) -> None:
        await self._svc.upsert_worker(
            {
                "worker_id": worker,
                "model_name": self.model,
                "endpoint": http_endpoint,
                "block_size": block_size or self.block_size,
                "kv_events_endpoint": kv_events_endpoint,
                "replay_endpoint": replay_endpoint,
                "total_kv_blocks": total_kv_blocks,
                "max_num_batched_tokens": max_num_batched_tokens,
            }
        )
        if worker not in self._workers:
            self._workers.append(worker)

    async def remove_worker(self, worker: int) -> None:
        """Delete a worker: its KV listener and index entries go, it is never selected."""
        if worker in self._workers:
            self._workers.remove(worker)
        await self._svc.delete_worker(worker)

    @property
    def workers(self) -> list[int]:
        return list(self._workers)

    async def select_and_reserve(
        self, request_id: str, token_ids: Sequence[int], allowed: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """Dynamo's answer as it gives it (``worker_id``, ``endpoint``, ``overlap`` in tokens
        per tier, ...), the request booked under ``request_id``; ``allowed`` restricts the
        choice (Dynamo's ``allowed_worker_ids``)."""
        req: dict[str, Any] = {
            "model_name": self.model,
            "token_ids": list(token_ids),
            "selection_id": request_id,
        }
        if allowed is not None:
            req["allowed_worker_ids"] = list(allowed)
        return dict(await self._svc.select_and_reserve(req))

    async def select(self, request_id: str, token_ids: Sequence[int]) -> tuple[int, int, str]:
        """Select and book: (worker, device-cached prefix blocks it predicts, endpoint)."""
        d = await self.select_and_reserve(request_id, token_ids)
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

    def loads(self) -> dict[int, dict[str, int]]:
        """Booked load per worker: ``active_requests``, ``potential_prefill_tokens``,
        ``potential_decode_blocks`` (what reservations hold; all 0 when none is open)."""
        out: dict[int, dict[str, int]] = {}
        for group in self._svc.loads(model_name=self.model) or ():
            for w in group.get("loads") or ():
                out[int(w["worker_id"])] = {
                    k: int(w.get(k) or 0)
                    for k in (
                        "active_requests",
                        "potential_prefill_tokens",
                        "potential_decode_blocks",
                    )
                }
        return out

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


@dataclass(slots=True)
class _Mirrored:
    """One of our workers as the core knows it."""

    core_id: int
    instance_id: str
    reg: WorkerRegistration


class DynamoCoreRouter(RouterClient):
    """The dispatcher's router, choosing with Dynamo's core (see the module's docstring).

    Registry calls (``workers``, ``worker_failed``, ``register``) still go to our router;
    ``route`` / ``prefill_done`` / ``finished`` go to the core."""

    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 2.0,
        *,
        model: str,
        refresh_s: float = 1.0,
        knobs: Mapping[str, Any] | None = None,
        max_num_batched_tokens: int | None = None,
        metrics: FrontendMetrics | None = None,
        curve: Curve | None = None,
    ) -> None:
        super().__init__(endpoint, timeout_s, curve=curve)
        self.model = model
        self.refresh_s = refresh_s
        self.max_num_batched_tokens = max_num_batched_tokens
        self.metrics = metrics
        # block_size here is only the default of a registration without one (none is used)
        self.core = DynamoCore(16, knobs, model=model)
        self.mirrored: dict[str, _Mirrored] = {}
        self._by_core: dict[int, str] = {}
        self._core_ids = itertools.count(1)
        self.open: dict[str, int] = {}  # selection id -> core worker id, booked, not freed
        self._sync_lock = asyncio.Lock()
        self._synced = False
        self._loop_task: asyncio.Task[None] | None = None
        self.sync_errors = 0
        self._skipped: set[str] = set()  # workers not usable here (warned once)

    # ---------------------------------------------------------------- lifecycle
    def connect(self) -> None:
        super().connect()
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        self.core.close()
        await super().close()

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.sync()
            except DynamoExtError as exc:  # the router is down: keep what we have
                self.sync_errors += 1
                log.warning("dynamo_core: fleet refresh failed: %s", exc)
            except Exception:  # the core's own errors: logged, the loop lives on
                self.sync_errors += 1
                log.exception("dynamo_core: fleet refresh failed")
            await asyncio.sleep(self.refresh_s)

    # ---------------------------------------------------------------- the registry
    async def sync(self) -> None:
        """Mirror our router's fleet into the core: upsert the workers up (a new instance
        as a new core worker), delete the ones gone or down."""
        st = await self.workers()
        async with self._sync_lock:
            want: dict[str, WorkerRegistration] = {}
            for w in st.workers:
                reg = w.registration
                if not w.up or reg is None or not self._usable(w.worker_id, reg):
                    continue
                want[w.worker_id] = reg
                m = self.mirrored.get(w.worker_id)
                if m is not None and m.instance_id == reg.instance_id:
                    continue
                if m is not None:
                    log.info("dynamo_core: worker %s re-registered (new instance)", w.worker_id)
                    await self._delete(w.worker_id)
                total = w.last_metrics.kv_total_blocks if w.last_metrics else 0
                cid = next(self._core_ids)
                assert reg.kv_events_endpoint is not None and reg.http_endpoint is not None
                try:
                    await self.core.add_worker(
                        cid,
                        kv_events_endpoint=reg.kv_events_endpoint,
                        replay_endpoint=reg.replay_endpoint,
                        http_endpoint=reg.http_endpoint,
                        total_kv_blocks=total or None,
                        max_num_batched_tokens=self.max_num_batched_tokens,
                        block_size=reg.block_size,
                    )
                except Exception as exc:  # noqa: BLE001 - one refused worker must not stop the rest
                    self.sync_errors += 1
                    want.pop(w.worker_id, None)
                    log.warning("dynamo_core: worker %s refused by the core: %s", w.worker_id, exc)
                    continue
                self.mirrored[w.worker_id] = _Mirrored(cid, reg.instance_id, reg)
                self._by_core[cid] = w.worker_id
                log.info("dynamo_core: worker %s added (core id %d)", w.worker_id, cid)
            for wid in [wid for wid in self.mirrored if wid not in want]:
                log.info("dynamo_core: worker %s removed (gone or down)", wid)
                await self._delete(wid)
            self._synced = True
            if self.metrics is not None:
                self.metrics.dynamo_core_workers.set(len(self.mirrored))

    def _usable(self, worker_id: str, reg: WorkerRegistration) -> bool:
        why = None
        if reg.role != "both":
            why = f"role {reg.role} (dynamo_core routes aggregated workers only)"
        elif reg.engine != "vllm":
            why = f"engine {reg.engine}"
        elif reg.kv_events_endpoint is None or reg.http_endpoint is None:
            why = "no KV events or HTTP endpoint"
        elif reg.data_parallel_rank is not None:
            why = "a data-parallel rank"
        if why is not None and worker_id not in self._skipped:
            self._skipped.add(worker_id)
            log.warning("dynamo_core: worker %s not used: %s", worker_id, why)
        return why is None

    async def _delete(self, worker_id: str) -> None:
        m = self.mirrored.pop(worker_id, None)
        if m is None:
            return
        self._by_core.pop(m.core_id, None)
        with contextlib.suppress(Exception):  # already gone there: nothing to undo
            await self.core.remove_worker(m.core_id)

    # ---------------------------------------------------------------- routing
    async def route(
        self,
        request_id: str,
        token_ids: Sequence[int] | None = None,
        *,
        block_hashes: Sequence[int] | None = None,
        num_tokens: int | None = None,
        role: RequestRole = "aggregated",
        exclude_workers: Sequence[str] = (),
        track: bool = True,
        explain: bool = False,
        cache_salt: str | None = None,
    ) -> RouteResponse:
        if cache_salt is None:
            cache_salt = current_salt.get()
        if cache_salt:
            raise ApiError(
                501,
                "routing_backend dynamo_core cannot route a tenant's request: Dynamo's core "
                "hashes prompts without the tenant's cache_salt",
                "not_implemented",
                code="cache_salt_unsupported",
            )
        if token_ids is None:
            raise DynamoExtError("dynamo_core routes by token ids (no block hashes)")
        if role == "prefill":
            raise NoWorkerAvailable("dynamo_core has no prefill workers")
        if not self._synced:
            try:
                await self.sync()
            except RouterUnavailable:
                if not self.mirrored:
                    raise
        allowed = [m.core_id for wid, m in self.mirrored.items() if wid not in exclude_workers]
        if not allowed:
            raise NoWorkerAvailable(
                f"dynamo_core: no worker left (known {sorted(self.mirrored)}, "
                f"excluded {list(exclude_workers)})"
            )
        t0 = time.perf_counter()
        try:
            d = await self.core.select_and_reserve(request_id, token_ids, allowed)
        except Exception as exc:  # SelectionServiceError (not_ready, ...) and malformed input
            kind = getattr(exc, "kind", type(exc).__name__)
            raise NoWorkerAvailable(f"Dynamo's core selected no worker ({kind}): {exc}") from exc
        decision_us = (time.perf_counter() - t0) * 1e6
        cid = int(d["worker_id"])
        wid = self._by_core.get(cid)
        if wid is None:  # deleted while it was chosen
            with contextlib.suppress(Exception):
                await self.core.finished(request_id)
            raise NoWorkerAvailable(f"Dynamo's core chose worker {cid}, which just left")
        if track:
            self.open[request_id] = cid
        else:
            with contextlib.suppress(Exception):
                await self.core.finished(request_id)
        reg = self.mirrored[wid].reg
        bs = int(d.get("block_size") or reg.block_size or 1)
        ov = d.get("overlap") or {}
        hits = {
            tier: int(ov.get(key) or 0) // bs
            for tier, key in ((MEDIUM_GPU, "gpu"), (MEDIUM_CPU, "cpu"), (MEDIUM_DISK, "disk"))
        }
        hits = {k: v for k, v in hits.items() if v or k == MEDIUM_GPU}
        num_blocks = len(token_ids) // bs
        score = WorkerScore(
            worker_id=wid,
            prefix_hit_blocks=hits,
            offload_score=0.0,
            new_prefill_blocks=float(num_blocks - hits[MEDIUM_GPU]),
            running=0,
            waiting=0,
            kv_usage=0.0,
            predicted_prefill_tokens=int(d.get("effective_prefill_tokens") or 0),
            predicted_active_blocks=int(d.get("potential_decode_blocks") or 0),
            cost=0.0,
        )
        if self.metrics is not None:
            self.metrics.dynamo_core_open.set(len(self.open))
        return RouteResponse(
            request_id=request_id,
            worker_id=wid,
            http_endpoint=reg.http_endpoint,
            nixl_endpoint=reg.nixl_endpoint,
            num_blocks=num_blocks,
            chosen=score,
            worker_role=reg.role,
            block_size=bs,
            decision_us=decision_us,
            engine=reg.engine,
        )

    async def prefill_done(self, request_id: str) -> bool:
        if request_id not in self.open:
            return False
        try:
            await self.core.prefill_done(request_id)
        except Exception as exc:  # freed already (its worker was deleted)
            log.debug("dynamo_core: prefill_complete %s: %s", request_id, exc)
            return False
        return True

    async def finished(
        self,
        request_id: str,
        *,
        predicted_cached_tokens: int | None = None,
        actual_cached_tokens: int | None = None,
    ) -> bool:
        if self.open.pop(request_id, None) is None:
            return False
        if self.metrics is not None:
            self.metrics.dynamo_core_open.set(len(self.open))
        try:
            await self.core.finished(request_id)
        except Exception as exc:  # its worker was deleted, and its bookings with it
            log.debug("dynamo_core: free_reservation %s: %s", request_id, exc)
            return False
        return True

    async def worker_failed(self, worker_id: str, reason: str = "") -> bool:
        async with self._sync_lock:
            await self._delete(worker_id)
        if self.metrics is not None:
            self.metrics.dynamo_core_workers.set(len(self.mirrored))
        return await super().worker_failed(worker_id, reason)
