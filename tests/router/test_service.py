"""The router's decision room without sockets: leases, epochs, DP ranks, models, pool
vouching, the audit call and the predicted-vs-reported hit check."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dynamo_ext.config import RouterConfig
from dynamo_ext.hashing import BlockHasher
from dynamo_ext.protocol import (
    MEDIUM_REMOTE,
    Ack,
    BlockStored,
    ErrorReply,
    KVEventBatch,
    RequestFinished,
    RouteRequest,
    RouteResponse,
    RouterQuery,
    WorkerIndex,
    WorkerMetrics,
    WorkerRegistration,
    encode,
    seq_bytes,
)
from dynamo_ext.router.service import RouterService

BS = 16
H = BlockHasher(BS)
TOKS = list(range(BS * 6))
HS = H.hash_tokens(TOKS)


def svc(**kw) -> RouterService:
    return RouterService(RouterConfig(block_size=BS, metrics_port=None, **kw))


def feed(s: RouterService, wid: str, seq: int, events: list) -> None:
    st = s.workers[wid].stream
    s.ingest.on_live(st, [b"", seq_bytes(seq), encode(KVEventBatch(0.0, events))])


def stored(tokens: list[int], medium: str | None = None) -> BlockStored:
    return BlockStored(H.hash_tokens(tokens), None, tokens, BS, None, medium, None)


def test_data_parallel_ranks_are_distinct_workers_whose_keepalives_do_not_clash() -> None:
    """Was: every DP engine registered the same id; their keep-alives cleared each other."""
    s = svc()
    r0 = WorkerRegistration("w", block_size=BS, instance_id="a", data_parallel_rank=0)
    r1 = WorkerRegistration("w", block_size=BS, instance_id="b", data_parallel_rank=1)
    s.register(r0)
    s.register(r1)
    assert set(s.workers) == {"w@dp0", "w@dp1"}
    feed(s, "w@dp0", 0, [stored(TOKS)])
    for _ in range(3):  # keep-alives of both ranks, interleaved
        s.register(r1)
        s.register(r0)
    assert s.index.block_counts("w@dp0") == {"GPU": 6}
    r = s.route(RouteRequest("q", token_ids=TOKS, track=False))
    assert isinstance(r, RouteResponse) and r.worker_id == "w@dp0"


def test_a_new_instance_fences_the_old_index_and_a_keepalive_keeps_it() -> None:
    s = svc()
    reg = WorkerRegistration("w", block_size=BS, instance_id="1")
    s.register(reg)
    feed(s, "w", 0, [stored(TOKS)])
    s.register(reg)
    assert s.index.block_counts("w") == {"GPU": 6}
    s.register(WorkerRegistration("w", block_size=BS, instance_id="2"))
    assert s.index.block_counts("w") == {}
    assert s.workers["w"].stream.last_seq == -1


def test_routing_is_per_model() -> None:
    """Was: the router ignored the worker's model, so a two-model fleet misrouted."""
    s = svc()
    s.register(WorkerRegistration("a", block_size=BS, model="llama"))
    s.register(WorkerRegistration("b", block_size=BS, model="qwen"))
    feed(s, "a", 0, [stored(TOKS)])
    for _ in range(5):
        r = s.route(RouteRequest("q", token_ids=TOKS, model="qwen", track=False))
        assert isinstance(r, RouteResponse) and r.worker_id == "b"
    r = s.route(RouteRequest("q", token_ids=TOKS, model="mistral"))
    assert isinstance(r, ErrorReply) and r.code == "no_worker"


def test_pool_hits_count_only_while_a_live_worker_vouches() -> None:
    """Was: a dead worker's pool announcements kept crediting every pool reader."""
    s = svc(worker_expiry_s=0)
    s.register(
        WorkerRegistration(
            "writer", block_size=BS, prefetch_endpoint="tcp://x:1", metrics_endpoint="tcp://x:2"
        )
    )
    s.register(WorkerRegistration("reader", block_size=BS, prefetch_endpoint="tcp://x:3"))
    feed(s, "writer", 0, [stored(TOKS, MEDIUM_REMOTE)])
    hits = s.route(RouteRequest("q", token_ids=TOKS, track=False, exclude_workers=["writer"]))
    assert isinstance(hits, RouteResponse) and hits.chosen.prefix_hit_blocks == {"REMOTE": 6}
    s.report_failure("writer", "dead")
    r = s.route(RouteRequest("q", token_ids=TOKS, track=False))
    assert isinstance(r, RouteResponse) and r.worker_id == "reader"
    assert r.chosen.prefix_hit_blocks == {}


