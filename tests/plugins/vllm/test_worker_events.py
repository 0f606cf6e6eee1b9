"""Stock vLLM workers + our plugin (by flags and env only) + the router, all real processes.

Two aggregated vLLM servers publish vLLM's own KV events and our metrics; the stat logger
plugin registers them with a router process. Covers: plugin discovery, KV events reaching
the router, prefix-aware routing whose predicted hit equals the engine's reported
prefix-cache hit, and metrics that follow the real load.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from dynamo_ext.router.client import RouterClient
from dynamo_ext.testing import RouterProc, free_port, wait_for
from dynamo_ext.testing.tiny_model import english_like_text

from .conftest import BLOCK_SIZE, kv_events_args

pytestmark = pytest.mark.engine


def post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def router(tmp_path_factory) -> Iterator[RouterProc]:
    # Created, not started: the workers come up first and must serve without a router.
    p = RouterProc(
        tmp_path_factory.mktemp("router"),
        {"block_size": BLOCK_SIZE, "worker_timeout_s": 5.0, "log_decisions": True},
    )
    yield p
    p.stop()


@pytest.fixture(scope="module")
def workers(router: RouterProc, start_vllm):
    servers = {}
    for wid in ("w0", "w1"):
        env = {
            "DYNAMO_EXT_WORKER_ROUTER": router.endpoint,
            "DYNAMO_EXT_WORKER_ID": wid,
            "DYNAMO_EXT_WORKER_METRICS_PERIOD": "0.2",
        }
        args = [*kv_events_args(free_port(), free_port()), "--enable-prompt-tokens-details"]
        servers[wid] = start_vllm(args, env, wait=False)
    for s in servers.values():
        s.wait_ready()
    # The router is down: the engine serves anyway.
    s = servers["w0"]
    out = post(s.url + "/v1/completions", {"prompt": "hello there", "max_tokens": 2})
    assert out["usage"]["completion_tokens"] == 2
    # Each registrar has failed at least once (else a slow start could let its first try
    # land after the router comes up, and this would not test an outage).
    for srv in servers.values():
        run(
            wait_for(
                lambda srv=srv: "unreachable; worker keeps serving" in srv.log_path.read_text(),
                timeout=60,
            )
        )
    router.start()  # registration retries and lands; the initial replay fetches history
    return servers


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def fleet(router: RouterProc):
    async with RouterClient(router.endpoint) as c:
        return {w.worker_id: w for w in (await c.workers()).workers}


def test_plugin_discovered_and_workers_registered(router, workers) -> None:
    async def registered():
        f = await fleet(router)
        return (
            set(f) == {"w0", "w1"}
            and all(
                w.up and w.last_metrics is not None and w.last_metrics.kv_total_blocks > 0
                for w in f.values()
            )
            and f
        )

    f = run(wait_for(registered, timeout=30))
    for wid, s in workers.items():
        assert f[wid].http_endpoint == s.url
        assert f[wid].role == "both"
        log = s.log_path.read_text()
        assert "dynamo-ext worker " + wid in log
        # it started while the router was down, kept serving, and registered once it came up
        assert "unreachable; worker keeps serving" in log
        assert f"registered worker {wid} (role both)" in log


def test_kv_events_reach_router_and_prefix_routing_matches_engine_hits(router, workers) -> None:
    text = english_like_text(700, seed=11)

    async def main():
        # Prompt A: its first blocks get cached on whichever worker the router picks.
        base = next(iter(workers.values()))
        toks = post(base.url + "/tokenize", {"prompt": text})["tokens"]
        assert len(toks) >= 4 * BLOCK_SIZE
        async with RouterClient(router.endpoint) as c:
            r1 = await c.route("a", toks)
            assert r1.chosen.prefix_hit_blocks == {}
            out = post(
                r1.http_endpoint + "/v1/completions",
                {"model": str(base.model_dir), "prompt": toks, "max_tokens": 2, "temperature": 0},
            )
            assert out["usage"]["prompt_tokens"] == len(toks)
            await c.finished("a")
            full = len(toks) // BLOCK_SIZE

            async def indexed():
                f = await fleet(router)
                return sum(f[r1.worker_id].indexed_blocks.values()) >= full

            await wait_for(indexed, timeout=20)
            # Prompt B shares A's first blocks, then diverges.
            toks_b = toks[: 3 * BLOCK_SIZE + 17] + [5] * 300
            r2 = await c.route("b", toks_b, explain=True)
            assert r2.worker_id == r1.worker_id
            predicted = r2.chosen.prefix_hit_blocks["GPU"]
            assert predicted == 3
            other = next(s for s in r2.candidates if s.worker_id != r1.worker_id)
            assert other.prefix_hit_blocks == {}
            out = post(
                r2.http_endpoint + "/v1/completions",
                {"model": str(base.model_dir), "prompt": toks_b, "max_tokens": 2, "temperature": 0},
            )
            await c.finished("b")
            cached = out["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached == predicted * BLOCK_SIZE  # router's prediction == engine's hit

    run(main())
    log = router.log()
    assert "hashes differ" not in log  # the router reproduced vLLM's block hashes
    assert "route b (aggregated, " in log  # decisions are logged with their breakdown


def test_metrics_follow_real_load(router, workers) -> None:
    w0 = workers["w0"]
    prompts = [english_like_text(150, seed=100 + i) for i in range(6)]
    errors: list[BaseException] = []

    def send(p: str) -> None:
        try:
            post(
                w0.url + "/v1/completions",
                {
                    "model": str(w0.model_dir),
                    "prompt": p,
                    "max_tokens": 300,
                    "ignore_eos": True,
                    "temperature": 0,
                },
            )
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(p,)) for p in prompts]
    seen: list[int] = []

    async def busy():
        m = (await fleet(router))["w0"].last_metrics
        seen.append(m.running + m.waiting)
        return m.running >= 2 and m.kv_used_blocks > 0

    for t in threads:
        t.start()
    try:
        run(wait_for(busy, timeout=60, every=0.05))
    finally:
        for t in threads:
            t.join(180)
    assert not errors

    async def idle():
        m = (await fleet(router))["w0"].last_metrics
        return m.running == 0 and m.waiting == 0 and m.prefix_cache_queries > 0

    run(wait_for(idle, timeout=20))
    assert max(seen) >= 2
    time.sleep(0)
