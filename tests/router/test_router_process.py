"""The router as a real process, fed by publishers over real ZMQ sockets.

The publishers are ``dynamo_ext.publisher.KvEventPublisher`` (byte-identical to vLLM's
``ZmqEventPublisher``, proven in tests/test_protocol.py) so the test can drop a
sequence number on purpose; one test uses vLLM's own publisher class.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from dynamo_ext.errors import NoWorkerAvailable, ProtocolError
from dynamo_ext.hashing import BlockHasher
from dynamo_ext.protocol import (
    PROTOCOL_HEADER,
    BlockRemoved,
    BlockStored,
    ErrorReply,
    WorkerMetrics,
    WorkerRegistration,
    reply_decoder,
)
from dynamo_ext.publisher import KvEventPublisher, MetricsPublisher
from dynamo_ext.router.client import RouterClient
from dynamo_ext.testing import free_port, wait_for

BS = 16
HASHER = BlockHasher(BS)
TOKENS = list(range(1000, 1000 + BS * 8))
HASHES = HASHER.hash_tokens(TOKENS)


def stored(tokens: list[int], start_block: int, end_block: int) -> BlockStored:
    hs = HASHER.hash_tokens(tokens)
    parent = hs[start_block - 1] if start_block else None
    return BlockStored(
        hs[start_block:end_block],
        parent,
        tokens[start_block * BS : end_block * BS],
        BS,
        None,
        None,
        None,
    )


class Fleet:
    def __init__(self, n: int) -> None:
        self.kv = [KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0") for _ in range(n)]
        self.metrics = [MetricsPublisher("tcp://127.0.0.1:0") for _ in range(n)]
        self.ids = [f"w{i}" for i in range(n)]

    def reg(self, i: int, **kw) -> WorkerRegistration:
        return WorkerRegistration(
            self.ids[i],
            kv_events_endpoint=self.kv[i].endpoint,
            replay_endpoint=self.kv[i].replay_endpoint,
            metrics_endpoint=self.metrics[i].endpoint,
            http_endpoint=f"http://127.0.0.1:{8000 + i}",
            block_size=BS,
            **kw,
        )

    def beat(self, i: int, period: float = 0.1, **kw) -> None:
        wid = self.ids[i]
        self.metrics[i].start(lambda hb: WorkerMetrics(wid, hb, time.time(), **kw), period)

    def close(self) -> None:
        for p in self.kv + self.metrics:
            p.close()


@pytest.fixture
def fleet():
    f = Fleet(2)
    yield f
    f.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def indexed(client: RouterClient, wid: str) -> int:
    st = await client.workers()
    return next((sum(w.indexed_blocks.values()) for w in st.workers if w.worker_id == wid), -1)


async def register_all(client: RouterClient, fleet: Fleet) -> None:
    for i in range(len(fleet.ids)):
        fleet.beat(i)
        await client.register(fleet.reg(i))


def test_routes_to_the_worker_holding_the_prefix(router_factory, fleet) -> None:
    router = router_factory(block_size=BS, worker_timeout_s=2.0)

    async def main():
        async with RouterClient(router.endpoint) as c:
            await register_all(c, fleet)
            fleet.kv[1].publish([stored(TOKENS, 0, 6)])
            await wait_for(lambda: indexed(c, "w1"))
            r = await c.route("r1", TOKENS, explain=True)
            assert r.worker_id == "w1"
            assert r.http_endpoint == "http://127.0.0.1:8001"
            assert r.chosen.prefix_hit_blocks == {"GPU": 6}
            assert r.num_blocks == 8 and {s.worker_id for s in r.candidates} == {"w0", "w1"}
            # r1 reserved load on w1 until reported finished (notifications keep order)
            await c.finished("r1")
            # precomputed hashes give the same answer
            r2 = await c.route("r2", block_hashes=HASHES[:4], num_tokens=64, track=False)
            assert r2.worker_id == "w1" and r2.chosen.prefix_hit_blocks == {"GPU": 4}
            # removal moves the prefix boundary
            fleet.kv[1].publish([BlockRemoved(HASHES[2:6], None)])
            await wait_for(lambda: indexed(c, "w1"), timeout=5)

            async def two_left():
                return await indexed(c, "w1") == 2

            await wait_for(two_left)
            r3 = await c.route("r3", TOKENS, track=False)
            assert r3.worker_id == "w1" and r3.chosen.prefix_hit_blocks == {"GPU": 2}

    run(main())
    text = router.scrape()
    assert 'dynamo_ext_router_decisions_total{role="aggregated",worker="w1"}' in text
    assert "dynamo_ext_router_decision_seconds_bucket" in text
    assert 'dynamo_ext_router_kv_events_total{worker="w1"} 2.0' in text
    assert 'dynamo_ext_router_prefix_hit_blocks_total{tier="GPU",worker="w1"} 12.0' in text
    assert 'dynamo_ext_router_worker_prefix_hit_rate{worker="w1"} 0.6' in text


def test_sequence_gap_is_recovered_through_replay(router_factory, fleet) -> None:
    router = router_factory(block_size=BS, worker_timeout_s=2.0)

    async def main():
        async with RouterClient(router.endpoint) as c:
            await register_all(c, fleet)
            await asyncio.sleep(0.3)
            fleet.kv[0].publish([stored(TOKENS, 0, 2)])
            fleet.kv[0].publish([stored(TOKENS, 2, 4)], skip=True)  # lost on the wire
            fleet.kv[0].publish([stored(TOKENS, 4, 8)])

            async def all_eight():
                return await indexed(c, "w0") == 8

            await wait_for(all_eight)
            r = await c.route("r", TOKENS, track=False)
            assert r.chosen.prefix_hit_blocks == {"GPU": 8}

    run(main())
    text = router.scrape()
    assert 'dynamo_ext_router_seq_gaps_total{worker="w0"} 1.0' in text
    assert 'dynamo_ext_router_replays_total{result="ok",worker="w0"}' in text
    assert "KV seq gap: expected 1 got 2" in router.log()


def test_idle_stream_resyncs_a_batch_lost_after_the_last_one(router_factory, fleet) -> None:
    """A worker's last batch is dropped on the wire (as PUB drops it while a SUB is still
    joining) and the worker goes idle: no later seq reveals a gap. The router with resync on
    asks for it; the one with resync off (control) never learns it."""
    on = router_factory(block_size=BS, worker_timeout_s=5.0, resync_interval_s=0.3)
    off = router_factory(block_size=BS, worker_timeout_s=5.0, resync_interval_s=0)

    async def main():
        async with RouterClient(on.endpoint) as a, RouterClient(off.endpoint) as b:
            fleet.beat(0)
            for c in (a, b):
                await c.register(fleet.reg(0))
            fleet.kv[0].publish([stored(TOKENS, 0, 2)])

            async def both_two():
                return await indexed(a, "w0") == 2 and await indexed(b, "w0") == 2

            await wait_for(both_two)
            fleet.kv[0].publish([stored(TOKENS, 2, 6)], skip=True)  # lost, then silence

            async def six():
                return await indexed(a, "w0") == 6

            await wait_for(six, timeout=10)
            await asyncio.sleep(1.0)
            assert await indexed(b, "w0") == 2

    run(main())
    assert 'dynamo_ext_router_replays_total{result="resync",worker="w0"}' in on.scrape()
    assert 'result="resync"' not in off.scrape()


def test_restarted_router_rebuilds_its_index_from_replay(router_factory, fleet) -> None:
    static = [
        {
            "worker_id": "w0",
            "kv_events_endpoint": fleet.kv[0].endpoint,
            "replay_endpoint": fleet.kv[0].replay_endpoint,
            "block_size": BS,
        },
    ]
    fleet.kv[0].publish([stored(TOKENS, 0, 5)])  # before any router exists
    router = router_factory(block_size=BS, workers=static)

    async def main(expect: int):
        async with RouterClient(router.endpoint) as c:

            async def ok():
                return await indexed(c, "w0") == expect

            await wait_for(ok)

    run(main(5))
    router.stop()
    fleet.kv[0].publish([stored(TOKENS, 5, 8)])  # while the router is down
    router.start()
    run(main(8))


def test_worker_down_on_silence_and_back_on_metrics(router_factory, fleet) -> None:
    router = router_factory(block_size=BS, worker_timeout_s=0.6)

    async def main():
        async with RouterClient(router.endpoint) as c:
            await c.register(fleet.reg(0))
            fleet.beat(0)
            # w1 registers but never beats: it goes down after the timeout
            await c.register(fleet.reg(1))
            fleet.kv[1].publish([stored(TOKENS, 0, 8)])

            async def w1_down():
                st = await c.workers()
                return {w.worker_id: w.up for w in st.workers} == {"w0": True, "w1": False}

            await wait_for(w1_down, timeout=5)
            r = await c.route("r", TOKENS, track=False)
            assert r.worker_id == "w0"  # w1 holds the prefix but is down
            fleet.beat(1)

            async def w1_up():
                st = await c.workers()
                return all(w.up for w in st.workers)

            await wait_for(w1_up, timeout=5)
            r = await c.route("r", TOKENS, track=False)
            assert r.worker_id == "w1"
            # a caller seeing connection refused takes it out at once
            await c.worker_failed("w1", "connection refused")

            async def w1_failed():
                st = await c.workers()
                return not next(w.up for w in st.workers if w.worker_id == "w1")

            await wait_for(w1_failed, timeout=2)
            assert (await c.route("r", TOKENS, track=False)).worker_id == "w0"
            fleet.metrics[0].close()
            fleet.metrics[0] = MetricsPublisher("tcp://127.0.0.1:0")  # keep close() happy

            async def none_left():
                try:
                    await c.route("r", TOKENS, track=False)
                except NoWorkerAvailable:
                    return True
                return False

            await wait_for(none_left, timeout=5)

    run(main())
    assert "marked DOWN: no metrics" in router.log()
    assert "marked DOWN: reported failed: connection refused" in router.log()
    assert "marked UP: metrics resumed" in router.log()


def test_malformed_input_is_counted_dropped_and_survived(router_factory, fleet) -> None:
    router = router_factory(block_size=BS, worker_timeout_s=5.0)

    async def main():
        async with RouterClient(router.endpoint) as c:
            await register_all(c, fleet)
            fleet.kv[0].publish([stored(TOKENS, 0, 4)])

            async def four():
                return await indexed(c, "w0") == 4

            await wait_for(four)
            # KV stream: wrong frame count, then a payload that is not a KVEventBatch
            fleet.kv[0].send_frames([b"", b"junk"])
            fleet.kv[0].publish_raw(b"\xc1\xc1not msgpack")
            fleet.kv[0].publish_raw(msgspec.msgpack.encode([1.0, [["Unknown", 1]]]))
            # metrics stream: wrong frame count, bad payload, a worker nobody registered
            fleet.metrics[1].send_frames([b"metrics"])
            fleet.metrics[1].send_frames([b"metrics", b"\x00" * 8, b"\xc1"])
            fleet.metrics[1].publish(WorkerMetrics("ghost", 1, time.time()))
            # control socket: bad header, bad payload, unknown tag
            ctx = zmq.asyncio.Context.instance()
            s = ctx.socket(zmq.DEALER)
            s.connect(router.endpoint)
            await s.send_multipart([b"http/1.1", b"\x00" * 7 + b"\x01", b"x"])
            rep = reply_decoder.decode((await s.recv_multipart())[2])
            assert isinstance(rep, ErrorReply) and rep.code == "version"
            await s.send_multipart([PROTOCOL_HEADER, b"\x00" * 7 + b"\x02", b"\x93garbage"])
            rep = reply_decoder.decode((await s.recv_multipart())[2])
            assert isinstance(rep, ErrorReply) and rep.code == "bad_request"
            await s.send_multipart(
                [
                    PROTOCOL_HEADER,
                    b"\x00" * 7 + b"\x03",
                    msgspec.msgpack.encode({"type": "launch_missiles"}),
                ]
            )
            rep = reply_decoder.decode((await s.recv_multipart())[2])
            assert isinstance(rep, ErrorReply) and rep.code == "bad_request"
            await s.send_multipart([b"only-one-frame"])
            s.close(0)
            with pytest.raises(ProtocolError, match="token_ids or block_hashes"):
                await c.route("r", None)
            # the next good batch still lands, and the index kept its blocks
            fleet.kv[0].publish([stored(TOKENS, 4, 8)])

            async def eight():
                return await indexed(c, "w0") == 8

            await wait_for(eight)
            assert (await c.route("r", TOKENS, track=False)).chosen.prefix_hit_blocks == {"GPU": 8}

    run(main())
    text = router.scrape()
    kv_bad = [
        ln
        for ln in text.splitlines()
        if ln.startswith('dynamo_ext_router_malformed_messages_total{source="kv"}')
    ]
    assert kv_bad and float(kv_bad[0].split()[-1]) == 3.0
    assert 'dynamo_ext_router_malformed_messages_total{source="control"} 4.0' in text
    assert 'dynamo_ext_router_malformed_messages_total{source="metrics"} 3.0' in text
    assert "dropped malformed kv message from w0" in router.log()
    assert router.proc is not None and router.proc.poll() is None


def test_heartbeat_going_back_means_a_restarted_worker(router_factory, fleet) -> None:
    router = router_factory(block_size=BS, worker_timeout_s=5.0)

    async def main():
        async with RouterClient(router.endpoint) as c:
            await c.register(fleet.reg(0))
            await asyncio.sleep(0.3)
            m = fleet.metrics[0]
            m.publish(WorkerMetrics("w0", 100, time.time()))
            fleet.kv[0].publish([stored(TOKENS, 0, 8)])

            async def eight():
                return await indexed(c, "w0") == 8

            await wait_for(eight)
            m.publish(WorkerMetrics("w0", 1, time.time()))  # a new process

            async def cleared():
                return await indexed(c, "w0") == 0

            await wait_for(cleared)

    run(main())
    assert "heartbeat went back 100 -> 1" in router.log()


def test_vllm_own_publisher_feeds_the_router(router_factory) -> None:
    kv = pytest.importorskip("vllm.distributed.kv_events")

    port, rport = free_port(), free_port()
    pub = kv.ZmqEventPublisher(
        0, endpoint=f"tcp://*:{port}", replay_endpoint=f"tcp://*:{rport}", topic="kv"
    )
    try:
        pub.publish(
            kv.KVEventBatch(
                ts=time.time(),
                events=[
                    kv.BlockStored(
                        block_hashes=HASHES[:3],
                        parent_block_hash=None,
                        token_ids=TOKENS[: 3 * BS],
                        block_size=BS,
                        lora_id=None,
                        medium="GPU",
                        lora_name=None,
                    )
                ],
            )
        )
        router = router_factory(
            block_size=BS,
            workers=[
                {
                    "worker_id": "vllm-0",
                    "kv_events_endpoint": f"tcp://127.0.0.1:{port}",
                    "kv_events_topic": "kv",
                    "replay_endpoint": f"tcp://127.0.0.1:{rport}",
                }
            ],
        )

        async def main():
            async with RouterClient(router.endpoint) as c:

                async def three():
                    return await indexed(c, "vllm-0") == 3

                await wait_for(three)  # from the replay: published before the router
                pub.publish(
                    kv.KVEventBatch(
                        ts=time.time(),
                        events=[
                            kv.BlockStored(
                                block_hashes=HASHES[3:5],
                                parent_block_hash=HASHES[2],
                                token_ids=TOKENS[3 * BS : 5 * BS],
                                block_size=BS,
                                lora_id=None,
                                medium="CPU",
                                lora_name=None,
                            )
                        ],
                    )
                )

                async def five():
                    return await indexed(c, "vllm-0") == 5

                await wait_for(five)
                r = await c.route("r", TOKENS, track=False)
                assert r.chosen.prefix_hit_blocks == {"GPU": 3, "CPU": 2}
                assert r.chosen.offload_score == pytest.approx(2 * 0.9)

        run(main())
        assert "hashes differ" not in router.log()  # engine hashing reproduced
    finally:
        pub.shutdown()


def test_pool_tier_is_shared_and_router_sends_prefetch(router_factory, fleet) -> None:
    """w0 wrote a prefix to the global pool (STORAGE/REMOTE events) and to its disk
    (STORAGE/LOCAL); w1 reads the same pool (it registered a prefetch socket). The router
    credits the pooled prefix to both, and when it routes to w1 it sends w1's pool tier a
    PrefetchRequest naming the blocks w1 lacks, over a real ZMQ PUSH/PULL pair."""
    import msgspec
    import zmq

    from dynamo_ext.protocol import decode_prefetch

    router = router_factory(block_size=BS, worker_timeout_s=2.0)
    ctx = zmq.Context.instance()
    pulls = [ctx.socket(zmq.PULL) for _ in range(2)]
    eps = []
    for p in pulls:
        port = p.bind_to_random_port("tcp://127.0.0.1")
        eps.append(f"tcp://127.0.0.1:{port}")

    def pool_ev(lo: int, hi: int, locality: str) -> BlockStored:
        ev = stored(TOKENS, lo, hi)
        return msgspec.structs.replace(ev, medium="STORAGE", locality=locality)

    async def main():
        async with RouterClient(router.endpoint) as c:
            for i in range(2):
                fleet.beat(i)
                await c.register(fleet.reg(i, prefetch_endpoint=eps[i]))
            fleet.kv[0].publish([pool_ev(0, 6, "REMOTE"), pool_ev(0, 3, "LOCAL")])

            async def both_indexed():
                st = {w.worker_id: w.indexed_blocks for w in (await c.workers()).workers}
                return st["w0"].get("REMOTE") == 6 and st["w0"].get("DISK") == 3 and st

            await wait_for(both_indexed)
            r = await c.route("p0", TOKENS, explain=True, track=False)  # what-if: no work
            hits = {s.worker_id: s.prefix_hit_blocks for s in r.candidates}
            assert hits["w0"] == {"DISK": 3, "REMOTE": 3}  # its own disk first, then the pool
            assert hits["w1"] == {"REMOTE": 6}  # the pool is global
            r1 = await c.route("p1", TOKENS, exclude_workers=["w1"])
            assert r1.worker_id == "w0"
            r2 = await c.route("p2", TOKENS, exclude_workers=["w0"])
            assert r2.worker_id == "w1"
        assert pulls[1].poll(5000)
        msg = decode_prefetch(pulls[1].recv())
        assert msg.request_id == "p2" and msg.block_hashes == HASHES[:6]
        # w0: nothing in its memory; its disk holds 3 blocks, the pool 3 more: all 6 staged
        assert pulls[0].poll(5000)
        m0 = decode_prefetch(pulls[0].recv())
        assert m0.request_id == "p1" and m0.block_hashes == HASHES[:6]
        assert not pulls[0].poll(300) and not pulls[1].poll(0)  # nothing for the what-if

    try:
        run(main())
    finally:
        for p in pulls:
            p.close(0)
    assert 'dynamo_ext_router_prefetch_blocks_total{worker="w1"} 6.0' in router.scrape()


def test_client_hashes_prompts_itself_for_a_tokens_mode_router(router_factory, fleet) -> None:
    """A router in tokens mode announces it; the client then sends the prompt's hashes
    (computed natively) instead of its tokens, with the same answer. A router restarted
    with other hashing refuses such hashes (hash_mismatch) and the client falls back to
    tokens for that prompt and learns the new hashing: no misroute, no error."""
    router = router_factory(block_size=BS, worker_timeout_s=2.0, hash_mode="tokens")
    sent: list[object] = []

    async def main():
        async with RouterClient(router.endpoint) as c:
            orig = c.call

            async def spy(msg, *a, **kw):  # type: ignore[no-untyped-def]
                sent.append(msg)
                return await orig(msg, *a, **kw)

            c.call = spy  # type: ignore[method-assign]
            await register_all(c, fleet)
            fleet.kv[1].publish([stored(TOKENS, 0, 6)])
            await wait_for(lambda: indexed(c, "w1"))
            r = await c.route("r1", TOKENS, explain=True)
            assert r.worker_id == "w1" and r.chosen.prefix_hit_blocks == {"GPU": 6}
            routes = [m for m in sent if type(m).__name__ == "RouteRequest"]
            assert routes[-1].block_hashes is not None and routes[-1].token_ids is None
            assert routes[-1].hashed_as == f"tokens/{BS}" and routes[-1].num_tokens == len(TOKENS)
            await c.finished("r1")
            # what the router would have computed from the tokens: the same hit
            c.hash_locally, c._hashing = False, ""
            r2 = await c.route("r2", TOKENS, track=False)
            assert r2.chosen.prefix_hit_blocks == {"GPU": 6}
            # a client that believes another hashing is refused, falls back, relearns
            c._hashing = "tokens/32"
            r3 = await c.route("r3", TOKENS, track=False)
            assert r3.worker_id == "w1" and r3.chosen.prefix_hit_blocks == {"GPU": 6}
            assert c._hashing is None
            tail = [m for m in sent if type(m).__name__ == "RouteRequest"][-2:]
            assert tail[0].hashed_as == "tokens/32"
            assert tail[1].block_hashes is None and tail[1].token_ids == TOKENS
            await c.route("r4", TOKENS, track=False)
            assert c._hashing == f"tokens/{BS}"
            assert 'reason="hash_mismatch"' in router.scrape()

    run(main())
