"""The OpenAI surface of vLLM's own server, through the frontend, with the ``openai`` client,
against real workers: one prefill and one decode vLLM worker with our connector (a short
prompt is served by the decode worker alone: aggregated; a long one is prefilled remotely:
P/D), the router, the frontend (admission limited to 2 in flight and 1 queued, so the
queue test needs few requests). vLLM's answer straight from a worker is the reference.

In order, one fleet for the whole module: the surface (logprobs, echo, usage, cached
tokens, n, stops, penalties, logit bias, seed, structured outputs, tools, /v1/models,
refused and passed-through fields); disconnects abort on the worker; the deadline; the
queue; /health; then the decode worker is SIGKILLed mid-stream (the stream completes on the
prefill worker with the tokens of an undisturbed run), requests are served by the prefill
worker while no decode worker lives, and P/D resumes when a decode worker is back; last,
a real Prometheus scrapes the fleet and every panel query of the Grafana dashboard
(``examples/grafana/dynamo-ext.json``) must return data.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from dynamo_ext.plugins.vllm import fleet as fleet_mod
from dynamo_ext.plugins.vllm.fleet import LocalFleet
from dynamo_ext.testing.tiny_model import english_like_text

pytestmark = pytest.mark.engine
MODEL = "tiny-llama"
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "examples" / "grafana" / "dynamo-ext.json"
# --enable-log-requests: vLLM logs "Aborted request(s)" when a client hangs up (its
# Prometheus numbers of such a request lag or miss it on this CPU build)
TOOL_ARGS = ["--enable-auto-tool-choice", "--tool-call-parser", "pythonic", "--enable-log-requests"]
FRONTEND_ENV = {
    "DYNAMO_EXT_FRONTEND__MAX_CONCURRENT_REQUESTS": "2",
    "DYNAMO_EXT_FRONTEND__MAX_QUEUED_REQUESTS": "1",
    "DYNAMO_EXT_FRONTEND__QUEUE_TIMEOUT_S": "60",
}


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, tmp_path_factory) -> Iterator[LocalFleet]:
    saved = {k: os.environ.get(k) for k in FRONTEND_ENV}
    os.environ.update(FRONTEND_ENV)  # the frontend process inherits them
    # vLLM answers tool_choice "required" or a named function only with a tool-call parser;
    # pythonic needs no special tokens in the tiny model's vocabulary
    plain_spec = fleet_mod.worker_spec

    def with_tools(*a: Any) -> Any:
        spec = plain_spec(*a)
        spec.extra_args = [*spec.extra_args, *TOOL_ARGS]
        return spec

    fleet_mod.worker_spec = with_tools  # type: ignore[assignment]
    f = LocalFleet(
        tiny_model,
        aggregated=0,
        prefill=1,
        decode=1,
        workdir=tmp_path_factory.mktemp("surface"),
        served_model_name=MODEL,
        engine_threads=None,  # each engine its share of the cores
    )
    try:
        f.start()
        yield f
    finally:
        f.stop()
        fleet_mod.worker_spec = plain_spec  # type: ignore[assignment]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client(f: LocalFleet, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f.url + "/v1", api_key="x", max_retries=0, timeout=300, **kw)


def worker(f: LocalFleet, role: str) -> Any:
    return next(w for w in f.workers if w.role == role and w.server.is_alive())


def direct(f: LocalFleet, role: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's own answer, straight from a worker (the reference)."""
    r = httpx.post(worker(f, role).server.url + path, json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.split()[-1])
    return total


SHORT = english_like_text(40, seed=3)  # < min_remote_prefill_tokens: the decode worker alone
LONG = english_like_text(420, seed=4)  # prefilled on the prefill worker


def test_models_lists_the_workers_max_model_len(fleet) -> None:
    [m] = client(fleet).models.list().data
    assert m.id == MODEL
    assert m.model_extra["max_model_len"] == 2048  # the workers' --max-model-len, not 4096


