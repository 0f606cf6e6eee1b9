"""CURVE keys and sockets (dynamo_ext.security) and the ``dynamo-ext keys`` command, on real
ZeroMQ sockets: an allow-listed client gets through and is named by ``User-Id``; a client
with another key, or none, gets nothing through; our publishers admit only their router."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from dynamo_ext import security as S
from dynamo_ext.errors import ConfigError
from dynamo_ext.protocol import (
    BlockStored,
    KVEventBatch,
    WorkerMetrics,
    kv_batch_decoder,
    metrics_decoder,
)
from dynamo_ext.publisher import KvEventPublisher, MetricsPublisher


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    for name in ("router", "w0", "fe", "evil"):
        S.generate_keys(tmp_path, name)
    return tmp_path


def curve_of(keydir: Path, name: str, **kw) -> S.Curve:
    c = S.load_curve(S.CurveConfig(secret_key_file=str(keydir / f"{name}.key"), **kw))
    assert c is not None
    return c


def test_keys_cli_gen_and_show(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "dynamo_ext.cli", "keys"]
    out = subprocess.run([*run, "gen", str(tmp_path), "--name", "w7"], capture_output=True)
    assert out.returncode == 0, out.stderr
    sec, pub = tmp_path / "w7.key", tmp_path / "w7.key.pub"
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert "secret-key" not in pub.read_text()
    public, secret = zmq.auth.load_certificate(sec)  # ZeroMQ's own reader
    assert secret is not None and zmq.curve_public(secret) == public
    shown = subprocess.run([*run, "show", str(pub)], capture_output=True, text=True)
    assert shown.stdout.split() == [public.decode(), S.key_id(public)]
    again = subprocess.run([*run, "gen", str(tmp_path), "--name", "w7"], capture_output=True)
    assert again.returncode == 2 and b"exists" in again.stderr


def test_loading_refuses_readable_secret_and_public_only(keydir: Path) -> None:
    os.chmod(keydir / "w0.key", 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        S.load_keypair(keydir / "w0.key")
    os.chmod(keydir / "w0.key", 0o600)
    pub_copy = keydir / "copy.key"
    pub_copy.write_text((keydir / "w0.key.pub").read_text())
    os.chmod(pub_copy, 0o600)
    with pytest.raises(ConfigError, match="no secret key"):
        S.load_keypair(pub_copy)
    inline = S.load_public(str(keydir / "w0.key.pub"))
    assert S.load_public(inline.decode()) == inline
    with pytest.raises(ConfigError, match="security.secret_key_file"):
        S.load_curve(S.CurveConfig(server_public_key=inline.decode()))


def test_allow_dir_roles_and_router_admitted(keydir: Path, tmp_path: Path) -> None:
    allow = tmp_path / "allow"
    (allow / "worker").mkdir(parents=True)
    (allow / "frontend").mkdir()
    (allow / "worker" / "w0.pub").write_text((keydir / "w0.key.pub").read_text())
    (allow / "frontend" / "fe.pub").write_text((keydir / "fe.key.pub").read_text())
    c = curve_of(keydir, "router", allow_dir=str(allow))
    assert c.allowlist.role_of(S.load_public(str(keydir / "w0.key.pub"))) == "worker"
    assert c.allowlist.role_of(S.load_public(str(keydir / "fe.key.pub"))) == "frontend"
    assert c.allowlist.role_of(S.load_public(str(keydir / "evil.key.pub"))) is None
    w = curve_of(keydir, "w0", server_public_key=str(keydir / "router.key.pub"))
    assert w.allowlist.role_of(w.server_public) == "router"


def test_server_admits_allowlisted_keys_and_names_them(keydir: Path) -> None:
    ctx = zmq.Context()
    server = curve_of(
        keydir, "router", allow=[S.AllowedKey(key=str(keydir / "w0.key.pub"), role="worker")]
    )
    denied: list[str] = []
    auth = S.start_authenticator(ctx, server, denied.append)
    sock = ctx.socket(zmq.ROUTER)
    server.server(sock)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    peers = []
    for name in ("w0", "evil", None):
        p = ctx.socket(zmq.DEALER)
        if name is not None:
            curve_of(keydir, name, server_public_key=str(keydir / "router.key.pub")).client(p)
        p.connect(f"tcp://127.0.0.1:{port}")
        p.send(name.encode() if name else b"plain")
        peers.append(p)
    try:
        got = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and sock.poll(300):
            frames = sock.recv_multipart(copy=False)
            got.append((frames[-1].bytes, S.peer_key(frames[-1])))
        w0 = S.load_public(str(keydir / "w0.key.pub")).decode()
        assert got == [(b"w0", w0)]
        assert denied == [S.key_id(S.load_public(str(keydir / "evil.key.pub")))]
    finally:
        for s in (*peers, sock):
            s.close(0)
        auth.stop()
        ctx.term()


def _sub(ctx: zmq.Context, endpoint: str, curve: S.Curve | None, server: bytes) -> zmq.Socket:
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    if curve is not None:
        curve.client(s, server)
    s.connect(endpoint)
    return s


def test_publishers_over_curve_reach_only_the_router(keydir: Path) -> None:
    worker = curve_of(keydir, "w0", server_public_key=str(keydir / "router.key.pub"))
    kv = KvEventPublisher("tcp://127.0.0.1:0", curve=worker)
    mp = MetricsPublisher("tcp://127.0.0.1:0", curve=worker)
    ctx = zmq.Context()
    router, evil = curve_of(keydir, "router"), curve_of(keydir, "evil")
    subs = {
        (who, what): _sub(ctx, ep, c, worker.keys.public)
        for what, ep in (("kv", kv.endpoint), ("metrics", mp.endpoint))
        for who, c in (("router", router), ("evil", evil), ("plain", None))
    }
    try:
        time.sleep(0.5)  # subscriptions reach the publishers
        ev = BlockStored(
            block_hashes=[1], parent_block_hash=None, token_ids=[1] * 16, block_size=16,
            lora_id=None, medium="GPU", lora_name=None,
        )  # fmt: skip
        kv.publish([ev], ts=1.0)
        mp.publish(WorkerMetrics(worker_id="w0", heartbeat=1, ts=1.0))
        got = {k: s.poll(1500 if k[0] == "router" else 300) for k, s in subs.items()}
        assert got == {k: k[0] == "router" for k in subs}, got
        batch = kv_batch_decoder.decode(subs["router", "kv"].recv_multipart()[2])
        assert isinstance(batch, KVEventBatch) and batch.events == [ev]
        m = metrics_decoder.decode(subs["router", "metrics"].recv_multipart()[2])
        assert m.worker_id == "w0"
    finally:
        for s in subs.values():
            s.close(0)
        ctx.term()
        kv.close()
        mp.close()


def test_check_bind_safe_default() -> None:
    S.check_bind("tcp://127.0.0.1:5600", "bind", secured=False, insecure=False)
    S.check_bind("ipc:///tmp/x", "bind", secured=False, insecure=False)
    with pytest.raises(ConfigError, match="--insecure"):
        S.check_bind("tcp://0.0.0.0:5600", "bind", secured=False, insecure=False)
    S.check_bind("tcp://0.0.0.0:5600", "bind", secured=True, insecure=False)
    S.check_bind("tcp://*:5600", "bind", secured=False, insecure=True)
