"""``RouterClient`` never hangs its caller: every call has one deadline that covers the send,
notifications are bounded and dropped (counted) when the router is away, and a router that
comes back is used again. The "router" here is a bare ZMQ ROUTER socket in the test, so it
can answer, stay silent or vanish on cue; the real router process is in test_router_process.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import zmq
import zmq.asyncio

from dynamo_ext.errors import NoWorkerAvailable, RouterUnavailable
from dynamo_ext.protocol import (
    PROTOCOL_HEADER,
    Ack,
    ErrorReply,
    RequestFinished,
    RouteRequest,
    control_decoder,
    encode,
)
from dynamo_ext.router.client import RouterClient
from dynamo_ext.testing import free_port


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


class FakeRouter:
    """A ROUTER socket that records what it receives and answers ``Ack`` (or nothing)."""

    def __init__(self, endpoint: str, answer: bool = True) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.answer = answer
        self.received: list[object] = []
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            ident, header, corr, payload = await self.sock.recv_multipart()
            assert header == PROTOCOL_HEADER
            msg = control_decoder.decode(payload)
            self.received.append(msg)
            if self.answer and corr != b"\x00" * 8:
                reply = (
                    ErrorReply("no_worker", "none here") if isinstance(msg, RouteRequest) else Ack()
                )
                await self.sock.send_multipart([ident, PROTOCOL_HEADER, corr, encode(reply)])

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        self.sock.close(linger=0)
        self.ctx.term()


def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def test_call_to_a_router_nobody_runs_fails_at_its_deadline_then_fast() -> None:
    async def main() -> None:
        async with RouterClient(endpoint(), timeout_s=0.5) as c:
            t0 = time.monotonic()
            with pytest.raises(RouterUnavailable, match="not reachable"):
                await c.route("r1", [1, 2, 3])
            # a new client gives its router one deadline to appear
            assert 0.4 < time.monotonic() - t0 < 1.0
            assert not c.reachable
            for _ in range(5):  # known down: no call waits its deadline any more
                t0 = time.monotonic()
                with pytest.raises(RouterUnavailable):
                    await c.workers()
                assert time.monotonic() - t0 < 0.3

    run(main())


def test_a_router_starting_after_its_client_is_waited_for() -> None:
    async def main() -> None:
        ep = endpoint()
        async with RouterClient(ep, timeout_s=2.0) as c:
            call = asyncio.ensure_future(c.deregister("w0"))
            await asyncio.sleep(0.5)  # refused connections meanwhile
            fake = FakeRouter(ep)
            try:
                assert isinstance(await call, Ack)
            finally:
                await fake.stop()

    run(main())


def test_deadline_covers_the_send_to_a_router_that_never_speaks() -> None:
    """A peer that takes the TCP connection but never completes ZMTP's handshake (a hung
    process): nothing can be sent, and the call fails at its deadline, not later."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)  # the kernel accepts; nobody ever reads

    async def main() -> None:
        ep = f"tcp://127.0.0.1:{lsock.getsockname()[1]}"
        async with RouterClient(ep, timeout_s=0.5) as c:
            t0 = time.monotonic()
            with pytest.raises(RouterUnavailable, match="not reachable"):
                await c.workers()
            assert 0.4 < time.monotonic() - t0 < 1.0
            t0 = time.monotonic()
            assert await c.finished("r1") is False
            assert time.monotonic() - t0 < 0.3

    try:
        run(main())
    finally:
        lsock.close()


def test_notifications_are_bounded_and_counted_when_the_router_is_down() -> None:
    async def main() -> None:
        async with RouterClient(endpoint(), timeout_s=2.0, notify_timeout_s=0.2) as c:
            t0 = time.monotonic()
            assert await c.finished("r1") is False
            assert await c.prefill_done("r1") is False
            assert await c.worker_failed("w1", "x") is False
            assert time.monotonic() - t0 < 0.6  # one budget, then fast while down
            assert c.dropped_notifications == 3

    run(main())


def test_router_that_takes_the_message_but_never_answers() -> None:
    async def main() -> None:
        ep = endpoint()
        fake = FakeRouter(ep, answer=False)
        try:
            async with RouterClient(ep, timeout_s=0.4) as c:
                t0 = time.monotonic()
                with pytest.raises(RouterUnavailable, match="did not answer"):
                    await c.workers()
                assert time.monotonic() - t0 < 0.8
                assert fake.received  # it went out: the deadline covered the answer
        finally:
            await fake.stop()

    run(main())


