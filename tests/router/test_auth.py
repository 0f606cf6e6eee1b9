"""Authenticated planes on the router process (router/identity, CURVE sockets): a real
router with keys, a real worker w0 (CURVE publishers, registered with its key), and
impostors on real sockets, one without a key and one holding a valid but different key.
Every attack (re-register, deregister, report failed, metrics, KV stream, prefetch) is refused
and counted, and no route ever points at an impostor."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path

import pytest
import zmq

from dynamo_ext import security as S
from dynamo_ext.errors import ConfigError, RouterUnavailable
from dynamo_ext.protocol import (
    BlockStored,
    ErrorReply,
    WorkerDeregistration,
    WorkerFailed,
    WorkerMetrics,
    WorkerRegistration,
    decode_prefetch,
)
from dynamo_ext.publisher import KvEventPublisher, MetricsPublisher
from dynamo_ext.router.client import RouterClient
from dynamo_ext.testing import RouterProc, wait_for
from dynamo_ext.testing import client_curve as curve

BS = 16
HASHES = list(range(1, 7))


def stored(hashes: list[int], medium: str | None = None) -> BlockStored:
    return BlockStored(hashes, None, [7] * (BS * len(hashes)), BS, None, medium, None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def rejected(router: RouterProc) -> dict[str, float]:
    text = router.scrape()
    pat = r'dynamo_ext_router_auth_rejected_total\{reason="(\w+)"\} ([0-9.]+)'
    return {m[0]: float(m[1]) for m in re.findall(pat, text)}


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    for name in ("router", "w0", "w1", "fe", "evil"):
        S.generate_keys(tmp_path, name)
    return tmp_path


@pytest.fixture
def router(router_factory, keys: Path) -> RouterProc:
    allow = [
        {"key": str(keys / "w0.key.pub"), "role": "worker"},
        {"key": str(keys / "w1.key.pub"), "role": "worker"},
        {"key": str(keys / "fe.key.pub"), "role": "frontend"},
    ]
    security = {"secret_key_file": str(keys / "router.key"), "allow": allow}
    return router_factory(block_size=BS, worker_timeout_s=3.0, security=security)


class Worker:
    """One worker process's sockets: CURVE KV/metrics publishers and a prefetch PULL."""

    def __init__(self, c: S.Curve, worker_id: str) -> None:
        self.curve = c
        self.worker_id = worker_id
        self.kv = KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", curve=c)
        self.metrics = MetricsPublisher("tcp://127.0.0.1:0", curve=c)
        self.ctx = zmq.Context()
        self.auth = S.start_authenticator(self.ctx, c)
        self.pull = self.ctx.socket(zmq.PULL)
        c.server(self.pull)
        self.prefetch = f"tcp://127.0.0.1:{self.pull.bind_to_random_port('tcp://127.0.0.1')}"
        self.beats = 0

    def reg(self, **kw) -> WorkerRegistration:
        base = dict(
            worker_id=self.worker_id,
            http_endpoint=f"http://{self.worker_id}.real:8000",
            kv_events_endpoint=self.kv.endpoint,
            replay_endpoint=self.kv.replay_endpoint,
            metrics_endpoint=self.metrics.endpoint,
            prefetch_endpoint=self.prefetch,
            block_size=BS,
            instance_id=uuid.uuid4().hex,
        )
        return WorkerRegistration(**{**base, **kw})

    def beat(self, worker_id: str | None = None) -> None:
        # The impostor's metrics say 99 requests run: easy to spot if they got in.
        self.beats += 1
        wid = worker_id or self.worker_id
        self.metrics.publish(WorkerMetrics(wid, self.beats, 0.0, running=99))

    def heartbeat(self) -> None:
        self.metrics.start(lambda hb: WorkerMetrics(self.worker_id, hb, 0.0), 0.1)

    def close(self) -> None:
        self.kv.close()
        self.metrics.close()
        self.pull.close(0)
        self.auth.stop()
        self.ctx.term()


async def _down(c: RouterClient, wid: str) -> bool:
    return any(w.worker_id == wid and not w.up for w in (await c.workers()).workers)


async def indexed(c: RouterClient, wid: str) -> dict[str, int]:
    for w in (await c.workers()).workers:
        if w.worker_id == wid:
            return w.indexed_blocks
    return {}


