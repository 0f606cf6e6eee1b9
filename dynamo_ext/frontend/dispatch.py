"""Where a request runs, and keeping it running: routing, conditional disaggregation and
request migration, independent of the HTTP API in front.

For each request the dispatcher asks the router for a decode-capable worker, decides whether
it is paired with a prefill worker, streams the decode worker's tokens and tells the router
when the request is over. How a pair is made is the engine's business: the dispatcher asks
the decode worker's engine for its :class:`~dynamo_ext.frontend.handshake.Handshake` and
knows no engine itself. A decode worker is paired when its engine cannot prefill on a decode
worker (SGLang), or when a remote prefill pays (see ``FrontendConfig``: enough uncached
prompt tokens, a prefill queue that is not backed up); otherwise it prefills locally
(conditional disaggregation). A sequential handshake (vLLM) posts the prefill request first
and gives its checked answer to the decode worker; a prefill worker that cannot be reached or
refuses leaves the prompt to the decode worker, one whose answer is not a usable handshake
fails the request with a clear error (counted by engine and reason). A concurrent handshake
(SGLang) sends both at once; a prefill worker that fails before the first decoded token fails
the attempt, which is retried with another prefill worker.

Failures are told apart by whose they are. A worker that refuses the connection, or a stream
that breaks before the request finished, is the worker's: it is reported to the router at once
and the request moves to another worker with the prompt plus the tokens already generated and
the remaining token budget, so the client's stream continues where it stopped, neither losing
nor repeating a token (migration). A worker that answers with an error, as an HTTP status or as
an error event inside its stream (vLLM validates some inputs, e.g. token ids, only once the
stream has begun), is alive: the error is the request's and goes back to its client (4xx as
is, others as 502); the worker is neither reported nor left.

Every locally prefilled attempt checks the router's index against the engine: the router's
predicted prefix hit (``chosen.prefix_hit_blocks`` times the block size) against the
``usage.prompt_tokens_details.cached_tokens`` the worker reports at the end of its stream. The
difference goes to the metrics and, in ``RequestFinished``, to the router.

The request body is the client's own, passed to the worker's OpenAI endpoint of the same
name (``/v1/completions`` or ``/v1/chat/completions``) with only the fields the dispatcher
must set (token-id prompt, remaining ``max_tokens``, streaming with usage and token ids,
``kv_transfer_params``): vLLM applies the chat template, tools, structured outputs, logprobs
and tool-call parsing itself. A stream that breaks after tokens reached the client continues
on the next worker as a completion of the prompt's token ids plus the tokens generated
(chat chunks rebuilt from it); requests whose continuation would not be the same (``n`` > 1,
structured outputs) move only before their first token. A non-streamed request is retried
whole. When no decode worker is left, requests fall back to any live worker, prefill
workers included (each is a full vLLM server serving aggregated); each request asks for a
decode worker first, so P/D resumes as soon as one is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from dynamo_ext.errors import DisaggError, DynamoExtError, NoWorkerAvailable, RouterUnavailable
from dynamo_ext.frontend.config import FrontendConfig
from dynamo_ext.frontend.handshake import Handshake, handshake_for
from dynamo_ext.frontend.metrics import FrontendMetrics
from dynamo_ext.protocol import MEDIUM_GPU, RouteResponse
from dynamo_ext.router.client import RouterClient

log = logging.getLogger(__name__)


class UpstreamError(DynamoExtError):
    """A worker answered with an error (the request itself is at fault)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"worker answered {status}: {body[:500]}")
        self.status = status
        self.body = body


class _Broken(DynamoExtError):
    """The worker's stream ended before the request finished."""


class _PrefillFailed(DynamoExtError):
    """The paired (concurrent) prefill worker failed before the decode worker produced a
    token."""

    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(f"prefill worker {worker_id} failed: {reason}")
        self.worker_id = worker_id


# How many prefill candidates that do not fit the handshake (another engine, no bootstrap
# endpoint) the router may offer before we give up: one router can serve mixed fleets.
_ENGINE_PICKS = 4

# Fields that constrain decoding with a grammar from the first generated token.
_GRAMMAR_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex")
# Sampling fields a chat request shares with a completion: what a chat request's prefill
# (a completion of its token ids) and its migrated continuation keep.
_SHARED_SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "bad_words",
    "allowed_token_ids",
    "priority",
    "cache_salt",
    "n",
    "user",
)


