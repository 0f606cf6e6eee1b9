"""The chaos harness's parts (``sim.chaos``): the fault-injecting proxies a worker's KV
stream, replay socket and metrics pass through, a simulated worker (a one-worker
``MockerFleet`` whose true cache the checkpoints read), the CURVE keys of a secured run,
the hostile payloads (msgpack nested past any decoder's stack), and ``/proc`` and
Prometheus readers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from pathlib import Path
from typing import Any, Literal

import msgspec
import zmq
import zmq.asyncio

from dynamo_ext.hashing import BlockHasher
from dynamo_ext.protocol import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    REPLAY_END_SEQ,
    RouteRequest,
    WorkerRegistration,
)
from dynamo_ext.security import Curve, CurveConfig, generate_keys, load_curve
from dynamo_ext.sim.fleet import MockerFleet, MockerWorker
from dynamo_ext.sim.model import MockerConfig, output_token

_NESTING = 5000  # msgpack arrays nested this deep (5 kB): deeper than any real message


# ======================================================================================
# Fault-injecting proxy of one worker's KV stream and replay socket
# ======================================================================================
ReplayMode = Literal["ok", "delay", "stall"]


class StreamProxy:
    """SUB->PUB forwarder of a vLLM KV event stream, plus a ROUTER->DEALER replay proxy.

    Frames pass unchanged (seqs included), so a dropped batch is a real gap for the router
    and the real publisher's buffer, reached through the replay proxy, can fill it.
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        kv_endpoint: str,
        replay_endpoint: str,
        rng: random.Random,
        curve: Curve | None = None,
    ) -> None:
        self.ctx = ctx
        self.upstream_replay = replay_endpoint
        self.rng = rng
        self.drop_rate = 0.0
        self.replay_mode: ReplayMode = "ok"
        self.replay_delay_s = 1.0
        self.last_forwarded: bytes | None = None  # seq frame of the last batch sent on
        self.forwarded = self.dropped = self.replays = self.replays_stalled = 0
        self._sub = ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(kv_endpoint)
        self._pub = ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 0)
        if curve is not None:  # the router-facing sockets speak as the worker's key
            curve.server(self._pub)
        self._pub.bind("tcp://127.0.0.1:0")
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replay = ctx.socket(zmq.ROUTER)
        if curve is not None:
            curve.server(self._replay)
        self._replay.setsockopt(zmq.LINGER, 0)
        # No high-water mark of our own: a long replay must lose nothing in the proxy
        # (the real publisher's ROUTER keeps its own, as in production).
        self._replay.setsockopt(zmq.SNDHWM, 0)
        self._replay.bind("tcp://127.0.0.1:0")
        self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._spawn(self._forward())
        self._spawn(self._serve_replay())

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def heal(self) -> None:
        self.drop_rate = 0.0
        self.replay_mode = "ok"

    async def _forward(self) -> None:
        while True:
            frames = await self._sub.recv_multipart()
            if self.drop_rate and self.rng.random() < self.drop_rate:
                self.dropped += 1
                continue
            await self._pub.send_multipart(frames)
            if len(frames) == 3:
                self.last_forwarded = frames[1]
            self.forwarded += 1

    async def inject(self, frames: list[bytes]) -> None:
        await self._pub.send_multipart(frames)

    async def _serve_replay(self) -> None:
        while True:
            frames = await self._replay.recv_multipart()
            self.replays += 1
            if self.replay_mode == "stall":
                self.replays_stalled += 1
                continue  # never answered
            self._spawn(self._answer(frames[0], frames[1:], self.replay_mode == "delay"))

    async def _answer(self, ident: bytes, request: list[bytes], delay: bool) -> None:
        if delay:
            await asyncio.sleep(self.replay_delay_s)
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVHWM, 0)
        dealer.connect(self.upstream_replay)
        try:
            await dealer.send_multipart(request)
            while await dealer.poll(2000):
                frames = await dealer.recv_multipart()
                await self._replay.send_multipart([ident, *frames])
                if len(frames) >= 3 and frames[2] == REPLAY_END_SEQ:
                    break
        finally:
            dealer.close(linger=0)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
                await t
        for s in (self._sub, self._pub, self._replay):
            s.close(linger=0)


