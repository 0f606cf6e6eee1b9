"""The ``dynamo_ext_curve`` KV event publisher against vLLM's own ``ZmqEventPublisher``: the
same batches give byte-identical frames (live and replayed), only over CURVE, and only a
subscriber holding the router's key receives them. No engine is started."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from dynamo_ext import security as S


def _batches(kv_events):
    stored = kv_events.BlockStored(
        block_hashes=[11, 12],
        parent_block_hash=None,
        token_ids=list(range(32)),
        block_size=16,
        lora_id=None,
        medium="GPU",
        lora_name=None,
        extra_keys=[("tenant-a",), None],
    )
    removed = kv_events.BlockRemoved(block_hashes=[11], medium="GPU")
    return [
        kv_events.KVEventBatch(ts=1.5, events=[stored], data_parallel_rank=0),
        kv_events.KVEventBatch(ts=2.5, events=[removed, kv_events.AllBlocksCleared()]),
    ]


def _recv_all(sock: zmq.Socket, n: int, first_ms: int) -> list[list[bytes]]:
    out = []
    while len(out) < n and sock.poll(first_ms if not out else 1000):
        out.append(sock.recv_multipart())
    return out


def test_curve_publisher_bytes_identical_to_vllms(tmp_path: Path) -> None:
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    from dynamo_ext.plugins.vllm.kv_events import PUBLISHER_NAME, CurveEventPublisher, register

    for name in ("router", "w0", "evil"):
        S.generate_keys(tmp_path, name)
    worker = S.load_curve(
        S.CurveConfig(
            secret_key_file=str(tmp_path / "w0.key"),
            server_public_key=str(tmp_path / "router.key.pub"),
        )
    )
    assert worker is not None
    ep = {k: f"ipc://{tmp_path}/{k}" for k in ("pub", "replay", "cpub", "creplay")}
    plain = kv_events.ZmqEventPublisher(0, ep["pub"], ep["replay"], topic="kv")
    curved = CurveEventPublisher(0, ep["cpub"], ep["creplay"], topic="kv", curve=worker)
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def sock(kind: int, endpoint: str, key: str | None) -> zmq.Socket:
        s = ctx.socket(kind)
        if kind == zmq.SUB:
            s.setsockopt(zmq.SUBSCRIBE, b"")
        if key is not None:
            c = S.load_curve(S.CurveConfig(secret_key_file=str(tmp_path / f"{key}.key")))
            assert c is not None
            c.client(s, worker.keys.public)
        s.connect(endpoint)
        socks.append(s)
        return s

    try:
        sub_plain = sock(zmq.SUB, ep["pub"], None)
        sub_curve = sock(zmq.SUB, ep["cpub"], "router")
        impostors = [sock(zmq.SUB, ep["cpub"], None), sock(zmq.SUB, ep["cpub"], "evil")]
        time.sleep(0.5)
        for pub in (plain, curved):
            for b in _batches(kv_events):
                pub.publish(b)
        live_plain = _recv_all(sub_plain, 2, 3000)
        live_curve = _recv_all(sub_curve, 2, 3000)
        assert len(live_plain) == 2 and live_curve == live_plain
        assert [f[1] for f in live_curve] == [(0).to_bytes(8, "big"), (1).to_bytes(8, "big")]
        assert all(not s.poll(300) for s in impostors)

        # Replay: [b"", start seq] -> the buffered batches, then vLLM's end marker.
        replies = []
        for endpoint, key in ((ep["replay"], None), (ep["creplay"], "router")):
            d = sock(zmq.DEALER, endpoint, key)
            d.send_multipart([b"", (0).to_bytes(8, "big")])
            replies.append(_recv_all(d, 3, 3000))
        assert len(replies[0]) == 3 and replies[1] == replies[0]
        assert replies[0][-1] == [b"", b"", kv_events.ZmqEventPublisher.END_SEQ, b""]
        evil = sock(zmq.DEALER, ep["creplay"], "evil")
        evil.send_multipart([b"", (0).to_bytes(8, "big")], zmq.NOBLOCK)
        assert not evil.poll(500)

        # The name vLLM's --kv-events-config takes, once the plugin registered it.
        register()
        register()  # idempotent: vLLM loads plugins in every process, maybe twice
        from vllm.config.kv_events import KVEventsConfig

        cfg = KVEventsConfig(enable_kv_cache_events=True, publisher=PUBLISHER_NAME)  # type: ignore[arg-type]
        assert cfg.publisher == PUBLISHER_NAME
        assert kv_events.EventPublisherFactory._registry[PUBLISHER_NAME] is CurveEventPublisher
        with pytest.raises(ValueError):
            KVEventsConfig(enable_kv_cache_events=True, publisher="bogus")  # type: ignore[arg-type]
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        plain.shutdown()
        curved.shutdown()
