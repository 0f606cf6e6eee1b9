"""A STAND-IN for ``python -m sglang.launch_server``: SGLang cannot serve a model on this
CPU-only machine (its install needs CUDA kernels: sglang-kernel, flashinfer, ...), so tests
run the launcher against this process, which speaks SGLang 0.5.23's wire formats:

- KV events: ``--kv-events-config`` is honoured like ``ZmqEventPublisher`` does (PUB bound
  at ``endpoint``, ROUTER replay at ``replay_endpoint``, ``[topic, seq, payload]``, replay
  answers ``[b"", topic, seq, payload]`` then ``[b"", b"", -1, b""]``); payloads are the
  batches recorded from SGLang's own classes (``fixtures/sglang_0.5.23_kv_events.msgpack``,
  see ``sglang_recorder.py``). ``POST /standin/kv?upto=N`` publishes batches up to N; the
  first is only buffered, never sent, so a subscriber must replay it (a dropped message);
- ``GET /metrics``: the recorded Prometheus text of ``--enable-metrics``; ``GET /health``;
- ``POST /v1/completions`` (OpenAI, ``return_token_ids``, streaming or not) with SGLang's PD
  semantics when ``--disaggregation-mode`` is set: a prefill stand-in serves a bootstrap
  endpoint on ``--disaggregation-bootstrap-port`` and holds a request until the decode
  side with the same ``bootstrap_room`` has contacted it; a decode stand-in contacts
  ``bootstrap_host:bootstrap_port`` for its room before it streams. Both sides therefore
  only finish when a gateway sends them the same room at the same time, pointing at the
  prefill worker, as SGLang's do. ``GET /standin/requests`` lists the bodies received.

Exits with code 3 on SIGTERM, so tests can see the launcher pass its child's code on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path

import aiohttp
import msgspec
import zmq
from aiohttp import web

HERE = Path(__file__).parent
KV_FIXTURE = HERE / "fixtures" / "sglang_0.5.23_kv_events.msgpack"
METRICS_FIXTURE = HERE / "fixtures" / "sglang_0.5.23_metrics.txt"
END_SEQ = (-1).to_bytes(8, "big", signed=True)
PAIR_TIMEOUT_S = 10.0


class KvPublisher:
    """ZmqEventPublisher's sockets and framing (sglang/srt/disaggregation/kv_events.py)."""

    def __init__(self, cfg: dict) -> None:
        self.ctx = zmq.Context.instance()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.bind(cfg["endpoint"])
        self.topic = cfg.get("topic", "").encode()
        self.replay = None
        if cfg.get("replay_endpoint"):
            self.replay = self.ctx.socket(zmq.ROUTER)
            self.replay.bind(cfg["replay_endpoint"])
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=10_000)
        self.seq = 0
        self.batches = msgspec.msgpack.decode(KV_FIXTURE.read_bytes(), type=list[bytes])
        self.sent = 0

    def publish_upto(self, n: int) -> int:
        while self.sent < min(n, len(self.batches)):
            payload = self.batches[self.sent]
            if self.sent > 0:  # the first batch is "dropped": only a replay delivers it
                self.pub.send_multipart((self.topic, self.seq.to_bytes(8, "big"), payload))
            self.buffer.append((self.seq, payload))
            self.seq += 1
            self.sent += 1
        return self.sent

    async def serve_replay(self) -> None:
        if self.replay is None:
            return
        while True:
            if not self.replay.poll(0):
                await asyncio.sleep(0.01)
                continue
            frames = self.replay.recv_multipart()
            if len(frames) != 3:
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, buf in self.buffer:
                if seq >= start_seq:
                    self.replay.send_multipart(
                        (client, b"", self.topic, seq.to_bytes(8, "big"), buf)
                    )
            self.replay.send_multipart((client, b"", b"", END_SEQ, b""))


