"""``routing_backend: embedded``: our router inside the frontend's process
(``dynamo_ext.frontend.embedded.EmbeddedRouter``).

Config (fast); the embedded router over the mocker fleet's real KV and metrics streams,
decision for decision the same as a standalone router process subscribed to the same
streams, hostile control messages on its socket counted (fast, no engine); and a real
2-worker vLLM fleet behind a frontend that embeds it, the engines' own prefix-cache
counters as the judge (engine).
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
import zmq
import zmq.asyncio

from dynamo_ext.config import build
from dynamo_ext.errors import ConfigError, NoWorkerAvailable
from dynamo_ext.frontend.auth import current_salt, salt_of
from dynamo_ext.benchmarks.serve_ab import engine_counters
from dynamo_ext.frontend.config import FrontendConfig
from dynamo_ext.frontend.embedded import EmbeddedRouter, router_config
from dynamo_ext.protocol import PROTOCOL_HEADER
from dynamo_ext.router.client import RouterClient
from dynamo_ext.router.server import INLINE_BLOCKS
from dynamo_ext.testing import RouterProc, client_curve, free_port, wait_for


def _cfg(**kw: object) -> FrontendConfig:
    return build(FrontendConfig, {"model": "m", **kw})


def test_the_embedded_backend_config() -> None:
    cfg = _cfg(routing_backend="embedded", router="tcp://127.0.0.1:5999",
               embedded_router={"block_size": 32, "scorer": {"mode": "kv"}})
    rc = cfg.embedded_router_config()
    assert rc.bind == "tcp://127.0.0.1:5999"  # where the workers register
    assert rc.block_size == 32 and rc.metrics_port is None  # the frontend serves its metrics
    with pytest.raises(ConfigError, match="embedded_router") as e:
        _cfg(routing_backend="embedded", embedded_router={"block_size": "big"})
    assert "block_size" in str(e.value)
    with pytest.raises(ConfigError, match="embedded_router"):
        _cfg(routing_backend="embedded", embedded_router={"no_such_field": 1})
    # the other backends ignore it
    assert _cfg(embedded_router={"no_such_field": 1}).routing_backend == "router"
    from dynamo_ext.cli import build_parser

    assert build_parser().parse_args(
        ["frontend", "--routing-backend", "embedded"]
    ).routing_backend == "embedded"


def test_embedded_router_decides_as_the_standalone_one(tmp_path: Path) -> None:
    """The same fleet's streams into an embedded and a standalone router: the same worker
    and the same predicted hit for every prompt; bookings freed; exclusions, tenants' salts
    and prompts past the inline limit (hashed a chunk per loop turn) as the standalone one;
    garbage on the embedded router's socket counted, routing unharmed."""
    from dynamo_ext.sim.fleet import MockerFleet
    from dynamo_ext.sim.model import MockerConfig

    bs = 16
    rcfg = {"block_size": bs, "worker_timeout_s": 30.0, "resync_interval_s": 0.5}
    standalone = RouterProc(tmp_path, rcfg).start()
    endpoint = f"tcp://127.0.0.1:{free_port()}"

    async def main() -> None:
        emb = EmbeddedRouter(router_config(endpoint, rcfg))
        emb.connect()
        await emb.started()
        fleet = MockerFleet(2, MockerConfig(block_size=bs, num_gpu_blocks=2048, speedup=50.0),
                            router=endpoint, keepalive_s=0.5)
        await fleet.start()
        other = RouterClient(standalone.endpoint, 5.0)
        try:
            await asyncio.wait_for(fleet.registered.wait(), 10)
            st = await emb.workers()
            assert {w.worker_id for w in st.workers} == {"mocker-0", "mocker-1"}
            for w in st.workers:  # the standalone router subscribes to the same streams
                assert w.registration is not None
                await other.register(w.registration)
            prompts = {}
            for i, wid in enumerate(("mocker-0", "mocker-1", "mocker-1")):
                p = list(range(1000 * (i + 1), 1000 * (i + 1) + 40 * bs))
                _, q = fleet.workers[wid].submit(p, 2)
                while (await q.get())[1] is None:
                    pass
                prompts[f"p{i}"] = (p, wid)

            async def same_view() -> bool:
                for p, wid in prompts.values():
                    a = await emb.route("probe", p, track=False)
                    b = await other.route("probe", p, track=False)
                    if (a.worker_id, a.chosen.prefix_hit_blocks) != (
                        wid, {"GPU": 40}
                    ) or (b.worker_id, b.chosen.prefix_hit_blocks) != (wid, {"GPU": 40}):
                        return False
                return True

            deadline = time.monotonic() + 20
            while not await same_view():
                assert time.monotonic() < deadline, "the routers never both indexed the fleet"
                await asyncio.sleep(0.2)
            # decision for decision, tracked (the load each books moves the next choice)
            for k in range(12):
                p, _ = prompts[f"p{k % 3}"]
                q = p[: (10 + k) * bs] + [7] * (k + 1)
                a = await emb.route(f"r{k}", q)
                b = await other.route(f"r{k}", q)
                assert (a.worker_id, a.chosen.prefix_hit_blocks, a.num_blocks) == (
                    b.worker_id, b.chosen.prefix_hit_blocks, b.num_blocks
                ), k
                assert a.http_endpoint == f"{fleet.http_base}/{a.worker_id}"
            assert len(emb.service.sequences) == 12
            for k in range(12):
                assert await emb.prefill_done(f"r{k}")
                assert await emb.finished(f"r{k}")
            assert len(emb.service.sequences) == 0
            # exclusions
            p, holder = prompts["p0"]
            a = await emb.route("x", p, exclude_workers=[holder], track=False)
            assert a.worker_id != holder and a.chosen.prefix_hit_blocks.get("GPU", 0) == 0
            with pytest.raises(NoWorkerAvailable):
                await emb.route("x2", p, exclude_workers=["mocker-0", "mocker-1"], track=False)
            # a tenant's salt: its prompt hashes apart, so nobody holds it
            tok = current_salt.set(salt_of("acme"))
            try:
                a = await emb.route("t", p, track=False)
                assert a.chosen.prefix_hit_blocks.get("GPU", 0) == 0
            finally:
                current_salt.reset(tok)
            # past the inline limit: hashed in chunks, the same answer as the standalone
            long = p + list(range(50_000, 50_000 + (INLINE_BLOCKS + 5) * bs))
            a = await emb.route("long", long, track=False)
            b = await other.route("long", long, track=False)
            assert a.num_blocks == len(long) // bs > INLINE_BLOCKS
            assert (a.worker_id, a.chosen.prefix_hit_blocks) == (holder, {"GPU": 40})
            assert (b.worker_id, b.chosen.prefix_hit_blocks) == (holder, {"GPU": 40})
            # hostile peers on the embedded router's socket: counted, nothing else changes
            before = emb.service.metrics.malformed.labels("control")._value.get()
            ctx = zmq.asyncio.Context.instance()
            bad = ctx.socket(zmq.DEALER)
            bad.setsockopt(zmq.LINGER, 0)
            bad.connect(endpoint)
            for frames in (
                [b"junk"],
                [PROTOCOL_HEADER, b"\x00" * 8, b"\xc1" * 64],
                [PROTOCOL_HEADER, b"\x00" * 8, b"\x91" * 10_000],  # deeply nested
                [PROTOCOL_HEADER, b"\x00" * 8, b"\xdd\xff\xff\xff\xff"],  # a huge array
            ):
                await bad.send_multipart(frames)
            await wait_for(
                lambda: emb.service.metrics.malformed.labels("control")._value.get()
                >= before + 4,
                5,
            )
            bad.close()
            a = await emb.route("after", p, track=False)
            assert (a.worker_id, a.chosen.prefix_hit_blocks) == (holder, {"GPU": 40})
        finally:
            await other.close()
            await fleet.stop()
            await emb.close()

    try:
        asyncio.run(main())
    finally:
        standalone.stop()