def test_impostors_are_refused_counted_and_never_routed_to(router: RouterProc, keys) -> None:
    w0 = Worker(curve(keys, "w0"), "w0")
    w0.heartbeat()
    imp = Worker(curve(keys, "w1"), "w1")  # a valid worker key, not w0's
    # An impostor that holds no key: plain sockets at its own endpoints.
    plain_kv = KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")

    async def main() -> None:
        fe = RouterClient(router.endpoint, curve=curve(keys, "fe"))
        owner = RouterClient(router.endpoint, curve=curve(keys, "w0"))
        other = RouterClient(router.endpoint, curve=curve(keys, "w1"))
        anon = RouterClient(router.endpoint, timeout_s=1.0)
        outsider = RouterClient(router.endpoint, timeout_s=1.0, curve=curve(keys, "evil"))
        try:
            # w0's registration names endpoints held by impostors first (a hijacked address):
            # the router's sockets demand w0's key there, so nothing gets in or out.
            hijacked = w0.reg(
                kv_events_endpoint=imp.kv.endpoint,
                replay_endpoint=plain_kv.replay_endpoint,
                metrics_endpoint=imp.metrics.endpoint,
            )
            assert (await owner.register(hijacked)).ok
            for _ in range(5):
                imp.kv.publish([stored(HASHES, "DISK")])
                plain_kv.publish([stored(HASHES, "DISK")])
                imp.beat("w0")
                await asyncio.sleep(0.1)
            assert await indexed(fe, "w0") == {}

            # Its own streams now, but a prefetch address held by the impostor.
            assert (await owner.register(w0.reg(prefetch_endpoint=imp.prefetch))).ok
            w0.kv.publish([stored(HASHES, "DISK")])
            await wait_for(lambda: indexed(fe, "w0"))
            await fe.route("h0", block_hashes=HASHES, num_tokens=BS * 6)
            assert not imp.pull.poll(500)

            # The real w0 restarts (same key, new instance id): it replaces its old self.
            assert (await owner.register(w0.reg())).ok
            w0.kv.publish([stored(HASHES, "DISK")])
            await wait_for(lambda: indexed(fe, "w0"))
            assert await indexed(fe, "w0") == {"DISK": 6}
            r = await fe.route("p0", block_hashes=HASHES, num_tokens=BS * 6)
            assert r.worker_id == "w0" and r.http_endpoint == "http://w0.real:8000"
            assert w0.pull.poll(5000)  # the prefetch hint reached the real worker
            assert decode_prefetch(w0.pull.recv()).request_id == "p0"

            # A valid but different key takes over, drops, fails w0; a frontend registers.
            takeover = imp.reg(worker_id="w0", http_endpoint="http://evil:8000")
            for reply in (
                await other.call(takeover),
                await other.call(WorkerDeregistration("w0")),
                await other.call(WorkerFailed("w0", "impostor")),
                await fe.call(takeover),
            ):
                assert isinstance(reply, ErrorReply) and reply.code == "forbidden", reply
            # metrics for w0 from the impostor's own (registered) publisher
            assert (await other.register(imp.reg())).ok
            for _ in range(3):
                imp.beat("w0")
                await asyncio.sleep(0.1)
            assert (await other.deregister("w1")).ok  # its own worker: that it may do
            # without a key, or with a key the router does not know: no answer at all
            for c in (anon, outsider):
                with pytest.raises(RouterUnavailable):
                    await c.register(takeover)
                with pytest.raises(RouterUnavailable):
                    await c.deregister("w0")
                await c.worker_failed("w0", "impostor")
            await asyncio.sleep(0.3)

            # w0 is still w0, up, and every route goes to it.
            fleet = {w.worker_id: w for w in (await fe.workers()).workers}
            assert fleet["w0"].up and fleet["w0"].http_endpoint == "http://w0.real:8000"
            for i in range(20):
                r = await fe.route(f"q{i}", block_hashes=HASHES, num_tokens=BS * 6)
                assert r.http_endpoint != "http://evil:8000"
                assert r.worker_id == "w0"
            m = fleet["w0"].last_metrics
            assert m is not None and m.running == 0  # w0's own metrics, none of imp's
            # A frontend may report a worker failed (it saw it fail): that still works.
            await fe.worker_failed("w0", "connect refused")
            await wait_for(lambda: _down(fe, "w0"))
        finally:
            for c in (fe, owner, other, anon, outsider):
                await c.close()

    try:
        run(main())
    finally:
        w0.close()
        imp.close()
        plain_kv.close()
    counts = rejected(router)
    assert counts["not_owner"] >= 3  # re-register, deregister, fail
    assert counts["role"] >= 1  # the frontend key registering
    assert counts["metrics_not_owner"] >= 1
    assert counts["handshake"] >= 2  # the keyless and the unknown key
    log = router.log()
    assert (
        "refused registration for worker 'w0' from key "
        + S.key_id(S.load_public(str(keys / "w1.key.pub")))
        in log
    )


