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

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from dynamo_ext.errors import (
    ApiError,
    DisaggError,
    DynamoExtError,
    NoWorkerAvailable,
    RouterUnavailable,
)
from dynamo_ext.frontend import auth
from dynamo_ext.frontend.config import FrontendConfig
from dynamo_ext.frontend.dispatch import Dispatcher, GenRequest, GenState, UpstreamError
from dynamo_ext.frontend.metrics import FrontendMetrics
from dynamo_ext.security import load_curve

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


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False

    def sampling(self) -> dict[str, Any]:
        keys = ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "min_tokens")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class CompletionBody(_Sampling):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


def _max_model_len(cfg: FrontendConfig) -> int:
    if cfg.max_model_len:
        return cfg.max_model_len
    try:
        mc = json.loads((Path(cfg.model) / "config.json").read_text())
        return int(mc.get("max_position_embeddings", 4096))
    except (OSError, ValueError):
        return 4096


class Frontend:
    def __init__(self, cfg: FrontendConfig) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.max_model_len = _max_model_len(cfg)
        self.metrics = FrontendMetrics()
        curve = load_curve(cfg.security.router, "security.router")
        self.router = auth.TenantRouterClient(cfg.router, cfg.router_timeout_s, curve=curve)
        self.dispatcher = Dispatcher(cfg, self.router, self.metrics)
        self.app = self._build()

    # ---------------------------------------------------------------- helpers
    def _check_model(self, name: str) -> None:
        if name != self.cfg.model_name:
            raise ApiError(
                404,
                f"The model `{name}` does not exist.",
                "NotFoundError",
                "model",
                "model_not_found",
            )

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

    def _chat_ids(self, body: ChatBody) -> list[int]:
        msgs = [m.model_dump(exclude_none=True) for m in body.messages]
        out: Any = self.tokenizer.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True
        )
        if isinstance(out, dict) or hasattr(out, "input_ids"):  # transformers 5: an encoding
            out = out["input_ids"]
        return list(out)

    # ---------------------------------------------------------------- app
    def _build(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            self.router.connect()
            log.info(
                "frontend for %s on http://%s:%d, router %s",
                self.cfg.model_name,
                self.cfg.host,
                self.cfg.port,
                self.cfg.router,
            )
            yield
            await self.dispatcher.close()
            await self.router.close()

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
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(
                generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST
            )

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {
                "object": "list",
                "data": [
                    {
                        "id": self.cfg.model_name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "dynamo-ext",
                    }
                ],
            }

        @app.post("/v1/completions")
        async def completions(body: CompletionBody) -> Any:
            self._check_model(body.model)
            ids = (
                self.tokenizer(body.prompt).input_ids
                if isinstance(body.prompt, str)
                else list(body.prompt)
            )
            if not ids:
                raise ApiError(400, "prompt must not be empty", param="prompt")
            max_tokens = body.max_tokens if body.max_tokens is not None else 16
            self._check_len(len(ids), max_tokens)
            return await self._serve("/v1/completions", "text_completion", body, ids, max_tokens)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatBody) -> Any:
            self._check_model(body.model)
            ids = self._chat_ids(body)
            mt = body.max_completion_tokens or body.max_tokens
            max_tokens = mt if mt is not None else self.max_model_len - len(ids)
            self._check_len(len(ids), max_tokens)
            return await self._serve(
                "/v1/chat/completions", "chat.completion", body, ids, max_tokens
            )

        return app

    async def _serve(
        self, endpoint: str, kind: str, body: _Sampling, ids: list[int], max_tokens: int
    ) -> Any:
        model = self.cfg.model_name
        rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
        req = GenRequest(rid, ids, max_tokens, {**body.sampling(), **auth.tenant_fields()})
        state = GenState()
        created = int(time.time())
        rtype = "stream" if body.stream else "unary"
        chat = kind == "chat.completion"
        m = self.metrics
        t0 = time.perf_counter()
        m.inflight.labels(model).inc()

        def done(status: str) -> None:
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

        def usage() -> dict[str, Any]:
            out: dict[str, Any] = {
                "prompt_tokens": len(ids),
                "completion_tokens": len(state.generated),
                "total_tokens": len(ids) + len(state.generated),
            }
            if state.cached_tokens is not None:
                out["prompt_tokens_details"] = {"cached_tokens": state.cached_tokens}
            return out

        def chunk(
            text: str, finish: str | None, first: bool, token_ids: list[int]
        ) -> dict[str, Any]:
            # token_ids (as vLLM's return_token_ids) lets clients count tokens exactly: a
            # chunk may carry several when the engine runs ahead of a slow reader.
            if chat:
                delta: dict[str, Any] = {"content": text}
                if first:
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "token_ids": token_ids}
                obj = "text_completion"
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
            }

        gen = self.dispatcher.generate(req, state)
        # Pull the first token before answering, so routing and worker errors become
        # proper HTTP statuses instead of a broken stream.
        t_last = 0.0
        try:
            first_delta = await gen.__anext__()
        except StopAsyncIteration:
            first_delta = None
        except BaseException as exc:
            done("error")
            raise self._map(exc) from exc
        t_last = time.perf_counter()
        m.ttft.labels(model).observe(t_last - t0)

        if body.stream:

            async def sse() -> AsyncIterator[bytes]:
                nonlocal t_last
                ok = "error"
                try:
                    first = True
                    if first_delta is not None:
                        yield _sse(
                            chunk(
                                first_delta.text,
                                first_delta.finish_reason,
                                True,
                                first_delta.token_ids,
                            )
                        )
                        first = False
                        async for d in gen:
                            t = time.perf_counter()
                            m.itl.labels(model).observe(t - t_last)
                            t_last = t
                            yield _sse(chunk(d.text, d.finish_reason, first, d.token_ids))
                    ok = "success"
                    yield b"data: [DONE]\n\n"
                except BaseException as exc:
                    mapped = self._map(exc)
                    yield _sse(
                        {
                            "error": {
                                "message": mapped.message,
                                "type": mapped.type,
                                "code": mapped.code,
                            }
                        }
                    )
                    if not isinstance(exc, Exception):
                        raise
                finally:
                    done(ok)

            return StreamingResponse(sse(), media_type="text/event-stream")

        texts: list[str] = []
        finish: str | None = None
        try:
            if first_delta is not None:
                texts.append(first_delta.text)
                finish = first_delta.finish_reason
                async for d in gen:
                    texts.append(d.text)
                    finish = d.finish_reason or finish
        except BaseException as exc:
            done("error")
            raise self._map(exc) from exc
        done("success")
        text = "".join(texts)
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "finish_reason": finish,
                "message": {"role": "assistant", "content": text},
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "finish_reason": finish,
                "logprobs": None,
                "token_ids": state.generated,
            }
        return {
            "id": rid,
            "object": kind,
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage(),
        }

    def _map(self, exc: BaseException) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
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
        log.exception("unexpected error", exc_info=exc)
        return ApiError(500, f"internal error: {type(exc).__name__}", "internal_error")


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
