"""The router under hostile input, lost events, churn and huge requests: each test
reproduces a finding of the router-trust issue against a real router process over real
ZMQ sockets (publishers are ``dynamo_ext.publisher``'s, byte-identical to vLLM's; one
test uses vLLM's own ``ZmqEventPublisher``).
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request

import msgspec
import pytest
import zmq
import zmq.asyncio

from dynamo_ext.hashing import BlockHasher
from dynamo_ext.protocol import (
    PROTOCOL_HEADER,
    BlockStored,
    ErrorReply,
    RouterQuery,
    WorkerIndex,
    WorkerMetrics,
    WorkerRegistration,
    encode,
    reply_decoder,
    seq_bytes,
)
from dynamo_ext.publisher import KvEventPublisher, MetricsPublisher
from dynamo_ext.router.client import RouterClient
from dynamo_ext.testing import wait_for

BS = 16
HASHER = BlockHasher(BS)


def blocks(n: int, start: int = 0, seed: int = 0) -> tuple[list[int], list[int]]:
    toks = [seed * 100_000 + i for i in range(n * BS)]
    return toks, HASHER.hash_tokens(toks)


def stored(tokens: list[int], parent: int | None = None, **kw) -> BlockStored:
    hs = HASHER.hash_tokens(tokens)
    bs = kw.pop("block_size", BS)
    return BlockStored(hs, parent, tokens, bs, None, kw.pop("medium", None), None, **kw)


def nested(depth: int) -> bytes:
    """msgpack: ``depth`` nested one-element arrays around a 0 (~depth bytes)."""
    return b"\x91" * depth + b"\x00"


def lethal(depth: int) -> bytes:
    """A ~1 kB KV batch whose BlockStored.extra_keys (typed Any) nests ``depth`` deep: msgspec
    raises RecursionError decoding it, with the full or the lean decoder."""
    ev = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": list(range(BS)),
        "block_size": BS,
        "lora_id": None,
        "medium": None,
        "lora_name": None,
        "extra_keys": ["SENTINEL"],
    }
    raw = msgspec.msgpack.encode([0.0, [ev]])
    return raw.replace(msgspec.msgpack.encode("SENTINEL"), nested(depth))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, val = line.rpartition(" ")
        if head != name and not head.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(val)
            found = True
    return total if found else 0.0


async def indexed(client: RouterClient, wid: str) -> int:
    st = await client.workers()
    return next((sum(w.indexed_blocks.values()) for w in st.workers if w.worker_id == wid), -1)


async def raw_call(endpoint: str, payload: bytes, timeout: float = 5.0) -> msgspec.Struct:
    ctx = zmq.asyncio.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        await s.send_multipart([PROTOCOL_HEADER, b"\x00" * 7 + b"\x01", payload])
        assert await s.poll(int(timeout * 1000)), "no answer"
        frames = await s.recv_multipart()
        return reply_decoder.decode(frames[2])
    finally:
        s.close()


class Worker:
    def __init__(self, wid: str, replay: bool = True) -> None:
        self.wid = wid
        self.kv = KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0" if replay else None)
        self.metrics = MetricsPublisher("tcp://127.0.0.1:0")

    def reg(self, **kw) -> WorkerRegistration:
        return WorkerRegistration(
            self.wid,
            kv_events_endpoint=self.kv.endpoint,
            replay_endpoint=self.kv.replay_endpoint,
            metrics_endpoint=self.metrics.endpoint,
            http_endpoint="http://127.0.0.1:1",
            block_size=BS,
            **kw,
        )

    def beat(self, period: float = 0.1) -> None:
        self.metrics.start(lambda hb: WorkerMetrics(self.wid, hb, time.time()), period)

    def close(self) -> None:
        self.kv.close()
        self.metrics.close()


@pytest.fixture
def worker():
    w = Worker("w0")
    yield w
    w.close()


async def joined(c: RouterClient, w: Worker) -> None:
    """Register and wait until a probe batch is indexed (the SUB has joined). A PUB drops
    what it sends before the subscription arrives: probe until one lands; the stream's
    first seq seen is its start, so dropped probes are no gap."""
    w.beat()
    await c.register(w.reg())
    for i in range(100):
        toks, _ = blocks(1, seed=999)
        w.kv.publish([stored(toks)])
        await asyncio.sleep(0.1)
        if await indexed(c, w.wid) > 0:
            return
        del i
    raise AssertionError("KV stream never joined")


async def interleaved(c: RouterClient, w: Worker, rounds: int, bad) -> None:
    """Each round ``bad(i)`` sends what a hostile peer sends, then one valid batch of a new
    block; returns once every valid block (the join probe's too) is indexed."""
    want = 1
    for i in range(rounds):
        bad(i)
        toks, _ = blocks(1, seed=i)
        w.kv.publish([stored(toks)])
        want += 1

    async def all_valid():
        return await indexed(c, w.wid) == want

    await wait_for(all_valid, timeout=20)


# ---------------------------------------------------------------- lethal frames
def test_no_frame_kills_the_kv_task_and_valid_blocks_interleaved_are_applied(
    router_factory, worker
) -> None:
    """Was: a ~1 kB frame nested 1,000 deep raised RecursionError in the KV task, which
    died silently (6 of 1,002 valid blocks indexed)."""
    router = router_factory(block_size=BS, worker_timeout_s=5.0, resync_interval_s=0)

    async def main():
        async with RouterClient(router.endpoint) as c:
            await joined(c, worker)

            def bad(i: int) -> None:
                worker.kv.publish_raw(lethal(1000 + i))  # killed the KV task before
                worker.kv.publish_raw(nested(1000 + i))
                worker.kv.publish_raw(encode(msgspec.msgpack.decode(nested(5))) + b"junk")

            await interleaved(c, worker, 60, bad)

    run(main())
    text = router.scrape()
    assert metric(text, "dynamo_ext_router_malformed_messages_total", source="kv") >= 60
    assert metric(text, "dynamo_ext_router_task_restarts_total") == 0


def test_recv_now_reads_what_recv_multipart_reads_whatever_the_part_count() -> None:
    """The KV drain's reader (``server.recv_now``) takes each part's "more" flag from the
    part: messages of 1, 2, 3, 4 and 7 parts, empty parts, a 1 MB part, queued back to
    back, come out one message at a time exactly as ``recv_multipart`` gives them (a
    reader that assumed three parts would splice the next message into this one)."""
    from dynamo_ext.router.server import recv_now

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    msgs = [
        [b"a"], [b"", b"\x00" * 8], [b"", b"\x00" * 8, b"x" * 100], [b"t", b"", b"", b""],
        [bytes([i]) for i in range(7)], [b"", b"s" * 8, b"p" * (1 << 20)], [b""],
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 5
        while True:  # a PUB drops what it sends before the subscription lands
            pub.send_multipart([b"probe"])
            if sub.poll(50):
                assert recv_now(sub) == [b"probe"]
                break
            assert time.monotonic() < deadline, "SUB never joined"
        while sub.poll(100):
            sub.recv_multipart()
        for m in msgs * 3:
            pub.send_multipart(m)
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 3 * len(msgs) and time.monotonic() < deadline:
            try:
                got.append(recv_now(sub))
            except zmq.Again:
                time.sleep(0.01)
        assert got == msgs * 3
        with pytest.raises(zmq.Again):
            recv_now(sub)
    finally:
        pub.close()
        sub.close()
        ctx.term()


def test_kv_messages_with_the_wrong_part_count_are_malformed_and_splice_nothing(
    router_factory, worker
) -> None:
    """A peer's KV PUB sends messages of 1, 2, 4 and 5 parts between valid batches, in one
    burst (the drain path, where queued messages are read without an event-loop turn):
    each bad one is counted malformed, every valid batch is indexed, no seq gap is seen."""
    router = router_factory(block_size=BS, worker_timeout_s=5.0, resync_interval_s=0)
    bad = [[b""], [b"", seq_bytes(10**6)], [b"", seq_bytes(1), b"\x90", b"x"], [b""] * 5]

    async def main():
        async with RouterClient(router.endpoint) as c:
            await joined(c, worker)
            text = router.scrape()
            before = metric(text, "dynamo_ext_router_malformed_messages_total", source="kv")

            def send(i: int) -> None:  # past the publisher's framing: a raw multipart
                with worker.kv._lock:
                    worker.kv._pub.send_multipart(bad[i % len(bad)])

            await interleaved(c, worker, 40, send)
            return before

    before = run(main())
    text = router.scrape()
    assert metric(text, "dynamo_ext_router_malformed_messages_total", source="kv") - before >= 40
    assert metric(text, "dynamo_ext_router_seq_gaps_total", worker="w0") == 0
    assert metric(text, "dynamo_ext_router_task_restarts_total") == 0


def test_nested_control_and_metrics_messages_kill_nothing(router_factory, worker) -> None:
    """Was: a 5 kB nested RouteRequest killed the control task (every later route timed
    out) and a nested WorkerMetrics the metrics task (every worker would go down)."""
    router = router_factory(block_size=BS, worker_timeout_s=1.0, resync_interval_s=0)
    # A RouteRequest and a WorkerMetrics whose unknown field holds 5,000 nested arrays.
    pk = msgspec.msgpack.encode
    bad_route = b"\x83" + pk("type") + pk("route") + pk("request_id") + pk("x") + pk("zzz")
    bad_route += nested(5000)
    bad_metrics = b"\x84" + pk("type") + pk("metrics") + pk("worker_id") + pk("w0")
    bad_metrics += pk("heartbeat") + pk(10**9) + pk("zzz") + nested(5000)

    async def main():
        async with RouterClient(router.endpoint) as c:
            await joined(c, worker)
            for _ in range(5):
                reply = await raw_call(router.endpoint, bad_route)
                assert isinstance(reply, ErrorReply) and reply.code == "bad_request"
                worker.metrics.send_frames([b"", b"", bad_metrics])
            r = await c.route("ok", list(range(4 * BS)), track=False)
            assert r.worker_id == "w0"
            await asyncio.sleep(2.0)  # > worker_timeout_s: metrics must still be read
            st = await c.workers()
            assert st.workers[0].up

    run(main())
    text = router.scrape()
    assert metric(text, "dynamo_ext_router_malformed_messages_total", source="control") >= 5
    assert metric(text, "dynamo_ext_router_malformed_messages_total", source="metrics") >= 5


def test_tokens_mode_block_size_zero_is_malformed_not_fatal(router_factory, worker) -> None:
    """Was: ZeroDivisionError in tokens mode killed the KV task."""
    router = router_factory(
        block_size=BS, hash_mode="tokens", worker_timeout_s=5.0, resync_interval_s=0
    )

    async def main():
        async with RouterClient(router.endpoint) as c:
            await joined(c, worker)
            toks, _ = blocks(2, seed=5)
            worker.kv.publish([stored(toks, block_size=0)])
            worker.kv.publish([stored(toks[: BS * 2])])

            async def three():
                return await indexed(c, "w0") == 3

            await wait_for(three, timeout=10)

    run(main())
    assert metric(router.scrape(), "dynamo_ext_router_malformed_messages_total", source="kv_event")


def test_garbage_events_are_counted_and_never_indexed(router_factory, worker) -> None:
    """Was: block_size 0/negative, wrong token counts, 1 kB byte hashes and new medium
    strings were applied without a count (250 index tiers after a fuzz run)."""
    router = router_factory(block_size=BS, worker_timeout_s=5.0, resync_interval_s=0)
    toks, hs = blocks(2, seed=7)
    bad = [
        BlockStored(hs, None, toks, 0, None, None, None),
        BlockStored(hs, None, toks, -BS, None, None, None),
        BlockStored(hs, None, toks[:-1], BS, None, None, None),
        BlockStored([b"\x01" * 1024, b"\x02" * 1024], None, toks, BS, None, None, None),
    ] + [BlockStored(hs, None, toks, BS, None, f"TIER{i}", None) for i in range(50)]

    async def main():
        async with RouterClient(router.endpoint) as c:
            await joined(c, worker)
            for ev in bad:
                worker.kv.publish([ev])
            toks2, _ = blocks(1, seed=8)
            worker.kv.publish([stored(toks2)])

            async def two():
                return await indexed(c, "w0") == 2

            await wait_for(two, timeout=10)
            st = await c.workers()
            assert set(st.workers[0].indexed_blocks) == {"GPU"}

    run(main())
    text = router.scrape()
    assert metric(text, "dynamo_ext_router_malformed_messages_total", source="kv_event") == len(bad)
    assert "TIER" not in text


# ---------------------------------------------------------------- lost events
def test_one_lost_batch_without_replay_is_one_gap_and_marks_the_index_stale(
    router_factory,
) -> None:
    """Was: with no replay endpoint last_seq never advanced past a gap: 1 lost batch then
    40 more gave seq_gaps_total 40 and a gap logged for every later batch."""
    router = router_factory(block_size=BS, worker_timeout_s=5.0, resync_interval_s=0)
    w = Worker("w0", replay=False)

    async def main():
        async with RouterClient(router.endpoint) as c:
            await joined(c, w)
            w.kv.publish([stored(blocks(1, seed=1)[0])], skip=True)
            for i in range(40):
                w.kv.publish([stored(blocks(1, seed=10 + i)[0])])

            async def all41():
                return await indexed(c, "w0") == 41

            await wait_for(all41, timeout=10)
            st = await c.workers()
            assert st.workers[0].stale

    try:
        run(main())
    finally:
        w.close()
    text = router.scrape()
    assert metric(text, "dynamo_ext_router_seq_gaps_total", worker="w0") == 1
    assert metric(text, "dynamo_ext_router_worker_index_stale", worker="w0") == 1
    assert metric(text, "dynamo_ext_router_kv_batches_dropped_total", reason="lost") == 1
    assert router.log().count("KV seq gap") == 1


def test_replay_that_never_answers_does_not_hold_up_later_batches(router_factory) -> None:
    """Was: each later batch waited a full replay timeout (10 batches took 20 s)."""
    router = router_factory(
        block_size=BS,
        worker_timeout_s=5.0,
        resync_interval_s=0,
        replay_timeout_s=2.0,
        initial_replay=False,
    )
    w = Worker("w0", replay=False)
    # a replay endpoint that accepts connections and never answers
    ctx = zmq.Context.instance()
    dead = ctx.socket(zmq.ROUTER)
    dead.setsockopt(zmq.LINGER, 0)
    dead.bind("tcp://127.0.0.1:0")
    dead_ep = dead.getsockopt_string(zmq.LAST_ENDPOINT)

    async def main():
        async with RouterClient(router.endpoint) as c:
            w.beat()
            await c.register(msgspec.structs.replace(w.reg(), replay_endpoint=dead_ep))
            await asyncio.sleep(0.5)
            w.kv.publish([stored(blocks(1, seed=1)[0])])
            await wait_for(lambda: indexed(c, "w0"), timeout=10)
            w.kv.publish([stored(blocks(1, seed=2)[0])], skip=True)
            t0 = time.monotonic()
            for i in range(10):
                w.kv.publish([stored(blocks(1, seed=20 + i)[0])])

            async def eleven():
                return await indexed(c, "w0") == 11

            await wait_for(eleven, timeout=20)
            return time.monotonic() - t0

    try:
        took = run(main())
    finally:
        w.close()
        dead.close()
    # one replay timeout (2 s) at most, not one per batch
    assert took < 4.0, took
    text = router.scrape()
    assert metric(text, "dynamo_ext_router_seq_gaps_total", worker="w0") == 1


def test_router_killed_and_restarted_rebuilds_a_full_vllm_buffer_exactly(
    router_factory, tmp_path
) -> None:
    """Was: against vLLM's own ZmqEventPublisher holding 10,000 single-block batches, a
    restarted router lost 106-214 of them (the replay ROUTER's HWM), said 'replayed 9786
    KV batches (seq 0..9999)' and nothing warned. Now a short replay is asked again."""
    vkv = pytest.importorskip("vllm.distributed.kv_events")
    from dynamo_ext.testing import free_port

    port, rport = free_port(), free_port()
    pub = vkv.ZmqEventPublisher(
        0, endpoint=f"tcp://*:{port}", replay_endpoint=f"tcp://*:{rport}", topic="kv"
    )
    n = 10_000
    toks, hs = blocks(n, seed=3)
    try:
        for i in range(n):
            ev = vkv.BlockStored(
                block_hashes=[hs[i]],
                parent_block_hash=hs[i - 1] if i else None,
                token_ids=toks[i * BS : (i + 1) * BS],
                block_size=BS,
                lora_id=None,
                medium=None,
                lora_name=None,
            )
            pub.publish(vkv.KVEventBatch(ts=time.time(), events=[ev]))
        deadline = time.monotonic() + 30
        while pub._event_queue.qsize() and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.05)
        static = [
            {
                "worker_id": "w0",
                "kv_events_endpoint": f"tcp://127.0.0.1:{port}",
                "replay_endpoint": f"tcp://127.0.0.1:{rport}",
                "kv_events_topic": "kv",
                "block_size": BS,
            }
        ]
        for attempt in range(3):  # each start is a fresh rebuild from the buffer
            router = router_factory(
                block_size=BS, resync_interval_s=0, replay_timeout_s=5.0, workers=static
            )

            async def main(router=router):
                async with RouterClient(router.endpoint) as c:

                    async def full():
                        return await indexed(c, "w0") == n

                    await wait_for(full, timeout=30)
                    idx = await c.call(RouterQuery("index", "w0"))
                    assert isinstance(idx, WorkerIndex)
                    assert sorted(idx.blocks["GPU"]) == sorted(set(hs))

            run(main())
            router.stop(9)
            del attempt
    finally:
        pub.shutdown()


# ---------------------------------------------------------------- churn
def test_abandoned_workers_expire_and_the_router_stays_bounded(router_factory) -> None:
    """Was: 5,000 registered-and-abandoned workers (pods restarting under new names) filled
    the index (after 4,095 every registration failed), the sockets, RSS and metrics page."""
    router = router_factory(
        block_size=BS, worker_timeout_s=0.3, worker_expiry_s=1.0, resync_interval_s=0
    )
    pid = router.proc.pid

    def fds() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    async def main():
        async with RouterClient(router.endpoint) as c:
            base_fds = fds()
            for wave in range(3):
                for i in range(1500):
                    wid = f"pod-{wave}-{i}"
                    await c.register(
                        WorkerRegistration(
                            wid,
                            kv_events_endpoint=f"tcp://127.0.0.1:{1 + i % 50}",
                            metrics_endpoint=f"tcp://127.0.0.1:{51 + i % 50}",
                            block_size=BS,
                        )
                    )
                await asyncio.sleep(1.6)

            async def few():
                return len((await c.workers()).workers) <= 1500

            await wait_for(few, timeout=10)
            fresh = Worker("fresh")
            try:
                await joined(c, fresh)
            finally:
                fresh.close()
            assert fds() < base_fds + 200, (base_fds, fds())

    run(main())
    text = urllib.request.urlopen(f"http://127.0.0.1:{router.metrics_port}/metrics").read()
    assert metric(text.decode(), "dynamo_ext_router_workers_expired_total") >= 3000
    assert len(text) < 600_000, len(text)


# ---------------------------------------------------------------- bounded work
def test_a_huge_route_is_refused_and_a_long_one_never_stalls_other_routes(
    router_factory, worker
) -> None:
    """Was: 20M token ids stalled all routing for 3 s. Now a prompt past max_route_tokens
    is refused, one past the message size never decoded, and a long legal prompt is hashed
    a chunk per event-loop turn while short routes are answered."""
    router = router_factory(
        block_size=BS,
        worker_timeout_s=5.0,
        resync_interval_s=0,
        max_route_tokens=400_000,
        max_message_bytes=4 << 20,
    )

    async def main():
        async with RouterClient(router.endpoint, timeout_s=30) as c:
            await joined(c, worker)
            r = await raw_call(
                router.endpoint, encode_route("big", list(range(500_000))), timeout=10
            )
            assert isinstance(r, ErrorReply) and "at most 400000" in r.message
            long_task = asyncio.create_task(c.route("long", list(range(390_000)), track=False))
            lat = []
            while not long_task.done():
                t0 = time.perf_counter()
                await c.route("short", list(range(4 * BS)), track=False)
                lat.append(time.perf_counter() - t0)
            assert (await long_task).num_blocks == 390_000 // BS
            return lat

    lat = run(main())
    assert len(lat) >= 3
    lat.sort()
    # the decode of the long message itself is the one step that cannot be split
    assert lat[len(lat) // 2] < 0.05, lat


def encode_route(rid: str, toks: list[int]) -> bytes:
    from dynamo_ext.protocol import RouteRequest

    return encode(RouteRequest(rid, token_ids=toks))


def test_seq_frame_of_the_wrong_size_or_negative_is_malformed(router_factory, worker) -> None:
    router = router_factory(block_size=BS, worker_timeout_s=5.0, resync_interval_s=0)

    async def main():
        async with RouterClient(router.endpoint) as c:
            await joined(c, worker)
            from dynamo_ext.protocol import KVEventBatch

            payload = encode(KVEventBatch(0.0, [stored(blocks(1, seed=6)[0])]))
            worker.kv.send_frames([b"", b"\x01\x02", payload])
            worker.kv.send_frames([b"", (-5).to_bytes(8, "big", signed=True), payload])
            worker.kv.publish_raw(b"\xc1")  # its own next seq, a reserved msgpack byte
            worker.kv.publish([stored(blocks(1, seed=4)[0])])

            async def two():
                return await indexed(c, "w0") >= 2

            await wait_for(two, timeout=10)

    run(main())
    assert metric(router.scrape(), "dynamo_ext_router_malformed_messages_total", source="kv") >= 3


def test_metrics_out_of_range_are_malformed_and_attract_nothing(router_factory) -> None:
    """Was: a worker (or anyone on its metrics PUB) reporting negative load (running,
    waiting, KV blocks, prefill queue all -10**6) had it taken as is: its cost fell far below
    every honest worker's and it drew every route. Now such metrics fail to decode, are
    counted as malformed, and the liar's load is what the router reserved there."""
    router = router_factory(block_size=BS, worker_timeout_s=30.0, resync_interval_s=0)
    honest, liar = Worker("honest"), Worker("liar")
    lie = -(10**6)

    async def main():
        async with RouterClient(router.endpoint) as c:
            honest.beat()
            liar.metrics.start(
                lambda hb: WorkerMetrics(
                    "liar",
                    hb,
                    time.time(),
                    running=lie,
                    waiting=lie,
                    kv_used_blocks=lie,
                    kv_total_blocks=10,
                    prefill_queue_tokens=lie,
                ),
                0.05,
            )
            await c.register(honest.reg())
            await c.register(liar.reg())
            await asyncio.sleep(0.5)
            chosen = [
                (await c.route(f"r{i}", list(range(1000 * i, 1000 * i + 4 * BS)))).worker_id
                for i in range(20)
            ]
            assert chosen.count("liar") <= 12, chosen

    try:
        run(main())
    finally:
        honest.close()
        liar.close()
    assert metric(router.scrape(), "dynamo_ext_router_malformed_messages_total", source="metrics") >= 3


def test_metrics_fields_are_bounded_at_decode() -> None:
    from dynamo_ext.protocol import encode, metrics_decoder

    for field, bad in (
        ("running", -1),
        ("waiting", -1),
        ("kv_used_blocks", -1),
        ("kv_total_blocks", -1),
        ("prefill_queue_tokens", -1),
        ("prefix_cache_hits", -1),
        ("running", 1 << 62),
    ):
        with pytest.raises(msgspec.ValidationError):
            metrics_decoder.decode(encode(WorkerMetrics("w", 1, 0.0, **{field: bad})))
    with pytest.raises(msgspec.ValidationError):
        metrics_decoder.decode(encode(WorkerMetrics("w", 1, 0.0, offload_blocks={"CPU": -3})))
    ok = WorkerMetrics("w", 1, 0.0, running=3, kv_total_blocks=1 << 30, offload_blocks={"CPU": 2})
    assert metrics_decoder.decode(encode(ok)) == ok


def test_a_flood_of_garbage_control_messages_starves_no_route(router_factory, worker) -> None:
    """Past the 64-message burst the control socket answers per loop turn: 20,000
    malformed control messages from two flooding peers (junk frames, bad headers, nested and
    truncated msgpack) while an honest client routes. Every message is counted as
    malformed, the KV stream keeps being applied, and every honest route is answered
    within its deadline."""
    router = router_factory(block_size=BS, worker_timeout_s=30.0, resync_interval_s=0)
    garbage = [
        [b"junk"],
        [b"not-the-header", b"\x00" * 8, b"\x80"],
        [PROTOCOL_HEADER, b"\x00" * 8, nested(2000)],
        [PROTOCOL_HEADER, b"\x00" * 8, b"\xdd\xff\xff\xff\xff"],
        [PROTOCOL_HEADER, b"\x00" * 8, b"\x83\xa4type\xa5route"],
    ]

    async def flood(n: int) -> int:
        ctx = zmq.asyncio.Context.instance()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)  # queue everything: the router must drain it all
        s.connect(router.endpoint)
        try:
            for i in range(n):
                await s.send_multipart(garbage[i % len(garbage)])
                if i % 500 == 0:
                    await asyncio.sleep(0)
            await asyncio.sleep(0.5)
        finally:
            s.close()
        return n

    async def main():
        async with RouterClient(router.endpoint, timeout_s=2.0) as c:
            await joined(c, worker)
            toks, _ = blocks(8, seed=3)
            worker.kv.publish([stored(toks)])
            floods = [asyncio.create_task(flood(10_000)) for _ in range(2)]
            lat = []
            while not all(f.done() for f in floods) or len(lat) < 20:
                t0 = time.perf_counter()
                r = await c.route(f"honest-{len(lat)}", toks + [1], track=False)
                lat.append(time.perf_counter() - t0)
                assert r.worker_id == "w0"
            sent = sum([await f for f in floods])
            # the batch published during the flood was applied
            assert (await c.route("after", toks, track=False)).chosen.prefix_hit_blocks == {
                "GPU": 8
            }
            return sent, lat

    sent, lat = run(main())
    assert max(lat) < 2.0, max(lat)
    deadline = time.monotonic() + 20
    while True:
        n = metric(router.scrape(), "dynamo_ext_router_malformed_messages_total", source="control")
        if n >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert n == sent, (n, sent)
