"""Async client of the router's control socket, for any gateway (our frontend, a proxy).

One DEALER socket carries any number of concurrent calls: each is tagged with an 8-byte
correlation id the router echoes back, and the event loop's reader callback on the socket's
FD resolves the matching future. The socket is a plain one driven from that callback, not
pyzmq's asyncio wrapper, which costs a future and a dozen enum operations per message: more
than the router's whole decision.
Notifications (request finished, prefill done) go out with correlation id zero and get no
answer, so reporting the end of a request costs the caller one send.

No call can hang a caller: every call has one deadline (``timeout_s``) that covers the send
as well as the answer, and a notification gets ``notify_timeout_s`` to go out, after which it
is dropped and counted (``dropped_notifications``). The socket queues messages only on a
live connection (``ZMQ_IMMEDIATE``): while the router is down a send cannot go out, so it
fails at its deadline instead of piling up stale routes that a restarted router would then
reserve load for. A socket monitor follows the connection: when it drops (the router
process died, or stopped answering ZMTP heartbeats) the calls waiting for an answer fail at
once (a new connection never carries the old answers), and while no connection is up sends
get only ``_FAST_FAIL_S`` to find one, so a frontend answers 503 at once during an outage
instead of after a full timeout each. A new client gives its router one deadline to appear
(a router and its clients often start together) before a refused connection means down.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Sequence

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from dynamo_ext.errors import DynamoExtError, NoWorkerAvailable, ProtocolError, RouterUnavailable
from dynamo_ext.hashing import salt_parent, token_block_hashes
from dynamo_ext.protocol import (
    PROTOCOL_HEADER,
    Ack,
    ErrorReply,
    FleetState,
    PrefillFinished,
    ReplyMessage,
    RequestFinished,
    RequestRole,
    RouteRequest,
    RouteResponse,
    RouterQuery,
    WorkerDeregistration,
    WorkerFailed,
    WorkerRegistration,
    encode,
    pack_tokens,
    reply_decoder,
)
from dynamo_ext.security import Curve

log = logging.getLogger(__name__)

_NO_REPLY = b"\x00" * 8
# Prompts at least this long are sent as RouteRequest.token_bytes (packed uint32s).
PACK_TOKENS_FROM = 1024
# Send budget while the last send found no connection: long enough for a reconnect that is
# already under way (ZMQ retries every 100 ms), short enough that an outage costs nothing.
_FAST_FAIL_S = 0.05
_SEND_RETRY_S = 0.001  # a send that found no connection tries again after this
_HEARTBEAT_IVL_MS = 1000
_HEARTBEAT_TIMEOUT_MS = 3000
_MONITORED = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED


_MAX_BLOCK_SIZE = 1 << 16


def _tokens_block_size(hashing: str) -> int | None:
    """The block size of a "tokens/<n>" hashing, None unless n is a plain 1..65536."""
    n = hashing.partition("/")[2]
    if not (n.isascii() and n.isdigit() and len(n) <= 5):
        return None
    bs = int(n)
    return bs if 1 <= bs <= _MAX_BLOCK_SIZE else None


class _Expired(Exception):
    """A call's deadline passed before its answer came."""