def test_dead_dynamic_workers_expire_and_static_ones_stay() -> None:
    s = svc(worker_expiry_s=5, worker_timeout_s=1)
    s.register(WorkerRegistration("gone", block_size=BS, metrics_endpoint="tcp://x:1"))
    s.register(
        WorkerRegistration("static", block_size=BS, metrics_endpoint="tcp://x:2"), static=True
    )
    feed(s, "gone", 0, [stored(TOKS)])
    t = s.workers["gone"].last_seen
    s.check_liveness(t + 2)
    assert not s.workers["gone"].up
    s.check_liveness(t + 6)
    assert "gone" not in s.workers and "static" in s.workers
    assert s.index.num_entries() == 0


def test_a_full_index_evicts_the_worker_down_longest() -> None:
    from dynamo_ext.router import indexer

    s = svc(worker_expiry_s=0)
    old = indexer.MAX_WORKERS
    indexer.MAX_WORKERS = 3
    try:
        for i in range(3):
            s.register(WorkerRegistration(f"w{i}", block_size=BS))
        s.report_failure("w1", "x")
        s.register(WorkerRegistration("new", block_size=BS))
        assert set(s.workers) == {"w0", "w2", "new"}
        reply = s.dispatch(WorkerRegistration("newer", block_size=BS))
        assert isinstance(reply, ErrorReply) and reply.code == "unavailable"
    finally:
        indexer.MAX_WORKERS = old


def test_audit_returns_the_indexed_blocks_and_finish_measures_the_prediction() -> None:
    s = svc()
    s.register(WorkerRegistration("w", block_size=BS))
    feed(s, "w", 0, [stored(TOKS[: 4 * BS])])
    idx = s.dispatch(RouterQuery("index", "w"))
    assert isinstance(idx, WorkerIndex) and sorted(idx.blocks["GPU"]) == sorted(HS[:4])
    assert isinstance(s.dispatch(RouterQuery("index", "nobody")), ErrorReply)
    r = s.route(RouteRequest("q", token_ids=TOKS))
    assert isinstance(r, RouteResponse) and r.chosen.prefix_hit_blocks == {"GPU": 4}
    # the engine says it reused 2 blocks: the index over-predicted by 2 blocks
    assert s.dispatch(RequestFinished("q", actual_cached_tokens=2 * BS)) == Ack(True)
    assert s.workers["w"].hit_error == pytest.approx(0.2 * 2 * BS)
    text = s.metrics.registry.get_sample_value(
        "dynamo_ext_router_hit_prediction_error_tokens_count"
    )
    assert text == 1


def test_metrics_heartbeat_gap_is_counted() -> None:
    s = svc()
    s.register(WorkerRegistration("w", block_size=BS, metrics_endpoint="tcp://x:1"))
    s.on_metrics(WorkerMetrics("w", 1, 0.0))
    s.on_metrics(WorkerMetrics("w", 5, 0.0))
    assert s.metrics.registry.get_sample_value("dynamo_ext_router_metrics_gaps_total") == 3


def test_a_router_task_that_dies_is_logged_counted_and_restarted(caplog) -> None:
    from dynamo_ext.router.server import RouterServer

    calls = []

    async def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("boom")

    async def main() -> None:
        srv = RouterServer(RouterConfig(block_size=BS, metrics_port=None, bind="tcp://127.0.0.1:0"))
        t = srv._supervised("router-test", flaky)  # noqa: SLF001 - the supervisor itself
        await asyncio.wait_for(t, 5)
        n = srv.metrics.registry.get_sample_value(
            "dynamo_ext_router_task_restarts_total", {"task": "router-test"}
        )
        assert n == 2
        srv.ctx.term()

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert len(calls) == 3
    assert "router task router-test died" in caplog.text


def test_vllm_offload_placeholder_events_are_applied() -> None:
    """vLLM's offloading connector announces chunks it did not see computed with no tokens
    and block_size 0 (``_placeholder_stored``): not malformed, their hashes are exact."""
    s = svc()
    s.register(WorkerRegistration("w", block_size=BS))
    feed(s, "w", 0, [BlockStored(HS[:3], None, [], 0, None, "CPU", None)])
    assert s.index.block_counts("w") == {"CPU": 3}
    assert s.metrics.registry.get_sample_value(
        "dynamo_ext_router_malformed_messages_total", {"source": "kv_event"}
    ) in (None, 0.0)