@dataclass(slots=True)
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    # the worker's chunk as it came (the API layer rewrites id and model), or one rebuilt
    # here for a continuation
    chunk: dict[str, Any] | None = None


@dataclass(slots=True)
class GenRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, stop, ...
    # The client's fields for the worker's ``endpoint`` (passed through; the engine validates
    # them). None: a completion of ``prompt_ids`` with ``sampling``.
    body: dict[str, Any] | None = None
    endpoint: str = "/v1/completions"

    @property
    def chat(self) -> bool:
        return self.endpoint.endswith("/chat/completions")

    def continuable(self) -> str | None:
        """Why a stream that already sent tokens cannot continue on another worker as a
        completion of prompt + generated tokens (``None``: it can)."""
        b = self.body or {}
        if int(b.get("n") or 1) != 1:
            return "n > 1"
        if _echo_as_text(b):
            return "echo (its stream carries no token ids)"
        for k in _GRAMMAR_FIELDS:
            if b.get(k) not in (None, {}, ""):
                if k == "response_format" and b[k].get("type") in ("text", None):
                    continue
                return f"{k} (a grammar would restart)"
        return None


@dataclass(slots=True)
class GenState:
    """What the API layer reads after the stream: where it ran, how it went."""

    worker_id: str | None = None
    prefill: str = "local"  # "remote" when a prefill worker computed the prompt
    migrations: int = 0
    prompt_blocks: int = 0
    hit_blocks: int = 0
    generated: list[int] = field(default_factory=list)
    sent: bool = False  # tokens reached the client: a retry must continue, not restart
    # What the worker reported it reused of the prompt (first attempt only: a migrated
    # request's prompt is another one).
    cached_tokens: int | None = None