def _expire(fut: asyncio.Future[ReplyMessage]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


class RouterClient:
    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 2.0,
        ctx: zmq.asyncio.Context | None = None,
        *,
        notify_timeout_s: float | None = None,
        curve: Curve | None = None,
        hash_locally: bool = True,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.notify_timeout_s = (
            min(timeout_s, 0.25) if notify_timeout_s is None else notify_timeout_s
        )
        self.dropped_notifications = 0
        self.bad_hashing = 0  # announcements of a hashing that cannot be (then: tokens)
        # A router in tokens mode announces it (FleetState.hashing): then prompts are hashed
        # here, natively (microseconds), and sent as hashes, which spares the router's one
        # event loop the hashing. None: not asked yet; "": ask nothing, send tokens.
        self.hash_locally = hash_locally
        self._hashing: str | None = None if hash_locally else ""
        self._curve = curve  # a CURVE client of the router's key (dynamo_ext.security)
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock: zmq.Socket | None = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[bytes, asyncio.Future[ReplyMessage]] = {}
        self._ids = itertools.count(1)
        self._unreachable = False  # no connection: the last one dropped or a send found none
        self._grace_until = 0.0  # loop time until which a refused connection is not "down"
        self._monitor: zmq.asyncio.Socket | None = None  # made on the asyncio context
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RouterClient:
        self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def connect(self) -> None:
        if self._sock is not None:
            return
        s = zmq.Socket(self._ctx, zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)  # queue on live connections only
        s.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
        if self._curve is not None:
            self._curve.client(s)
        mon: zmq.asyncio.Socket = s.get_monitor_socket(_MONITORED)  # type: ignore[assignment]
        self._monitor = mon
        s.connect(self.endpoint)
        self._sock = s
        loop = self._loop = asyncio.get_running_loop()
        self._grace_until = loop.time() + self.timeout_s
        self._fd = fd = int(s.getsockopt(zmq.FD))
        loop.add_reader(fd, self._drain)
        self._watcher = loop.create_task(self._watch(mon))

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        self._watcher = None
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._sock.close(linger=0)
            self._sock = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        self._fail_pending("client closed")

    def _fail_pending(self, why: str) -> None:
        for f in self._pending.values():
            if not f.done():
                f.set_exception(RouterUnavailable(why))
        self._pending.clear()

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Follow the connection: up once the ZMTP handshake is done, down when it drops
        or a connection attempt fails."""
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._unreachable = False
            elif event == zmq.EVENT_DISCONNECTED:
                self._unreachable = True
                self._grace_until = 0.0  # a live connection was lost: no grace
                # The router that took these calls is gone: their answers never come.
                self._fail_pending(f"connection to router at {self.endpoint} lost")
            elif event == zmq.EVENT_CONNECT_RETRIED:
                self._unreachable = True

    def _drain(self) -> None:
        """Answers queued on the socket, each to its call. The FD is edge-triggered: read
        until EAGAIN (also after a send, which can consume the signal of an answer)."""
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:  # the socket closed under us
                log.debug("router client socket: %s", exc)
                return
            if len(frames) != 3 or frames[0] != PROTOCOL_HEADER:
                continue  # not an answer we can match to a call
            fut = self._pending.pop(frames[1], None)
            if fut is None or fut.done():
                continue  # its caller timed out
            try:
                fut.set_result(reply_decoder.decode(frames[2]))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                fut.set_exception(ProtocolError(f"malformed reply from router: {exc}"))

    @property
    def reachable(self) -> bool:
        """False while there is no connection to the router."""
        return not self._unreachable

    def _try_send(self, frames: list[bytes]) -> bool:
        """One non-blocking send: False while no connection can take it (ZMQ_IMMEDIATE)."""
        assert self._sock is not None
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        finally:
            # The send may have consumed the FD's signal of an answer that came meanwhile.
            if int(self._sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                assert self._loop is not None
                self._loop.call_soon(self._drain)
        return True

    async def _send(self, frames: list[bytes], budget_s: float) -> None:
        """Send ``frames`` within ``budget_s`` (``_FAST_FAIL_S`` while there is no
        connection, also when it drops during the wait), or raise ``RouterUnavailable``:
        the message is then not queued anywhere."""
        # Done at once on a live connection: then nothing is awaited, which is most of a
        # route's cost on the caller's side.
        if self._try_send(frames):
            self._unreachable = False
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        # Otherwise tried again every millisecond (ZMQ reconnects every 100 ms), so a
        # connection found dead meanwhile ends the wait.
        while True:
            now = loop.time()
            down = self._unreachable and now >= self._grace_until
            budget = min(budget_s, _FAST_FAIL_S) if down else budget_s
            if now - t0 >= budget:
                break
            await asyncio.sleep(_SEND_RETRY_S)
            if self._sock is None:
                break
            if self._try_send(frames):
                self._unreachable = False
                return
        self._unreachable = True
        self._grace_until = 0.0
        raise RouterUnavailable(
            f"router at {self.endpoint} is not reachable "
            f"(no connection in {loop.time() - t0:.3g}s)"
        )

    async def call(self, msg: msgspec.Struct) -> ReplyMessage:
        """Send ``msg`` and await the router's answer, all within ``timeout_s``."""
        self.connect()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        corr = next(self._ids).to_bytes(8, "big")
        fut: asyncio.Future[ReplyMessage] = loop.create_future()
        self._pending[corr] = fut
        # A timer, not asyncio.wait_for: that wraps the await in a task of its own, which
        # costs more than the rest of a route's client side together.
        timer = loop.call_at(deadline, _expire, fut)
        try:
            await self._send([PROTOCOL_HEADER, corr, encode(msg)], self.timeout_s)
            return await fut
        except _Expired as exc:
            raise RouterUnavailable(
                f"router at {self.endpoint} did not answer in {self.timeout_s}s"
            ) from exc
        finally:
            timer.cancel()
            self._pending.pop(corr, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # failed while the send was still waiting: retrieved here
            else:
                fut.cancel()

    async def notify(self, msg: msgspec.Struct) -> bool:
        """Send ``msg`` without an answer; ``False`` (and counted in
        ``dropped_notifications``) when it could not go out in ``notify_timeout_s``.
        Never raises for a router that is down: the caller is usually cleaning up."""
        self.connect()
        try:
            await self._send([PROTOCOL_HEADER, _NO_REPLY, encode(msg)], self.notify_timeout_s)
        except RouterUnavailable as exc:
            self.dropped_notifications += 1
            log.debug("dropped %s: %s", type(msg).__name__, exc)
            return False
        return True

    @staticmethod
    def _expect(reply: ReplyMessage, cls: type) -> None:
        if isinstance(reply, ErrorReply):
            if reply.code == "no_worker":
                raise NoWorkerAvailable(reply.message)
            raise ProtocolError(f"router error {reply.code}: {reply.message}")
        if not isinstance(reply, cls):
            raise ProtocolError(f"expected {cls.__name__}, got {type(reply).__name__}")

    # ---- calls --------------------------------------------------------------------
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
        base = RouteRequest(
            request_id=request_id,
            role=role,
            exclude_workers=list(exclude_workers),
            track=track,
            explain=explain,
            cache_salt=cache_salt,
        )
        if token_ids is not None and block_hashes is None and self._hashing != "":
            if self._hashing is None:
                await self._learn_hashing()
            hashing = self._hashing
            if hashing:
                hashes = token_block_hashes(
                    token_ids, int(hashing.partition("/")[2]), salt_parent(cache_salt)
                )
                reply = await self.call(
                    msgspec.structs.replace(
                        base, block_hashes=hashes, num_tokens=len(token_ids), hashed_as=hashing
                    )
                )
                if not (isinstance(reply, ErrorReply) and reply.code == "hash_mismatch"):
                    self._expect(reply, RouteResponse)
                    return reply  # type: ignore[return-value]
                # The router was restarted with another hashing: learn it again next time,
                # and send this prompt's tokens (nothing is lost but one round trip).
                log.info("router at %s: %s", self.endpoint, reply.message)
                self._hashing = None
        packed = token_ids is not None and len(token_ids) >= PACK_TOKENS_FROM
        reply = await self.call(
            msgspec.structs.replace(
                base,
                # Long prompts go as packed uint32s: cheap for the router to decode.
                token_ids=list(token_ids) if token_ids is not None and not packed else None,
                token_bytes=pack_tokens(token_ids) if packed and token_ids is not None else None,
                block_hashes=list(block_hashes) if block_hashes is not None else None,
                num_tokens=num_tokens,
            )
        )
        self._expect(reply, RouteResponse)
        return reply  # type: ignore[return-value]

    async def _learn_hashing(self) -> None:
        """Ask the router how it hashes prompts (once; again after a hash_mismatch)."""
        try:
            reply = await self.call(RouterQuery())
        except RouterUnavailable:
            raise  # the route itself could not go either: fail it now, not after two tries
        except DynamoExtError as exc:
            log.debug("router hashing unknown (%s): sending tokens", exc)
            return
        # A router that does not say (an older one, or not a FleetState): send tokens.
        hashing = reply.hashing if isinstance(reply, FleetState) else ""
        if hashing.startswith("tokens/") and _tokens_block_size(hashing) is None:
            # Broken or lying: hashing with its block size would fail or mislead every route.
            self.bad_hashing += 1
            log.warning("router at %s announced hashing %r: sending tokens", self.endpoint, hashing[:64])
            hashing = ""
        self._hashing = hashing if hashing.startswith("tokens/") else ""

    async def register(self, reg: WorkerRegistration) -> Ack:
        reply = await self.call(reg)
        self._expect(reply, Ack)
        return reply  # type: ignore[return-value]

    async def deregister(self, worker_id: str) -> Ack:
        reply = await self.call(WorkerDeregistration(worker_id))
        self._expect(reply, Ack)
        return reply  # type: ignore[return-value]

    async def workers(self) -> FleetState:
        reply = await self.call(RouterQuery())
        self._expect(reply, FleetState)
        return reply  # type: ignore[return-value]

    async def prefill_done(self, request_id: str) -> bool:
        return await self.notify(PrefillFinished(request_id))

    async def finished(
        self,
        request_id: str,
        *,
        predicted_cached_tokens: int | None = None,
        actual_cached_tokens: int | None = None,
    ) -> bool:
        """The request is over; with what the router predicted the worker had cached for
        its prompt and what the worker reported it reused, when both are known."""
        return await self.notify(
            RequestFinished(
                request_id,
                predicted_cached_tokens=predicted_cached_tokens,
                actual_cached_tokens=actual_cached_tokens,
            )
        )

    async def worker_failed(self, worker_id: str, reason: str = "") -> bool:
        return await self.notify(WorkerFailed(worker_id, reason))
