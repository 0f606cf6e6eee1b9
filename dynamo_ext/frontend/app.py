"""The OpenAI-compatible HTTP frontend (FastAPI on uvicorn).

``/v1/completions`` and ``/v1/chat/completions`` (streaming SSE and not), ``/v1/models``,
``/health``, ``/metrics``. The frontend tokenizes with the model's own tokenizer (chat
messages through its chat template), so the router sees the exact token ids the engine will
cache, and it sends token ids, never text, to the workers. Errors are OpenAI-shaped JSON:
``{"error": {"message", "type", "param", "code"}}`` with 400 for bad input, 404 for an unknown
model, 503 (with ``Retry-After``) when no worker can serve or the router cannot be reached,
502 when workers failed beyond the migration limit or a prefill worker's handshake was
unusable. A worker's own error answer for a request (a prompt too long for it, a token id
outside its vocabulary) is passed through to the client with its 4xx status. With API keys
configured, 401/403/429 come from the door in front (``dynamo_ext.frontend.auth``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dynamo_ext.errors import (
    ApiError,
    DisaggError,
    DynamoExtError,
    NoWorkerAvailable,
    RouterUnavailable,
)
from dynamo_ext.frontend import auth
from dynamo_ext.frontend.config import FrontendConfig
from dynamo_ext.frontend.dispatch import Delta, Dispatcher, GenRequest, GenState, UpstreamError
from dynamo_ext.frontend.metrics import FrontendMetrics
from dynamo_ext.protocol import WorkerState
from dynamo_ext.router.client import RouterClient
from dynamo_ext.security import load_curve

T = TypeVar("T")

log = logging.getLogger(__name__)

# How long a client should wait before retrying a 503: the router's reconnect and the
# workers' keep-alive both heal within about a second.
RETRY_AFTER_S = 1

__all__ = ["ApiError", "Frontend", "run"]


def _error(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        status_code=status,
        headers=headers,
    )


# Fields a client may not set: the frontend sets them (disaggregation) or cannot route by
# them; a client's ``cache_salt`` is dropped (the API key's tenant sets it, see auth).
# Everything else passes through to the engine, which validates it.
_REFUSED = {
    "kv_transfer_params": "set by the frontend when it pairs prefill and decode workers",
    "prompt_embeds": "the router routes by token ids: send text or token ids",
    "multi_modal_data": "the router routes by token ids: send text or token ids",
}
_DEADLINE_HEADER = "x-request-timeout"


def _max_model_len(cfg: FrontendConfig) -> int:
    if cfg.max_model_len:
        return cfg.max_model_len
    try:
        mc = json.loads((Path(cfg.model) / "config.json").read_text())
        return int(mc.get("max_position_embeddings", 4096))
    except (OSError, ValueError):
        return 4096


def _int_field(body: dict[str, Any], name: str, lo: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise ApiError(400, f"{name}: must be an integer, got {v!r}", param=name)
    if v < lo:
        raise ApiError(400, f"{name} must be at least {lo}, got {v}.", param=name)
    return v


def _template_message(m: Any, i: int) -> dict[str, Any]:
    """A chat message as chat templates expect it (what vLLM hands its templates): text
    parts joined into one string, tool-call arguments parsed from their JSON string."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ApiError(400, f"messages.{i}: must be an object with a role", param="messages")
    out = {k: v for k, v in m.items() if v is not None}
    content = out.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(
                    400,
                    f"messages.{i}.content: {kind!r} parts are not supported (text only)",
                    param="messages",
                )
            texts.append(str(part.get("text", "")))
        out["content"] = "\n".join(texts)
    elif content is None:
        out["content"] = ""
    calls = out.get("tool_calls")
    if isinstance(calls, list):
        fixed = []
        for c in calls:
            fn = c.get("function") if isinstance(c, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    fn = {**fn, "arguments": json.loads(fn["arguments"])}
                except ValueError:
                    pass
                c = {**c, "function": fn}
            fixed.append(c)
        out["tool_calls"] = fixed
    return out


class Admission:
    """Bounded concurrency: ``limit`` requests served at once, at most ``queue`` waiting
    (then 429) for at most ``timeout_s`` each (then 503), both with ``Retry-After``."""

    def __init__(self, limit: int, queue: int, timeout_s: float) -> None:
        self.limit = limit
        self.queue = queue
        self.timeout_s = timeout_s
        self.active = 0
        self.waiting = 0
        self._sem = asyncio.Semaphore(limit)

    async def acquire(self, budget_s: float | None = None) -> None:
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if self._sem.locked() and self.waiting >= self.queue:
            raise ApiError(
                429,
                f"{self.active} requests in flight and {self.waiting} queued: try again later",
                "rate_limit_exceeded",
                code="queue_full",
                headers=retry,
            )
        wait = self.timeout_s if budget_s is None else min(self.timeout_s, budget_s)
        self.waiting += 1
        try:
            await asyncio.wait_for(self._sem.acquire(), max(wait, 0.0))
        except TimeoutError:
            raise ApiError(
                503,
                f"no slot within {wait:.1f} s ({self.active} requests in flight)",
                "service_unavailable",
                code="queue_timeout",
                headers=retry,
            ) from None
        finally:
            self.waiting -= 1
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._sem.release()


class _WorkerView:
    """What the frontend knows of the fleet from the router, refreshed at most every
    ``ttl_s``: the workers up, and the ``max_model_len`` their /v1/models report."""

    def __init__(self, fe: Frontend, ttl_s: float = 5.0) -> None:
        self.fe = fe
        self.ttl_s = ttl_s
        self.at = -1e9
        self.up: list[WorkerState] = []
        self.router_error: str | None = "not asked yet"
        self.max_model_len: int | None = None
        self._lock = asyncio.Lock()

    async def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.at < self.ttl_s:
            return
        async with self._lock:
            if not force and time.monotonic() - self.at < self.ttl_s:
                return
            try:
                st = await self.fe.router.workers()
                self.up = [w for w in st.workers if w.up]
                self.router_error = None
            except DynamoExtError as exc:
                self.up, self.router_error = [], str(exc) or type(exc).__name__
            lens = []
            for w in self.up:
                if w.http_endpoint:
                    n = await self._model_len(w.http_endpoint)
                    if n is not None:
                        lens.append(n)
            if lens:
                self.max_model_len = min(lens)
            self.at = time.monotonic()

    async def _model_len(self, url: str) -> int | None:
        try:
            r = await self.fe.dispatcher.http.get(url + "/v1/models", timeout=2.0)
            n = r.json()["data"][0].get("max_model_len")
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            return None
        return n if isinstance(n, int) and n > 0 else None


class Frontend:
    def __init__(self, cfg: FrontendConfig) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self._fallback_len = _max_model_len(cfg)
        self.metrics = FrontendMetrics()
        curve = load_curve(cfg.security.router, "security.router")
        self.router: RouterClient
        if cfg.routing_backend == "dynamo_core":
            from dynamo_ext.frontend.dynamo_core import DynamoCoreRouter

            self.router = DynamoCoreRouter(
                cfg.router,
                cfg.router_timeout_s,
                model=cfg.model_name,
                refresh_s=cfg.dynamo_core_refresh_s,
                knobs=cfg.dynamo_core_knobs,
                max_num_batched_tokens=cfg.dynamo_core_max_num_batched_tokens,
                metrics=self.metrics,
                curve=curve,
            )
        elif cfg.routing_backend == "embedded":
            from dynamo_ext.frontend.embedded import EmbeddedRouter

            self.router = EmbeddedRouter(cfg.embedded_router_config())
        else:
            self.router = auth.TenantRouterClient(cfg.router, cfg.router_timeout_s, curve=curve)
        self.dispatcher = Dispatcher(cfg, self.router, self.metrics)
        self.admission = Admission(
            cfg.max_concurrent_requests, cfg.max_queued_requests, cfg.queue_timeout_s
        )
        # Read at scrape time: a request waiting for its slot shows as queued while it
        # waits (set on admission only, the gauge showed the queue as of the last admitted).
        self.metrics.queued.labels(cfg.model_name).set_function(lambda: self.admission.waiting)
        self.fleet = _WorkerView(self)
        self._pool = ThreadPoolExecutor(cfg.tokenizer_threads, thread_name_prefix="tokenize")
        self.app = self._build()

    @property
    def max_model_len(self) -> int:
        if self.cfg.max_model_len:
            return self.cfg.max_model_len
        return self.fleet.max_model_len or self._fallback_len

    # ---------------------------------------------------------------- helpers
    def _check_model(self, name: object) -> None:
        if not isinstance(name, str):
            raise ApiError(400, "model: a model name is required", param="model")
        if name != self.cfg.model_name:
            raise ApiError(
                404,
                f"The model `{name}` does not exist.",
                "NotFoundError",
                "model",
                "model_not_found",
            )

    @staticmethod
    def _check_fields(body: dict[str, Any]) -> None:
        for name, why in _REFUSED.items():
            if body.get(name) is not None:
                raise ApiError(400, f"{name}: not accepted here ({why})", param=name)
        if "stream" in body and not isinstance(body["stream"], bool):
            raise ApiError(400, "stream: must be a boolean", param="stream")
        _int_field(body, "n", 1)

    def _check_len(self, prompt_len: int, max_tokens: int) -> None:
        if max_tokens <= 0:
            raise ApiError(
                400, f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens"
            )
        if prompt_len + max_tokens > self.max_model_len:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {prompt_len + max_tokens} tokens "
                f"({prompt_len} in the prompt, {max_tokens} for the completion).",
                param="max_tokens" if prompt_len < self.max_model_len else "prompt",
                code="context_length_exceeded",
            )

    async def _tokenize(self, fn: Any, *args: Any) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    def text_prompt_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def chat_prompt_ids(self, body: dict[str, Any]) -> list[int]:
        """The prompt's token ids as vLLM makes them: the chat template (with the
        request's tools, documents and template arguments) rendered, then tokenized
        without special tokens."""
        msgs = [_template_message(m, i) for i, m in enumerate(body["messages"])]
        kwargs = dict(body.get("chat_template_kwargs") or {})
        for k in ("tools", "documents"):
            if body.get(k) is not None:
                kwargs[k] = body[k]
        try:
            text: Any = self.tokenizer.apply_chat_template(
                msgs,
                add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                continue_final_message=bool(body.get("continue_final_message", False)),
                tokenize=False,
                **kwargs,
            )
        except Exception as exc:  # jinja raises what the template raises
            raise ApiError(
                400, f"messages: the chat template failed: {exc}", param="messages"
            ) from exc
        return list(self.tokenizer(str(text), add_special_tokens=False).input_ids)

    def _deadline(self, request: Request) -> float:
        """The request's deadline on the event loop's clock."""
        budget = self.cfg.request_deadline_s
        raw = request.headers.get(_DEADLINE_HEADER)
        if raw is not None:
            try:
                asked = float(raw)
            except ValueError:
                raise ApiError(400, f"{_DEADLINE_HEADER}: not a number of seconds") from None
            if not asked > 0:
                raise ApiError(400, f"{_DEADLINE_HEADER}: must be > 0")
            budget = min(budget, asked)
        return asyncio.get_running_loop().time() + budget

    # ---------------------------------------------------------------- app
    def _build(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            self.router.connect()
            started = getattr(self.router, "started", None)
            if started is not None:  # the embedded router: a port taken fails the start-up
                await started()
            log.info(
                "frontend for %s on http://%s:%d, router %s, routing backend %s",
                self.cfg.model_name,
                self.cfg.host,
                self.cfg.port,
                self.cfg.router,
                self.cfg.routing_backend,
            )
            yield
            await self.dispatcher.close()
            await self.router.close()
            self._pool.shutdown(wait=False, cancel_futures=True)

        app = FastAPI(title="dynamo-ext frontend", lifespan=lifespan)
        auth.install(app, self.cfg.security, lambda text: len(self.tokenizer(text).input_ids))

        @app.exception_handler(RequestValidationError)
        async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            errs = exc.errors()
            first = errs[0] if errs else {}
            loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
            if first.get("type") == "json_invalid":
                return _error(400, "Request body is not valid JSON.", code="invalid_json")
            return _error(400, f"{loc}: {first.get('msg', 'invalid value')}", param=loc or None)

        @app.exception_handler(ApiError)
        async def _api(request: Request, exc: ApiError) -> JSONResponse:
            self.metrics.requests.labels(
                self.cfg.model_name, request.url.path, "unknown", "error"
            ).inc()
            return _error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

        @app.get("/health")
        async def health() -> JSONResponse:
            """200 while the router answers and lists a worker up; 503 otherwise."""
            await self.fleet.refresh(force=time.monotonic() - self.fleet.at > 1.0)
            v = self.fleet
            info: dict[str, Any] = {
                "router": "ok" if v.router_error is None else f"unreachable: {v.router_error}",
                "workers_up": {w.worker_id: w.role for w in v.up},
                "inflight": self.admission.active,
                "routing_backend": self.cfg.routing_backend,
                "queued": self.admission.waiting,
            }
            if v.router_error is not None or not v.up:
                why = "router unreachable" if v.router_error is not None else "no worker up"
                return JSONResponse(
                    {"status": "unavailable", "reason": why, **info},
                    status_code=503,
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            return JSONResponse({"status": "ok", **info})

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            text = generate_latest(self.metrics.registry)
            embedded = getattr(self.router, "service", None)
            if embedded is not None:  # the embedded router's own counters, as it would serve them
                text += generate_latest(embedded.metrics.registry)
            return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            await self.fleet.refresh()
            return {
                "object": "list",
                "data": [
                    {
                        "id": self.cfg.model_name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "dynamo-ext",
                        "root": self.cfg.model,
                        "max_model_len": self.max_model_len,
                    }
                ],
            }

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            body = await _json_body(request)
            self._check_model(body.get("model"))
            self._check_fields(body)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
                prompt = prompt[0]  # one prompt in a batch of one
            if isinstance(prompt, str):
                ids = await self._tokenize(self.text_prompt_ids, prompt) if prompt else []
            elif isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt
            ):
                ids = list(prompt)
            elif isinstance(prompt, list):
                raise ApiError(
                    400,
                    "prompt: batched prompts are not supported; send one request per prompt",
                    param="prompt",
                )
            else:
                raise ApiError(400, "prompt: a string or a list of token ids", param="prompt")
            if not ids:
                raise ApiError(400, "prompt must not be empty", param="prompt")
            mt = _int_field(body, "max_tokens", 1)
            max_tokens = mt if mt is not None else 16
            await self.fleet.refresh()
            self._check_len(len(ids), max_tokens)
            return await self._serve(request, "/v1/completions", body, ids, max_tokens)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await _json_body(request)
            self._check_model(body.get("model"))
            self._check_fields(body)
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise ApiError(400, "messages: at least one message", param="messages")
            ids = await self._tokenize(self.chat_prompt_ids, body)
            mt = _int_field(body, "max_completion_tokens", 1)
            if mt is None:
                mt = _int_field(body, "max_tokens", 1)
            await self.fleet.refresh()
            max_tokens = mt if mt is not None else self.max_model_len - len(ids)
            self._check_len(len(ids), max_tokens)
            return await self._serve(request, "/v1/chat/completions", body, ids, max_tokens)

        return app

    async def _serve(
        self, request: Request, endpoint: str, body: dict[str, Any], ids: list[int], mt: int
    ) -> Any:
        model = self.cfg.model_name
        chat = endpoint.endswith("/chat/completions")
        stream = bool(body.get("stream"))
        m = self.metrics
        deadline = self._deadline(request)
        loop = asyncio.get_running_loop()
        try:
            await self.admission.acquire(deadline - loop.time())
        except ApiError as exc:
            m.rejected.labels(model, exc.code or "admission").inc()
            raise
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admission.release()

        try:
            return await self._admitted(
                request, endpoint, chat, stream, body, ids, mt, deadline, release
            )
        except BaseException:
            release()
            raise

    async def _admitted(
        self,
        request: Request,
        endpoint: str,
        chat: bool,
        stream: bool,
        body: dict[str, Any],
        ids: list[int],
        max_tokens: int,
        deadline: float,
        release: Callable[[], None],
    ) -> Any:
        model = self.cfg.model_name
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        # A client's own cache_salt is dropped: the salt is the API key's tenant's (auth).
        wbody = {k: v for k, v in body.items() if k not in ("model", "cache_salt")}
        wbody.update(auth.tenant_fields())
        req = GenRequest(rid, ids, max_tokens, body=wbody, endpoint=endpoint)
        state = GenState()
        created = int(time.time())
        rtype = "stream" if stream else "unary"
        m = self.metrics
        t0 = time.perf_counter()
        m.inflight.labels(model).inc()
        want_ids = bool(body.get("return_token_ids"))
        want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        ended = False

        def done(status: str) -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            release()
            m.inflight.labels(model).dec()
            m.requests.labels(model, endpoint, rtype, status).inc()
            m.e2e.labels(model).observe(time.perf_counter() - t0)
            if status == "success":
                m.isl.labels(model).observe(len(ids))
                m.osl.labels(model).observe(len(state.generated))
                m.input_tokens.labels(model).inc(len(ids))
                m.output_tokens.labels(model).inc(len(state.generated))
                m.prompt_blocks.labels(model).inc(state.prompt_blocks)
                m.hit_blocks.labels(model).inc(state.hit_blocks)
                total = m.prompt_blocks.labels(model)._value.get()
                if total:
                    m.prefix_hit_rate.labels(model).set(
                        m.hit_blocks.labels(model)._value.get() / total
                    )

        def fix_usage(usage: Any) -> Any:
            """A migrated request's usage, counted from the client's prompt: the last
            worker saw the prompt plus the tokens generated before."""
            if not isinstance(usage, dict) or not state.migrations:
                return usage
            n = len(state.generated)
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        def rewrite(obj: dict[str, Any]) -> dict[str, Any]:
            out = {**obj, "id": rid, "model": model, "created": created}
            if not want_ids:
                out.pop("prompt_token_ids", None)
            if "usage" in out:
                out["usage"] = fix_usage(out["usage"])
            return out

        if not stream:
            try:
                answer = await _until_disconnect(
                    request, self.dispatcher.complete(req, state), deadline
                )
            except BaseException as exc:
                done("error")
                raise self._map(exc, model) from exc
            done("success")  # (no first-token time without a stream: TTFT is streams only)
            return JSONResponse(rewrite(answer))

        gen = self.dispatcher.generate(req, state)

        async def next_delta() -> Delta | None:
            try:
                async with asyncio.timeout_at(deadline):
                    return await gen.__anext__()
            except StopAsyncIteration:
                return None

        # Pull the first chunk before answering, so routing and worker errors become
        # proper HTTP statuses instead of a broken stream.
        try:
            first = await _until_disconnect(request, next_delta(), None)
        except BaseException as exc:
            done("error")
            with anyio.CancelScope(shield=True):
                await gen.aclose()
            raise self._map(exc, model) from exc
        t_last = time.perf_counter()
        m.ttft.labels(model).observe(t_last - t0)

        async def sse() -> AsyncIterator[bytes]:
            nonlocal t_last
            status = "error"
            d = first
            try:
                while d is not None:
                    if d.chunk is not None:
                        chunk = d.chunk
                        if chunk.get("choices") or want_usage:
                            if not want_usage:
                                chunk = {k: v for k, v in chunk.items() if k != "usage"}
                            yield _sse(rewrite(chunk))
                    d = await next_delta()
                    if d is not None and d.token_ids:
                        t = time.perf_counter()
                        m.itl.labels(model).observe(t - t_last)
                        t_last = t
                status = "success"
                yield b"data: [DONE]\n\n"
            except Exception as exc:
                mapped = self._map(exc, model)
                yield _sse(
                    {"error": {"message": mapped.message, "type": mapped.type, "code": mapped.code}}
                )
            except BaseException:
                status = "client_disconnect"
                m.rejected.labels(model, "client_disconnect").inc()
                raise
            finally:
                done("success" if status == "success" else "error")
                # closes the worker's stream (vLLM aborts the request) and tells the
                # router, even while the client's disconnect cancels us
                with anyio.CancelScope(shield=True):
                    await gen.aclose()

        return StreamingResponse(sse(), media_type="text/event-stream")

    def _map(self, exc: BaseException, model: str = "") -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, TimeoutError):
            self.metrics.rejected.labels(model or self.cfg.model_name, "deadline").inc()
            return ApiError(
                504, "the request's deadline passed", "timeout", code="deadline_exceeded"
            )
        if isinstance(exc, UpstreamError):
            status = exc.status if 400 <= exc.status < 500 else 502
            return ApiError(
                status, f"worker rejected the request: {exc.body[:300]}", "upstream_error"
            )
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if isinstance(exc, NoWorkerAvailable):
            return ApiError(503, str(exc), "service_unavailable", code="no_worker", headers=retry)
        if isinstance(exc, RouterUnavailable):
            return ApiError(
                503, str(exc), "service_unavailable", code="router_unavailable", headers=retry
            )
        if isinstance(exc, DisaggError):
            return ApiError(502, str(exc), "upstream_error", code="disaggregation_failed")
        if isinstance(exc, DynamoExtError):
            return ApiError(502, str(exc), "upstream_error")
        if isinstance(exc, asyncio.CancelledError | _ClientGone):
            return ApiError(499, "client disconnected", "client_closed_request")
        log.exception("unexpected error", exc_info=exc)
        return ApiError(500, f"internal error: {type(exc).__name__}", "internal_error")


class _ClientGone(DynamoExtError):
    """The client closed its connection before the answer."""


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "Request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object.", code="invalid_json")
    return body


async def _until_disconnect(request: Request, work: Awaitable[T], deadline: float | None) -> T:
    """``work``, cancelled when the client disconnects (its upstream request is then
    closed, and vLLM aborts it) or the deadline passes (TimeoutError)."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watch = asyncio.ensure_future(gone())
    try:
        timeout = None if deadline is None else deadline - asyncio.get_running_loop().time()
        await asyncio.wait({task, watch}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if watch.done():
            raise _ClientGone("client disconnected")
        raise TimeoutError
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def run(cfg: FrontendConfig) -> None:
    import uvicorn

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call
    fe = Frontend(cfg)
    uvicorn.run(
        fe.app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        timeout_keep_alive=30,
        ssl_certfile=cfg.security.ssl_certfile,  # both None: plain HTTP
        ssl_keyfile=cfg.security.ssl_keyfile,
    )
