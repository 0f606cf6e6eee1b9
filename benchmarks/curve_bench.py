"""What CURVE costs the router: ingest and route over real loopback sockets, plaintext and
CURVE in the same run (``dynamo-ext bench router`` reports it under ``curve``).

* ingest: a worker's PUB sends the router bench's KV event frames (real ``KVEventBatch``
  msgpack, 32 blocks a batch) to a SUB that decodes and applies each to a ``RouterService``
  index, as the server's KV loop does; events per second from the first send to the last
  apply (``wire``: the same frames received and dropped, the sockets' share alone);
* route: a DEALER asks a ROUTER for a route (4k-token prompt as block hashes) and waits for
  the answer, one at a time; with CURVE the ROUTER reads each sender's key (``User-Id``) and
  the identity guard checks it, as the server does. p50 / p99 round trip in microseconds.

Each arm runs ``rounds`` times, interleaved with the other, and reports its best round.
Ratios are CURVE over plaintext: ``ingest_ratio`` < 1 is throughput lost, ``route_p50_ratio``
> 1 latency added.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from dynamo_ext.benchmarks.router_bench import BLOCK_SIZE, Workload
from dynamo_ext.config import RouterConfig
from dynamo_ext.protocol import (
    PROTOCOL_HEADER,
    RouteRequest,
    WorkerRegistration,
    control_decoder,
    encode,
    seq_bytes,
)
from dynamo_ext.router.identity import IdentityGuard
from dynamo_ext.router.service import RouterService, WorkerEntry
from dynamo_ext.security import (
    AllowedKey,
    Curve,
    CurveConfig,
    generate_keys,
    load_curve,
    start_authenticator,
)
from dynamo_ext.stats import percentile


def _router(workers: int) -> tuple[RouterService, list[WorkerEntry]]:
    cfg = RouterConfig(bind="tcp://127.0.0.1:0", metrics_port=None, block_size=BLOCK_SIZE)
    srv = RouterService(cfg)
    return srv, [srv.register(WorkerRegistration(f"w{i}"), static=True) for i in range(workers)]


def _keys(tmp: Path) -> tuple[Curve, Curve]:
    """(server side, client side) keys, each admitting the other."""
    for name in ("server", "client"):
        generate_keys(tmp, name)
    server = load_curve(
        CurveConfig(
            secret_key_file=str(tmp / "server.key"),
            allow=[AllowedKey(key=str(tmp / "client.key.pub"), role="frontend")],
        )
    )
    client = load_curve(
        CurveConfig(
            secret_key_file=str(tmp / "client.key"), server_public_key=str(tmp / "server.key.pub")
        )
    )
    assert server is not None and client is not None
    return server, client


def _ingest(
    frames: list[tuple[int, bytes]], workers: int, keys: tuple[Curve, Curve] | None, apply: bool
) -> float:
    srv, entries = _router(workers)
    for e in entries:
        e.stream.hash_checked = True
    pub_ctx, sub_ctx = zmq.Context(), zmq.Context()
    zap = start_authenticator(pub_ctx, keys[0]) if keys else None
    pub = pub_ctx.socket(zmq.PUB)
    sub = sub_ctx.socket(zmq.SUB)
    for s in (pub, sub):
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        s.setsockopt(zmq.LINGER, 0)
    if keys:
        keys[0].server(pub)
        keys[1].client(sub)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    # the subscription must reach the PUB before the first frame, or PUB drops it
    while True:
        pub.send_multipart([b"probe", b"", b""])
        if sub.poll(50):
            sub.recv_multipart()
            break
    while sub.poll(50):
        sub.recv_multipart()
    topics = [str(w).encode() for w in range(workers)]
    t0 = time.perf_counter()

    def send() -> None:
        for seq, (w, payload) in enumerate(frames):
            pub.send_multipart((topics[w], seq_bytes(seq), payload))

    th = threading.Thread(target=send)
    th.start()
    decode, apply_ = srv.ingest.decode, srv.ingest.apply
    recv = sub.recv_multipart
    if apply:
        for _ in range(len(frames)):
            topic, _seq, payload = recv()
            st = entries[int(topic)].stream
            apply_(st, decode(st, payload))
    else:
        for _ in range(len(frames)):
            recv()
    dt = time.perf_counter() - t0
    th.join()
    for s in (pub, sub):
        s.close(0)
    if zap is not None:
        zap.stop()
    pub_ctx.term()
    sub_ctx.term()
    return dt


def _route(wl: Workload, workers: int, n: int, keys: tuple[Curve, Curve] | None):
    srv, _ = _router(workers)
    ctx, cctx = zmq.Context(), zmq.Context()
    zap = start_authenticator(ctx, keys[0]) if keys else None
    if keys:
        srv.secure(IdentityGuard(keys[0].allowlist, srv.metrics.registry))
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    if keys:
        keys[0].server(router)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not router.poll(50):
                continue
            if keys:
                raw = router.recv_multipart(copy=False)
                frames = [f.bytes for f in raw]
                peer = raw[-1].get("User-Id")
            else:
                frames, peer = router.recv_multipart(), None
            ident, header, corr, payload = frames
            msg = control_decoder.decode(payload)
            reply = srv.authorize(msg, peer) or srv.dispatch(msg)  # type: ignore[arg-type]
            router.send_multipart([ident, header, corr, encode(reply)])

    th = threading.Thread(target=serve)
    th.start()
    dealer = cctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if keys:
        keys[1].client(dealer)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    prompts = [wl.prompt(4096 // BLOCK_SIZE) for _ in range(n)]
    lat: list[float] = []
    for i, hs in enumerate(prompts):
        body = encode(RouteRequest(request_id=f"q{i}", block_hashes=hs, track=False))
        corr = (i + 1).to_bytes(8, "big")
        t = time.perf_counter()
        dealer.send_multipart([PROTOCOL_HEADER, corr, body])
        reply = dealer.recv_multipart()
        lat.append((time.perf_counter() - t) * 1e6)
        assert reply[1] == corr and b"routed" in reply[2], reply[2][:200]
    stop.set()
    th.join()
    dealer.close(0)
    router.close(0)
    if zap is not None:
        zap.stop()
    ctx.term()
    cctx.term()
    return lat[n // 10 :]  # the first answers include the handshake and warm-up


def bench_curve(
    workers: int = 8, blocks: int = 100_000, routes: int = 2000, rounds: int = 5
) -> dict[str, Any]:
    """Both arms ``rounds`` times, interleaved, best of each (a shared machine's noise only
    ever slows a round down)."""
    wl = Workload(workers, blocks)
    frames = wl.frames()
    applied = sum(len(c) for chains in wl.chains for c in chains)
    out: dict[str, Any] = {"workers": workers, "blocks": applied, "routes": routes}
    best: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys = _keys(Path(tmp))
        for _ in range(rounds):
            for name, k in (("plain", None), ("curve", keys)):
                b = best.setdefault(
                    name, {"ingest": 0.0, "wire": 0.0, "p50": float("inf"), "p99": 0.0}
                )
                b["ingest"] = max(b["ingest"], applied / _ingest(frames, workers, k, True))
                b["wire"] = max(b["wire"], applied / _ingest(frames, workers, k, False))
                lat = _route(wl, workers, routes, k)
                p50 = percentile(lat, 50)
                if p50 < b["p50"]:
                    b["p50"], b["p99"] = p50, percentile(lat, 99)
    for name, b in best.items():
        out[f"{name}_ingest_events_per_s"] = round(b["ingest"])
        out[f"{name}_wire_events_per_s"] = round(b["wire"])
        out[f"{name}_route_p50_us"] = round(b["p50"], 1)
        out[f"{name}_route_p99_us"] = round(b["p99"], 1)
    plain, curve = best["plain"], best["curve"]
    out["ingest_ratio"] = round(curve["ingest"] / plain["ingest"], 3)
    out["wire_ratio"] = round(curve["wire"] / plain["wire"], 3)
    out["route_p50_ratio"] = round(curve["p50"] / plain["p50"], 3)
    out["route_p99_ratio"] = round(curve["p99"] / plain["p99"], 3)
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(bench_curve()))
