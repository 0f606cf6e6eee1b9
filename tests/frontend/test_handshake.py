"""The prefill/decode handshake seam and the dispatcher around it, without engines.

The registry (``dynamo_ext.frontend.handshake``) loads each engine's plugin on first use by
name and no engine package at import time; the vLLM handshake checks the prefill worker's
answer. The dispatcher runs against a stub router and stub workers (``httpx.MockTransport``),
so each failure is staged exactly: a bad prefill answer fails its request and is counted, a
worker's own error answer (a status, or an error event inside the stream) goes back to the
client without the worker being reported, a refused connection still migrates, and the hit
check reaches ``RequestFinished``. The same behaviours on real vLLM workers are in
test_frontend.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import httpx
import msgspec
import pytest

from dynamo_ext.errors import DisaggError, NoWorkerAvailable
from dynamo_ext.frontend import handshake
from dynamo_ext.frontend.config import FrontendConfig
from dynamo_ext.frontend.dispatch import Dispatcher, GenRequest, GenState, UpstreamError
from dynamo_ext.frontend.metrics import FrontendMetrics
from dynamo_ext.protocol import RouteResponse, WorkerScore

GOOD_PARAMS = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_engine_id": "e",
    "remote_request_id": "r",
    "remote_block_ids": [[3, 4]],
    "remote_host": "10.0.0.1",
    "remote_port": 5600,
    "tp_size": 1,
    "remote_num_tokens": 300,
}


# --- registry -------------------------------------------------------------------------------


def test_frontend_imports_no_plugin_and_no_engine_until_a_pair_is_made() -> None:
    code = """
import sys
import dynamo_ext.frontend.app, dynamo_ext.frontend.dispatch
from dynamo_ext.frontend.handshake import handshake_for, registered_engines
def loaded(prefixes):
    return sorted(m for m in sys.modules if m.split(".")[0] in prefixes
                  or m.startswith("dynamo_ext.plugins"))
assert loaded({"vllm", "sglang"}) == [], loaded({"vllm", "sglang"})
assert registered_engines() == ["sglang", "vllm"]
assert type(handshake_for("vllm")).__name__ == "VllmHandshake"
assert type(handshake_for("sglang")).__name__ == "SglangHandshake"
assert loaded({"vllm", "sglang"}) == [
    "dynamo_ext.plugins", "dynamo_ext.plugins.sglang", "dynamo_ext.plugins.sglang.disagg",
    "dynamo_ext.plugins.vllm", "dynamo_ext.plugins.vllm.disagg"], loaded({"vllm", "sglang"})
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_registry_unknown_engine_custom_class_and_bad_paths() -> None:
    with pytest.raises(DisaggError, match="no prefill/decode handshake registered for engine"):
        handshake.handshake_for("trt-llm")

    class Mine(handshake.Handshake):
        engine = "mine"

        def prefill_request(self, body, prefill):  # type: ignore[no-untyped-def]
            return dict(body)

        def decode_request(self, body, prefill_body, prefill_answer):  # type: ignore[no-untyped-def]
            return dict(body)

    handshake.register_handshake("mine", Mine)
    try:
        hs = handshake.handshake_for("mine")
        assert isinstance(hs, Mine) and handshake.handshake_for("mine") is hs
        handshake.register_handshake("mine", "no.such.module:Mine")
        with pytest.raises(DisaggError, match="cannot be loaded"):
            handshake.handshake_for("mine")
        with pytest.raises(ValueError, match="module:ClassName"):
            handshake.register_handshake("mine", "no_colon")
        handshake.register_handshake("mine", "json:JSONDecoder")
        with pytest.raises(DisaggError, match="is not a Handshake"):
            handshake.handshake_for("mine")
    finally:
        handshake._registry.pop("mine", None)
        handshake._instances.pop("mine", None)


# --- the vLLM handshake checks P's answer -----------------------------------------------------


