"""Simulated vLLM workers over real sockets: many ``MockerCore`` engines in one asyncio
process, each speaking exactly what a real vLLM worker with our plugin speaks, so routing
can be studied (and tested, and demonstrated) at fleet scale on one CPU.

Each worker has vLLM's KV event PUB + replay ROUTER (``KvEventPublisher``), our
``WorkerMetrics`` (one shared PUB for the fleet), registration with a router
(``RouterClient`` with keep-alive) and an OpenAI-compatible HTTP server (aiohttp) streaming
dummy tokens: ``POST {http_endpoint}/v1/completions``. ``MockerConfig.speedup`` runs virtual
time that many times faster than the wall clock. ``MockerWorker.submit`` serves a request
without HTTP, for drivers in the same process (the router demo).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_ext.config import advertise
from dynamo_ext.errors import ConfigError, DynamoExtError
from dynamo_ext.protocol import WorkerRegistration
from dynamo_ext.sim.model import MockerConfig, MockerCore, SimRequest, StepResult, output_token

if TYPE_CHECKING:  # the socket layer's imports stay out of the replayer's import time
    from aiohttp import web

    from dynamo_ext.publisher import KvEventPublisher, MetricsPublisher
    from dynamo_ext.router.client import RouterClient

log = logging.getLogger(__name__)


def _advertised(endpoint: str, host: str | None) -> str:
    """``tcp://0.0.0.0:5557`` -> ``tcp://HOST:5557`` (what a peer elsewhere connects to)."""
    return endpoint if host is None else advertise(endpoint, host, any_host=True)


class MockerWorker:
    """One core in real time: its KV publisher, its run loop, its HTTP streams."""

    def __init__(
        self,
        worker_id: str,
        cfg: MockerConfig,
        kv: KvEventPublisher,
        t0: float,
    ) -> None:
        self.worker_id = worker_id
        self.cfg = cfg
        self.core = MockerCore(cfg, worker_id)
        self.kv = kv
        self.heartbeat = 0
        self.instance_id = uuid.uuid4().hex
        self._t0 = t0
        self._streams: dict[int, asyncio.Queue[tuple[int, str | None]]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count()

    def vnow(self) -> float:
        return (time.monotonic() - self._t0) * self.cfg.speedup

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"mocker-{self.worker_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(
        self, tokens: list[int], max_tokens: int
    ) -> tuple[SimRequest, asyncio.Queue[tuple[int, str | None]]]:
        rid = next(self._ids)
        r = SimRequest(f"{self.worker_id}-{rid}", tokens, max_tokens, self.vnow(), tag=rid)
        q: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
        if not self.core.add_request(r, r.arrival):
            q.put_nowait((-1, "error"))
            return r, q
        self._streams[rid] = q
        self._wake.set()
        return r, q

    def cancel(self, r: SimRequest) -> None:
        self._streams.pop(r.tag, None)
        self.core.abort(r, self.vnow())
        self._wake.set()

    async def _run(self) -> None:
        core = self.core
        speed = self.cfg.speedup
        while True:
            self._wake.clear()
            res = core.advance(self.vnow())
            if res is not None:
                self._deliver(res)
            nt = core.next_time()
            timeout = None if nt is None else max(0.0, (nt - self.vnow()) / speed)
            if timeout == 0.0:
                await asyncio.sleep(0)  # let the HTTP side run between back-to-back steps
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _deliver(self, res: StepResult) -> None:
        if res.events:
            self.kv.publish(res.events)
        streams = self._streams
        for r in res.emitted:
            q = streams.get(r.tag)
            if q is None:
                continue
            i = r.generated - 1
            done = r.generated >= r.max_tokens
            q.put_nowait((output_token(i), "length" if done else None))
            if done:
                del streams[r.tag]


