"""End to end through real processes: the frontend, the router, and vLLM workers.

Fleet: router; one prefill (kv_producer) and two decode (kv_consumer) vLLM workers with our
connector, all registered with the router by our plugin; the frontend in front. A plain
vLLM server that the router does not know serves as the aggregated reference. The worker
kill test runs last in this module: it takes a decode worker away.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from dynamo_ext.plugins.vllm.fleet import LocalFleet
from dynamo_ext.plugins.vllm.launcher import CPU_FAST_ARGS, CPU_FAST_ENV, VllmServer
from dynamo_ext.router.client import RouterClient
from dynamo_ext.testing import free_port
from dynamo_ext.testing.tiny_model import english_like_text

pytestmark = pytest.mark.engine
MODEL_NAME = "tiny-llama"


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, tmp_path_factory):
    f = LocalFleet(
        tiny_model,
        aggregated=0,
        prefill=1,
        decode=2,
        workdir=tmp_path_factory.mktemp("fleet"),
        served_model_name=MODEL_NAME,
        engine_threads=None,  # each engine its share of the cores
    )
    # the aggregated reference starts alongside the fleet, with its engines' threads
    ref = VllmServer(
        tiny_model,
        free_port(),
        list(CPU_FAST_ARGS),
        {**os.environ, **CPU_FAST_ENV, **f.threads_env()},
        f.workdir / "reference.log",
    )
    ref.start()
    try:
        f.start()
        ref.wait_ready()
        f.reference = ref  # type: ignore[attr-defined]
        yield f
    finally:
        ref.stop()
        f.stop()


def client(fleet: LocalFleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference(fleet: LocalFleet, prompt: str, max_tokens: int) -> dict:
    ref: VllmServer = fleet.reference  # type: ignore[attr-defined]
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    req = urllib.request.Request(
        ref.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["choices"][0]


def metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.split()[-1])
    return total


def test_openai_client_completions_and_chat(fleet) -> None:
    c = client(fleet)
    assert [m.id for m in c.models.list().data] == [MODEL_NAME]
    prompt = english_like_text(80, seed=1)
    unary = c.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert unary.usage.completion_tokens == 12
    streamed = c.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(ch.choices[0].text for ch in streamed) == unary.choices[0].text
    assert unary.choices[0].text == reference(fleet, prompt, 12)["text"]
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": english_like_text(30, seed=2)},
    ]
    chat = c.chat.completions.create(
        model=MODEL_NAME,
        messages=msgs,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 10
    chunks = list(
        c.chat.completions.create(
            model=MODEL_NAME,
            messages=msgs,
            max_tokens=10,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == chat.choices[0].message.content


def test_every_engine_gets_its_share_of_the_cores(fleet) -> None:
    """Three engines and the reference on this machine: each engine process starts with
    OMP_NUM_THREADS of its share (torch's default, a thread per core each, oversubscribes
    the cores: ``engine_threads_env``), the reference with the same, so that it computes
    as they do."""
    want = max(1, len(os.sched_getaffinity(0)) // 3)
    if os.environ.get("OMP_NUM_THREADS"):
        want = int(os.environ["OMP_NUM_THREADS"])
    assert fleet.threads_env() == {"OMP_NUM_THREADS": str(want)}
    for srv in [w.server for w in fleet.workers] + [fleet.reference]:
        assert srv.pid is not None
        assert psutil.Process(srv.pid).environ().get("OMP_NUM_THREADS") == str(want)


def test_disaggregated_equals_aggregated(fleet) -> None:
    c = client(fleet)
    before = metric(fleet.url, "dynamo_ext_frontend_prefill_total", where="remote")
    for seed in (21, 22, 23):
        prompt = english_like_text(500, seed=seed)  # > min_remote_prefill_tokens uncached
        out = c.completions.create(
            model=MODEL_NAME,
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        ref = reference(fleet, prompt, 16)
        assert out.choices[0].token_ids == ref["token_ids"]  # type: ignore[attr-defined]
        assert out.choices[0].text == ref["text"]
    after = metric(fleet.url, "dynamo_ext_frontend_prefill_total", where="remote")
    assert after - before == 3  # every one of them was prefilled remotely
    # the decode workers pulled the prompts instead of computing them
    pulled = sum(
        metric(w.server.url, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
        for w in fleet.workers
        if w.role == "decode"
    )
    assert pulled >= 3 * 384


def test_short_prompt_is_prefilled_locally(fleet) -> None:
    c = client(fleet)
    before = metric(fleet.url, "dynamo_ext_frontend_prefill_total", where="local")
    out = c.completions.create(
        model=MODEL_NAME, prompt="short prompt here", max_tokens=4, temperature=0
    )
    assert out.usage.completion_tokens >= 1
    assert metric(fleet.url, "dynamo_ext_frontend_prefill_total", where="local") == before + 1


@pytest.mark.parametrize(
    "raw, status, needle",
    [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"model": MODEL_NAME}).encode(), 400, "prompt"),
        (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "does not exist"),
        (
            json.dumps({"model": MODEL_NAME, "prompt": "x", "max_tokens": 0}).encode(),
            400,
            "max_tokens",
        ),
        (
            json.dumps({"model": MODEL_NAME, "prompt": "x", "max_tokens": -3}).encode(),
            400,
            "max_tokens",
        ),
        (
            json.dumps(
                {"model": MODEL_NAME, "prompt": english_like_text(2500, seed=5), "max_tokens": 8}
            ).encode(),
            400,
            "maximum context length",
        ),
        (json.dumps({"model": MODEL_NAME, "messages": []}).encode(), 400, "messages"),
    ],
)
def test_bad_input_gets_a_clear_4xx(fleet, raw: bytes, status: int, needle: str) -> None:
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    req = urllib.request.Request(fleet.url + path, raw, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=30)
    assert exc.value.code == status
    err = json.loads(exc.value.read())["error"]
    assert needle in err["message"] and err["type"]
    # and the server keeps serving
    ok = client(fleet).completions.create(model=MODEL_NAME, prompt="still alive?", max_tokens=2)
    assert ok.choices[0].text is not None


def test_load_from_a_second_process(fleet) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynamo_ext.benchmarks.serve_bench",
            "--url",
            fleet.url,
            "--model",
            MODEL_NAME,
            "--requests",
            "24",
            "--concurrency",
            "8",
            "--max-tokens",
            "12",
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    print(summary)
    assert summary["requests"] == 24 and summary["succeeded"] == 24, summary
    assert summary["lost"] == 0 and summary["duplicated_ids"] == 0
    assert summary["tokens"] == 24 * 12
    assert out.returncode == 0


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    "prompt, needle",
    [
        # longer than the workers' max_model_len (2048), within the model's 4096: refused
        # with a 400 before any stream
        ([(7 * i) % 1900 + 50 for i in range(2100)], "maximum context length"),
        # vLLM checks token ids once the stream has begun: an error event in a 200 stream
        ([5000, 6, 7], "out of vocabulary"),
    ],
    ids=["too-long-for-the-worker", "token-out-of-vocabulary"],
)
def test_a_requests_own_error_is_not_a_worker_failure(
    fleet, prompt: list[int], needle: str, stream: bool
) -> None:
    """The worker answered: the error is the request's. It reaches the client as a 4xx and
    the worker is neither reported failed to the router nor left (no migration)."""
    router_log = fleet.router.log  # type: ignore[union-attr]
    failed_before = router_log().count("reported failed")
    migrations = metric(fleet.url, "dynamo_ext_frontend_migrations_total")
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 4, "stream": stream}
    r = httpx.post(fleet.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    # the frontend knows the workers' max_model_len (their /v1/models) once it has asked:
    # then a too-long prompt is its own 400, before any worker
    assert needle in err["message"], err
    assert err["type"] in ("upstream_error", "invalid_request_error"), err
    # the router marks a worker reported by a gateway down with this reason
    assert router_log().count("reported failed") == failed_before, router_log()[-3000:]
    assert metric(fleet.url, "dynamo_ext_frontend_migrations_total") == migrations
    ok = client(fleet).completions.create(model=MODEL_NAME, prompt="still serving?", max_tokens=2)
    assert ok.usage.completion_tokens >= 1


def test_router_prediction_matches_the_workers_cache(fleet) -> None:
    """The frontend checks the router's predicted prefix hit against the cached_tokens the
    worker reports: a repeated prompt is predicted as the worker reused it."""
    prompt = [(13 * i + 5) % 1900 + 60 for i in range(200)]  # < min_remote_prefill_tokens
    names = (
        "dynamo_ext_frontend_hit_predicted_tokens_total",
        "dynamo_ext_frontend_hit_actual_tokens_total",
    )
    count = "dynamo_ext_frontend_hit_prediction_error_tokens_count"

    def figures() -> tuple[float, float, float]:
        pred, act = (metric(fleet.url, n) for n in names)
        return pred, act, metric(fleet.url, count)

    def ask() -> dict:
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2, "temperature": 0}
        r = httpx.post(fleet.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    p0, a0, n0 = figures()
    first = ask()
    p1, a1, n1 = figures()
    assert (p1 - p0, a1 - a0, n1 - n0) == (0, 0, 1)  # cold: nothing predicted, nothing reused
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    async def indexed() -> bool:
        async with RouterClient(fleet.router.endpoint) as rc:  # type: ignore[union-attr]
            r = await rc.route("probe", prompt, role="decode", track=False)
            return r.chosen.prefix_hit_blocks.get("GPU", 0) >= 1

    deadline = time.monotonic() + 30
    while not asyncio.run(indexed()):  # the worker's KV event reaches the router
        assert time.monotonic() < deadline, "the router never indexed the prompt"
        time.sleep(0.2)
    second = ask()
    p2, a2, n2 = figures()
    predicted, actual = p2 - p1, a2 - a1
    print(f"repeated prompt: predicted {predicted:.0f} cached tokens, worker reused {actual:.0f}")
    assert n2 - n1 == 1
    assert predicted == 128  # one full block of the 200-token prompt (block size 128)
    assert abs(predicted - actual) <= 128  # within one block
    assert actual == predicted
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == actual


def test_killing_the_decode_worker_mid_stream_migrates(fleet) -> None:
    prompt = english_like_text(300, seed=77)
    # long enough that the stream is still running when the worker dies: with its share of
    # the cores an engine decodes a token of this model in ~5 ms (300 were done before a
    # busy client read its sixth chunk)
    n = 1200
    ref = reference(fleet, prompt, n)
    before = metric(fleet.url, "dynamo_ext_frontend_migrations_total")
    c = client(fleet)
    stream = c.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=n,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    texts: list[str] = []
    killed: list[str] = []

    async def serving_worker() -> str:
        async with RouterClient(fleet.router.endpoint) as rc:  # type: ignore[union-attr]
            st = await rc.workers()
        busy = [w.worker_id for w in st.workers if w.role == "decode" and w.active_requests]
        assert len(busy) == 1, st
        return busy[0]

    for i, ch in enumerate(stream):
        texts.append(ch.choices[0].text)
        if i == 5 and not killed:
            wid = asyncio.run(serving_worker())
            victim = next(w for w in fleet.workers if w.worker_id == wid)
            os.killpg(victim.server.pid, signal.SIGKILL)
            killed.append(wid)
    assert killed
    assert "".join(texts) == ref["text"]  # complete and identical to an undisturbed run
    assert metric(fleet.url, "dynamo_ext_frontend_migrations_total") == before + 1
    threading.Event().wait(0)
