"""Async client of the router's control socket, for any gateway (our frontend, a proxy).

One DEALER socket carries any number of concurrent calls: each is tagged with an 8-byte
correlation id the router echoes back, and one reader task resolves the matching future.
Notifications (request finished, prefill done) go out with correlation id zero and get no
answer, so reporting the end of a request costs the caller one send.

No call can hang a caller: every call has one deadline (``timeout_s``) that covers the send
as well as the answer, and a notification gets ``notify_timeout_s`` to go out, after which it
is dropped and counted (``dropped_notifications``). The socket queues messages only on a
live connection (``ZMQ_IMMEDIATE``): while the router is down a send cannot go out, so it
fails at its deadline instead of piling up stale routes that a restarted router would then
reserve load for. Once a call has failed that way, the next sends get only
``_FAST_FAIL_S`` to find a connection until one goes out again, so a frontend answers 503
at once during an outage instead of after a full timeout each. ZMTP heartbeats drop a
connection whose peer stopped answering without closing it.
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

from dynamo_ext.errors import NoWorkerAvailable, ProtocolError, RouterUnavailable
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
    reply_decoder,
)
from dynamo_ext.security import Curve

log = logging.getLogger(__name__)

_NO_REPLY = b"\x00" * 8
# Send budget while the last send found no connection: long enough for a reconnect that is
# already under way (ZMQ retries every 100 ms), short enough that an outage costs nothing.
_FAST_FAIL_S = 0.05
_HEARTBEAT_IVL_MS = 1000
_HEARTBEAT_TIMEOUT_MS = 3000


class RouterClient:
    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 2.0,
        ctx: zmq.asyncio.Context | None = None,
        *,
        notify_timeout_s: float | None = None,
        curve: Curve | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.notify_timeout_s = (
            min(timeout_s, 0.25) if notify_timeout_s is None else notify_timeout_s
        )
        self.dropped_notifications = 0
        self._curve = curve  # a CURVE client of the router's key (dynamo_ext.security)
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._pending: dict[bytes, asyncio.Future[ReplyMessage]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self._unreachable = False  # the last send found no connection in its budget

    async def __aenter__(self) -> RouterClient:
        self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def connect(self) -> None:
        if self._sock is not None:
            return
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)  # queue on live connections only
        s.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout_s * 1000)))  # backstop
        s.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
        if self._curve is not None:
            self._curve.client(s)
        s.connect(self.endpoint)
        self._sock = s
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        for f in self._pending.values():
            if not f.done():
                f.set_exception(RouterUnavailable("client closed"))
        self._pending.clear()

    async def _read(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
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
        """False while the last send found no connection to the router."""
        return not self._unreachable

    async def _send(self, frames: list[bytes], budget_s: float) -> None:
        """Send ``frames`` within ``budget_s`` (less while the router is known down), or
        raise ``RouterUnavailable``: the message is then not queued anywhere."""
        assert self._sock is not None
        if self._unreachable:
            budget_s = min(budget_s, _FAST_FAIL_S)
        try:
            async with asyncio.timeout(max(budget_s, 0.0)):
                await self._sock.send_multipart(frames)
        except (TimeoutError, zmq.Again) as exc:
            self._unreachable = True
            raise RouterUnavailable(
                f"router at {self.endpoint} is not reachable (no connection in {budget_s:.3g}s)"
            ) from exc
        self._unreachable = False

    async def call(self, msg: msgspec.Struct) -> ReplyMessage:
        """Send ``msg`` and await the router's answer, all within ``timeout_s``."""
        self.connect()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        corr = next(self._ids).to_bytes(8, "big")
        fut: asyncio.Future[ReplyMessage] = loop.create_future()
        self._pending[corr] = fut
        try:
            await self._send([PROTOCOL_HEADER, corr, encode(msg)], self.timeout_s)
            return await asyncio.wait_for(fut, max(deadline - loop.time(), 0.0))
        except TimeoutError as exc:
            raise RouterUnavailable(
                f"router at {self.endpoint} did not answer in {self.timeout_s}s"
            ) from exc
        finally:
            self._pending.pop(corr, None)

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
        reply = await self.call(
            RouteRequest(
                request_id=request_id,
                role=role,
                token_ids=list(token_ids) if token_ids is not None else None,
                block_hashes=list(block_hashes) if block_hashes is not None else None,
                num_tokens=num_tokens,
                exclude_workers=list(exclude_workers),
                track=track,
                explain=explain,
                cache_salt=cache_salt,
            )
        )
        self._expect(reply, RouteResponse)
        return reply  # type: ignore[return-value]

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
