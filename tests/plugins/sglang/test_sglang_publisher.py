"""The sidecar against SGLang's own ``ZmqEventPublisher`` (real SGLang code, real sockets).

SGLang's publisher is pure Python and runs here even though SGLang cannot serve a model on
this CPU-only machine. A batch published before the sidecar subscribes is lost on the wire
and must come back through SGLang's replay socket; what the sidecar republishes must read
as vLLM-schema batches through our replay socket, which is what the router uses.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

from dynamo_ext.hashing import BlockHasher
from dynamo_ext.plugins.sglang.config import LauncherConfig, SglangPlan
from dynamo_ext.plugins.sglang.launch_server import Sidecar
from dynamo_ext.protocol import REPLAY_END_SEQ, BlockStored, kv_batch_decoder
from dynamo_ext.testing import free_port, wait_for

FIXTURE = Path(__file__).parent / "fixtures" / "sglang_0.5.23_kv_events.msgpack"


def test_sidecar_replays_from_sglang_publisher() -> None:
    kv = pytest.importorskip("sglang.srt.disaggregation.kv_events", reason="SGLang not installed")
    raw = msgspec.msgpack.decode(FIXTURE.read_bytes(), type=list[bytes])
    batches = [msgspec.msgpack.decode(b, type=kv.KVEventBatch) for b in raw]
    pub_ep = f"tcp://127.0.0.1:{free_port()}"
    replay_ep = f"tcp://127.0.0.1:{free_port()}"
    pub = kv.ZmqEventPublisher(
        attn_dp_rank=0, endpoint=pub_ep, bind=True, replay_endpoint=replay_ep, topic="kv"
    )
    try:
        asyncio.run(_run(pub, batches, pub_ep, replay_ep))
    finally:
        pub.shutdown()


async def _run(pub, batches, pub_ep: str, replay_ep: str) -> None:
    pub.publish(batches[0])  # nobody subscribed yet: lost on the wire, kept for replay
    await asyncio.sleep(0.3)
    plan = SglangPlan(
        argv=[],
        role="both",
        page_size=4,
        host="127.0.0.1",
        port=free_port(),
        kv_endpoint=pub_ep,
        kv_replay_endpoint=replay_ep,
        kv_topic="kv",
        bootstrap_port=None,
        http_endpoint="http://127.0.0.1:1",
        worker_id="sg",
        model=None,
    )
    side = Sidecar(
        LauncherConfig(
            block_size=4,
            kv_endpoint="tcp://127.0.0.1:0",
            replay_endpoint="tcp://127.0.0.1:0",
            metrics_endpoint="tcp://127.0.0.1:0",
        ),
        plan,
    )
    task = asyncio.create_task(side.run())
    try:
        await asyncio.sleep(0.5)  # SUB connected
        pub.publish(batches[1])
        await wait_for(lambda: side.batches == 2, timeout=10)
        assert side.replayed == 2  # seq 0 (missed) and seq 1, from SGLang's replay socket
        assert side.translator.held("GPU") == 5 and side.translator.held("CPU") == 3

        # what the router would fetch from us: vLLM-schema batches, our own sequence
        ctx = zmq.asyncio.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(side.kv_pub.replay_endpoint)
        await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        got = []
        while True:
            frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
            if frames[2] == REPLAY_END_SEQ:
                break
            got.append(kv_batch_decoder.decode(frames[3]))
        dealer.close(0)
        stored = [e for b in got for e in b.events if isinstance(e, BlockStored)]
        hashes = BlockHasher(4, "engine", "sha256").hash_tokens(list(range(1, 21)))
        assert [e.block_hashes for e in stored] == [hashes[:3], hashes[3:], hashes[:3]]
        assert [e.medium for e in stored] == ["GPU", "GPU", "CPU"]
    finally:
        side.stop()
        await task
        await side.close()