@pytest.mark.parametrize(
    "params, needle",
    [
        (None, "no kv_transfer_params"),
        ("yes", "no kv_transfer_params"),
        ({**GOOD_PARAMS, "do_remote_prefill": False}, "do_remote_prefill"),
        ({**GOOD_PARAMS, "do_remote_prefill": "true"}, "do_remote_prefill"),
        ({k: v for k, v in GOOD_PARAMS.items() if k != "remote_engine_id"}, "remote_engine_id"),
        ({**GOOD_PARAMS, "remote_port": "5600"}, "remote_port"),
        ({**GOOD_PARAMS, "remote_port": 70000}, "remote_port"),
        ({**GOOD_PARAMS, "remote_port": True}, "remote_port"),
        ({**GOOD_PARAMS, "remote_host": ""}, "remote_host"),
        ({**GOOD_PARAMS, "remote_block_ids": []}, "remote_block_ids"),
        ({**GOOD_PARAMS, "remote_block_ids": [[]]}, "remote_block_ids"),
        ({**GOOD_PARAMS, "remote_block_ids": [[1, "2"]]}, "remote_block_ids"),
        ({**GOOD_PARAMS, "remote_block_ids": [[1, -2]]}, "remote_block_ids"),
        ({**GOOD_PARAMS, "tp_size": 0}, "tp_size"),
    ],
)
def test_vllm_handshake_refuses_a_bad_prefill_answer(params: Any, needle: str) -> None:
    hs = handshake.handshake_for("vllm")
    body = {"prompt": [1, 2, 3], "max_tokens": 5, "stream": True}
    answer = {"choices": []} if params is None else {"choices": [], "kv_transfer_params": params}
    with pytest.raises(DisaggError, match=needle):
        hs.decode_request(body, hs.prefill_request(body, route("p0", "prefill")), answer)


