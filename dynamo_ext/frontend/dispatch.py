"""Where a request runs, and keeping it running: routing, conditional disaggregation and
request migration, independent of the HTTP API in front.

For each request the dispatcher asks the router for a decode-capable worker, decides whether
a remote prefill pays (see ``FrontendConfig``), optionally has a prefill worker compute the
prompt's KV cache (vLLM's ``kv_transfer_params`` handshake: ``max_tokens=1`` with
``do_remote_decode`` on the prefill worker, its returned params sent with the same prompt to
the decode worker, which pulls the blocks over NIXL), and streams the decode worker's tokens.

The handshake is chosen per worker pool, by the engine the decode worker registered with.
An SGLang decode worker (``--disaggregation-mode decode``) cannot prefill by itself: every
request is paired with an SGLang prefill worker the way SGLang's own PD router does it. The
same request goes to both at once, carrying the prefill worker's ``bootstrap_host`` /
``bootstrap_port`` (its ``--disaggregation-bootstrap-port``) and one random
``bootstrap_room``; the decode worker meets the prefill worker in that room, pulls the KV
cache (NIXL) and streams the tokens, while the prefill worker's answer is drained. A prefill
worker that fails before the first decoded token fails the attempt, which is retried with
another prefill worker.

If a worker refuses the connection or the stream breaks before the request finished, the
worker is reported to the router at once and the request moves to another worker with the
prompt plus the tokens already generated and the remaining token budget: the client's stream
continues where it stopped, neither losing nor repeating a token (migration).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from dynamo_ext.errors import DynamoExtError, NoWorkerAvailable
from dynamo_ext.frontend.config import FrontendConfig
from dynamo_ext.frontend.metrics import FrontendMetrics
from dynamo_ext.protocol import MEDIUM_GPU, RouteResponse
from dynamo_ext.router.client import RouterClient

log = logging.getLogger("dynamo_ext.frontend")


class UpstreamError(DynamoExtError):
    """A worker answered with an error status (the request itself is at fault)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"worker answered {status}: {body[:500]}")
        self.status = status
        self.body = body


class _Broken(DynamoExtError):
    """The worker's stream ended before the request finished."""


class _PrefillFailed(DynamoExtError):
    """The paired (SGLang) prefill worker failed before the decode worker produced a token."""

    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(f"prefill worker {worker_id} failed: {reason}")
        self.worker_id = worker_id


# How many prefill candidates of the wrong engine the router may offer before we give up
# (a fleet that mixes vLLM and SGLang pools routes both through one router).
_ENGINE_PICKS = 4


@dataclass(slots=True)
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass(slots=True)
class GenRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, stop, ...


@dataclass(slots=True)
class GenState:
    """What the API layer reads after the stream: where it ran, how it went."""

    worker_id: str | None = None
    prefill: str = "local"  # "remote" when a prefill worker computed the prompt
    migrations: int = 0
    prompt_blocks: int = 0
    hit_blocks: int = 0
    generated: list[int] = field(default_factory=list)


