"""The mocker: its cache, scheduler and timing model in virtual time, and its socket layer
against a real router over real ZMQ and HTTP. Everything here runs in about a second."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from dynamo_ext.config import RouterConfig
from dynamo_ext.hashing import BlockHasher
from dynamo_ext.protocol import (
    MEDIUM_CPU,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    RouteResponse,
    WorkerRegistration,
    encode,
    kv_batch_decoder,
)
from dynamo_ext.sim.fleet import MockerFleet
from dynamo_ext.sim.model import (
    MockerConfig,
    MockerCore,
    SimRequest,
    StepResult,
    TimingModel,
    output_token,
)
from dynamo_ext.testing import wait_for

BS = 4


def core(blocks: int = 64, budget: int = 64, **kw: object) -> MockerCore:
    return MockerCore(
        MockerConfig(block_size=BS, num_gpu_blocks=blocks, max_num_batched_tokens=budget, **kw)  # type: ignore[arg-type]
    )


def run(c: MockerCore, reqs: list[SimRequest], at: float = 0.0) -> list[StepResult]:
    """Add ``reqs`` at ``at`` and drive the core until it is idle."""
    for r in reqs:
        assert c.add_request(r, at)
    out = []
    res = c.advance(at)
    if res is not None:
        out.append(res)
    while (t := c.next_time()) is not None:
        res = c.advance(t)
        if res is not None:
            out.append(res)
    return out


def events(results: list[StepResult]) -> list[object]:
    """Every event as the router would decode it from the wire."""
    out: list[object] = []
    for r in results:
        if r.events:
            out += kv_batch_decoder.decode(encode(KVEventBatch(ts=r.end, events=r.events))).events
    return out


def test_the_mockers_chain_is_the_routers_block_hash() -> None:
    toks = list(range(1000, 1037))
    assert isinstance(MockerCore(MockerConfig(block_size=BS, num_gpu_blocks=8)).hasher, BlockHasher)
    hs, digest = BlockHasher(BS).chain(None, toks)
    assert hs == BlockHasher(BS).hash_tokens(toks) and len(hs) == 9
    more, _ = BlockHasher(BS).chain(digest, list(range(50, 58)))
    assert hs + more == BlockHasher(BS).hash_tokens(toks[:36] + list(range(50, 58)))


def test_prefix_hit_and_chained_block_stored() -> None:
    c = core()
    prompt = list(range(100, 118))  # 4 full blocks + 2 tokens
    a = SimRequest("a", list(prompt), 3, 0.0)
    evs = events(run(c, [a]))
    assert a.first_token is not None and a.finish is not None and a.generated == 3
    stored = [e for e in evs if isinstance(e, BlockStored)]
    # The prompt's 4 blocks, then the block its output completes (tokens 16..19).
    assert [len(e.block_hashes) for e in stored] == [4, 1]
    want = BlockHasher(BS).hash_tokens(prompt + [output_token(0), output_token(1)])
    assert stored[0].block_hashes == want[:4] and stored[0].parent_block_hash is None
    assert stored[1].block_hashes == want[4:5] and stored[1].parent_block_hash == want[3]
    assert stored[0].token_ids == prompt[:16] and stored[0].medium == "GPU"
    assert stored[0].block_size == BS and stored[0].group_idx == 0
    # Same prefix, longer prompt: the 4 cached blocks are hits, nothing is re-stored.
    b = SimRequest("b", prompt[:16] + [7] * 9, 1, 1.0)
    evs = events(run(c, [b], at=1.0))
    assert b.hit_gpu == 16
    assert [e.block_hashes for e in evs if isinstance(e, BlockStored)] == [
        BlockHasher(BS).hash_tokens(b.tokens)[4:6]
    ]
    # An identical prompt hits all but its last block: one token is always computed.
    d = SimRequest("d", list(prompt[:16]), 1, 2.0)
    run(c, [d], at=2.0)
    assert d.hit_gpu == 12
    assert c.prefix_queries == 18 + 25 + 16 and c.prefix_hits == 16 + 12


def test_lru_eviction_emits_block_removed_tail_first() -> None:
    c = core(blocks=8)
    a = SimRequest("a", list(range(200, 216)), 1, 0.0)  # 4 blocks, cached then freed
    run(c, [a])
    ha = BlockHasher(BS).hash_tokens(a.tokens[:16])
    assert all(c.is_cached(h) for h in ha)
    assert c.free_blocks() == 8  # finished: free but still cached
    # 6 new blocks: 4 never-used ones, then the 2 least recently freed: a's tail blocks.
    b = SimRequest("b", list(range(300, 323)), 1, 1.0)
    evs = events(run(c, [b], at=1.0))
    removed = [h for e in evs if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert removed == [ha[3], ha[2]]
    assert [e.medium for e in evs if isinstance(e, BlockRemoved)] == ["GPU"]
    assert c.is_cached(ha[0]) and not c.is_cached(ha[3])
    # The router's index, fed these very events, agrees with the engine.
    from dynamo_ext.router.service import RouterService

    srv = RouterService(RouterConfig(metrics_port=None, block_size=BS))
    w = srv.register(WorkerRegistration("w", block_size=BS), static=True)
    c2 = core(blocks=8)
    for r in run(c2, [SimRequest("a", list(a.tokens[:16]), 1, 0.0)]) + run(
        c2, [SimRequest("b", list(range(300, 323)), 1, 1.0)], at=1.0
    ):
        if r.events:
            srv.ingest.apply(w.stream, kv_batch_decoder.decode(encode(KVEventBatch(0.0, r.events))))
    m = srv.index.find_matches(ha)
    assert m.gpu == {"w": 2}


def test_chunked_prefill_shares_steps_with_decodes() -> None:
    c = core(budget=8)
    short = SimRequest("s", list(range(10, 15)), 6, 0.0)
    run_one = run(c, [short])
    assert len(run_one) == 6  # one prefill step, then one token a step
    c = core(budget=8)
    d = SimRequest("d", list(range(10, 15)), 8, 0.0)
    c.add_request(d, 0.0)
    c.advance(0.0)
    t = c.next_time()
    assert t is not None
    c.advance(t)  # d prefilled, first token out, now decoding
    long = SimRequest("l", list(range(500, 530)), 1, t)  # 30 tokens: 4 chunks of <= 7
    c.add_request(long, t)
    steps = []
    while long.first_token is None:
        nt = c.next_time()
        assert nt is not None
        res = c.advance(nt)
        assert res is not None
        steps.append(res)
    # The decode keeps its token every step while the prompt goes through in chunks.
    assert all(d in s.emitted for s in steps)
    # One step already under way when it came, then 30 tokens at 7 a step next to d's 1.
    assert len(steps) == 1 + 5
    assert c.prefill_tokens == 5 + 30 and c.steps >= 6


def test_preemption_frees_blocks_and_everyone_finishes() -> None:
    c = core(blocks=10, budget=64)
    a = SimRequest("a", list(range(0, 16)), 12, 0.0)  # grows to 7 blocks
    b = SimRequest("b", list(range(100, 116)), 12, 0.0)
    run(c, [a, b])
    assert a.generated == 12 and b.generated == 12
    assert c.preemptions > 0 and b.preemptions > 0  # LIFO: the later one is preempted
    assert c.free_blocks() == 10


def test_request_too_large_is_rejected() -> None:
    c = core(blocks=4)
    r = SimRequest("x", list(range(40)), 1, 0.0)
    assert not c.add_request(r, 0.0) and r.error and c.rejected == 1


def test_cpu_offload_tier_events_and_hits() -> None:
    c = core(blocks=8, num_cpu_blocks=32)
    a = SimRequest("a", list(range(200, 216)), 1, 0.0)
    evs = events(run(c, [a]))
    cpu_stored = [e for e in evs if isinstance(e, BlockStored) and e.medium == MEDIUM_CPU]
    ha = BlockHasher(BS).hash_tokens(a.tokens[:16])
    assert [h for e in cpu_stored for h in e.block_hashes] == ha  # write-through
    run(c, [SimRequest("b", list(range(300, 331)), 1, 1.0)], at=1.0)  # evicts all of a
    assert not any(c.is_cached(h) for h in ha) and all(c.is_cached(h, MEDIUM_CPU) for h in ha)
    again = SimRequest("a2", list(a.tokens[:16]) + [9] * 3, 1, 2.0)
    evs = events(run(c, [again], at=2.0))
    assert again.hit_cpu == 16 and again.hit_gpu == 0 and c.cpu_hits == 16
    # Loaded blocks rejoin the GPU cache and say so.
    assert (
        ha
        == [
            h
            for e in evs
            if isinstance(e, BlockStored) and e.medium == "GPU"
            for h in e.block_hashes
        ][:4]
    )


def test_timing_model_monotonic_and_calibrated() -> None:
    t = TimingModel()
    base = t.step_seconds(1, 0, 100)
    assert 0.006 < base < 0.008  # ~7 ms a decode step at batch 1 (Llama-3-8B, H100)
    for args in ((8192, 0, 0), (1, 10**6, 0), (1, 0, 10**6)):
        assert t.step_seconds(*args) > base
    prev = 0.0
    for n in (1, 512, 2048, 8192):
        cur = t.step_seconds(n, n * (n + 1) / 2, 64 * 4096)
        assert cur > prev
        prev = cur
    assert 0.2 < t.step_seconds(8192, 8192 * 8193 / 2, 0) < 0.35  # 8k-token prefill
    assert MockerConfig().gpu_blocks() * 16 > 350_000  # ~400k tokens of KV on 80 GB
    with pytest.raises(ValueError, match="gemm_efficiency"):
        TimingModel(gemm_efficiency=1.5)


def test_fleet_publishes_to_a_real_router_and_streams_http() -> None:
    from dynamo_ext.router.client import RouterClient
    from dynamo_ext.router.server import RouterServer

    async def main() -> None:
        srv = RouterServer(RouterConfig(bind="tcp://127.0.0.1:0", metrics_port=None, block_size=BS))
        await srv.start()
        assert srv.bound_endpoint is not None
        cfg = MockerConfig(block_size=BS, num_gpu_blocks=256, speedup=20.0, metrics_period_s=0.1)
        fleet = MockerFleet(2, cfg, router=srv.bound_endpoint)
        try:
            await fleet.start()
            await wait_for(
                lambda: len(srv.workers) == 2 and all(w.metrics for w in srv.workers.values())
            )
            prompt = list(range(1000, 1030))
            async with aiohttp.ClientSession() as http:
                url = f"{fleet.http_base}/mocker-1/v1/completions"
                body = {"prompt": prompt, "max_tokens": 5, "stream": True, "return_token_ids": True}
                chunks = []
                async with http.post(url, json=body) as resp:
                    assert resp.status == 200
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            chunks.append(json.loads(line[6:]))
                toks = [t for ch in chunks for t in ch["choices"][0]["token_ids"]]
                assert toks == [output_token(i) for i in range(5)]
                assert chunks[-1]["choices"][0]["finish_reason"] == "length"
                async with http.post(url, json={"prompt": "hi", "max_tokens": 2}) as resp:
                    assert (await resp.json())["usage"]["completion_tokens"] == 2
            # The worker's KV events reached the router's index over ZMQ.
            want = BlockHasher(BS).hash_tokens(prompt)
            await wait_for(lambda: srv.index.find_matches(want).gpu.get("mocker-1") == 7)
            async with RouterClient(srv.bound_endpoint) as client:
                d = await client.route("q", prompt)
                assert isinstance(d, RouteResponse) and d.worker_id == "mocker-1"
                assert d.chosen.prefix_hit_blocks["GPU"] == 7
                assert d.http_endpoint == f"{fleet.http_base}/mocker-1"

            # And its metrics: the two prompts (30 tokens, then "hi") were looked up.
            def queries() -> int:
                m = srv.workers["mocker-1"].metrics
                return m.prefix_cache_queries if m and m.kv_total_blocks == 256 else 0

            await wait_for(lambda: queries() == 32)
        finally:
            await fleet.stop()
            await srv.stop()

    asyncio.run(asyncio.wait_for(main(), 30))