def test_vllm_handshake_bodies() -> None:
    hs = handshake.handshake_for("vllm")
    body = {
        "prompt": [1, 2, 3],
        "max_tokens": 5,
        "min_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    p = hs.prefill_request(body, route("p0", "prefill"))
    assert p == {
        "prompt": [1, 2, 3],
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": {"do_remote_decode": True},
    }
    flat = {**GOOD_PARAMS, "remote_block_ids": [3, 4]}  # older connectors: one group, flat
    for params in (GOOD_PARAMS, flat):
        d = hs.decode_request(body, p, {"kv_transfer_params": params})
        assert d == {**body, "kv_transfer_params": params}
    assert hs.why_not({"prompt": [1], "n": 2}) is not None


def test_sglang_handshake_bodies() -> None:
    hs = handshake.handshake_for("sglang")
    assert hs.concurrent and hs.decode_needs_prefill
    assert "bootstrap" in (hs.why_not_prefill_worker(route("p0", "prefill", "sglang")) or "")
    p0 = route("p0", "prefill", "sglang", bootstrap="10.0.0.2:8998")
    assert hs.why_not_prefill_worker(p0) is None
    assert "runs vllm" in (hs.why_not_prefill_worker(route("p1", "prefill")) or "")
    body = {"prompt": [1, 2], "max_tokens": 4, "stream": True, "stream_options": {"x": 1}}
    p = hs.prefill_request(body, p0)
    d = hs.decode_request(body, p, None)
    assert p["stream"] is False and "stream_options" not in p and d["stream"] is True
    for k, v in (("bootstrap_host", "10.0.0.2"), ("bootstrap_port", 8998)):
        assert p[k] == d[k] == v
    assert p["bootstrap_room"] == d["bootstrap_room"] and 0 <= d["bootstrap_room"] < 2**63
    assert "bootstrap_room" not in body


# --- the dispatcher, against a stub router and stub workers ---------------------------------


def route(
    wid: str,
    role: str,
    engine: str = "vllm",
    hit_blocks: int = 0,
    bootstrap: str | None = None,
) -> RouteResponse:
    score = WorkerScore(wid, {"GPU": hit_blocks} if hit_blocks else {}, 0, 0, 0, 0, 0, 0, 0, 0)
    return RouteResponse(
        request_id="",
        worker_id=wid,
        http_endpoint=f"http://{wid}",
        nixl_endpoint=None,
        num_blocks=3,
        chosen=score,
        worker_role=role,  # type: ignore[arg-type]
        block_size=128,
        engine=engine,  # type: ignore[arg-type]
        bootstrap_endpoint=bootstrap,
    )


class StubRouter:
    def __init__(self, *workers: RouteResponse) -> None:
        self.workers = list(workers)
        self.done: list[tuple[str, dict[str, Any]]] = []
        self.failed: list[str] = []

    async def route(self, rid, prompt, *, role="aggregated", exclude_workers=()):  # type: ignore[no-untyped-def]
        want = {"prefill": ("prefill",), "decode": ("decode", "both")}.get(role, ("both",))
        for w in self.workers:
            if w.worker_role in want and w.worker_id not in exclude_workers:
                return msgspec.structs.replace(w, request_id=rid)
        raise NoWorkerAvailable(f"no {role} worker")

    async def finished(self, rid: str, **kw: Any) -> bool:
        self.done.append((rid, kw))
        return True

    async def prefill_done(self, rid: str) -> bool:
        return True

    async def worker_failed(self, wid: str, reason: str = "") -> bool:
        self.failed.append(wid)
        return True


def sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + (
        b"data: [DONE]\n\n"
    )


def tokens(n: int, cached: int | None = None) -> bytes:
    chunks: list[dict[str, Any]] = [
        {"choices": [{"text": f"<{i}>", "token_ids": [i], "finish_reason": None}]}
        for i in range(n - 1)
    ]
    chunks.append({"choices": [{"text": "<end>", "token_ids": [99], "finish_reason": "length"}]})
    if cached is not None:
        chunks.append(
            {"choices": [], "usage": {"prompt_tokens_details": {"cached_tokens": cached}}}
        )
    return sse(*chunks)


class Workers:
    """Stub workers by host name: each a function of the request body."""

    def __init__(self, **handlers: Any) -> None:
        self.handlers = handlers
        self.bodies: dict[str, list[dict[str, Any]]] = {h: [] for h in handlers}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        body = json.loads(request.content)
        self.bodies[host].append(body)
        return self.handlers[host](body)


def dispatcher(router: StubRouter, workers: Workers) -> Dispatcher:
    cfg = FrontendConfig(model="m", min_remote_prefill_tokens=256, migration_limit=3)
    d = Dispatcher(cfg, router, FrontendMetrics())  # type: ignore[arg-type]
    d.http = httpx.AsyncClient(transport=httpx.MockTransport(workers))
    return d


def serve(d: Dispatcher, prompt_len: int, max_tokens: int = 3) -> tuple[GenState, list[str]]:
    state = GenState()

    async def main() -> list[str]:
        try:
            req = GenRequest("req", list(range(10, 10 + prompt_len)), max_tokens)
            # (a usage chunk is a delta without tokens)
            return [x.text async for x in d.generate(req, state) if x.token_ids]
        finally:
            await d.close()

    return state, asyncio.run(main())


def sample(d: Dispatcher, name: str, **labels: str) -> float:
    value = d.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def test_bad_prefill_answer_fails_the_request_and_is_counted() -> None:
    r = StubRouter(route("d0", "decode"), route("p0", "prefill"))
    bad = {**GOOD_PARAMS, "remote_host": None}
    w = Workers(
        p0=lambda b: httpx.Response(200, json={"choices": [], "kv_transfer_params": bad}),
        d0=lambda b: httpx.Response(200, content=tokens(3)),
    )
    d = dispatcher(r, w)
    with pytest.raises(DisaggError, match="prefill worker p0 answered without a usable"):
        serve(d, 300)
    assert w.bodies["d0"] == []  # the decode worker never got a half handshake
    assert (
        sample(
            d,
            "dynamo_ext_frontend_disagg_errors_total",
            model="m",
            engine="vllm",
            reason="bad_answer",
        )
        == 1
    )
    assert [rid for rid, _ in r.done] == ["req#0:prefill", "req#0"] and r.failed == []


def test_good_prefill_answer_reaches_the_decode_worker() -> None:
    r = StubRouter(route("d0", "decode"), route("p0", "prefill"))
    w = Workers(
        p0=lambda b: httpx.Response(200, json={"choices": [], "kv_transfer_params": GOOD_PARAMS}),
        d0=lambda b: httpx.Response(200, content=tokens(3, cached=300)),
    )
    state, texts = serve(dispatcher(r, w), 300)
    assert texts == ["<0>", "<1>", "<end>"] and state.prefill == "remote"
    [p], [dd] = w.bodies["p0"], w.bodies["d0"]
    assert p["max_tokens"] == 1 and p["stream"] is False and "stream_options" not in p
    assert dd["kv_transfer_params"] == GOOD_PARAMS and dd["stream"] is True
    # D reports the pulled prompt as cached: no hit check for a remote prefill
    assert r.done[-1] == (
        "req#0",
        {"predicted_cached_tokens": None, "actual_cached_tokens": None},
    )


def test_unreachable_prefill_worker_leaves_the_prompt_to_the_decode_worker() -> None:
    def refuse(b: dict[str, Any]) -> httpx.Response:
        raise httpx.ConnectError("refused")

    r = StubRouter(route("d0", "decode"), route("p0", "prefill"))
    w = Workers(p0=refuse, d0=lambda b: httpx.Response(200, content=tokens(2)))
    d = dispatcher(r, w)
    state, texts = serve(d, 300, max_tokens=2)
    assert texts == ["<0>", "<end>"] and state.prefill == "local" and r.failed == ["p0"]
    assert "kv_transfer_params" not in w.bodies["d0"][0]
    assert (
        sample(
            d,
            "dynamo_ext_frontend_disagg_errors_total",
            model="m",
            engine="vllm",
            reason="prefill_unreachable",
        )
        == 1
    )


@pytest.mark.parametrize(
    "answer",
    [
        # vLLM checks token ids only once the stream has begun: an error event, status 200
        lambda b: httpx.Response(
            200,
            content=sse({"error": {"message": "Token id 5000 is out of vocabulary", "code": 400}}),
        ),
        lambda b: httpx.Response(400, json={"error": {"message": "too long", "code": 400}}),
    ],
    ids=["error-event", "status"],
)
def test_a_requests_own_error_is_the_clients_not_the_workers(answer: Any) -> None:
    r = StubRouter(route("d0", "decode"), route("d1", "decode"))
    w = Workers(d0=answer, d1=answer)
    d = dispatcher(r, w)
    with pytest.raises(UpstreamError) as ei:
        serve(d, 10)
    assert ei.value.status == 400
    assert r.failed == [] and len(w.bodies["d0"]) == 1 and w.bodies["d1"] == []
    assert sample(d, "dynamo_ext_frontend_migrations_total", model="m", reason="stream") == 0


def test_refused_connection_still_migrates() -> None:
    def refuse(b: dict[str, Any]) -> httpx.Response:
        raise httpx.ConnectError("refused")

    r = StubRouter(route("d0", "decode"), route("d1", "decode"))
    w = Workers(d0=refuse, d1=lambda b: httpx.Response(200, content=tokens(2)))
    state, texts = serve(dispatcher(r, w), 10, max_tokens=2)
    assert texts == ["<0>", "<end>"] and r.failed == ["d0"] and state.migrations == 1


def test_hit_check_reaches_metrics_and_the_router() -> None:
    r = StubRouter(route("d0", "decode", hit_blocks=2))
    w = Workers(d0=lambda b: httpx.Response(200, content=tokens(2, cached=128)))
    d = dispatcher(r, w)
    state, _ = serve(d, 300, max_tokens=2)  # 2 cached blocks: 44 uncached, prefilled locally
    assert state.cached_tokens == 128 and state.prefill == "local"
    assert w.bodies["d0"][0]["stream_options"] == {"include_usage": True}
    assert r.done == [("req#0", {"predicted_cached_tokens": 256, "actual_cached_tokens": 128})]
    assert sample(d, "dynamo_ext_frontend_hit_prediction_error_tokens_sum", worker="d0") == 128
    assert sample(d, "dynamo_ext_frontend_hit_prediction_error_tokens_count", worker="d0") == 1
    assert (
        sample(d, "dynamo_ext_frontend_hit_mispredictions_total", worker="d0", direction="over")
        == 1
    )
    # a prompt that ends on a block boundary: the engine recomputes its last block
    r2 = StubRouter(route("d0", "decode", hit_blocks=2))
    w2 = Workers(d0=lambda b: httpx.Response(200, content=tokens(2, cached=128)))
    serve(dispatcher(r2, w2), 256, max_tokens=2)
    assert r2.done[0][1] == {"predicted_cached_tokens": 128, "actual_cached_tokens": 128}


def test_sglang_decode_worker_is_always_paired_through_the_registry() -> None:
    r = StubRouter(
        route("d0", "decode", "sglang"),
        route("p-vllm", "prefill"),  # wrong engine: skipped
        route("p0", "prefill", "sglang", bootstrap="127.0.0.1:8998"),
    )
    w = Workers(
        p0=lambda b: httpx.Response(200, json={"choices": []}),
        d0=lambda b: httpx.Response(200, content=tokens(2)),
    )
    state, texts = serve(dispatcher(r, w), 10, max_tokens=2)
    assert texts == ["<0>", "<end>"] and state.prefill == "remote"
    [p], [dd] = w.bodies["p0"], w.bodies["d0"]
    assert p["bootstrap_room"] == dd["bootstrap_room"] and p["stream"] is False
    assert "req#0:prefill" in [rid for rid, _ in r.done]