def test_answers_and_finished_carries_the_hit_check() -> None:
    async def main() -> None:
        ep = endpoint()
        fake = FakeRouter(ep)
        try:
            async with RouterClient(ep, timeout_s=2.0) as c:
                with pytest.raises(NoWorkerAvailable):
                    await c.route("r1", [1, 2, 3])
                assert await c.finished("r1", predicted_cached_tokens=256, actual_cached_tokens=128)
                assert await c.finished("r2")
                await asyncio.sleep(0.1)
        finally:
            await fake.stop()
        done = [m for m in fake.received if isinstance(m, RequestFinished)]
        assert [
            (m.request_id, m.predicted_cached_tokens, m.actual_cached_tokens) for m in done
        ] == [
            ("r1", 256, 128),
            ("r2", None, None),
        ]

    run(main())


def test_calls_in_flight_fail_when_the_connection_drops() -> None:
    async def main() -> None:
        ep = endpoint()
        fake = FakeRouter(ep, answer=False)
        async with RouterClient(ep, timeout_s=5.0) as c:
            call = asyncio.ensure_future(c.workers())
            await asyncio.sleep(0.3)
            assert fake.received and not call.done()
            t0 = time.monotonic()
            await fake.stop()
            with pytest.raises(RouterUnavailable, match="lost"):
                await call
            assert time.monotonic() - t0 < 0.5  # not the 5 s deadline

    run(main())


def test_a_router_that_dies_then_returns() -> None:
    """Killed mid-run: calls fail within their deadline and nothing sent meanwhile reaches
    the router that comes back (no stale routes reserving load); then it is used again."""

    async def main() -> None:
        ep = endpoint()
        fake = FakeRouter(ep)
        async with RouterClient(ep, timeout_s=0.5) as c:
            assert isinstance(await c.deregister("w0"), Ack)
            await fake.stop()  # the router process is gone: its socket closed
            await asyncio.sleep(0.2)
            times = []
            for i in range(5):
                t0 = time.monotonic()
                with pytest.raises(RouterUnavailable):
                    await c.route(f"lost-{i}", [1, 2, 3])
                await c.finished(f"lost-{i}")
                times.append(time.monotonic() - t0)
            assert max(times) < 1.0, times
            back = FakeRouter(ep)
            try:
                deadline = time.monotonic() + 5
                while True:  # reconnects within ZMQ's reconnect interval
                    try:
                        assert isinstance(await c.deregister("w0"), Ack)
                        break
                    except RouterUnavailable:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.05)
                assert c.reachable
                stale = [
                    m for m in back.received if getattr(m, "request_id", "").startswith("lost")
                ]
                assert stale == []
            finally:
                await back.stop()

    run(main())


class LyingRouter(FakeRouter):
    """Announces a hashing it made up (``FleetState.hashing``), then refuses routes."""

    def __init__(self, endpoint: str, hashing: str) -> None:
        self.hashing = hashing
        super().__init__(endpoint)

    async def _serve(self) -> None:
        from dynamo_ext.protocol import FleetState, RouterQuery

        while True:
            ident, header, corr, payload = await self.sock.recv_multipart()
            msg = control_decoder.decode(payload)
            self.received.append(msg)
            if isinstance(msg, RouterQuery):
                reply: object = FleetState([], hashing=self.hashing)
            else:
                reply = ErrorReply("no_worker", "none here")
            await self.sock.send_multipart([ident, PROTOCOL_HEADER, corr, encode(reply)])


@pytest.mark.parametrize(
    "hashing",
    ["tokens/abc", "tokens/0", "tokens/-16", "tokens/" + "9" * 40, "tokens/16/x", "tokens/"],
)
def test_a_router_that_announces_an_impossible_hashing_gets_tokens(hashing: str) -> None:
    """Was: the client parsed the announced block size with int() and hashed with it, so a
    lying (or broken) router made every route raise ValueError/ZeroDivisionError in the
    caller. Now the announcement is refused, counted, and the prompt goes as tokens."""

    async def main() -> None:
        ep = endpoint()
        fake = LyingRouter(ep, hashing)
        try:
            async with RouterClient(ep, timeout_s=2.0) as c:
                for i in range(2):
                    with pytest.raises(NoWorkerAvailable):
                        await c.route(f"r{i}", list(range(64)))
                assert c.bad_hashing == 1  # counted once, then tokens without asking again
        finally:
            await fake.stop()
        routes = [m for m in fake.received if isinstance(m, RouteRequest)]
        assert len(routes) == 2
        assert all(m.block_hashes is None and m.token_ids == list(range(64)) for m in routes)

    run(main())