class MetricsProxy:
    """SUB->PUB forwarder of a worker's ``WorkerMetrics`` stream, into which a malformed
    peer can slip frames."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, curve: Curve | None = None) -> None:
        self._sub = ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(endpoint)
        self._pub = ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.server(self._pub)
        self._pub.bind("tcp://127.0.0.1:0")
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._forward())

    async def _forward(self) -> None:
        while True:
            await self._pub.send_multipart(await self._sub.recv_multipart())

    async def inject(self, frames: list[bytes]) -> None:
        await self._pub.send_multipart(frames)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
                await self._task
        self._sub.close(linger=0)
        self._pub.close(linger=0)


# ======================================================================================
# One simulated worker process
# ======================================================================================
class SimWorker:
    """A mocker worker behind its proxy; ``kill`` makes its sockets vanish without a word."""

    def __init__(self, worker_prefix: str, cfg: MockerConfig) -> None:
        self.prefix = worker_prefix
        self.cfg = cfg
        self.fleet = MockerFleet(1, cfg, router=None, prefix=worker_prefix)
        self.proxy: StreamProxy | None = None
        self.metrics_proxy: MetricsProxy | None = None
        self.slot = 0
        self.alive = False
        self.dead: asyncio.Future[None] | None = None
        self.started_at = 0.0
        # Block hashes this instance may hold: the chains of every prompt sent to it,
        # continued over the output tokens it generates (a superset of its true cache).
        self.universe: set[int] = set()
        self.prompts: list[tuple[int, ...]] = []

    @property
    def mocker(self) -> MockerWorker:
        return next(iter(self.fleet.workers.values()))

    @property
    def worker_id(self) -> str:
        return self.mocker.worker_id

    async def start(
        self, ctx: zmq.asyncio.Context, rng: random.Random, curve: Curve | None = None
    ) -> None:
        await self.fleet.start()
        kv = self.mocker.kv
        assert kv.replay_endpoint is not None
        self.proxy = StreamProxy(ctx, kv.endpoint, kv.replay_endpoint, rng, curve)
        self.proxy.start()
        self.metrics_proxy = MetricsProxy(ctx, self.fleet.metrics_endpoint, curve)
        self.metrics_proxy.start()
        self.alive = True
        self.dead = asyncio.get_running_loop().create_future()
        self.started_at = time.monotonic()

    def registration(self) -> WorkerRegistration:
        assert self.proxy is not None and self.metrics_proxy is not None
        return msgspec.structs.replace(
            self.fleet.registration(self.mocker),
            kv_events_endpoint=self.proxy.endpoint,
            replay_endpoint=self.proxy.replay_endpoint,
            metrics_endpoint=self.metrics_proxy.endpoint,
        )

    def kill(self) -> asyncio.Task[None]:
        """Gone at once: KV, replay, metrics and HTTP sockets closed, nothing deregistered.
        Returns the teardown task (the HTTP server may wait for in-flight handlers)."""
        self.alive = False
        if self.dead is not None and not self.dead.done():
            self.dead.set_result(None)

        async def teardown() -> None:
            if self.proxy is not None:
                await self.proxy.close()
            if self.metrics_proxy is not None:
                await self.metrics_proxy.close()
            await self.fleet.stop()

        return asyncio.get_running_loop().create_task(teardown())

    def served(self, prompt: tuple[int, ...], hasher: BlockHasher, max_tokens: int) -> None:
        full = list(prompt) + [output_token(i) for i in range(max_tokens)]
        self.universe.update(hasher.chain(None, full)[0])
        self.prompts.append(prompt)
        if len(self.prompts) > 256:
            del self.prompts[:128]

    def true_counts(self) -> dict[str, int]:
        core = self.mocker.core
        out = {MEDIUM_GPU: core.cached_blocks(), MEDIUM_CPU: core.cpu_cached_blocks()}
        return {k: v for k, v in out.items() if v}

    def true_hashes(self, medium: str = MEDIUM_GPU) -> set[int]:
        core = self.mocker.core
        return {h for h in self.universe if core.is_cached(h, medium)}

    def true_prefix(self, hashes: list[int]) -> int:
        core = self.mocker.core
        k = 0
        for h in hashes:
            if not core.is_cached(h):
                break
            k += 1
        return k


class Keys:
    """CURVE keys of a secured run: the router's, the clients' (frontend role), one per
    worker slot (worker role, allowed the ids ``w<slot>-*`` and ``w<slot>g*`` of its
    restarts) and a rogue key nobody lists."""

    def __init__(self, folder: Path, slots: int) -> None:
        self.folder = folder
        names = ["router", "frontend", "rogue", *(f"slot{i}" for i in range(slots))]
        for n in names:
            generate_keys(folder, n, force=True)
        self.slots = [self._curve(f"slot{i}") for i in range(slots)]
        self.frontend = self._curve("frontend")
        self.rogue = self._curve("rogue")
        self.n = slots

    def _curve(self, name: str) -> Curve:
        cfg = CurveConfig(
            secret_key_file=str(self.folder / f"{name}.key"),
            server_public_key=str(self.folder / "router.key.pub"),
        )
        c = load_curve(cfg)
        assert c is not None
        return c

    def router_security(self) -> dict[str, Any]:
        allow: list[dict[str, Any]] = [
            {"key": str(self.folder / "frontend.key.pub"), "role": "frontend", "name": "fe"}
        ]
        for i in range(self.n):
            allow.append(
                {
                    "key": str(self.folder / f"slot{i}.key.pub"),
                    "role": "worker",
                    "name": f"slot{i}",
                    "workers": [f"w{i}-*", f"w{i}g*"],
                }
            )
        return {"secret_key_file": str(self.folder / "router.key"), "allow": allow}


# ======================================================================================
# Helpers
# ======================================================================================
def nested_route_request() -> bytes:
    """A RouteRequest with an unknown field nesting ``_NESTING`` arrays deep (5 kB): a
    decoder that skips unknown fields recursively overflows the stack; a typed field
    would be refused at its first level."""
    head = msgspec.msgpack.encode({"type": "route", "request_id": "nested"})
    junk = msgspec.msgpack.encode("junk") + b"\x91" * _NESTING + b"\x90"
    return bytes([0x83]) + head[1:] + junk  # a fixmap of 3 entries instead of 2


def nested_worker_metrics(worker_id: str) -> bytes:
    """A WorkerMetrics of ``worker_id`` with an unknown field nesting ``_NESTING`` deep."""
    head = msgspec.msgpack.encode(
        {"type": "metrics", "worker_id": worker_id, "heartbeat": 1, "ts": 0.0}
    )
    junk = msgspec.msgpack.encode("junk") + b"\x91" * _NESTING + b"\x90"
    return bytes([0x85]) + head[1:] + junk  # a fixmap of 5 entries instead of 4


def nested_kv_batch() -> bytes:
    """A KVEventBatch ``[ts, [], None, <nested>]``: a fourth, unknown element nesting
    ``_NESTING`` arrays deep, skipped recursively by the decoder (5 kB)."""
    ts = msgspec.msgpack.encode(time.time())
    return b"\x94" + ts + b"\x90\xc0" + b"\x91" * _NESTING + b"\x90"


def proc_usage(pid: int) -> tuple[float, int]:
    """(RSS in MB, open fds) of a process, from /proc."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
                break
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def counter_totals(text: str) -> dict[str, float]:
    """Prometheus text -> each counter's total over its labels (names as exported)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "_total" not in line:
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ")[0] else line.partition(" ")
        value = rest.rsplit(" ", 1)[-1]
        name = name.removeprefix("dynamo_ext_router_")
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return {k: v for k, v in sorted(out.items()) if v}
