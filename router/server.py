"""The router sidecar's sockets and timers: one asyncio process that feeds ``ingest`` and
asks ``service``, which own no socket.

Sockets (all ``zmq.asyncio`` on one event loop, every one with a maximum message size):

* one SUB per worker, connected to the worker's vLLM KV event PUB (``[topic, seq, payload]``),
  closed with the worker; a DEALER to the publisher's replay ROUTER opened per replay, at
  most ``max_replays_in_flight`` at a time, off the ingest path (live batches wait in the
  stream's bounded buffer meanwhile);
* one SUB connected to every worker's metrics PUB (``WorkerMetrics`` name their worker);
* one ROUTER bound at ``config.bind`` for the control plane: ``[header, corr, payload]``
  from a DEALER, answered ``[header, corr, reply]`` unless ``corr`` is zero.

With ``config.security`` keys every socket runs CURVE: the ROUTER is a CURVE server whose ZAP
handler admits the allow-listed keys and tags each message with its sender's key, which the
service checks (router/identity); KV, replay, metrics and prefetch sockets are CURVE clients
of the key that registered their worker, so only that worker's process can feed them
(metrics then get one SUB per endpoint, to know whose key each message came through).

Every loop runs under a supervisor: a task that dies is logged with its traceback, counted
(``dynamo_ext_router_task_restarts_total``) and restarted. Input never crashes a task: a
malformed frame is counted, logged with its origin and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from dynamo_ext.config import RouterConfig
from dynamo_ext.protocol import (
    PROTOCOL_HEADER,
    REPLAY_END_SEQ,
    ErrorReply,
    PrefetchRequest,
    RouteRequest,
    WorkerRegistration,
    control_decoder,
    encode,
    metrics_decoder,
    seq_bytes,
)
from dynamo_ext.router.identity import IdentityGuard
from dynamo_ext.router.idle_gc import IdleGC
from dynamo_ext.router.ingest import DECODE_ERRORS
from dynamo_ext.router.service import (
    HASH_CHUNK_BLOCKS,
    RouterService,
    WorkerEntry,
    prompt_tokens,
)
from dynamo_ext.security import load_curve, peer_key, start_authenticator

log = logging.getLogger(__name__)


def recv_now(sock: zmq.Socket[bytes]) -> list[bytes]:
    """``sock.recv_multipart(zmq.NOBLOCK)``, at about half its cost: each part's "more"
    flag is read from the part itself (``Frame.more``) where ``recv_multipart`` asks the
    socket for it (a getsockopt per part, ~2 us each on this project's 2-core VM), and a
    KV batch is three parts. Raises ``zmq.Again`` when no message is queued; a message's parts arrive
    together, so once its first is read the rest are there (any number of them: a
    malformed count is the caller's to refuse)."""
    f = sock.recv(zmq.NOBLOCK, copy=False)
    out = [f.bytes]
    while f.more:
        f = sock.recv(zmq.NOBLOCK, copy=False)
        out.append(f.bytes)
    return out


# A route whose prompt has more blocks than this is hashed in a task of its own, a chunk
# per event-loop turn, so it never delays the routes behind it by more than a chunk.
INLINE_BLOCKS = 4 * HASH_CHUNK_BLOCKS
_MAX_BIG_ROUTES = 8
_KV_DRAIN_BATCHES = 64
_CONTROL_BURST = 64  # control messages answered per event-loop turn


class RouterServer:
    def __init__(self, config: RouterConfig, ctx: zmq.asyncio.Context | None = None) -> None:
        self.config = config
        self.ctx = ctx or zmq.asyncio.Context()
        self._own_ctx = ctx is None
        self._sync_ctx: zmq.Context = zmq.Context.instance()
        self.service = RouterService(config, transport=self)
        self._prefetch_socks: dict[str, zmq.Socket] = {}
        self._kv_tasks: dict[str, asyncio.Task[None]] = {}
        self._replay_tasks: dict[str, asyncio.Task[None]] = {}
        self._replay_sem = asyncio.Semaphore(config.max_replays_in_flight)
        self._big_routes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._idle_gc: IdleGC | None = None
        self._metrics_sub: zmq.asyncio.Socket | None = None
        self._metrics_endpoints: dict[str, int] = {}  # endpoint -> workers using it
        self._router: zmq.Socket | None = None
        self._control_done: asyncio.Future[None] | None = None
        self._draining = False
        self.bound_endpoint: str | None = None
        self.metrics_port: int | None = None
        self._http_server: object = None
        self._stopped = asyncio.Event()
        self._curve = load_curve(config.security)
        self._zap: object = None
        # security on: metrics endpoint -> (SUB, its task, workers using it)
        self._secure_metrics: dict[str, tuple[zmq.asyncio.Socket, asyncio.Task[None], int]] = {}

    # views for embedding code (tests, the demo)
    @property
    def index(self):  # type: ignore[no-untyped-def]
        return self.service.index

    @property
    def metrics(self):  # type: ignore[no-untyped-def]
        return self.service.metrics

    @property
    def workers(self) -> dict[str, WorkerEntry]:
        return self.service.workers

    def _socket(self, kind: int, sync: bool = False) -> Any:
        """A socket on the router's context: pyzmq's asyncio one, or (``sync``) a plain one
        that the event loop serves from a reader callback (same context: same ZAP)."""
        s = zmq.Socket(self.ctx, kind) if sync else self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, self.config.reconnect_ivl_max_ms)
        return s

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        # The control socket is a plain (blocking-API) socket on the same context, served
        # from the event loop's reader callback (``_serve_control``): pyzmq's asyncio
        # wrapper costs a future and a dozen enum operations per message, more than a
        # route itself.
        self._router = self._socket(zmq.ROUTER, sync=True)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._secure_start(self._router)
        self._router.bind(self.config.bind)
        self.bound_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._metrics_sub = self._socket(zmq.SUB)
        self._metrics_sub.setsockopt(zmq.RCVHWM, self.config.sub_hwm)
        self._metrics_sub.setsockopt(zmq.SUBSCRIBE, b"")
        if self.config.metrics_port is not None:
            self._start_http()
        for reg in self.config.workers:
            self.service.register(reg, static=True)
        self._tasks += [
            self._supervised("router-control", self._serve_control),
            self._supervised("router-metrics", self._serve_metrics),
            self._supervised("router-housekeeping", self._housekeeping),
        ]
        # Start-up objects live as long as the process: keep them out of GC scans, which
        # would otherwise add pauses to routing decisions.
        gc.collect()
        gc.freeze()
        if self.config.gc_interval_s and self._idle_gc is None:
            self._idle_gc = IdleGC(self.config.gc_interval_s, self._count_gc)
            self._idle_gc.start()
        log.info(
            "router listening on %s (block_size=%d hash_mode=%s scorer=%s, %d static workers)",
            self.bound_endpoint,
            self.config.block_size,
            self.config.hash_mode,
            self.config.scorer.mode,
            len(self.config.workers),
        )

    def _supervised(
        self,
        name: str,
        loop: Callable[[], Awaitable[None]],
        alive: Callable[[], bool] | None = None,
    ) -> asyncio.Task[None]:
        """Run ``loop`` forever: if it raises, log it, count it and start it again."""

        kind = name if name.startswith("router-") else name.split("-")[0]

        async def run() -> None:
            backoff = 0.05
            while alive is None or alive():
                t0 = time.monotonic()
                try:
                    await loop()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("router task %s died; restarting it", name)
                    self.metrics.task_restarts.labels(kind).inc()
                    backoff = 0.05 if time.monotonic() - t0 > 10 else min(2.0, backoff * 2)
                    await asyncio.sleep(backoff)

        return asyncio.create_task(run(), name=name)

    def _start_http(self) -> None:
        from prometheus_client import start_http_server

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

    def _count_gc(self, generation: int, seconds: float) -> None:
        self.metrics.gc_collections.labels(str(generation)).inc()
        self.metrics.gc_seconds.inc(seconds)

    async def stop(self) -> None:
        if self._idle_gc is not None:
            await self._idle_gc.stop()
            self._idle_gc = None
        tasks = self._tasks + list(self._kv_tasks.values()) + list(self._replay_tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await t
                except Exception:
                    log.exception("router task %s failed", t.get_name())
        for s in (self._router, self._metrics_sub):
            if s is not None:
                s.close(linger=0)
        self._secure_stop()
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

    # ------------------------------------------------------------------ Transport
    def watch(self, w: WorkerEntry) -> None:
        reg = w.reg
        if reg.kv_events_endpoint:
            wid = w.worker_id
            self._kv_tasks[wid] = self._supervised(
                f"kv-{wid}", lambda: self._kv_loop(w), alive=lambda: self.workers.get(wid) is w
            )
        ep = reg.metrics_endpoint
        if ep and self._curve is not None:
            self._watch_metrics_secured(w, ep)
        elif ep and self._metrics_sub is not None:
            n = self._metrics_endpoints.get(ep, 0)
            if not n:
                self._metrics_sub.connect(ep)
            self._metrics_endpoints[ep] = n + 1

    def unwatch(self, w: WorkerEntry) -> None:
        for tasks in (self._kv_tasks, self._replay_tasks):
            t = tasks.pop(w.worker_id, None)
            if t is not None:
                t.cancel()
        ep = w.reg.metrics_endpoint
        if ep and ep in self._secure_metrics:
            self._unwatch_metrics_secured(ep)
        if ep and ep in self._metrics_endpoints:
            n = self._metrics_endpoints[ep] - 1
            if n <= 0:
                del self._metrics_endpoints[ep]
                if self._metrics_sub is not None:
                    with contextlib.suppress(zmq.ZMQError):
                        self._metrics_sub.disconnect(ep)
            else:
                self._metrics_endpoints[ep] = n
        pep = w.reg.prefetch_endpoint
        if pep and not any(
            o.reg.prefetch_endpoint == pep for o in self.workers.values() if o is not w
        ):
            sock = self._prefetch_socks.pop(pep, None)
            if sock is not None:
                sock.close(linger=0)

    def prefetch(self, w: WorkerEntry, msg: PrefetchRequest) -> bool:
        ep = w.reg.prefetch_endpoint
        assert ep is not None
        sock = self._prefetch_socks.get(ep)
        if sock is None:
            sock = self._sync_ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1024)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, self.config.reconnect_ivl_max_ms)
            self._as_client_of(sock, w)
            sock.connect(ep)
            self._prefetch_socks[ep] = sock
        try:
            sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    # ------------------------------------------------------------------ KV events
    async def _kv_loop(self, w: WorkerEntry) -> None:
        reg = w.reg
        st = w.stream
        assert reg.kv_events_endpoint is not None
        sub = self._socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self.config.sub_hwm)
        sub.setsockopt(zmq.SUBSCRIBE, reg.kv_events_topic.encode())
        initial = bool(reg.replay_endpoint and self.config.initial_replay and st.last_seq < 0)
        monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED) if initial else None
        self._as_client_of(sub, w)
        sub.connect(reg.kv_events_endpoint)
        resync_ms = int(self.config.resync_interval_s * 1000) or None
        ingest = self.service.ingest
        drain: zmq.Socket[bytes] = zmq.Socket.shadow(sub.underlying)  # same socket, sync reads
        try:
            if monitor is not None:
                # ZMQ's connect returns before the subscription reaches the publisher; a
                # batch published in between is dropped. Replay once the handshake is done,
                # so whatever the replay misses queues on `sub`.
                await self._joined(w, monitor)
                sub.disable_monitor()
                monitor.close(linger=0)
                monitor = None
                self._start_replay(w, 0, "initial")
            # A stream that lost batches is rebuilt from replay, at most once per heal
            # interval, until the publisher answers (even with idle resync off).
            heal_s = self.config.resync_interval_s or 5.0
            next_heal = 0.0
            while True:
                if st.needs_rebuild and not st.replaying and time.monotonic() >= next_heal:
                    next_heal = time.monotonic() + heal_s
                    self._start_replay(w, 0, "rebuild")
                wait_ms = (
                    resync_ms if resync_ms else (int(heal_s * 1000) if st.needs_rebuild else None)
                )
                if wait_ms and reg.replay_endpoint and not await sub.poll(wait_ms):
                    if not st.replaying and not st.needs_rebuild and resync_ms:
                        # idle: fetch anything past the last seq (a lost last batch)
                        self._start_replay(w, st.last_seq + 1, "resync")
                    continue
                frames = await sub.recv_multipart(copy=True)
                self.service.kv_alive(w)
                start = ingest.on_live(st, frames)
                if start is not None:
                    self._start_replay(w, start, "gap")
                # Batches already queued are read without an event-loop turn each (an
                # awaited recv costs more than applying a 32-block batch), a bounded run.
                for _ in range(_KV_DRAIN_BATCHES):
                    try:
                        frames = recv_now(drain)
                    except zmq.Again:
                        break
                    start = ingest.on_live(st, frames)
                    if start is not None:
                        self._start_replay(w, start, "gap")
        except zmq.ZMQError as exc:
            log.error("KV event socket of worker %s failed: %s", w.worker_id, exc)
            raise
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

    def _start_replay(self, w: WorkerEntry, start: int, kind: str) -> None:
        st = w.stream
        if st.replaying or not w.reg.replay_endpoint:
            return
        self.service.ingest.begin_replay(st)
        wid = w.worker_id
        self._replay_tasks[wid] = asyncio.create_task(
            self._replay(w, start, kind), name=f"replay-{wid}"
        )

    async def _replay(self, w: WorkerEntry, start: int, kind: str) -> None:
        """Fetch batches from ``start`` (retrying from a hole), then apply what waited; if
        batches are lost for good, rebuild the worker's index from the whole history."""
        ingest = self.service.ingest
        st = w.stream
        try:
            async with self._replay_sem:
                if kind == "rebuild":
                    await self._rebuild(w)
                else:
                    complete = await self._replay_rounds(w, start, kind)
                    if not complete:
                        ingest.replay_unanswered(st, kind)
                    if ingest.end_replay(st):
                        await self._rebuild(w)
        except asyncio.CancelledError:
            st.replaying = False
            raise
        except Exception:
            log.exception("replay from worker %s failed", w.worker_id)
            ingest.end_replay(st)
        finally:
            if self._replay_tasks.get(w.worker_id) is asyncio.current_task():
                del self._replay_tasks[w.worker_id]

    async def _rebuild(self, w: WorkerEntry) -> None:
        """The stream lost batches: rebuild the worker's index from the publisher's whole
        history. The index is cleared only once the publisher answers (one that does not
        leaves the index as it was, marked stale, and is tried again later)."""
        ingest = self.service.ingest
        st = w.stream
        log.warning("worker %s lost KV batches: rebuilding its index from replay", w.worker_id)
        ingest.begin_replay(st)
        complete = await self._replay_rounds(w, 0, "rebuild", fresh=True)
        ingest.end_replay(st)
        if st.replay_first is not None and complete:
            ingest.rebuilt(st)
        else:
            ingest.replay_unanswered(st, "rebuild")

    async def _replay_rounds(
        self, w: WorkerEntry, start: int, kind: str, fresh: bool = False
    ) -> bool:
        """Replay from ``start``; ``fresh``: start the index over at the first batch."""
        ingest = self.service.ingest
        st = w.stream
        wid = w.worker_id
        metrics = self.metrics
        timeout_ms = int(self.config.replay_timeout_s * 1000)
        assert w.reg.replay_endpoint is not None
        # Rounds that bring nothing new count against replay_attempts; a short round that
        # made progress (a publisher dropping part of a long history) is asked again.
        fruitless = rounds = 0
        while fruitless < self.config.replay_attempts and rounds < 256:
            rounds += 1
            dealer = self._socket(zmq.DEALER)
            dealer.setsockopt(zmq.RCVHWM, 0)  # ours never drops; the publisher's may
            self._as_client_of(dealer, w)
            dealer.connect(w.reg.replay_endpoint)
            first = st.last_seq
            n = 0
            timed_out_after = False
            try:
                await dealer.send_multipart([b"", seq_bytes(start)])
                while True:
                    if not await dealer.poll(timeout_ms):
                        metrics.replays.labels(wid, "timeout").inc()
                        if kind != "resync" or n:
                            log.warning(
                                "replay from %s (seq %d) timed out after %d batches",
                                wid,
                                start,
                                n,
                            )
                        if n:
                            # It answered, then went quiet: its end marker can be dropped
                            # by the same send high-water mark as batches. Ask again.
                            timed_out_after = True
                            break
                        return False
                    frames = await dealer.recv_multipart()
                    if len(frames) != 4 or len(frames[2]) != 8:
                        ingest.malformed("replay", wid, f"{len(frames)} frames")
                        continue
                    if frames[2] == REPLAY_END_SEQ:
                        break
                    if fresh:
                        ingest.rebuild(st)
                        fresh = False
                    ingest.on_replayed(st, frames[2], frames[3])
                    n += 1
                    if n % 512 == 0:
                        await asyncio.sleep(0)  # let routes in between a long history
            except zmq.ZMQError as exc:
                metrics.replays.labels(wid, "error").inc()
                log.warning("replay from %s failed: %s", wid, exc)
                return False
            finally:
                dealer.close(linger=0)
            again = ingest.replay_round(st)
            if timed_out_after:
                again = st.last_seq + 1
            if again is None:
                metrics.replays.labels(wid, "resync" if kind == "resync" else "ok").inc()
                if st.last_seq > first:
                    log.info(
                        "replayed KV batches of worker %s (seq %d..%d, %s)",
                        wid,
                        max(first + 1, 0),
                        st.last_seq,
                        kind,
                    )
                return True
            log.warning("replay from %s came back short at seq %d: asking again", wid, again)
            if st.last_seq <= first:
                fruitless += 1
            start = again
        return False

    # ------------------------------------------------------------------ metrics events
    async def _serve_metrics(self) -> None:
        assert self._metrics_sub is not None
        await self._serve_metrics_from(self._metrics_sub, None)

    # ------------------------------------------------------------------ housekeeping
    async def _housekeeping(self) -> None:
        period = min(0.25, self.config.worker_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            self.service.tick()

    # ------------------------------------------------------------------ control plane
    async def _serve_control(self) -> None:
        """Answer control messages, from the event loop's reader callback on the socket's
        FD (no task hop between a message's arrival and its answer). The FD is
        edge-triggered: it signals when the socket's state changes, so each call drains
        what is queued until EAGAIN; a send can consume the signal of a message that came
        meanwhile, so ``_reply`` drains again. Up to ``_CONTROL_BURST`` messages per loop
        turn, then other tasks (KV ingest, metrics) run before the rest."""
        sock = self._router
        assert sock is not None
        loop = asyncio.get_running_loop()
        fd = int(sock.getsockopt(zmq.FD))
        done: asyncio.Future[None] = loop.create_future()
        self._control_done = done
        loop.add_reader(fd, self._drain_control)
        loop.call_soon(self._drain_control)  # what came before the reader was added
        try:
            await done  # set only by a failure of the drain, which the supervisor restarts
        finally:
            loop.remove_reader(fd)
            self._control_done = None

    def _drain_control(self) -> None:
        sock = self._router
        if sock is None or self._draining:
            return
        self._draining = True
        try:
            for _ in range(_CONTROL_BURST):
                try:
                    raw = sock.recv_multipart(zmq.NOBLOCK, copy=self._curve is None)
                except zmq.Again:
                    return
                self._control_message(sock, raw)  # type: ignore[arg-type]
            asyncio.get_running_loop().call_soon(self._drain_control)  # the rest, next turn
        except Exception as exc:  # noqa: BLE001 - handed to the supervisor, which logs it
            if self._control_done is not None and not self._control_done.done():
                self._control_done.set_exception(exc)
        finally:
            self._draining = False

    def _control_message(self, sock: zmq.Socket, raw: list) -> None:  # type: ignore[type-arg]
        service = self.service
        frames: list[bytes]
        peer: str | None = None
        if self._curve is not None:
            frames, peer = _with_peer(raw)
        else:
            frames = raw
        ident = frames[0]
        body = frames[1:]
        if body and body[0] == b"":  # a REQ peer adds an empty delimiter
            body = body[1:]
            ident_frames = [ident, b""]
        else:
            ident_frames = [ident]
        origin = ident.hex()[:32]
        if len(body) != 3:
            service.malformed("control", origin, f"{len(body)} frames")
            return
        header, corr, payload = body
        if header != PROTOCOL_HEADER:
            service.malformed("control", origin, f"protocol header {header[:32]!r}")
            reply: msgspec.Struct | None = ErrorReply(
                "version", f"router speaks {PROTOCOL_HEADER.decode()}, got {header[:32]!r}"
            )
        else:
            try:
                msg = control_decoder.decode(payload)
            except DECODE_ERRORS as exc:
                service.malformed("control", origin, exc)
                reply = ErrorReply("bad_request", f"malformed message: {str(exc)[:200]}")
            except Exception as exc:  # noqa: BLE001
                service.malformed("control", origin, f"{type(exc).__name__}: {exc}")
                reply = ErrorReply("bad_request", f"malformed: {type(exc).__name__}")
            else:
                refused = service.authorize(msg, peer)
                if refused is not None:
                    reply = refused
                elif (
                    type(msg) is RouteRequest
                    and len(prompt_tokens(msg) or ()) > INLINE_BLOCKS * self.config.block_size
                ):
                    reply = self._route_big(sock, ident_frames, corr, msg)
                else:
                    reply = service.dispatch(msg, origin)
        if corr != b"\x00" * 8 and reply is not None:
            self._reply(sock, ident_frames + [PROTOCOL_HEADER, corr, encode(reply)])

    def _reply(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        # A ROUTER socket without ROUTER_MANDATORY never blocks: an answer to a peer that
        # has gone (or whose queue is full) is dropped, as the peer's timeout expects.
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("control reply dropped: %s", exc)
        # The send may have consumed the FD's signal of a message queued meanwhile.
        if not self._draining and int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            asyncio.get_running_loop().call_soon(self._drain_control)

    def _route_big(
        self, sock: zmq.Socket, ident_frames: list[bytes], corr: bytes, req: RouteRequest
    ) -> msgspec.Struct | None:
        """Start hashing a long prompt in a task of its own; None: it answers itself."""
        bad = self.service.check_request(req)
        if bad is not None:
            return bad
        if self._big_routes >= _MAX_BIG_ROUTES:
            self.metrics.rejected.labels("busy").inc()
            return ErrorReply("unavailable", "too many long prompts in flight", req.request_id)
        self._big_routes += 1

        async def run() -> None:
            try:
                hashes: list[int] = []
                for chunk in self.service.hash_chunks(prompt_tokens(req) or (), req.cache_salt):
                    hashes += chunk
                    await asyncio.sleep(0)
                reply = self.service.dispatch_hashed(req, hashes)
                if corr != b"\x00" * 8:
                    self._reply(sock, ident_frames + [PROTOCOL_HEADER, corr, encode(reply)])
            except Exception:
                log.exception("route %s", req.request_id[:64])
            finally:
                self._big_routes -= 1

        task = asyncio.create_task(run(), name="route-long")
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)
        return None

    # convenience for embedding (tests, the demo)
    def register(self, regs: Iterable[WorkerRegistration]) -> None:
        self.service.register_all(regs)

    # ------------------------------------------------------------------ CURVE (security)
    def _secure_start(self, router: zmq.Socket) -> None:
        """Security on: ZAP handler, identity guard, the control socket a CURVE server."""
        curve = self._curve
        if curve is None:
            return
        guard = IdentityGuard(curve.allowlist, self.metrics.registry)
        guard.static.update(w.worker_id for w in self.config.workers)
        self.service.secure(guard)
        self._zap = start_authenticator(self.ctx, curve, guard.handshake_refused)
        curve.server(router)
        # Peers without CURVE never reach the ZAP handler: count their failed handshakes.
        # (a plain socket's monitor is made on its context: an asyncio one here)
        mon: zmq.asyncio.Socket = router.get_monitor_socket(  # type: ignore[assignment]
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )

        async def handshakes() -> None:
            while True:
                await mon.recv_multipart()
                guard.handshake_refused("none")

        self._tasks.append(self._supervised("router-handshakes", handshakes))
        self._handshake_monitor = mon
        log.info(
            "CURVE on: router key %s, %d allowed keys",
            curve.keys.public.decode()[:8] + "...",
            len(curve.allowlist),
        )

    def _secure_stop(self) -> None:
        for sub, task, _n in self._secure_metrics.values():
            task.cancel()
            sub.close(linger=0)
        self._secure_metrics.clear()
        mon = getattr(self, "_handshake_monitor", None)
        if mon is not None:
            mon.close(linger=0)
        if self._zap is not None:
            self._zap.stop()  # type: ignore[attr-defined]

    def _owner_key(self, w: WorkerEntry) -> str | None:
        guard = self.service.guard
        return guard.owner_of(w.worker_id) if guard is not None else None

    def _as_client_of(self, sock: zmq.Socket, w: WorkerEntry) -> None:
        """A socket to one of ``w``'s endpoints: a CURVE client of the key that registered
        ``w`` (a static worker has none: plain)."""
        owner = self._owner_key(w)
        if self._curve is not None and owner is not None:
            self._curve.client(sock, owner.encode())

    def _watch_metrics_secured(self, w: WorkerEntry, ep: str) -> None:
        entry = self._secure_metrics.get(ep)
        if entry is not None:
            self._secure_metrics[ep] = (entry[0], entry[1], entry[2] + 1)
            return
        sub = self._socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self.config.sub_hwm)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._as_client_of(sub, w)
        sub.connect(ep)
        key = self._owner_key(w)
        task = self._supervised(f"metrics-{ep}", lambda: self._serve_metrics_from(sub, key))
        self._secure_metrics[ep] = (sub, task, 1)

    def _unwatch_metrics_secured(self, ep: str) -> None:
        sub, task, n = self._secure_metrics[ep]
        if n > 1:
            self._secure_metrics[ep] = (sub, task, n - 1)
            return
        del self._secure_metrics[ep]
        task.cancel()
        sub.close(linger=0)

    async def _serve_metrics_from(self, sub: zmq.asyncio.Socket, key: str | None) -> None:
        """Metrics from a SUB; ``key``: the one publisher's key the CURVE handshake proved
        (None: the shared plaintext SUB)."""
        service = self.service
        while True:
            frames = await sub.recv_multipart()
            if len(frames) != 3:
                service.malformed("metrics", "?", f"{len(frames)} frames")
                continue
            try:
                m = metrics_decoder.decode(frames[2])
            except DECODE_ERRORS as exc:
                service.malformed("metrics", "?", exc)
                continue
            except Exception as exc:  # noqa: BLE001 - any bad payload is counted, dropped
                service.malformed("metrics", "?", f"{type(exc).__name__}: {exc}")
                continue
            try:
                service.metrics_from(m, key)
            except Exception:
                log.exception("metrics from %s", m.worker_id[:64])


def _with_peer(raw: list[zmq.Frame]) -> tuple[list[bytes], str | None]:
    """Frames as bytes, and the sender's Z85 key (ZMQ ``User-Id``, set by our ZAP handler)."""
    return [f.bytes for f in raw], peer_key(raw[-1]) if raw else None
