"""Async client of the router's control socket, for any gateway (our frontend, a proxy).

One DEALER socket carries any number of concurrent calls: each is tagged with an 8-byte
correlation id the router echoes back, and one reader task resolves the matching future.
Notifications (request finished, prefill done) go out with correlation id zero and get no
answer, so reporting the end of a request costs the caller one send.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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

_NO_REPLY = b"\x00" * 8


class RouterClient:
    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 2.0,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._pending: dict[bytes, asyncio.Future[ReplyMessage]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None

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

    async def call(self, msg: msgspec.Struct) -> ReplyMessage:
        self.connect()
        assert self._sock is not None
        corr = next(self._ids).to_bytes(8, "big")
        fut: asyncio.Future[ReplyMessage] = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        try:
            await self._sock.send_multipart([PROTOCOL_HEADER, corr, encode(msg)])
            return await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError as exc:
            raise RouterUnavailable(
                f"router at {self.endpoint} did not answer in {self.timeout_s}s"
            ) from exc
        finally:
            self._pending.pop(corr, None)

    async def notify(self, msg: msgspec.Struct) -> None:
        self.connect()
        assert self._sock is not None
        await self._sock.send_multipart([PROTOCOL_HEADER, _NO_REPLY, encode(msg)])

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

    async def prefill_done(self, request_id: str) -> None:
        await self.notify(PrefillFinished(request_id))

    async def finished(self, request_id: str) -> None:
        await self.notify(RequestFinished(request_id))

    async def worker_failed(self, worker_id: str, reason: str = "") -> None:
        await self.notify(WorkerFailed(worker_id, reason))
