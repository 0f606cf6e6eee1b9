"""A router embedded as its frontend embeds it, in a process of its own, timed from inside.

``bench route-cost`` starts two of these per fleet, both subscribed to the same workers' KV
streams: ``ours`` (``EmbeddedRouter``, the frontend's ``routing_backend: embedded``: hash +
match + score in process) and ``dynamo`` (Dynamo's ``SelectionService``, which Dynamo's
frontend also calls in process). Each answers the driver's commands on a PAIR socket; a
route is timed inside the process around the call its frontend makes, from the prompt's
token ids (a list of ints, as a tokenizer returns them) to the chosen worker, then freed.
One process per router: neither shares its process, its GIL or its threads with the other
or with the driver, and both are idle while the other routes. Both run Python's cyclic
collector between calls (``router.idle_gc``, which our router's server starts), not inside
them.

Commands (msgpack maps): ``add`` {workers: [{id, kv, replay}]}; ``seen`` {probes:
[[worker index, packed tokens, blocks]]} -> whether each worker's index holds that many
blocks of its probe; ``route`` {id, tokens} -> {route_us, free_us, worker, hit}; ``stop``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import time
from array import array
from typing import Any

import msgspec
import zmq
import zmq.asyncio

BLOCK = 16


class Embedded:
    """The child's side: one router, the commands it answers."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.ids: list[str] = []
        if kind == "ours":
            from dynamo_ext.frontend.embedded import EmbeddedRouter, router_config

            cfg = router_config(
                "tcp://127.0.0.1:0",
                {
                    "block_size": BLOCK,
                    "hash_mode": "tokens",
                    "resync_interval_s": 0,
                    "worker_timeout_s": 3600.0,
                },
            )
            self.router = EmbeddedRouter(cfg)
        else:
            from dynamo_ext.frontend.dynamo_core import DynamoCore

            self.core = DynamoCore(BLOCK)

    async def add(self, workers: list[dict[str, str]]) -> None:
        from dynamo_ext.protocol import WorkerRegistration

        for i, w in enumerate(workers):
            self.ids.append(w["id"])
            if self.kind == "ours":
                await self.router.register(
                    WorkerRegistration(
                        w["id"], kv_events_endpoint=w["kv"], replay_endpoint=w["replay"],
                        block_size=BLOCK,
                    )
                )
            else:
                await self.core.add_worker(
                    i,
                    kv_events_endpoint=w["kv"],
                    replay_endpoint=w["replay"],
                    http_endpoint=f"http://127.0.0.1:{20000 + i}",
                    total_kv_blocks=1 << 20,
                    max_num_batched_tokens=8192,
                )

    async def seen(self, probes: list[list[Any]]) -> bool:
        from dynamo_ext.hashing import token_block_hashes

        for w, packed, blocks in probes:
            toks = array("I", packed).tolist()
            if self.kind == "ours":
                hs = token_block_hashes(toks, BLOCK)
                m = self.router.service.index.find_matches(hs)
                got = m.gpu.get(self.ids[w], 0)
            else:
                got = (await self.core.overlap_blocks(toks)).get(w, 0)
            if got < blocks:
                return False
        return True

    async def route(self, rid: str, toks: list[int]) -> dict[str, Any]:
        if self.kind == "ours":
            t0 = time.perf_counter()
            r = await self.router.route(rid, toks, track=True)
            t1 = time.perf_counter()
            await self.router.finished(rid)
            t2 = time.perf_counter()
            return {
                "route_us": (t1 - t0) * 1e6,
                "free_us": (t2 - t1) * 1e6,
                "worker": self.ids.index(r.worker_id),
                "hit": sum(r.chosen.prefix_hit_blocks.values()),
            }
        t0 = time.perf_counter()
        w, hit, _ = await self.core.select(rid, toks)
        t1 = time.perf_counter()
        await self.core.finished(rid)
        t2 = time.perf_counter()
        return {"route_us": (t1 - t0) * 1e6, "free_us": (t2 - t1) * 1e6, "worker": w, "hit": hit}

    async def close(self) -> None:
        if self.kind == "ours":
            await self.router.close()
        else:
            self.core.close()


async def _serve(kind: str, ctl: str) -> None:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ctl)
    me = Embedded(kind)
    idle = None
    if kind == "ours":
        me.router.connect()
        await me.router.started()  # its RouterServer runs IdleGC (gc_interval_s)
    else:
        # The same collector policy for Dynamo's child: between calls, not inside them.
        from dynamo_ext.router.idle_gc import IdleGC

        idle = IdleGC(0.01)
        idle.start()
    frozen = False
    try:
        while True:
            msg = msgspec.msgpack.decode(await sock.recv())
            op = msg["op"]
            out: Any = None
            if op == "add":
                await me.add(msg["workers"])
            elif op == "seen":
                out = await me.seen(msg["probes"])
            elif op == "route":
                if not frozen:  # what the index holds is long-lived: out of GC scans
                    gc.collect()
                    gc.freeze()
                    frozen = True
                toks = array("I", msg["tokens"]).tolist()  # the frontend holds a list of ints
                out = await me.route(msg["id"], toks)
            elif op == "stop":
                break
            await sock.send(msgspec.msgpack.encode({"ok": True, "out": out}))
    finally:
        if idle is not None:
            await idle.stop()
        await me.close()
        await sock.send(msgspec.msgpack.encode({"ok": True, "out": None}))
        sock.close()
        ctx.term()


class EmbeddedProc:
    """The driver's side: start a child, send it commands."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        env = {**os.environ, "DYN_LOG": "error"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo_ext.benchmarks.route_embedded", kind,
             f"tcp://127.0.0.1:{port}"],
            env=env,
        )

    async def call(self, timeout_s: float = 120.0, **msg: Any) -> Any:
        await self.sock.send(msgspec.msgpack.encode(msg))
        if not await self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"embedded {self.kind} router did not answer {msg['op']}")
        return msgspec.msgpack.decode(await self.sock.recv())["out"]

    async def wait_seen(self, probes: list[list[Any]], timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.call(op="seen", probes=probes):
            if time.monotonic() > deadline:
                raise TimeoutError(f"embedded {self.kind} router did not apply the stream")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        try:
            await self.call(op="stop", timeout_s=10)
        except TimeoutError:
            pass
        finally:
            self.sock.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=("ours", "dynamo"))
    p.add_argument("ctl")
    a = p.parse_args()
    asyncio.run(_serve(a.kind, a.ctl))


if __name__ == "__main__":
    main()