def test_non_loopback_bind_needs_keys_or_insecure(tmp_path: Path) -> None:
    from dynamo_ext.config import RouterConfig, build

    with pytest.raises(ConfigError, match="--insecure"):
        build(RouterConfig, {"bind": "tcp://0.0.0.0:5600"})
    assert build(RouterConfig, {"bind": "tcp://0.0.0.0:5600", "insecure": True}).insecure
    S.generate_keys(tmp_path, "r")
    sec = {"secret_key_file": str(tmp_path / "r.key")}
    assert build(RouterConfig, {"bind": "tcp://0.0.0.0:5600", "security": sec}).security.enabled


def test_identity_rules_on_the_service(keys: Path) -> None:
    """The guard's rules through RouterService's public calls (no sockets)."""
    from prometheus_client import CollectorRegistry

    from dynamo_ext.config import RouterConfig
    from dynamo_ext.protocol import RequestFinished, RouteRequest
    from dynamo_ext.router.identity import IdentityGuard
    from dynamo_ext.router.service import RouterService

    allow = S.Allowlist()
    k = {n: S.load_public(str(keys / f"{n}.key.pub")).decode() for n in ("w0", "w1", "fe")}
    allow.add(k["w0"].encode(), "worker")
    allow.add(k["w1"].encode(), "worker")
    allow.add(k["fe"].encode(), "frontend")
    static = WorkerRegistration("s0", block_size=BS)
    svc = RouterService(RouterConfig(block_size=BS, metrics_port=None, workers=[static]))
    guard = IdentityGuard(allow, CollectorRegistry())
    guard.static.add("s0")
    svc.secure(guard)
    svc.register(static, static=True)

    def code(msg, who: str | None) -> str | None:
        r = svc.authorize(msg, k[who] if who in k else who)
        return None if r is None else r.message.rsplit(": ", 1)[1]

    reg = WorkerRegistration("w0", block_size=BS, instance_id="a")
    assert code(reg, "w0") is None
    svc.dispatch(reg)
    assert code(msgspec_replace(reg, instance_id="b"), "w0") is None  # its restart
    assert code(reg, "w1") == "not_owner"
    assert code(reg, "fe") == "role"
    assert code(reg, "some-unknown-key") == "unknown_key"
    assert code(WorkerRegistration("s0"), "w0") == "static"
    assert code(RouteRequest("r", token_ids=[1]), "w0") == "role"
    assert code(RouteRequest("r", token_ids=[1]), "fe") is None
    assert code(RequestFinished("r"), "fe") is None
    assert code(WorkerDeregistration("w0"), "fe") == "role"
    assert code(WorkerDeregistration("w0"), "w1") == "not_owner"
    assert code(WorkerDeregistration("w0"), "w0") is None
    assert code(WorkerFailed("w0"), "w1") == "not_owner"
    assert code(WorkerFailed("w0"), "fe") is None
    # data-parallel ranks: the rank's id is what gets bound
    dp = WorkerRegistration("w2", block_size=BS, data_parallel_rank=1)
    assert code(dp, "w1") is None
    assert code(WorkerDeregistration("w2@dp1"), "w0") == "not_owner"
    # metrics: only through the owner's key (a static worker's through its plaintext one)
    svc.metrics_from(WorkerMetrics("w0", 1, 0.0, running=99), k["w1"])
    assert svc.workers["w0"].metrics is None
    svc.metrics_from(WorkerMetrics("w0", 1, 0.0), k["w0"])
    svc.metrics_from(WorkerMetrics("s0", 1, 0.0), None)
    assert svc.workers["w0"].metrics is not None and svc.workers["s0"].metrics is not None
    counts = {r: guard.rejected.labels(r)._value.get() for r in ("not_owner", "role", "static")}
    assert counts == {"not_owner": 4, "role": 3, "static": 1}
    assert guard.rejected.labels("metrics_not_owner")._value.get() == 1
    # an entry with id patterns: other ids are refused even while unbound (router restart)
    allow.add(k["w1"].encode(), "worker", workers=["pool-b-*"])
    assert code(WorkerRegistration("pool-a-0", block_size=BS), "w1") == "id_not_allowed"
    assert code(WorkerRegistration("pool-b-0", block_size=BS), "w1") is None


def msgspec_replace(reg: WorkerRegistration, **kw) -> WorkerRegistration:
    import msgspec

    return msgspec.structs.replace(reg, **kw)