def test_a_route_before_start_waits_and_a_closed_one_is_refused() -> None:
    """The first route may come before the server's start ran: it waits for it. A port
    already taken: the start's error, not a hang."""
    async def main() -> None:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        emb = EmbeddedRouter(router_config(endpoint, {"block_size": 16}))
        with pytest.raises(NoWorkerAvailable):  # started by the call, no worker yet
            await emb.route("r", list(range(64)))
        assert emb.reachable
        clash = EmbeddedRouter(router_config(endpoint, {"block_size": 16}))
        with pytest.raises(zmq.ZMQError):
            await clash.started()
        await clash.close()
        await emb.close()

    asyncio.run(main())


# ---------------------------------------------------------------- real vLLM fleet
@pytest.mark.engine
def test_a_frontend_embedding_the_router_serves_a_real_vllm_fleet(
    tiny_model: Path, tmp_path: Path
) -> None:
    from dynamo_ext.plugins.vllm.fleet import LocalFleet
    from dynamo_ext.testing.tiny_model import english_like_text

    fleet = LocalFleet(
        tiny_model, aggregated=2, workdir=tmp_path, embedded_router=True,
        frontend_args=["--no-disaggregation"],
    )
    with fleet:
        assert fleet.router is None  # no router process: the frontend is the router
        url = fleet.url
        bases = {w.worker_id: w.server.url for w in fleet.workers}
        doc = english_like_text(700, seed=11)

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
        time.sleep(1.0)  # the stored blocks reach the embedded router over the KV stream
        second = ask(doc + " another question entirely")
        after = {w: engine_counters(b) for w, b in bases.items()}
        assert after[holder][1] - mid[holder][1] >= (n_prompt // 128) * 128 - 128, (mid, after)
        assert after[other] == mid[other], "the other worker saw the request"
        details = second["usage"].get("prompt_tokens_details") or {}
        assert (details.get("cached_tokens") or 0) >= 512
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        # the embedded router's own counters are on the frontend's /metrics
        assert "dynamo_ext_router_malformed_messages_total" in text
        health = httpx.get(url + "/health", timeout=5).json()
        assert health["routing_backend"] == "embedded" and set(health["workers_up"]) == set(bases)


def test_the_embedded_router_refuses_impostors_over_curve(tmp_path: Path) -> None:
    """With CURVE keys the embedded router's socket is the router's: a worker holding a
    valid key that is not w0's cannot take w0 over, deregister or fail it; a peer without a
    key gets no answer; an impostor's KV stream named in w0's registration is never indexed;
    the frontend's own routes (in process) keep going to the real w0. Refusals are counted
    on the router's registry, which the frontend's /metrics serves."""
    import uuid

    from dynamo_ext import security as S
    from dynamo_ext.errors import RouterUnavailable
    from dynamo_ext.protocol import (
        BlockStored,
        ErrorReply,
        WorkerDeregistration,
        WorkerFailed,
        WorkerRegistration,
    )
    from dynamo_ext.publisher import KvEventPublisher
    from prometheus_client import generate_latest

    bs = 16
    hashes = list(range(1, 7))
    for name in ("router", "w0", "w1"):
        S.generate_keys(tmp_path, name)

    def curve(name: str) -> S.Curve:
        return client_curve(tmp_path, name)

    allow = [{"key": str(tmp_path / f"{w}.key.pub"), "role": "worker"} for w in ("w0", "w1")]
    cfg = router_config(
        f"tcp://127.0.0.1:{free_port()}",
        {
            "block_size": bs,
            "security": {"secret_key_file": str(tmp_path / "router.key"), "allow": allow},
        },
    )
    kv0 = KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", curve=curve("w0"))
    kv1 = KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", curve=curve("w1"))

    def stored() -> BlockStored:
        return BlockStored(hashes, None, [7] * (bs * len(hashes)), bs, None, None, None)

    def reg(wid: str, kv: KvEventPublisher, http: str) -> WorkerRegistration:
        return WorkerRegistration(
            wid,
            http_endpoint=http,
            kv_events_endpoint=kv.endpoint,
            replay_endpoint=kv.replay_endpoint,
            block_size=bs,
            instance_id=uuid.uuid4().hex,
        )

    async def main() -> str:
        emb = EmbeddedRouter(cfg)
        emb.connect()
        await emb.started()
        ep = emb.endpoint_bound
        assert ep is not None
        owner = RouterClient(ep, curve=curve("w0"))
        other = RouterClient(ep, curve=curve("w1"))
        anon = RouterClient(ep, timeout_s=1.0)
        held = lambda: emb.service.index.find_matches(hashes).gpu.get("w0", 0)  # noqa: E731
        try:
            # w0 registers naming the impostor's stream: its blocks never reach the index
            assert (await owner.register(reg("w0", kv1, "http://w0.real:8000"))).ok
            for _ in range(5):
                kv1.publish([stored()])
                await asyncio.sleep(0.1)
            assert held() == 0
            # its own stream now
            assert (await owner.register(reg("w0", kv0, "http://w0.real:8000"))).ok
            kv0.publish([stored()])
            await wait_for(lambda: held() == len(hashes), timeout=20)
            takeover = reg("w0", kv1, "http://evil:8000")
            for msg in (takeover, WorkerDeregistration("w0"), WorkerFailed("w0", "impostor")):
                reply = await other.call(msg)
                assert isinstance(reply, ErrorReply) and reply.code == "forbidden", reply
            with pytest.raises(RouterUnavailable):
                await anon.register(takeover)
            for i in range(10):
                r = await emb.route(f"q{i}", block_hashes=hashes, num_tokens=bs * len(hashes))
                assert r.worker_id == "w0" and r.http_endpoint == "http://w0.real:8000"
                assert r.chosen.prefix_hit_blocks.get("GPU") == len(hashes)
            return generate_latest(emb.service.metrics.registry).decode()
        finally:
            for c in (owner, other, anon):
                await c.close()
            await emb.close()

    try:
        page = asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        kv0.close()
        kv1.close()
    assert 'dynamo_ext_router_auth_rejected_total{reason="not_owner"} 3.0' in page
    assert 'dynamo_ext_router_auth_rejected_total{reason="handshake"}' in page