class StandIn:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode = args.disaggregation_mode
        self.kv = KvPublisher(json.loads(args.kv_events_config))
        self.requests: list[dict] = []
        self.rooms: dict[int, asyncio.Event] = {}  # prefill: room -> decode has paired

    def room(self, r: int) -> asyncio.Event:
        return self.rooms.setdefault(r, asyncio.Event())

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(text=METRICS_FIXTURE.read_text(), content_type="text/plain")

    async def kv_publish(self, req: web.Request) -> web.Response:
        n = self.kv.publish_upto(int(req.query.get("upto", "1")))
        return web.json_response({"sent": n})

    async def list_requests(self, _: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def pair(self, req: web.Request) -> web.Response:
        # prefill side bootstrap endpoint: the decode peer of room R checks in
        r = int(req.query["room"])
        self.room(r).set()
        return web.json_response({"room": r, "prefill_port": self.args.port})

    async def completions(self, req: web.Request) -> web.StreamResponse:
        body = await req.json()
        body["_mode"] = self.mode
        body["_t"] = time.time()
        self.requests.append(body)
        prompt = body["prompt"]
        n = int(body.get("max_tokens", 16))
        if self.mode != "null":
            missing = [
                k
                for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room")
                if body.get(k) is None
            ]
            if missing:
                return web.json_response({"error": f"PD request without {missing}"}, status=400)
        if self.mode == "prefill":
            try:
                await asyncio.wait_for(self.room(body["bootstrap_room"]).wait(), PAIR_TIMEOUT_S)
            except TimeoutError:
                return web.json_response({"error": "decode peer never arrived"}, status=500)
            return web.json_response(
                {
                    "choices": [
                        {"index": 0, "text": "x", "token_ids": [1], "finish_reason": "length"}
                    ]
                }
            )
        if self.mode == "decode":
            url = (
                f"http://{body['bootstrap_host']}:{body['bootstrap_port']}/pair"
                f"?room={body['bootstrap_room']}"
            )
            try:
                async with (
                    aiohttp.ClientSession() as s,
                    s.get(url, timeout=aiohttp.ClientTimeout(total=PAIR_TIMEOUT_S)) as r,
                ):
                    if r.status != 200:
                        raise aiohttp.ClientError(f"status {r.status}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                return web.json_response({"error": f"bootstrap failed: {exc}"}, status=500)
        base = sum(prompt) if isinstance(prompt, list) else len(prompt)
        tokens = [(base + i) % 997 for i in range(n)]
        if not body.get("stream"):
            return web.json_response(
                {
                    "choices": [
                        {"index": 0, "text": "", "token_ids": tokens, "finish_reason": "length"}
                    ]
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        for i, t in enumerate(tokens):
            ch = {
                "index": 0,
                "text": f"<{t}>",
                "token_ids": [t],
                "finish_reason": "length" if i == n - 1 else None,
            }
            await resp.write(f"data: {json.dumps({'choices': [ch]})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


async def amain(args: argparse.Namespace) -> int:
    s = StandIn(args)
    app = web.Application()
    app.router.add_get("/health", s.health)
    app.router.add_get("/metrics", s.metrics)
    app.router.add_post("/v1/completions", s.completions)
    app.router.add_post("/standin/kv", s.kv_publish)
    app.router.add_get("/standin/requests", s.list_requests)
    runners = []
    r = web.AppRunner(app, access_log=None)
    await r.setup()
    await web.TCPSite(r, args.host, args.port).start()
    runners.append(r)
    if s.mode == "prefill":
        boot = web.Application()
        boot.router.add_get("/pair", s.pair)
        br = web.AppRunner(boot, access_log=None)
        await br.setup()
        await web.TCPSite(br, args.host, args.disaggregation_bootstrap_port).start()
        runners.append(br)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    replay = asyncio.create_task(s.kv.serve_replay())
    print(f"stand-in SGLang ({s.mode}) serving on {args.host}:{args.port}", flush=True)
    await stop.wait()
    replay.cancel()
    for r in runners:
        await r.cleanup()
    return 3


def main() -> int:
    out = os.environ.get("STANDIN_ARGV_OUT")
    if out:
        Path(out).write_text(json.dumps(sys.argv[1:]))
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--kv-events-config", required=True)
    p.add_argument("--disaggregation-mode", default="null")
    p.add_argument("--disaggregation-bootstrap-port", type=int, default=8998)
    args, _ = p.parse_known_args()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
