"""``routing_backend: dynamo_core``: Dynamo's SelectionService choosing the worker, our router
keeping the registry (``dynamo_ext.frontend.dynamo_core.DynamoCoreRouter``).

Config refusals (fast); the router class over a real router process and the mocker fleet's
real KV streams (fast, no engine); and one real 2-worker vLLM fleet behind the frontend with
the backend on, judged by the engines' own prefix-cache counters (engine).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from dynamo_ext.config import build
from dynamo_ext.errors import ApiError, ConfigError, NoWorkerAvailable
from dynamo_ext.frontend import dynamo_core
from dynamo_ext.frontend.auth import current_salt, salt_of
from dynamo_ext.benchmarks.serve_ab import engine_counters
from dynamo_ext.frontend.config import FrontendConfig
from dynamo_ext.frontend.dynamo_core import DynamoCoreRouter, dynamo_available
from dynamo_ext.testing import RouterProc, wait_for

needs_dynamo = pytest.mark.skipif(not dynamo_available(), reason="needs ai-dynamo-runtime")


# ---------------------------------------------------------------- config (no sockets)
def _cfg(**kw: object) -> FrontendConfig:
    return build(FrontendConfig, {"model": "m", **kw})  # as the CLI loads it


def test_router_is_the_default_backend() -> None:
    assert _cfg().routing_backend == "router"


@needs_dynamo
def test_dynamo_core_is_refused_where_it_cannot_route() -> None:
    ok = _cfg(routing_backend="dynamo_core", disaggregation=False)
    assert ok.routing_backend == "dynamo_core"
    with pytest.raises(ConfigError, match="disaggregation") as e:
        _cfg(routing_backend="dynamo_core")  # disaggregation is on by default
    assert "'routing_backend'" in str(e.value)
    with pytest.raises(ConfigError, match="CURVE"):
        _cfg(
            routing_backend="dynamo_core",
            disaggregation=False,
            security={"router": {"server_public_key": "x" * 40}},
        )
    with pytest.raises(ConfigError, match="unknown") as e:
        _cfg(routing_backend="dynamo_core", disaggregation=False, dynamo_core_knobs={"nope": 1})
    assert "'dynamo_core_knobs'" in str(e.value)
    with pytest.raises(ConfigError, match="> 0"):
        _cfg(routing_backend="dynamo_core", disaggregation=False, dynamo_core_refresh_s=0)
    # the router backend ignores the dynamo_core fields
    assert _cfg(dynamo_core_knobs={"nope": 1}).routing_backend == "router"


def test_dynamo_core_without_the_runtime_is_a_config_error(monkeypatch) -> None:
    monkeypatch.setattr(dynamo_core, "dynamo_available", lambda: False)
    with pytest.raises(ConfigError, match="ai-dynamo-runtime") as e:
        _cfg(routing_backend="dynamo_core", disaggregation=False)
    assert "'routing_backend'" in str(e.value)


def test_the_flag_reaches_the_config() -> None:
    from dynamo_ext.cli import build_parser

    a = build_parser().parse_args(["frontend", "--routing-backend", "dynamo_core"])
    assert a.routing_backend == "dynamo_core"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["frontend", "--routing-backend", "nope"])


# ---------------------------------------------------------------- mocker fleet (no engine)
@needs_dynamo
def test_dynamo_core_router_over_the_mocker_fleet(tmp_path: Path) -> None:
    """Mirrors the router's fleet, routes a repeated prefix to the worker holding it, frees
    every booking, honours exclusions, drops a worker reported failed and one that left."""
    from dynamo_ext.sim.fleet import MockerFleet
    from dynamo_ext.sim.model import MockerConfig

    bs = 16
    router = RouterProc(tmp_path, {"block_size": bs, "worker_timeout_s": 30.0}).start()

    async def main() -> None:
        cfg = MockerConfig(block_size=bs, num_gpu_blocks=512, speedup=50.0)
        fleet = MockerFleet(2, cfg, router=router.endpoint, keepalive_s=0.5)
        await fleet.start()
        rc = DynamoCoreRouter(router.endpoint, 2.0, model="mocker", refresh_s=0.2)
        rc.connect()
        try:
            await asyncio.wait_for(fleet.registered.wait(), 10)
            await wait_for(lambda: len(rc.mirrored) == 2, 10)
            assert set(rc.mirrored) == {"mocker-0", "mocker-1"}
            assert all(m.reg.block_size == bs for m in rc.mirrored.values())
            prompt = list(range(1000, 1200))  # 12 full blocks
            w1 = fleet.workers["mocker-1"]

            async def run_on_w1(tokens: list[int]) -> None:
                _, q = w1.submit(list(tokens), 2)
                while (await q.get())[1] is None:
                    pass

            async def learned(tokens: list[int], n: int) -> bool:
                return (await rc.core.overlap_blocks(tokens)).get(
                    rc.mirrored["mocker-1"].core_id, 0
                ) == n

            # upsert_worker returns before the core's SUB has joined the worker's PUB, and
            # a batch published in between is lost to it: probe prompts until one is
            # learned, so the subscription is known to be live before the real one runs.
            for i in range(40):
                probe = list(range(20000 + 100 * i, 20000 + 100 * i + 32))  # 2 blocks
                await run_on_w1(probe)
                for _ in range(10):
                    if await learned(probe, 2):
                        break
                    await asyncio.sleep(0.05)
                else:
                    continue
                break
            await run_on_w1(prompt)
            for _ in range(200):
                if await learned(prompt, 12):
                    break
                await asyncio.sleep(0.05)
            assert await learned(prompt, 12)
            d = await rc.route("r1", prompt + [7] * 40)
            assert d.worker_id == "mocker-1" and d.http_endpoint == f"{fleet.http_base}/mocker-1"
            assert d.chosen.prefix_hit_blocks["GPU"] == 12 and d.block_size == bs
            assert d.num_blocks == len(prompt + [7] * 40) // bs
            loads = rc.core.loads()
            assert loads[rc.mirrored["mocker-1"].core_id]["active_requests"] == 1
            assert await rc.prefill_done("r1")
            assert await rc.finished("r1")
            assert not await rc.finished("r1")  # freed once
            assert rc.open == {}
            assert all(v["active_requests"] == 0 for v in rc.core.loads().values())
            # exclusion: the holder excluded, the other one is chosen
            d = await rc.route("r2", prompt, exclude_workers=["mocker-1"])
            assert d.worker_id == "mocker-0"
            assert d.chosen.prefix_hit_blocks["GPU"] == 0  # the chosen worker's hit, not the best
            await rc.finished("r2")
            with pytest.raises(NoWorkerAvailable):
                await rc.route("r3", prompt, exclude_workers=["mocker-0", "mocker-1"])
            # a tenant's request: its cache_salt is unknown to the core, so it is refused
            tok = current_salt.set(salt_of("acme"))
            try:
                with pytest.raises(ApiError) as e:
                    await rc.route("t1", prompt)
                assert e.value.status == 501 and e.value.code == "cache_salt_unsupported"
            finally:
                current_salt.reset(tok)
            assert rc.open == {}
            # reported failed: gone from the core at once (the router holds it down)
            await rc.worker_failed("mocker-0", "test")
            assert set(rc.mirrored) == {"mocker-1"}
            assert len(rc.core.workers) == 1
            for i in range(3):
                d = await rc.route(f"f{i}", [5] * 64)
                assert d.worker_id == "mocker-1"
                await rc.finished(f"f{i}")
            # a worker that leaves the router's registry leaves the core (its keep-alive
            # stopped: one left running registers it again within 0.5 s, and a mirror
            # refresh on a slow machine could miss the gap)
            assert await fleet.leave("mocker-1")
            await wait_for(lambda: "mocker-1" not in rc.mirrored, 5)
        finally:
            await rc.close()
            await fleet.stop()

    try:
        asyncio.run(main())
    finally:
        router.stop()


# ---------------------------------------------------------------- real vLLM fleet
def _frontend_metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.split()[-1])
    return total


@pytest.mark.engine
@needs_dynamo
def test_dynamo_core_routes_a_real_vllm_fleet(tiny_model: Path, tmp_path: Path) -> None:
    from dynamo_ext.plugins.vllm.fleet import LocalFleet
    from dynamo_ext.testing.tiny_model import english_like_text

    fleet = LocalFleet(
        tiny_model,
        aggregated=2,
        workdir=tmp_path,
        frontend_args=["--routing-backend", "dynamo_core", "--no-disaggregation"],
    )
    with fleet:
        url = fleet.url
        bases = {w.worker_id: w.server.url for w in fleet.workers}
        # the frontend's mirror holds both workers
        deadline = time.monotonic() + 30
        while _frontend_metric(url, "dynamo_ext_frontend_dynamo_core_workers") < 2:
            assert time.monotonic() < deadline, "the frontend never mirrored both workers"
            time.sleep(0.2)
        doc = english_like_text(700, seed=7)

        def ask(prompt: str) -> dict:
            r = httpx.post(
                url + "/v1/completions",
                json={"model": fleet.served_model_name, "prompt": prompt, "max_tokens": 2},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            return r.json()

        before = {w: engine_counters(b) for w, b in bases.items()}
        first = ask(doc + " first question")
        mid = {w: engine_counters(b) for w, b in bases.items()}
        ran = [w for w in bases if mid[w][0] > before[w][0]]
        assert len(ran) == 1, (before, mid)
        holder = ran[0]
        other = next(w for w in bases if w != holder)
        n_prompt = first["usage"]["prompt_tokens"]
        assert n_prompt >= 600
        time.sleep(1.0)  # the stored blocks reach Dynamo's indexer over the KV stream
        second = ask(doc + " another question entirely")
        after = {w: engine_counters(b) for w, b in bases.items()}
        # the engine's own counter: the repeated prefix hit on its holder, and only there
        hits = after[holder][1] - mid[holder][1]
        assert hits >= (n_prompt // 128) * 128 - 128, (mid, after)
        assert after[other] == mid[other], "the other worker saw the request"
        details = second["usage"].get("prompt_tokens_details") or {}
        assert (details.get("cached_tokens") or 0) >= 512
        # Dynamo predicted that hit: the frontend's prediction check saw it
        assert _frontend_metric(url, "dynamo_ext_frontend_hit_predicted_tokens_total") >= 512
        # every booking freed, every route counted under the backend
        assert _frontend_metric(url, "dynamo_ext_frontend_dynamo_core_open_reservations") == 0
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        assert 'backend="dynamo_core"' in text
        # a worker that goes away leaves Dynamo's core; requests still succeed
        gone = next(w for w in fleet.workers if w.worker_id == holder)
        gone.server.stop()
        deadline = time.monotonic() + 30
        while _frontend_metric(url, "dynamo_ext_frontend_dynamo_core_workers") != 1:
            assert time.monotonic() < deadline, "the stopped worker stayed in Dynamo's core"
            time.sleep(0.3)
        third = ask(doc + " a third one")
        assert third["choices"][0]["text"] is not None
        health = json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())
        assert health["routing_backend"] == "dynamo_core"


def test_a_registration_the_core_refuses_does_not_stop_the_others() -> None:
    """Was: the mirror upserted workers in one loop, so the first registration Dynamo's core
    refused (here a block size it cannot take, from a router that lies or is broken) raised
    out of ``sync`` and no worker after it was ever mirrored. The core is Dynamo's real one;
    the fleet state is handed in (a lying router is what this guards against)."""
    from dynamo_ext.protocol import FleetState, WorkerRegistration, WorkerState

    async def main() -> None:
        rc = DynamoCoreRouter("tcp://127.0.0.1:1", 1.0, model="m", refresh_s=60)

        def reg(wid: str, bs: int) -> WorkerRegistration:
            return WorkerRegistration(
                wid,
                kv_events_endpoint="tcp://127.0.0.1:2",
                http_endpoint="http://127.0.0.1:3",
                block_size=bs,
            )

        states = [
            WorkerState(w, "both", True, "http://127.0.0.1:3", {}, registration=reg(w, bs))
            for w, bs in (("bad", -1), ("good", 16))
        ]

        async def workers() -> FleetState:
            return FleetState(states)

        rc.workers = workers  # type: ignore[method-assign]
        try:
            await rc.sync()
            assert set(rc.mirrored) == {"good"}
            assert rc.sync_errors == 1
        finally:
            rc.core.close()

    asyncio.run(main())