class Dispatcher:
    def __init__(self, cfg: FrontendConfig, router: RouterClient, metrics: FrontendMetrics) -> None:
        self.cfg = cfg
        self.router = router
        self.metrics = metrics
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.request_timeout_s, connect=cfg.upstream_connect_timeout_s),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def generate(self, req: GenRequest, state: GenState) -> AsyncIterator[Delta]:
        model = self.cfg.model_name
        exclude: list[str] = []
        prefill_exclude: list[str] = []
        attempt = 0
        while True:
            prompt = req.prompt_ids + state.generated
            remaining = req.max_tokens - len(state.generated)
            rid = f"{req.request_id}#{attempt}"
            role = "decode" if self.cfg.disaggregation else "aggregated"
            d = await self.router.route(rid, prompt, role=role, exclude_workers=exclude)  # type: ignore[arg-type]
            worker = d.worker_id
            state.worker_id = worker
            if attempt == 0:
                state.prompt_blocks = d.num_blocks
                state.hit_blocks = d.chosen.prefix_hit_blocks.get(MEDIUM_GPU, 0)
            body = self._body(prompt, remaining, req.sampling)
            reason = ""
            prefill_task: asyncio.Task[None] | None = None
            try:
                if d.engine == "sglang" and d.worker_role == "decode":
                    prefill_task = await self._sglang_pair(rid, prompt, d, body, prefill_exclude)
                    state.prefill = "remote"
                elif attempt == 0 and self.cfg.disaggregation:
                    kv = await self._maybe_remote_prefill(rid, prompt, d, req.sampling)
                    if kv is not None:
                        body["kv_transfer_params"] = kv
                        state.prefill = "remote"
                self.metrics.prefill.labels(model, state.prefill if attempt == 0 else "local").inc()
                first = True
                stream = self._stream(d, body)
                if prefill_task is not None:
                    stream = self._watch_prefill(stream, prefill_task)
                async for delta in stream:
                    if first:
                        first = False
                        await self.router.prefill_done(rid)
                    state.generated.extend(delta.token_ids)
                    yield delta
                    if delta.finish_reason is not None:
                        return
                raise _Broken(f"stream from {worker} ended without a finish reason")
            except httpx.ConnectError as exc:
                reason = "connect"
                await self.router.worker_failed(worker, f"connect: {exc}")
            except _PrefillFailed as exc:
                reason = "prefill"
                prefill_exclude.append(exc.worker_id)
            except (httpx.TransportError, _Broken) as exc:
                reason = "stream"
                await self.router.worker_failed(worker, f"stream broken: {exc}")
            finally:
                if prefill_task is not None:
                    # Done by now unless the decode side failed first; its outcome was
                    # either acted on (_PrefillFailed) or does not matter any more.
                    if not prefill_task.done():
                        prefill_task.cancel()
                    with contextlib.suppress(
                        asyncio.CancelledError, DynamoExtError, httpx.HTTPError
                    ):
                        await prefill_task
                await self.router.finished(rid)
            attempt += 1
            if attempt > self.cfg.migration_limit:
                raise NoWorkerAvailable(
                    f"request {req.request_id} failed on {attempt} workers (last {worker})"
                )
            state.migrations += 1
            self.metrics.migrations.labels(model, reason).inc()
            if reason != "prefill":  # the decode worker itself is fine then
                exclude.append(worker)
            log.warning(
                "request %s: worker %s failed (%s) after %d tokens; migrating",
                req.request_id,
                worker,
                reason,
                len(state.generated),
            )

    def _body(self, prompt: list[int], max_tokens: int, sampling: dict[str, Any]) -> dict:
        return {
            **sampling,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stream": True,
            "return_token_ids": True,
        }

    async def _maybe_remote_prefill(
        self, rid: str, prompt: list[int], d: RouteResponse, sampling: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Prefill on a prefill worker when it pays; returns the decode side's params."""
        if d.worker_role != "decode":
            return None  # only a decode (kv_consumer) worker can pull a remote prefill
        cached = d.chosen.prefix_hit_blocks.get(MEDIUM_GPU, 0) * d.block_size
        uncached = len(prompt) - cached
        if uncached < self.cfg.min_remote_prefill_tokens:
            return None
        prid = rid + ":prefill"
        try:
            p = await self.router.route(prid, prompt, role="prefill", exclude_workers=[d.worker_id])
        except NoWorkerAvailable:
            return None
        try:
            if p.engine != "vllm":
                return None  # kv_transfer_params mean nothing to another engine's worker
            if p.chosen.predicted_prefill_tokens > self.cfg.max_prefill_queue_tokens:
                return None  # the prefill pool is backed up: computing locally is faster
            if p.http_endpoint is None:
                return None
            body = {
                **sampling,
                "prompt": prompt,
                "max_tokens": 1,
                "stream": False,
                "kv_transfer_params": {"do_remote_decode": True},
            }
            try:
                r = await self.http.post(p.http_endpoint + "/v1/completions", json=body)
            except httpx.TransportError as exc:
                await self.router.worker_failed(p.worker_id, f"prefill: {exc}")
                return None
            if r.status_code != 200:
                log.warning(
                    "prefill on %s failed (%d): prefilling locally", p.worker_id, r.status_code
                )
                return None
            params = r.json().get("kv_transfer_params")
            return params if isinstance(params, dict) else None
        finally:
            await self.router.finished(prid)

    # ---- SGLang PD: bootstrap room pairing -------------------------------------------
    async def _sglang_pair(
        self,
        rid: str,
        prompt: list[int],
        d: RouteResponse,
        body: dict[str, Any],
        prefill_exclude: list[str],
    ) -> asyncio.Task[None]:
        """Pick an SGLang prefill worker, put the pairing into ``body`` and send the
        prefill request; returns its task (the decode request goes out next, concurrently:
        each side waits for the other in the bootstrap room)."""
        prid = rid + ":prefill"
        exclude = [d.worker_id, *prefill_exclude]
        p: RouteResponse | None = None
        for _ in range(_ENGINE_PICKS):
            try:
                cand = await self.router.route(
                    prid, prompt, role="prefill", exclude_workers=exclude
                )
            except NoWorkerAvailable as exc:
                raise NoWorkerAvailable(
                    f"SGLang decode worker {d.worker_id} needs an SGLang prefill worker: {exc}"
                ) from exc
            if (
                cand.engine == "sglang"
                and cand.worker_role == "prefill"
                and cand.bootstrap_endpoint
                and cand.http_endpoint
            ):
                p = cand
                break
            await self.router.finished(prid)
            exclude.append(cand.worker_id)
        if p is None:
            raise NoWorkerAvailable(
                f"SGLang decode worker {d.worker_id}: no SGLang prefill worker with a "
                "bootstrap endpoint is registered"
            )
        host, _, port = p.bootstrap_endpoint.rpartition(":")  # type: ignore[union-attr]
        body["bootstrap_host"] = host
        body["bootstrap_port"] = int(port)
        body["bootstrap_room"] = random.getrandbits(63)  # SGLang's rooms are non-negative i64
        log.debug(
            "request %s: SGLang prefill %s + decode %s, room %d",
            rid,
            p.worker_id,
            d.worker_id,
            body["bootstrap_room"],
        )
        return asyncio.create_task(self._sglang_prefill(prid, p, {**body, "stream": False}))

    async def _sglang_prefill(self, prid: str, p: RouteResponse, body: dict[str, Any]) -> None:
        try:
            r = await self.http.post(p.http_endpoint + "/v1/completions", json=body)  # type: ignore[operator]
            if r.status_code != 200:
                raise _PrefillFailed(p.worker_id, f"status {r.status_code}: {r.text[:200]}")
        except httpx.TransportError as exc:
            await self.router.worker_failed(p.worker_id, f"prefill: {exc}")
            raise _PrefillFailed(p.worker_id, str(exc)) from exc
        finally:
            await self.router.finished(prid)

    async def _watch_prefill(
        self, stream: AsyncIterator[Delta], prefill: asyncio.Task[None]
    ) -> AsyncIterator[Delta]:
        """The decode stream, failed early if its prefill partner fails first (the decode
        worker would otherwise wait for KV that never comes)."""
        it = aiter(stream)
        try:
            while True:
                nxt = asyncio.ensure_future(anext(it))
                if not prefill.done():
                    await asyncio.wait({nxt, prefill}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done() and prefill.done() and prefill.exception() is not None:
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await nxt
                    exc = prefill.exception()
                    raise exc if isinstance(exc, _PrefillFailed) else _PrefillFailed("?", str(exc))
                try:
                    delta = await nxt
                except StopAsyncIteration:
                    return
                yield delta
        finally:
            with contextlib.suppress(Exception):
                await it.aclose()  # type: ignore[attr-defined]

    async def _stream(self, d: RouteResponse, body: dict[str, Any]) -> AsyncIterator[Delta]:
        if d.http_endpoint is None:
            raise _Broken(f"worker {d.worker_id} has no HTTP endpoint")
        url = d.http_endpoint + "/v1/completions"
        async with self.http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                raise UpstreamError(r.status_code, text)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                for ch in chunk.get("choices", ()):
                    yield Delta(
                        ch.get("text") or "", ch.get("token_ids") or [], ch.get("finish_reason")
                    )


def now() -> float:
    return time.perf_counter()
