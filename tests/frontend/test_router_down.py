"""A router that is down never hangs the frontend: 503 with ``Retry-After`` within about a
second, through real processes (``dynamo-ext frontend`` with its default config and
``dynamo-ext router``; no engine: every answer here is a 503).

In order, on one frontend: its router endpoint has nobody listening; then a router starts
there and answers (``no_worker``: the fleet is empty); then that router is killed with SIGKILL
while clients keep sending, and every request after the kill is timed; then a router comes
back on the same endpoint and answers again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from dynamo_ext.testing import RouterProc, free_port

MODEL = "tiny-down"
BUDGET_S = 1.5  # what a client may wait for its 503 while the router is down


@pytest.fixture(scope="module")
def frontend(tiny_model: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router-down")
    router = RouterProc(tmp, {})  # not started: its endpoint has nobody listening yet
    port = free_port()
    log = tmp / "frontend.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynamo_ext.cli",
            "frontend",
            "--model",
            str(tiny_model),
            "--served-model-name",
            MODEL,
            "--port",
            str(port),
            "--router",
            router.endpoint,
        ],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "frontend did not start"
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield {"url": url, "router": router, "tmp": tmp}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        router.stop(signal.SIGKILL)


def ask(url: str, stream: bool = False) -> tuple[httpx.Response, float]:
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 4, "stream": stream}
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    return r, time.monotonic() - t0


def assert_503(r: httpx.Response, code: str) -> None:
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after") == "1"
    assert r.json()["error"]["code"] == code, r.text


def test_router_nobody_runs(frontend) -> None:
    times = []
    for stream in (False, True, False, False):
        r, dt = ask(frontend["url"], stream)
        assert_503(r, "router_unavailable")
        times.append(dt)
    print("time to 503, router never started:", [f"{t:.3f}" for t in times])
    assert max(times) < BUDGET_S, times


def test_router_killed_mid_run_then_back(frontend) -> None:
    router: RouterProc = frontend["router"]
    router.start()
    url = frontend["url"]
    deadline = time.monotonic() + 10
    while True:  # the frontend reconnects within ZMQ's reconnect interval
        r, _ = ask(url)
        if r.json()["error"]["code"] == "no_worker":
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)
    assert_503(r, "no_worker")  # the router answers: it knows no worker

    # clients keep sending while the router is killed
    results: list[tuple[float, float, int, str]] = []  # (sent at, took, status, code)
    stop = threading.Event()

    def client(stream: bool) -> None:
        while not stop.is_set():
            t = time.monotonic()
            r, dt = ask(url, stream)
            results.append((t, dt, r.status_code, r.json()["error"]["code"] if r.text else ""))

    threads = [threading.Thread(target=client, args=(i % 2 == 1,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    router.stop(signal.SIGKILL)
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(30)
    before = [x for x in results if x[0] + x[1] < killed_at]
    after = [x for x in results if x[0] >= killed_at]
    assert before and all(code == "no_worker" for _, _, _, code in before)
    assert len(after) >= 8, after
    assert all(status == 503 for _, _, status, _ in results)
    assert all(code == "router_unavailable" for _, _, _, code in after), after
    worst = max(dt for t, dt, _, _ in results if t + dt >= killed_at)  # in flight or later
    slowest = sorted(((dt, t - killed_at) for t, dt, _, _ in results if t + dt >= killed_at))[-3:]
    print(
        f"router SIGKILLed: {len(after)} requests after the kill, time to 503 "
        f"max {worst:.3f}s, median {sorted(dt for _, dt, _, _ in after)[len(after) // 2]:.3f}s; "
        "slowest (took, sent at - killed at): "
        + ", ".join(f"({dt:.3f}, {at:+.3f})" for dt, at in slowest)
    )
    assert worst < BUDGET_S

    router.start()  # same endpoint
    deadline = time.monotonic() + 10
    while True:
        r, _ = ask(url)
        if r.json()["error"]["code"] == "no_worker":
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)
