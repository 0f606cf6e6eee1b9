"""An authenticated fleet, all real processes: one stock vLLM worker with our plugin and the
``dynamo_ext_curve`` KV event publisher (keys from the environment), a router with keys, and
the frontend with API keys for two tenants, talking CURVE to the router.

* the worker registers over CURVE, its KV events and metrics reach the router over CURVE;
* its KV PUB and replay sockets serve the router's key only: a subscriber without a key or
  with another key receives nothing;
* two tenants sending the same long prompt: the second tenant's request is not a prefix hit
  on the worker (vLLM's own prefix-cache counters) and the router predicted no hit for it,
  while the first tenant's repeat is a hit on both.

One worker, shared by the module (a CPU engine takes minutes to start).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
import zmq

from dynamo_ext import security as S
from dynamo_ext.router.client import RouterClient
from dynamo_ext.testing import RouterProc, free_port, wait_for
from dynamo_ext.testing import client_curve as curve
from dynamo_ext.testing.tiny_model import english_like_text

from .conftest import BLOCK_SIZE

pytestmark = pytest.mark.engine
MODEL = "tiny-curve"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))


def post(url: str, body: dict, headers: dict | None = None, timeout: float = 180) -> dict:
    h = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, json.dumps(body).encode(), h)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def counter(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus counter's samples whose labels include ``labels``."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? ([0-9.e+-]+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m[1] or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m[2])
    return total


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    for name in ("router", "w0", "fe", "evil"):
        S.generate_keys(d, name)
    return d


@pytest.fixture(scope="module")
def fleet(keys: Path, start_vllm, tiny_model: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curve-fleet")
    router = RouterProc(
        tmp,
        {
            "block_size": BLOCK_SIZE,
            "worker_timeout_s": 10.0,
            "security": {
                "secret_key_file": str(keys / "router.key"),
                "allow": [
                    {"key": str(keys / "w0.key.pub"), "role": "worker"},
                    {"key": str(keys / "fe.key.pub"), "role": "frontend"},
                ],
            },
        },
    ).start()
    pub, replay = free_port(), free_port()
    kv_cfg = {
        "enable_kv_cache_events": True,
        "publisher": "dynamo_ext_curve",
        "topic": "kv",
        "endpoint": f"tcp://*:{pub}",
        "replay_endpoint": f"tcp://*:{replay}",
    }
    env = {
        "DYNAMO_EXT_WORKER_ROUTER": router.endpoint,
        "DYNAMO_EXT_WORKER_ID": "w0",
        "DYNAMO_EXT_WORKER_METRICS_PERIOD": "0.2",
        S.ENV_SECRET: str(keys / "w0.key"),
        S.ENV_SERVER: str(keys / "router.key.pub"),
    }
    keys_file = tmp / "api-keys.yaml"
    keys_file.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"key": "sk-tenant-a", "tenant": "a"},
                    {"key": "sk-tenant-b", "tenant": "b"},
                ]
            }
        )
    )
    fe_port = free_port()
    fe_cfg = {
        "model": str(tiny_model),
        "served_model_name": MODEL,
        "port": fe_port,
        "router": router.endpoint,
        "disaggregation": False,
        "security": {
            "api_keys_file": str(keys_file),
            "router": {
                "secret_key_file": str(keys / "fe.key"),
                "server_public_key": str(keys / "router.key.pub"),
            },
        },
    }
    (tmp / "fe.yaml").write_text(yaml.safe_dump(fe_cfg))
    fe_log = tmp / "frontend.log"
    fe = subprocess.Popen(
        [sys.executable, "-m", "dynamo_ext.cli", "frontend", "--config", str(tmp / "fe.yaml")],
        stdout=open(fe_log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        worker = start_vllm(
            ["--kv-events-config", json.dumps(kv_cfg), "--served-model-name", MODEL], env
        )
        ns = {
            "router": router,
            "worker": worker,
            "frontend": f"http://127.0.0.1:{fe_port}",
            "pub": f"tcp://127.0.0.1:{pub}",
            "replay": f"tcp://127.0.0.1:{replay}",
            "fe_log": fe_log,
        }
        deadline = time.monotonic() + 240
        while True:
            assert fe.poll() is None, fe_log.read_text()
            try:
                urllib.request.urlopen(ns["frontend"] + "/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "frontend did not start"
                time.sleep(0.5)
        yield ns
    finally:
        fe.terminate()
        fe.wait(15)
        router.stop()


async def fleet_state(router: RouterProc, keys: Path):
    async with RouterClient(router.endpoint, curve=curve(keys, "fe")) as c:
        return {w.worker_id: w for w in (await c.workers()).workers}


def test_worker_registers_and_feeds_the_router_over_curve(fleet, keys) -> None:
    router, worker = fleet["router"], fleet["worker"]

    async def up():
        f = await fleet_state(router, keys)
        w = f.get("w0")
        return w is not None and w.up and w.last_metrics is not None and w

    w = run(wait_for(up, timeout=60))
    assert w.http_endpoint == worker.url
    log = worker.log_path.read_text()
    assert "KV events over CURVE on tcp://*:" in log
    assert "registered worker w0 (role both)" in log
    text = english_like_text(400, seed=3)
    post(worker.url + "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1})

    async def indexed():
        f = await fleet_state(router, keys)
        return f["w0"].indexed_blocks.get("GPU", 0) >= 2 and f["w0"]

    run(wait_for(indexed, timeout=60))
    scraped = router.scrape()
    assert counter(scraped, "dynamo_ext_router_auth_rejected_total") == 0


def test_kv_plane_serves_only_the_routers_key(fleet, keys) -> None:
    worker = fleet["worker"]
    w0_public = S.load_public(str(keys / "w0.key.pub"))
    ctx = zmq.Context()
    socks: dict[str, zmq.Socket] = {}
    try:
        for who in ("router", "evil", None):
            s = ctx.socket(zmq.SUB)
            s.setsockopt(zmq.SUBSCRIBE, b"")
            if who is not None:
                curve(keys, who).client(s, w0_public)
            s.connect(fleet["pub"])
            socks[str(who)] = s
        time.sleep(1.0)
        text = english_like_text(300, seed=5)
        post(worker.url + "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1})
        assert socks["router"].poll(30_000)
        topic, seq, payload = socks["router"].recv_multipart()
        assert topic == b"kv" and len(seq) == 8 and payload
        assert not socks["evil"].poll(500) and not socks["None"].poll(0)
        for who in ("router", "evil", None):
            d = ctx.socket(zmq.DEALER)
            if who is not None:
                curve(keys, who).client(d, w0_public)
            d.connect(fleet["replay"])
            d.send_multipart([b"", (0).to_bytes(8, "big")], zmq.NOBLOCK if who != "router" else 0)
            socks[f"replay-{who}"] = d
        assert socks["replay-router"].poll(10_000)
        assert not socks["replay-evil"].poll(1000) and not socks["replay-None"].poll(0)
    finally:
        for s in socks.values():
            s.close(0)
        ctx.term()


def test_tenants_never_share_prefixes_and_the_router_agrees(fleet, keys) -> None:
    router, worker, fe = fleet["router"], fleet["worker"], fleet["frontend"]
    prompt = english_like_text(900, seed=21)

    def ask(key: str) -> tuple[float, float]:
        """(engine prefix-cache hit tokens, router-predicted GPU hit blocks) of one request."""
        e0 = counter(scrape(worker.url), "vllm:prefix_cache_hits_total")
        r0 = counter(router.scrape(), "dynamo_ext_router_prefix_hit_blocks_total", tier="GPU")
        out = post(
            fe + "/v1/completions",
            {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0},
            {"Authorization": f"Bearer {key}"},
        )
        assert out["usage"]["prompt_tokens"] > 5 * BLOCK_SIZE
        e1 = counter(scrape(worker.url), "vllm:prefix_cache_hits_total")
        r1 = counter(router.scrape(), "dynamo_ext_router_prefix_hit_blocks_total", tier="GPU")
        return e1 - e0, r1 - r0

    async def gpu_blocks() -> int:
        return (await fleet_state(router, keys))["w0"].indexed_blocks.get("GPU", 0)

    before = run(gpu_blocks())
    assert ask("sk-tenant-a") == (0, 0)  # first time: nothing cached for tenant a
    run(wait_for(lambda: _more(gpu_blocks, before + 5), timeout=60))
    engine_hit, router_hit = ask("sk-tenant-a")  # tenant a again: a hit, predicted
    assert engine_hit >= 5 * BLOCK_SIZE and router_hit >= 5
    assert router_hit * BLOCK_SIZE == engine_hit
    assert ask("sk-tenant-b") == (0, 0)  # the same prompt, another tenant: no hit at all
    # the salt reached the worker: tenant b's blocks are new blocks, not tenant a's
    run(wait_for(lambda: _more(gpu_blocks, before + 10), timeout=60))


async def _more(get, n: int) -> bool:
    return await get() >= n