@dataclass(slots=True)
class _Attempt:
    """One worker's try at a request."""

    route: RouteResponse
    prompt_len: int
    prefill: str = "local"
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens


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

    async def _route(self, rid: str, prompt: list[int], exclude: list[str]) -> RouteResponse:
        """A worker for the whole request: a decode-capable one, or (none left) any live
        worker, prefill workers included, which then serve the request aggregated."""
        if not self.cfg.disaggregation:
            return await self.router.route(rid, prompt, role="aggregated", exclude_workers=exclude)
        try:
            return await self.router.route(rid, prompt, role="decode", exclude_workers=exclude)
        except NoWorkerAvailable as exc:
            try:
                d = await self.router.route(rid, prompt, role="prefill", exclude_workers=exclude)
            except NoWorkerAvailable:
                raise exc from None
            if handshake_for(d.engine).decode_needs_prefill:
                await self.router.finished(rid)  # its prefill workers never serve alone
                raise exc from None
            self.metrics.fallbacks.labels(self.cfg.model_name, d.worker_role).inc()
            log.info("request %s: no decode worker, served by %s", rid, d.worker_id)
            return d

    def _attempt_body(
        self, req: GenRequest, state: GenState, stream: bool
    ) -> tuple[str, dict[str, Any], dict[str, Any], bool]:
        """``(endpoint, body, prefill-shaped body, rebuilt)`` of the next attempt. The
        first attempt (and any before a token reached the client) sends the client's own
        request; a continuation is a completion of prompt + generated tokens (``rebuilt``:
        chat chunks are made from its completion chunks)."""
        prompt = req.prompt_ids + state.generated
        remaining = req.max_tokens - len(state.generated)
        if req.body is None:
            body = self._body(prompt, remaining, req.sampling)
            if not stream:
                body = {k: v for k, v in body.items() if k != "stream_options"}
                body["stream"] = False
            return "/v1/completions", body, body, False
        src = req.body
        shared = {k: src[k] for k in _SHARED_SAMPLING if k in src}
        if state.generated and state.sent:
            # continue where the client's stream stopped
            body = self._body(prompt, remaining, shared)
            if src.get("logprobs") not in (None, False):
                lp = src.get("top_logprobs") if req.chat else src.get("logprobs")
                body["logprobs"] = int(lp or 0) if not isinstance(lp, bool) else 0
            return "/v1/completions", body, body, req.chat
        body = {**src, "max_tokens": remaining, "stream": stream, "return_token_ids": True}
        if _echo_as_text(src):
            body.pop("return_token_ids")  # vLLM echoes token ids instead of text with it
        body.pop("max_completion_tokens", None)
        if stream:
            opts = dict(src.get("stream_options") or {})
            opts["include_usage"] = True  # cached_tokens come with the usage
            body["stream_options"] = opts
        if not req.chat:
            # The token ids the router hashed; an echo of a text prompt keeps the client's
            # text (vLLM echoes a prompt of ids as their detokenization, BOS included).
            if not (_echo_as_text(src) and isinstance(src.get("prompt"), str)):
                body["prompt"] = prompt
            return req.endpoint, body, body, False
        # A chat request's prefill is a completion of its templated token ids.
        pd = {**shared, "prompt": prompt, "max_tokens": remaining, "stream": stream}
        for k in ("echo", "prompt_logprobs"):
            if src.get(k):
                pd[k] = src[k]
        return req.endpoint, body, pd, False

    async def generate(self, req: GenRequest, state: GenState) -> AsyncGenerator[Delta, None]:
        """The request streamed, moving to another worker when one fails."""
        async for delta in self._run(req, state, stream=True):
            yield delta

    async def complete(self, req: GenRequest, state: GenState) -> dict[str, Any]:
        """The request not streamed: the worker's JSON answer (retried whole on another
        worker when one fails)."""
        gen = self._run(req, state, stream=False)
        try:
            async for delta in gen:
                assert delta.chunk is not None
                return delta.chunk
        finally:
            await gen.aclose()  # its bookkeeping (router.finished) runs now, not at GC
        raise _Broken("no answer")  # pragma: no cover - _run yields once or raises

    async def _run(
        self, req: GenRequest, state: GenState, stream: bool
    ) -> AsyncGenerator[Delta, None]:
        model = self.cfg.model_name
        exclude: list[str] = []
        prefill_exclude: list[str] = []
        attempt = 0
        while True:
            if state.sent and req.body is not None:
                why = req.continuable()
                if why is not None:
                    raise NoWorkerAvailable(
                        f"request {req.request_id}: its worker failed mid-stream and a "
                        f"request with {why} cannot continue on another one"
                    )
            prompt = req.prompt_ids + state.generated
            rid = f"{req.request_id}#{attempt}"
            t_route = time.perf_counter()
            d = await self._route(rid, prompt, exclude)
            backend = self.cfg.routing_backend
            self.metrics.routes.labels(model, backend).inc()
            self.metrics.route_seconds.labels(backend).observe(time.perf_counter() - t_route)
            worker = d.worker_id
            state.worker_id = worker
            if attempt == 0:
                state.prompt_blocks = d.num_blocks
                state.hit_blocks = d.chosen.prefix_hit_blocks.get(MEDIUM_GPU, 0)
            endpoint, body, pd_body, rebuilt = self._attempt_body(req, state, stream)
            att = _Attempt(d, len(prompt))
            reason = ""
            prefill_task: asyncio.Task[None] | None = None
            try:
                paired = await self._disaggregate(
                    rid, prompt, d, body, attempt, prefill_exclude, pd_body
                )
                if paired is not None:
                    body, prefill_task = paired
                    att.prefill = state.prefill = "remote"
                self.metrics.prefill.labels(model, att.prefill).inc()
                if not stream:
                    answer = await self._post(d, endpoint, body, att, prefill_task)
                    await self.router.prefill_done(rid)
                    if attempt == 0:
                        state.cached_tokens = att.cached_tokens
                    for ch in answer.get("choices") or ():
                        if isinstance(ch, dict):
                            state.generated.extend(ch.get("token_ids") or ())
                    yield Delta("", [], None, answer)
                    return
                first = True
                done = False
                upstream = self._stream(d, body, att, endpoint)
                if prefill_task is not None:
                    upstream = self._watch_prefill(upstream, prefill_task)
                async for delta in upstream:
                    if first:
                        first = False
                        await self.router.prefill_done(rid)
                    if rebuilt and delta.chunk is not None:
                        delta.chunk = _as_chat_chunk(delta.chunk)
                    state.generated.extend(delta.token_ids)
                    state.sent = state.sent or bool(delta.token_ids or delta.text)
                    yield delta
                    # Read on to the end of the stream: its usage comes after the finish.
                    done = done or delta.finish_reason is not None
                if not done:
                    raise _Broken(f"stream from {worker} ended without a finish reason")
                if attempt == 0:
                    state.cached_tokens = att.cached_tokens
                return
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
                predicted, actual = self._check_hit(att)
                with contextlib.suppress(RouterUnavailable):
                    await self.router.finished(
                        rid, predicted_cached_tokens=predicted, actual_cached_tokens=actual
                    )
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

    async def _post(
        self,
        d: RouteResponse,
        endpoint: str,
        body: dict[str, Any],
        att: _Attempt,
        prefill: asyncio.Task[None] | None,
    ) -> dict[str, Any]:
        """A non-streamed request to worker ``d``: its JSON answer."""
        if d.http_endpoint is None:
            raise _Broken(f"worker {d.worker_id} has no HTTP endpoint")
        post = asyncio.ensure_future(self.http.post(d.http_endpoint + endpoint, json=body))
        try:
            if prefill is not None:
                await asyncio.wait({post, prefill}, return_when=asyncio.FIRST_COMPLETED)
                if not post.done() and prefill.exception() is not None:
                    exc = prefill.exception()
                    raise (
                        exc
                        if isinstance(exc, _PrefillFailed | UpstreamError)
                        else (_PrefillFailed("?", str(exc)))
                    )
            r = await post
        finally:
            if not post.done():
                post.cancel()
                with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                    await post
        if r.status_code != 200:
            raise UpstreamError(r.status_code, r.text)
        try:
            answer = r.json()
        except ValueError as exc:
            raise _Broken(f"answer from {d.worker_id} is not JSON: {r.text[:200]!r}") from exc
        if not isinstance(answer, dict):
            raise _Broken(f"answer from {d.worker_id} is not a JSON object")
        if "error" in answer and "choices" not in answer:
            raise UpstreamError(*_error_event(answer["error"]))
        usage = answer.get("usage")
        if isinstance(usage, dict):
            att.cached_tokens = _cached_tokens(usage)
        return answer

    def _body(self, prompt: list[int], max_tokens: int, sampling: dict[str, Any]) -> dict:
        return {
            **sampling,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stream": True,
            "return_token_ids": True,
            # the final chunk then carries usage.prompt_tokens_details.cached_tokens
            "stream_options": {"include_usage": True},
        }

    # ---- the router's prediction against the engine's report ---------------------------
    def _check_hit(self, att: _Attempt) -> tuple[int | None, int | None]:
        """``(predicted, actual)`` cached prompt tokens of an attempt that finished, was
        prefilled by its own worker and got a usage report; ``(None, None)`` otherwise (a
        worker that pulled the prompt from a prefill worker reports those tokens cached)."""
        d = att.route
        if att.cached_tokens is None or att.prefill != "local" or d.block_size <= 0:
            return None, None
        bs = d.block_size
        # An engine computes at least the last prompt token, so it never reuses the block
        # that holds it when the prompt ends on a block boundary.
        reusable = (att.prompt_len - 1) // bs * bs
        predicted = min(sum(d.chosen.prefix_hit_blocks.values()) * bs, reusable)
        actual = att.cached_tokens
        m = self.metrics
        err = actual - predicted
        m.hit_prediction_error.labels(d.worker_id).observe(abs(err))
        m.hit_predicted_tokens.labels(d.worker_id).inc(predicted)
        m.hit_actual_tokens.labels(d.worker_id).inc(actual)
        if abs(err) >= bs:
            m.hit_mispredictions.labels(d.worker_id, "over" if err < 0 else "under").inc()
        return predicted, actual

    # ---- prefill/decode pairing -------------------------------------------------------
    def _pays(self, prompt: list[int], d: RouteResponse) -> bool:
        cached = d.chosen.prefix_hit_blocks.get(MEDIUM_GPU, 0) * d.block_size
        return len(prompt) - cached >= self.cfg.min_remote_prefill_tokens

    async def _disaggregate(
        self,
        rid: str,
        prompt: list[int],
        d: RouteResponse,
        body: dict[str, Any],
        attempt: int,
        prefill_exclude: list[str],
        pd_body: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], asyncio.Task[None] | None] | None:
        """Pair decode worker ``d`` with a prefill worker when its engine requires it or a
        remote prefill pays: the decode worker's body and, for a concurrent handshake, the
        prefill request under way. ``None``: ``d`` prefills the prompt itself. ``pd_body``
        is the request as a completion of its token ids (what a prefill worker gets; a chat
        request's decode worker gets the chat body, ``body``)."""
        pd = body if pd_body is None else pd_body
        if d.worker_role != "decode":
            return None  # only a decode worker can take a prompt prefilled elsewhere
        hs = handshake_for(d.engine)
        required = hs.decode_needs_prefill
        if not required:
            if not (attempt == 0 and self.cfg.disaggregation and self._pays(prompt, d)):
                return None
            if hs.why_not(pd) is not None:
                return None
        prid = rid + ":prefill"
        p = await self._pick_prefill(prid, prompt, d, hs, prefill_exclude, required)
        if p is None:
            return None
        if hs.concurrent:
            try:
                pbody = hs.prefill_request(pd, p)
                dbody = hs.decode_request(body, pbody, None)
            except BaseException:
                await self.router.finished(prid)
                raise
            log.debug("request %s: prefill %s + decode %s", rid, p.worker_id, d.worker_id)
            return dbody, asyncio.create_task(self._prefill_alongside(prid, p, pbody))
        try:
            if (
                not required
                and p.chosen.predicted_prefill_tokens > self.cfg.max_prefill_queue_tokens
            ):
                return None  # the prefill pool is backed up: computing locally is faster
            pbody = hs.prefill_request(pd, p)
            answer = await self._prefill_first(p, pbody)
            if answer is None:
                if required:
                    raise NoWorkerAvailable(f"prefill worker {p.worker_id} failed")
                return None
            try:
                return hs.decode_request(body, pbody, answer), None
            except DisaggError as exc:
                self.metrics.disagg_errors.labels(self.cfg.model_name, p.engine, "bad_answer").inc()
                log.warning("request %s: prefill worker %s: %s", rid, p.worker_id, exc)
                raise DisaggError(
                    f"prefill worker {p.worker_id} answered without a usable handshake: {exc}"
                ) from exc
        finally:
            await self.router.finished(prid)

    async def _pick_prefill(
        self,
        prid: str,
        prompt: list[int],
        d: RouteResponse,
        hs: Handshake,
        prefill_exclude: list[str],
        required: bool,
    ) -> RouteResponse | None:
        """A prefill worker the handshake accepts, routed under ``prid``; ``None`` when there
        is none and the decode worker may prefill by itself."""
        exclude = [d.worker_id, *prefill_exclude]
        why = "the router offered none"
        for _ in range(_ENGINE_PICKS):
            try:
                cand = await self.router.route(
                    prid, prompt, role="prefill", exclude_workers=exclude
                )
            except NoWorkerAvailable as exc:
                why = str(exc)
                break
            except RouterUnavailable:
                if required:
                    raise
                return None  # the decode worker was routed already: let it prefill
            why = hs.why_not_prefill_worker(cand) or ""
            if not why:
                return cand
            await self.router.finished(prid)
            exclude.append(cand.worker_id)
        if required:
            raise NoWorkerAvailable(
                f"{d.engine} decode worker {d.worker_id} cannot prefill by itself and no "
                f"{d.engine} prefill worker fits: {why}"
            )
        return None

    async def _prefill_first(
        self, p: RouteResponse, body: dict[str, Any]
    ) -> Mapping[str, Any] | None:
        """A sequential handshake's prefill request: P's JSON answer, or ``None`` when P
        cannot be reached or refuses (the decode worker then prefills by itself)."""
        model = self.cfg.model_name
        try:
            r = await self.http.post(p.http_endpoint + "/v1/completions", json=body)  # type: ignore[operator]
        except httpx.TransportError as exc:
            self.metrics.disagg_errors.labels(model, p.engine, "prefill_unreachable").inc()
            await self.router.worker_failed(p.worker_id, f"prefill: {exc}")
            return None
        if r.status_code != 200:
            self.metrics.disagg_errors.labels(model, p.engine, "prefill_status").inc()
            log.warning("prefill on %s failed (%d): prefilling locally", p.worker_id, r.status_code)
            return None
        try:
            answer = r.json()
        except ValueError as exc:
            raise DisaggError(f"answer is not JSON: {r.text[:200]!r}") from exc
        if not isinstance(answer, Mapping):
            raise DisaggError(f"answer is not a JSON object: {r.text[:200]!r}")
        return answer

    async def _prefill_alongside(self, prid: str, p: RouteResponse, body: dict[str, Any]) -> None:
        """A concurrent handshake's prefill request, drained while the decode worker
        streams."""
        model = self.cfg.model_name
        try:
            r = await self.http.post(p.http_endpoint + "/v1/completions", json=body)  # type: ignore[operator]
            if 400 <= r.status_code < 500:
                raise UpstreamError(r.status_code, r.text)  # the request's own fault
            if r.status_code != 200:
                self.metrics.disagg_errors.labels(model, p.engine, "prefill_status").inc()
                raise _PrefillFailed(p.worker_id, f"status {r.status_code}: {r.text[:200]}")
        except httpx.TransportError as exc:
            self.metrics.disagg_errors.labels(model, p.engine, "prefill_unreachable").inc()
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
                    if isinstance(exc, _PrefillFailed | UpstreamError):
                        raise exc
                    raise _PrefillFailed("?", str(exc))
                try:
                    delta = await nxt
                except StopAsyncIteration:
                    return
                yield delta
        finally:
            with contextlib.suppress(Exception):
                await it.aclose()  # type: ignore[attr-defined]

    async def _stream(
        self,
        d: RouteResponse,
        body: dict[str, Any],
        att: _Attempt,
        endpoint: str = "/v1/completions",
    ) -> AsyncIterator[Delta]:
        """The worker's stream, a :class:`Delta` per choice of each chunk (the chunk itself
        on the first; a usage chunk without choices as a Delta of its own)."""
        if d.http_endpoint is None:
            raise _Broken(f"worker {d.worker_id} has no HTTP endpoint")
        url = d.http_endpoint + endpoint
        async with self.http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                raise UpstreamError(r.status_code, text)
            finished = False
            try:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError as exc:
                        raise _Broken(
                            f"malformed chunk from {d.worker_id}: {data[:200]!r}"
                        ) from exc
                    err = chunk.get("error")
                    if err is not None:
                        # The worker is alive and refused this request mid-stream.
                        raise UpstreamError(*_error_event(err))
                    usage = chunk.get("usage")
                    if isinstance(usage, dict):
                        att.cached_tokens = _cached_tokens(usage)
                    choices = chunk.get("choices") or ()
                    if not choices:
                        yield Delta("", [], None, chunk)
                    for i, ch in enumerate(choices):
                        piece: Any = ch.get("text")
                        if piece is None:  # a chat chunk
                            piece = (ch.get("delta") or {}).get("content")
                        delta = Delta(
                            piece if isinstance(piece, str) else "",
                            ch.get("token_ids") or [],
                            ch.get("finish_reason"),
                            chunk if i == 0 else None,
                        )
                        finished = finished or delta.finish_reason is not None
                        yield delta
            except httpx.TransportError:
                if finished:
                    return  # the answer was complete; only its usage was lost
                raise


