"""Dynamo's SelectionService fed by the mocker fleet's KV streams (``sim.peers.DynamoCore``):
it sees what the engines cache, its barrier holds until a batch is applied, and its knobs
reach its scheduler. Skipped without ``ai-dynamo-runtime``."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_ext.errors import DynamoExtError
from dynamo_ext.sim.fleet import MockerFleet
from dynamo_ext.sim.model import MockerConfig
from dynamo_ext.sim.peers import DynamoCore, dynamo_available

pytestmark = pytest.mark.skipif(not dynamo_available(), reason="needs ai-dynamo-runtime")

BS = 16


async def _fleet_and_core(knobs: dict | None = None) -> tuple[MockerFleet, DynamoCore]:
    cfg = MockerConfig(block_size=BS, num_gpu_blocks=512, speedup=50.0)
    fleet = MockerFleet(2, cfg)
    await fleet.start()
    core = DynamoCore(BS, knobs)
    for i, w in enumerate(fleet.workers.values()):
        reg = fleet.registration(w)
        assert reg.kv_events_endpoint is not None
        await core.add_worker(
            i,
            kv_events_endpoint=reg.kv_events_endpoint,
            replay_endpoint=reg.replay_endpoint,
            http_endpoint=reg.http_endpoint or "",
            total_kv_blocks=cfg.gpu_blocks(),
            max_num_batched_tokens=cfg.max_num_batched_tokens,
        )
    return fleet, core


async def _serve(fleet: MockerFleet, i: int, tokens: list[int]) -> None:
    w = list(fleet.workers.values())[i]
    _, q = w.submit(list(tokens), 2)
    while (await q.get())[1] is None:
        pass


def test_selection_service_routes_to_the_mocker_holding_the_prefix() -> None:
    async def main() -> None:
        fleet, core = await _fleet_and_core()
        try:
            pubs = {i: w.kv for i, w in enumerate(fleet.workers.values())}
            await core.barrier(pubs)  # both streams joined
            prompt = list(range(1000, 1200))  # 12 full blocks
            await _serve(fleet, 1, prompt)
            await asyncio.sleep(0.05)  # the step's batch is published at its end
            await core.barrier(pubs)
            assert (await core.overlap_blocks(prompt))[1] == 12
            w, hit, endpoint = await core.select("a", prompt + [7] * 40)
            assert (w, hit) == (1, 12) and endpoint.endswith("/mocker-1")
            await core.prefill_done("a")
            await core.finished("a")
            # The knobs reach its scheduler: worker 1 holds the prefix but carries booked
            # load; with the default overlap credit the cache wins, with none the load does.
            q = prompt + [9] * 40
            for name, knobs, want in (("x", None, 1), ("y", {"overlap_score_credit": 0.0}, 0)):
                other = DynamoCore(BS, knobs)
                try:
                    for i, w in enumerate(fleet.workers.values()):
                        reg = fleet.registration(w)
                        await other.add_worker(
                            i,
                            kv_events_endpoint=reg.kv_events_endpoint or "",
                            replay_endpoint=reg.replay_endpoint,
                            http_endpoint=reg.http_endpoint or "",
                            total_kv_blocks=512,
                            max_num_batched_tokens=8192,
                        )
                    await other.barrier(pubs)
                    await _serve(fleet, 1, prompt)  # republished: this core learns it
                    await asyncio.sleep(0.05)
                    await other.barrier(pubs)
                    await other.book(f"load-{name}", 1, list(range(5000, 5032)))
                    assert (await other.select(name, q))[0] == want, name
                finally:
                    other.close()
            with pytest.raises(DynamoExtError, match="knob"):
                DynamoCore(BS, {"no_such_knob": 1})
        finally:
            core.close()
            await fleet.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_dynamo_indexes_a_cpu_tier_and_credits_it() -> None:
    """``dynamo_core_offload``'s premise: Dynamo's core reads vLLM's BlockStored with
    medium "CPU" as its host-pinned tier (the engines of ``kv_offload`` announce offloaded
    blocks so) and credits those blocks in its prefill cost by host_cache_hit_weight, 0.75 by
    default, where a GPU block is credited whole."""
    import random

    from dynamo_ext.hashing import token_block_hashes
    from dynamo_ext.protocol import BlockStored, KVEventBatch, encode
    from dynamo_ext.publisher import KvEventPublisher

    async def go() -> None:
        pub = KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
        core = DynamoCore(BS)
        try:
            await core.add_worker(
                0, kv_events_endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint,
                http_endpoint="http://127.0.0.1:1", total_kv_blocks=1 << 20,
                max_num_batched_tokens=8192,
            )  # fmt: skip
            toks = [random.Random(5).getrandbits(30) for _ in range(8 * BS)]
            hs = token_block_hashes(toks, BS)
            gpu = BlockStored(hs[:4], None, toks[: 4 * BS], BS, None, "GPU", None)  # type: ignore[arg-type]
            cpu = BlockStored(hs[4:], hs[3], toks[4 * BS :], BS, None, "CPU", None)  # type: ignore[arg-type]
            for _ in range(100):  # until its SUB has joined and applied both
                pub.publish_raw(encode(KVEventBatch(ts=0.0, events=[gpu, cpu])))
                await asyncio.sleep(0.05)
                d = await core._svc.overlap_scores({"model_name": core.model, "token_ids": toks})
                w = d["workers"][0] if d["workers"] else {}
                if w.get("device_blocks") == 4 and w.get("host_pinned_extension_blocks") == 4:
                    break
            else:
                raise AssertionError(f"Dynamo never indexed the CPU tier: {d}")
            r = await core.select_and_reserve("a", toks)
            assert r["overlap"]["gpu"] == 4 * BS and r["overlap"]["cpu"] == 8 * BS
            # 128 prompt tokens - 64 on the GPU - 0.75 x 64 on the host
            assert r["effective_prefill_tokens"] == 8 * BS - 4 * BS - int(0.75 * 4 * BS)
        finally:
            core.close()
            pub.close()

    asyncio.run(go())
