"""The frontend's SGLang PD flow, through real processes, against STAND-IN SGLang workers.

SGLang cannot serve a model on this CPU-only machine, so both workers are
``tests/plugins/sglang/standin_sglang.py`` processes started by our SGLang launcher (which
registers them with the real router as ``engine="sglang"`` prefill and decode workers). The
stand-ins enforce SGLang's pairing: the decode side contacts the prefill side's bootstrap
server for its ``bootstrap_room``, the prefill side answers only once its decode peer has
checked in; sent one after the other, or with another host/port/room, a request fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from dynamo_ext.testing import RouterProc, free_port

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "plugins" / "sglang"))
from test_launcher import PAGE, start_launcher, stop  # noqa: E402

MODEL = "tiny-sglang"


@pytest.fixture(scope="module")
def pd_fleet(tiny_model: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sglang-pd")
    router = RouterProc(tmp, {"block_size": PAGE}).start()
    boot = free_port()
    prefill, p_port, _ = start_launcher(
        tmp,
        router.endpoint,
        "sgp",
        ["--dynamo-ext-role", "prefill", "--disaggregation-bootstrap-port", str(boot)],
    )
    decode, d_port, _ = start_launcher(tmp, router.endpoint, "sgd", ["--dynamo-ext-role", "decode"])
    fe_port = free_port()
    fe = subprocess.Popen(
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
            str(fe_port),
            "--router",
            router.endpoint,
        ],
        stdout=open(tmp / "frontend.log", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    fleet = {
        "router": router,
        "prefill": prefill,
        "decode": decode,
        "boot": boot,
        "p_url": f"http://127.0.0.1:{p_port}",
        "d_url": f"http://127.0.0.1:{d_port}",
        "url": f"http://127.0.0.1:{fe_port}",
        "tmp": tmp,
    }
    try:
        deadline = time.monotonic() + 240
        while True:
            assert fe.poll() is None, (tmp / "frontend.log").read_text()
            assert time.monotonic() < deadline, "frontend did not start"
            try:
                urllib.request.urlopen(fleet["url"] + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.3)
        deadline = time.monotonic() + 60
        while not all(
            f"registered SGLang worker {w}" in (tmp / f"launcher-{w}.log").read_text()
            for w in ("sgp", "sgd")
        ):
            assert time.monotonic() < deadline, "workers did not register"
            time.sleep(0.2)
        yield fleet
    finally:
        fe.terminate()
        fe.wait(10)
        stop(prefill)
        stop(decode)
        router.stop()


def received(url: str) -> list[dict]:
    return httpx.get(url + "/standin/requests").json()


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    return [(sum(prompt) + i) % 997 for i in range(n)]  # what the decode stand-in generates


def test_stream_pairs_prefill_and_decode(pd_fleet) -> None:
    prompt = list(range(10, 40))
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "stream": True, "temperature": 0}
    text = ""
    with httpx.stream("POST", pd_fleet["url"] + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += "".join(c.get("text") or "" for c in json.loads(line[6:])["choices"])
    assert text == "".join(f"<{t}>" for t in expected_tokens(prompt, 6))

    [p] = [q for q in received(pd_fleet["p_url"]) if q["prompt"] == prompt]
    [d] = [q for q in received(pd_fleet["d_url"]) if q["prompt"] == prompt]
    assert p["bootstrap_room"] == d["bootstrap_room"] and 0 <= p["bootstrap_room"] < 2**63
    for q in (p, d):
        assert (q["bootstrap_host"], q["bootstrap_port"]) == ("127.0.0.1", pd_fleet["boot"])
    assert p["stream"] is False and d["stream"] is True
    assert p["max_tokens"] == d["max_tokens"] == 6
    assert "kv_transfer_params" not in p and "kv_transfer_params" not in d  # not vLLM's flow
    metrics = httpx.get(pd_fleet["url"] + "/metrics").text
    assert 'dynamo_ext_frontend_prefill_total{model="tiny-sglang",where="remote"}' in metrics


def test_non_streaming_and_fresh_rooms(pd_fleet) -> None:
    rooms = set()
    for i in range(3):
        prompt = [5, 6, 7, i]
        r = httpx.post(
            pd_fleet["url"] + "/v1/completions",
            timeout=60,
            json={"model": MODEL, "prompt": prompt, "max_tokens": 3},
        )
        assert r.status_code == 200, r.text
        # not streamed to the worker either: the stand-in's unary answer carries the token
        # ids (and no text), passed through as it is
        assert r.json()["choices"][0]["token_ids"] == expected_tokens(prompt, 3)
        [d] = [q for q in received(pd_fleet["d_url"]) if q["prompt"] == prompt]
        rooms.add(d["bootstrap_room"])
    assert len(rooms) == 3  # one room per request


def test_no_prefill_worker_is_an_error_not_a_hang(pd_fleet) -> None:
    """Runs last: takes the prefill worker away. An SGLang decode worker cannot prefill by
    itself, so the frontend answers 503 instead of sending it an unpaired request."""
    stop(pd_fleet["prefill"])
    t0 = time.monotonic()
    r = httpx.post(
        pd_fleet["url"] + "/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": [1, 2, 3, 4, 5], "max_tokens": 2},
    )
    assert r.status_code == 503, r.text
    assert "prefill" in r.text
    assert time.monotonic() - t0 < 30
    assert not [q for q in received(pd_fleet["d_url"]) if q["prompt"] == [1, 2, 3, 4, 5]]