def _echo_as_text(body: Mapping[str, Any]) -> bool:
    return bool(body.get("echo")) and not body.get("return_token_ids")


def _as_chat_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
    """A completion chunk of a migrated chat request as the chat chunk the client expects
    (content and finish reason; logprobs in the chat shape)."""
    if not chunk.get("choices"):
        return {**chunk, "object": "chat.completion.chunk"}
    choices = []
    for ch in chunk["choices"]:
        out: dict[str, Any] = {
            "index": ch.get("index", 0),
            "delta": {"content": ch.get("text") or ""},
            "finish_reason": ch.get("finish_reason"),
            "token_ids": ch.get("token_ids"),
        }
        lp = ch.get("logprobs")
        if isinstance(lp, dict) and lp.get("tokens"):
            content = []
            tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
            vals = lp.get("token_logprobs") or ()
            for tok, val, top in zip(lp["tokens"], vals, tops, strict=False):
                content.append(
                    {
                        "token": tok,
                        "logprob": val,
                        "bytes": list(tok.encode()),
                        "top_logprobs": [
                            {"token": t, "logprob": v, "bytes": list(t.encode())}
                            for t, v in (top or {}).items()
                        ],
                    }
                )
            out["logprobs"] = {"content": content}
        choices.append(out)
    return {**chunk, "object": "chat.completion.chunk", "choices": choices}


def _error_event(err: object) -> tuple[int, str]:
    """Status and message of an error event in a stream (vLLM's and SGLang's shape:
    ``{"error": {"message", "type", "param", "code"}}``, ``code`` the HTTP status)."""
    if not isinstance(err, dict):
        return 500, str(err)
    code = err.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return status, json.dumps(err)


def _cached_tokens(usage: dict[str, Any]) -> int | None:
    details = usage.get("prompt_tokens_details")
    n = details.get("cached_tokens") if isinstance(details, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None