def test_completion_logprobs_echo_n_and_usage(fleet) -> None:
    c = client(fleet)
    out = c.completions.create(
        model=MODEL, prompt=SHORT, max_tokens=6, temperature=0, logprobs=2, echo=True
    )
    ch = out.choices[0]
    assert ch.text.startswith(SHORT) and len(ch.text) > len(SHORT)
    assert ch.logprobs is not None and len(ch.logprobs.top_logprobs[-1]) == 2
    ref = direct(
        fleet,
        "decode",
        "/v1/completions",
        {"prompt": SHORT, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True},
    )
    assert ch.text == ref["choices"][0]["text"]
    assert ch.logprobs.tokens == ref["choices"][0]["logprobs"]["tokens"]
    two = c.completions.create(model=MODEL, prompt=SHORT, max_tokens=4, n=2, seed=1)
    assert sorted(x.index for x in two.choices) == [0, 1]
    assert two.usage.completion_tokens == 8
    chunks = list(
        c.completions.create(
            model=MODEL,
            prompt=SHORT,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(x.usage is None for x in chunks[:-1])
    plain = list(c.completions.create(model=MODEL, prompt=SHORT, max_tokens=3, stream=True))
    assert all(x.usage is None for x in plain) and plain[-1].choices


def test_cached_tokens_come_from_the_worker(fleet) -> None:
    c = client(fleet)
    prompt = [(11 * i + 7) % 1900 + 60 for i in range(200)]
    c.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    time.sleep(1.0)  # the KV event reaches the router: routed to the same worker
    again = c.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == 128


def test_stops_penalties_logit_bias_seed(fleet) -> None:
    c = client(fleet)
    base = c.completions.create(
        model=MODEL,
        prompt=SHORT,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    text, ids = base.choices[0].text, base.choices[0].token_ids  # type: ignore[attr-defined]
    stop = text[len(text) // 2 :][:3]
    cut = c.completions.create(model=MODEL, prompt=SHORT, max_tokens=12, temperature=0, stop=stop)
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    by_id = c.completions.create(
        model=MODEL,
        prompt=SHORT,
        max_tokens=12,
        temperature=0,
        extra_body={"stop_token_ids": [ids[3]], "return_token_ids": True},
    )
    assert by_id.choices[0].finish_reason == "stop"
    assert len(by_id.choices[0].token_ids) <= 4  # type: ignore[attr-defined]
    biased = c.completions.create(
        model=MODEL,
        prompt=SHORT,
        max_tokens=5,
        temperature=0,
        logit_bias={"42": 100},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert biased.choices[0].token_ids == [42] * 5  # type: ignore[attr-defined]
    sampled = [
        c.completions.create(model=MODEL, prompt=SHORT, max_tokens=8, temperature=1.0, seed=1234)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    pen = c.completions.create(
        model=MODEL,
        prompt=SHORT,
        max_tokens=12,
        temperature=0,
        frequency_penalty=1.5,
        presence_penalty=1.0,
        extra_body={"repetition_penalty": 1.3, "ignore_eos": True},
    )
    assert pen.usage.completion_tokens == 12
    # the engine validates what it knows: its 400 reaches the client
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt=SHORT, max_tokens=2, presence_penalty=9.0)


def test_unknown_fields_pass_through_and_refused_fields_are_named(fleet) -> None:
    c = client(fleet)
    # min_p is not a field the frontend knows: the engine gets it and refuses the value
    with pytest.raises(openai.BadRequestError, match="min_p"):
        c.completions.create(model=MODEL, prompt=SHORT, max_tokens=2, extra_body={"min_p": 7})
    for field, value in (("kv_transfer_params", {"x": 1}), ("prompt_embeds", "AAAA")):
        r = httpx.post(
            fleet.url + "/v1/completions",
            json={"model": MODEL, "prompt": "hi", field: value},
            timeout=30,
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    r = httpx.post(
        fleet.url + "/v1/completions",
        json={"model": MODEL, "prompt": ["one", "two"]},
        timeout=30,
    )
    assert r.status_code == 400 and "batched" in r.text


def test_chat_logprobs_structured_outputs_and_tools(fleet) -> None:
    c = client(fleet)
    msgs = [{"role": "user", "content": english_like_text(20, seed=9)}]
    lp = c.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    choice = c.chat.completions.create(
        model=MODEL,
        messages=msgs,
        max_tokens=10,
        temperature=0,
        extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}},
    )
    assert choice.choices[0].message.content in ("alpha", "beta")
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"],
    }
    js = c.chat.completions.create(
        model=MODEL,
        messages=msgs,
        max_tokens=30,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    assert js.choices[0].message.content.lstrip().startswith("{")
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "weather", "parameters": schema},
        }
    ]
    # a named function: vLLM constrains the output to its parameters and answers a tool call
    # (the random model only pads the JSON with whitespace, so the arguments stay unfinished)
    named = c.chat.completions.create(
        model=MODEL,
        messages=msgs,
        max_tokens=20,
        temperature=0,
        tools=tools,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls = named.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather", named
    assert calls[0].function.arguments.startswith("{")
    for choice_ in ("auto", "required", "none"):  # accepted by the engine (parser configured)
        out = c.chat.completions.create(
            model=MODEL,
            messages=msgs,
            max_tokens=4,
            temperature=0,
            tools=tools,  # type: ignore[arg-type]
            tool_choice=choice_,  # type: ignore[arg-type]
        )
        assert out.choices[0].finish_reason == "length"


def test_pd_chat_and_logprobs_equal_the_workers_own_answer(fleet) -> None:
    c = client(fleet)
    before = metric(fleet.url, "dynamo_ext_frontend_prefill_total", where="remote")
    msgs = [{"role": "user", "content": LONG}]
    chat = c.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    ref = direct(
        fleet,
        "prefill",
        "/v1/chat/completions",
        {"messages": msgs, "max_tokens": 8, "temperature": 0, "ignore_eos": True},
    )
    assert chat.choices[0].message.content == ref["choices"][0]["message"]["content"]
    out = c.completions.create(
        model=MODEL, prompt=LONG + " x", max_tokens=6, temperature=0, logprobs=1
    )
    ref2 = direct(
        fleet,
        "prefill",
        "/v1/completions",
        {"prompt": LONG + " x", "max_tokens": 6, "temperature": 0, "logprobs": 1},
    )
    assert out.choices[0].text == ref2["choices"][0]["text"]
    assert out.choices[0].logprobs.tokens == ref2["choices"][0]["logprobs"]["tokens"]
    assert metric(fleet.url, "dynamo_ext_frontend_prefill_total", where="remote") == before + 2


def _running(f: LocalFleet) -> float:
    return sum(
        metric(w.server.url, "vllm:num_requests_running") for w in f.workers if w.server.is_alive()
    )


def _wait_running(f: LocalFleet, pred: Any, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while True:
        n = _running(f)
        if pred(n):
            return n
        assert time.monotonic() < deadline, f"vllm:num_requests_running stayed {n}"
        time.sleep(0.2)


def _aborted(f: LocalFleet) -> float:
    """Requests the workers aborted, from their logs."""
    logs = [f.workdir / f"{w.worker_id}.log" for w in f.workers]
    return sum(p.read_text(errors="replace").count("Aborted request") for p in logs if p.exists())


def _wait_aborted(f: LocalFleet, want: float, timeout: float = 15) -> float:
    t0 = time.monotonic()
    while _aborted(f) < want:
        assert time.monotonic() - t0 < timeout, f"the worker aborted {_aborted(f)}, not {want}"
        time.sleep(0.2)
    return time.monotonic() - t0


def test_client_disconnect_aborts_on_the_worker(fleet) -> None:
    """The worker aborts the request right after the client hangs up (vLLM logs it), and
    runs nothing after (vllm:num_requests_running back to 0)."""
    body = {"model": MODEL, "prompt": SHORT, "max_tokens": 1900, "ignore_eos": True}
    a0 = _aborted(fleet)
    # streaming: read a few chunks, then hang up
    with httpx.stream(
        "POST", fleet.url + "/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    print(f"stream disconnect: aborted on the worker {_wait_aborted(fleet, a0 + 1):.2f} s later")

    # not streamed: the client gives up after 1.5 s
    with pytest.raises(httpx.TimeoutException):
        httpx.post(fleet.url + "/v1/completions", json=body, timeout=1.5)
    print(f"unary disconnect: aborted on the worker {_wait_aborted(fleet, a0 + 2):.2f} s later")
    _wait_running(fleet, lambda n: n == 0, timeout=15)


def test_deadline_is_504_and_aborts(fleet) -> None:
    body = {"model": MODEL, "prompt": SHORT, "max_tokens": 1900, "ignore_eos": True}
    a0 = _aborted(fleet)
    r = httpx.post(
        fleet.url + "/v1/completions", json=body, headers={"X-Request-Timeout": "1.5"}, timeout=60
    )
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    with httpx.stream(
        "POST",
        fleet.url + "/v1/completions",
        json={**body, "stream": True},
        headers={"X-Request-Timeout": "4"},
        timeout=60,
    ) as s:
        s.read()
        text = s.text
    if s.status_code == 504:  # a loaded machine: not even the first token within 4 s
        assert "deadline_exceeded" in text
    else:  # tokens, then the deadline as the stream's last event
        events = [x for x in text.splitlines() if x.startswith("data: ")]
        assert len(events) >= 2 and "deadline_exceeded" in events[-1], events[-3:]
    _wait_aborted(fleet, a0 + 2)  # both closed on the worker
    _wait_running(fleet, lambda n: n == 0, timeout=15)


def test_bounded_concurrency_queues_then_429(fleet) -> None:
    """2 in flight, 1 queued, the rest refused at once. The refusals are sent only once the
    frontend's gauges show the first three admitted and queued, so the test holds however
    fast the engines decode (requests long enough to outlast the wait)."""
    body = {"model": MODEL, "prompt": SHORT, "max_tokens": 1500, "ignore_eos": True}
    results: list[httpx.Response] = []

    def ask() -> None:
        results.append(httpx.post(fleet.url + "/v1/completions", json=body, timeout=300))

    first = [threading.Thread(target=ask) for _ in range(3)]
    for t in first:
        t.start()
        time.sleep(0.15)
    deadline = time.monotonic() + 30
    while (
        metric(fleet.url, "dynamo_frontend_inflight_requests"),
        metric(fleet.url, "dynamo_ext_frontend_queued_requests"),
    ) != (2, 1):
        assert time.monotonic() < deadline, "the frontend never held 2 in flight and 1 queued"
        assert len(results) == 0, [r.status_code for r in results]  # none may finish yet
        time.sleep(0.05)
    more = [threading.Thread(target=ask) for _ in range(2)]
    for t in more:
        t.start()
    for t in first + more:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 200, 429, 429], codes  # 2 in flight, 1 queued, 2 refused
    refused = [r for r in results if r.status_code == 429]
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert refused[0].json()["error"]["code"] == "queue_full"


def test_health_reflects_router_and_workers(fleet) -> None:
    r = httpx.get(fleet.url + "/health", timeout=10)
    assert r.status_code == 200, r.text
    assert set(r.json()["workers_up"]) == {"prefill-0", "decode-0"}


def test_decode_killed_mid_stream_then_pool_gone_then_back(fleet) -> None:
    """1P:1D. The decode worker is SIGKILLed mid-stream: the stream completes on the prefill
    worker with the tokens of an undisturbed run; while no decode worker lives the prefill
    worker serves (aggregated); a decode worker back, requests are disaggregated again."""
    c = client(fleet)
    n = 200
    kw: dict[str, Any] = {
        "model": MODEL,
        "prompt": LONG,
        "max_tokens": n,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    undisturbed = c.completions.create(**kw).choices[0].text
    chat_kw: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": LONG}],
        "max_tokens": 60,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    chat_undisturbed = c.chat.completions.create(**chat_kw).choices[0].message.content
    mig0 = metric(fleet.url, "dynamo_ext_frontend_migrations_total")
    victim = worker(fleet, "decode")
    chat_stream = c.chat.completions.create(**chat_kw, stream=True)
    chat_first = next(iter(chat_stream))
    texts: list[str] = []
    for i, ch in enumerate(c.completions.create(**kw, stream=True)):
        texts.append(ch.choices[0].text)
        if i == 5:
            os.killpg(victim.server.pid, signal.SIGKILL)
    assert "".join(texts) == undisturbed
    chat_text = (chat_first.choices[0].delta.content or "") + "".join(
        ch.choices[0].delta.content or "" for ch in chat_stream if ch.choices
    )
    assert chat_text == chat_undisturbed
    assert metric(fleet.url, "dynamo_ext_frontend_migrations_total") >= mig0 + 1

    # no decode worker: the prefill worker serves whole requests
    fb0 = metric(fleet.url, "dynamo_ext_frontend_decode_fallbacks_total")
    for stream in (False, True):
        out = c.completions.create(
            model=MODEL, prompt=LONG + " y", max_tokens=4, temperature=0, stream=stream
        )
        if stream:
            assert "".join(ch.choices[0].text for ch in out if ch.choices)
        else:
            assert out.usage.completion_tokens >= 1
    assert metric(fleet.url, "dynamo_ext_frontend_decode_fallbacks_total") >= fb0 + 2

    # a decode worker is back: disaggregated again
    fleet.restart_worker(victim, wait=True)  # the same id and ports, registered anew
    fleet.wait_registered()
    remote = metric(fleet.url, "dynamo_ext_frontend_prefill_total", where="remote")
    out = c.completions.create(
        model=MODEL,
        prompt=LONG + " z",
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage.completion_tokens == 4
    assert metric(fleet.url, "dynamo_ext_frontend_prefill_total", where="remote") == remote + 1


# --- the Grafana dashboard against a real Prometheus ---------------------------------------


def _prometheus() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )


def _render_module() -> Any:
    """examples/grafana/render.py (examples/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render", DASHBOARD.with_name("render.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [
        (p["title"], t["expr"])
        for p in dash["panels"]
        if p.get("type") != "row"
        for t in p.get("targets", ())
    ]


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        out = json.loads(r.read())
    assert out["status"] == "success", out
    return out["data"]["result"]


def test_dashboard_queries_return_data_from_a_real_prometheus(fleet, tmp_path) -> None:
    prom = _prometheus()
    if prom is None:
        pytest.skip("Debian's prometheus is not installed (scripts/install.sh installs it as root)")
    targets = [
        fleet.url.removeprefix("http://"),
        f"127.0.0.1:{fleet.router.metrics_port}",  # type: ignore[union-attr]
        *(w.server.url.removeprefix("http://") for w in fleet.workers if w.server.is_alive()),
    ]
    proc, base = _render_module().start_prometheus(prom, targets, tmp_path)
    try:
        # traffic while Prometheus scrapes: short and long prompts, streamed and not
        c = client(fleet)
        t_end = time.monotonic() + 8
        i = 0
        while time.monotonic() < t_end:
            prompt = f"{i} {LONG if i % 3 == 0 else SHORT}"
            if i % 2:
                list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=4, stream=True))
            else:
                c.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
            i += 1
        time.sleep(3)
        up = _query(base, "up")
        assert len(up) == len(targets) and all(r["value"][1] == "1" for r in up), up
        answers = {expr: _query(base, expr) for _, expr in dashboard_queries()}
        empty = [(t, e) for t, e in dashboard_queries() if not answers[e]]
        assert not empty, f"dashboard queries without data: {empty}"
        # unlabelled answers: plain sums, or the vector(0) of counters never bumped
        zero = [t for t, e in dashboard_queries() if all(not r["metric"] for r in answers[e])]
        print(f"{len(answers)} dashboard queries answered; unlabelled only: {zero}")
        out = os.environ.get("DYNAMO_EXT_DASHBOARD_PNG")
        if out:  # a picture of this run's data
            _render_module().render(base, DASHBOARD, Path(out))
    finally:
        proc.terminate()
        proc.wait(10)


def test_dashboard_names_only_metrics_that_exist() -> None:
    """Without Prometheus: every metric a panel names is one we or vLLM export."""
    import re

    known = set()
    for path in ("router/metrics.py", "dynamo_ext/frontend/metrics.py"):
        src = (ROOT / path).read_text()
        prefix = "dynamo_ext_router_" if "router" in path else ""
        for m in re.finditer(r'(p|q) \+ "([a-z_]+)"', src):
            pre = {
                "p": prefix or "dynamo_frontend_",
                "q": "dynamo_ext_frontend_",
            }[m.group(1)]
            known.add(pre + m.group(2))
    names = {
        n
        for _, expr in dashboard_queries()
        for n in re.findall(r"\b(dynamo_[a-z_]+|vllm:[a-z_]+)", expr)
    }
    base = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in names if n.startswith("dynamo")}
    assert base <= known, base - known