def _prompt_tokens(prompt: Any) -> list[int]:
    """OpenAI ``prompt``: token ids as they are, text as its UTF-8 bytes (a byte-level
    tokenizer keeps equal text prefixes equal token prefixes, which is all routing needs)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list | str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return list(prompt.encode())
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise ValueError("prompt must be a string or a list of token ids (one prompt)")


class MockerFleet:
    """``n`` simulated workers in this asyncio loop, registered with a router.

    Sockets: one KV PUB + replay ROUTER per worker (vLLM's framing), one metrics PUB for all
    (each ``WorkerMetrics`` names its worker; the router subscribes once per endpoint), one
    HTTP server whose ``/<worker_id>`` prefix is each worker's OpenAI base URL.
    """

    def __init__(
        self,
        n: int,
        cfg: MockerConfig,
        *,
        router: str | None = None,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        http_port: int = 0,
        prefix: str = "mocker",
        model: str = "mocker",
        topic: str = "kv",
        keepalive_s: float = 5.0,
    ) -> None:
        if n <= 0:
            raise ConfigError("workers", f"must be > 0, got {n}")
        self.n = n
        self.cfg = cfg
        self.router = router
        self.host = host
        self.advertise_host = advertise_host or (None if host in ("0.0.0.0", "*") else host)
        if host in ("0.0.0.0", "*") and advertise_host is None:
            import socket

            self.advertise_host = socket.gethostname()
        self.http_port = http_port
        self.prefix = prefix
        self.model = model
        self.topic = topic
        self.keepalive_s = keepalive_s
        self.workers: dict[str, MockerWorker] = {}
        self.http_base = ""
        self.metrics_endpoint = ""
        self._metrics: MetricsPublisher | None = None
        self._client: RouterClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self.registered = asyncio.Event()
        self._left: set[str] = set()  # workers that deregistered: no keep-alive for them

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        from dynamo_ext.publisher import KvEventPublisher, MetricsPublisher

        bind = "*" if self.host in ("0.0.0.0", "*") else self.host
        self._metrics = MetricsPublisher(f"tcp://{bind}:0")
        self.metrics_endpoint = _advertised(self._metrics.endpoint, self.advertise_host)
        t0 = time.monotonic()
        for i in range(self.n):
            wid = f"{self.prefix}-{i}"
            kv = KvEventPublisher(f"tcp://{bind}:0", f"tcp://{bind}:0", topic=self.topic)
            w = MockerWorker(wid, self.cfg, kv, t0)
            self.workers[wid] = w
            w.start()
        await self._start_http()
        self._tasks.append(asyncio.create_task(self._publish_metrics(), name="mocker-metrics"))
        if self.router:
            self._tasks.append(asyncio.create_task(self._register_loop(), name="mocker-register"))
        else:
            self.registered.set()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._client is not None:
            for wid in self.workers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._client.deregister(wid), 0.5)
            await self._client.close()
        for w in self.workers.values():
            await w.stop()
            w.kv.close()
        if self._metrics is not None:
            self._metrics.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def leave(self, worker_id: str) -> bool:
        """The worker leaves the router's registry as a stopping engine does: its keep-alive
        ends and it deregisters (a worker left to its keep-alive would register again)."""
        if worker_id not in self.workers:
            raise KeyError(worker_id)
        self._left.add(worker_id)
        if self._client is None:
            return False
        return (await self._client.deregister(worker_id)).ok

    def registration(self, w: MockerWorker) -> WorkerRegistration:
        assert w.kv.replay_endpoint is not None
        return WorkerRegistration(
            worker_id=w.worker_id,
            role="both",
            http_endpoint=f"{self.http_base}/{w.worker_id}",
            kv_events_endpoint=_advertised(w.kv.endpoint, self.advertise_host),
            kv_events_topic=self.topic,
            replay_endpoint=_advertised(w.kv.replay_endpoint, self.advertise_host),
            metrics_endpoint=self.metrics_endpoint,
            block_size=self.cfg.block_size,
            model=self.model,
            instance_id=w.instance_id,
        )

    async def _register_loop(self) -> None:
        from dynamo_ext.router.client import RouterClient

        assert self.router is not None
        self._client = RouterClient(self.router, timeout_s=2.0)
        warned = False
        while True:
            try:
                for w in self.workers.values():
                    if w.worker_id not in self._left:
                        await self._client.register(self.registration(w))
                if warned:
                    log.info("mocker fleet registered again with %s", self.router)
                warned = False
                self.registered.set()
            except (DynamoExtError, OSError) as exc:
                if not warned:  # a router that is down never stops the fleet
                    log.warning("registration with %s failed (%s); retrying", self.router, exc)
                    warned = True
            # Repeat as a keep-alive: a restarted router learns the fleet again.
            await asyncio.sleep(self.keepalive_s if not warned else 1.0)

    async def _publish_metrics(self) -> None:
        pub = self._metrics
        assert pub is not None
        while True:
            now = time.time()
            for w in self.workers.values():
                w.heartbeat += 1
                try:
                    pub.publish(w.core.metrics(w.heartbeat, now))
                except Exception as exc:  # never let one send kill the heartbeat
                    log.warning("metrics publish failed: %s", exc)
            await asyncio.sleep(self.cfg.metrics_period_s)  # wall seconds: liveness is wall time

    # ---------------------------------------------------------------- HTTP
    async def _start_http(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/workers", self._list_workers)
        app.router.add_get("/{worker}/health", self._health)
        app.router.add_get("/{worker}/v1/models", self._models)
        app.router.add_post("/{worker}/v1/completions", self._completions)
        app.router.add_post("/{worker}/v1/chat/completions", self._completions)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host if self.host != "*" else "0.0.0.0", self.http_port)
        await site.start()
        self._runner = runner
        port = int(runner.addresses[0][1])  # the bound port, when asked for 0
        self.http_port = port
        self.http_base = f"http://{self.advertise_host or self.host}:{port}"

    async def _health(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        wid = request.match_info.get("worker")
        if wid is not None and wid not in self.workers:
            return web.json_response({"error": f"no worker {wid}"}, status=404)
        return web.json_response({"status": "ok"})

    async def _list_workers(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        return web.json_response(
            [msgspec.to_builtins(self.registration(w)) for w in self.workers.values()]
        )

    async def _models(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "me"}]}
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        w = self.workers.get(request.match_info["worker"])
        if w is None:
            return web.json_response({"error": {"message": "no such worker"}}, status=404)
        chat = request.path.endswith("/chat/completions")
        try:
            body = await request.json()
            if chat:
                msgs = body["messages"]
                text = "".join(f"<{m.get('role', '')}>{m.get('content', '')}" for m in msgs)
                tokens = list(text.encode())
            else:
                tokens = _prompt_tokens(body.get("prompt"))
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response(
                {"error": {"message": str(exc), "type": "invalid_request_error"}}, status=400
            )
        if not tokens:
            return web.json_response({"error": {"message": "empty prompt"}}, status=400)
        r, q = w.submit(tokens, max_tokens)
        if r.error is not None:
            return web.json_response({"error": {"message": r.error}}, status=400)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        want_ids = bool(body.get("return_token_ids"))

        def choice(tok: list[int], finish: str | None) -> dict[str, Any]:
            text = "".join(f" t{t}" for t in tok)
            c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                c["delta" if body.get("stream") else "message"] = {
                    "role": "assistant",
                    "content": text,
                }
            else:
                c["text"] = text
            if want_ids:
                c["token_ids"] = tok
            return c

        usage = {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": 0}
        if not body.get("stream"):
            out: list[int] = []
            finish: str | None = None
            try:
                while finish is None:
                    tok, finish = await q.get()
                    if tok >= 0:
                        out.append(tok)
            except asyncio.CancelledError:
                w.cancel(r)
                raise
            usage["completion_tokens"] = len(out)
            usage["total_tokens"] = len(out) + len(tokens)
            return web.json_response(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": self.model,
                    "choices": [choice(out, finish)],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        n = 0
        try:
            finish = None
            while finish is None:
                tok, finish = await q.get()
                toks = [tok] if tok >= 0 else []
                # Tokens of one step arrive together: send what is queued as one chunk.
                while finish is None and not q.empty():
                    t2, finish = q.get_nowait()
                    toks.append(t2)
                n += len(toks)
                chunk = {
                    "id": rid,
                    "object": obj + (".chunk" if chat else ""),
                    "created": created,
                    "model": self.model,
                    "choices": [choice(toks, finish)],
                }
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if (body.get("stream_options") or {}).get("include_usage"):
                usage["completion_tokens"] = n
                usage["total_tokens"] = n + len(tokens)
                tail = {
                    "id": rid,
                    "object": obj,
                    "model": self.model,
                    "choices": [],
                    "usage": usage,
                }
                await resp.write(b"data: " + json.dumps(tail).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            w.cancel(r)  # client gone: free its blocks as vLLM's abort does
            raise
        return resp
