"""The SGLang launcher's sidecar over CURVE (keys from ``DYNAMO_EXT_WORKER_CURVE_*``),
against the SGLang stand-in of test_launcher and a router with keys: it registers with its key, its
republished KV events and metrics reach the router, and a subscriber with another key gets
none of them."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import zmq

from dynamo_ext import security as S
from dynamo_ext.router.client import RouterClient
from dynamo_ext.testing import wait_for

from .test_launcher import PAGE, _blocks, _with_metrics, post, start_launcher, stop


def test_sidecar_speaks_curve_to_the_router(router_factory, tmp_path: Path, monkeypatch) -> None:
    for name in ("router", "sg0", "fe", "evil"):
        S.generate_keys(tmp_path, name)
    allow = [
        {"key": str(tmp_path / "sg0.key.pub"), "role": "worker"},
        {"key": str(tmp_path / "fe.key.pub"), "role": "frontend"},
    ]
    router = router_factory(
        block_size=PAGE,
        security={"secret_key_file": str(tmp_path / "router.key"), "allow": allow},
    )
    monkeypatch.setenv(S.ENV_SECRET, str(tmp_path / "sg0.key"))
    monkeypatch.setenv(S.ENV_SERVER, str(tmp_path / "router.key.pub"))
    proc, port, log = start_launcher(tmp_path, router.endpoint, "sg0", [])
    fe = S.load_curve(
        S.CurveConfig(
            secret_key_file=str(tmp_path / "fe.key"),
            server_public_key=str(tmp_path / "router.key.pub"),
        )
    )

    async def scenario() -> None:
        async with RouterClient(router.endpoint, curve=fe) as client:
            await wait_for(lambda: _with_metrics(client, "sg0"), timeout=60, every=0.2)
            assert post(f"http://127.0.0.1:{port}/standin/kv?upto=2") == {"sent": 2}
            await wait_for(lambda: _blocks(client, "sg0", {"GPU": 5, "CPU": 3}), timeout=20)
            d = await client.route("r1", list(range(1, 21)) + [99, 98], track=False)
            assert d.worker_id == "sg0" and d.chosen.prefix_hit_blocks.get("GPU") == 5

    try:
        asyncio.run(asyncio.wait_for(scenario(), 120))
        kv_ep = _kv_endpoint(log)
        # Another key on the republished PUB: the handshake fails, nothing arrives.
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        evil = S.load_curve(S.CurveConfig(secret_key_file=str(tmp_path / "evil.key")))
        assert evil is not None
        evil.client(sub, S.load_public(str(tmp_path / "sg0.key.pub")))
        sub.connect(kv_ep)
        time.sleep(0.5)
        post(f"http://127.0.0.1:{port}/standin/kv?upto=3")
        assert not sub.poll(1000)
        sub.close(0)
        ctx.term()
        assert "refused" not in router.log()
    finally:
        stop(proc)


def _kv_endpoint(log: Path) -> str:
    """The republished KV PUB, from the sidecar's registration line."""
    m = re.search(r"registered SGLang worker sg0 .*?, kv (tcp://\S+),", log.read_text())
    assert m is not None, log.read_text()
    return m[1]
