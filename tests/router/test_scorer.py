"""Cost functions and selection policies."""

from __future__ import annotations

import collections

import pytest

from dynamo_ext.config import ScorerConfig
from dynamo_ext.protocol import WorkerMetrics
from dynamo_ext.router.indexer import PrefixMatches
from dynamo_ext.router.scorer import Candidate, Scorer
from dynamo_ext.router.sequences import WorkerLoad


def cand(
    wid: str,
    running: int = 0,
    waiting: int = 0,
    used: int = 0,
    total: int = 1000,
    prefill_q: int = 0,
    load: WorkerLoad | None = None,
) -> Candidate:
    m = WorkerMetrics(
        wid,
        1,
        0.0,
        running=running,
        waiting=waiting,
        kv_used_blocks=used,
        kv_total_blocks=total,
        prefill_queue_tokens=prefill_q,
    )
    return Candidate(wid, m, load or WorkerLoad())


def test_kv_prefers_the_cached_prefix_when_load_is_equal() -> None:
    s = Scorer(ScorerConfig(seed=0), block_size=16)
    cs = [cand("a"), cand("b")]
    chosen, _ = s.select(cs, PrefixMatches({"b": 30}, {}, 32))
    assert chosen.worker_id == "b"
    assert chosen.prefix_hit_blocks == {"GPU": 30}
    assert chosen.new_prefill_blocks == 2


def test_kv_load_outweighs_a_small_hit() -> None:
    s = Scorer(ScorerConfig(seed=0), block_size=16)
    cs = [cand("a"), cand("b", running=4, waiting=3, used=400)]
    chosen, scores = s.select(cs, PrefixMatches({"b": 4}, {}, 32), explain=True)
    assert chosen.worker_id == "a"
    by = {x.worker_id: x for x in scores}
    # a: 32 new blocks; b: 28 new + 400 decode / 16 + 4 running / 16 + 3 waiting / 2
    assert by["a"].cost == 32 and by["b"].cost == 28 + 25 + 0.25 + 1.5


def test_offload_hits_are_cheaper_than_recompute_but_not_free() -> None:
    s = Scorer(ScorerConfig(seed=0, tier_costs={"CPU": 0.1, "DISK": 0.5}), block_size=16)
    cs = [cand("gpu"), cand("cpu"), cand("disk"), cand("none")]
    m = PrefixMatches({"gpu": 20}, {"cpu": {"CPU": 20}, "disk": {"DISK": 20}}, 20)
    _, scores = s.select(cs, m, explain=True)
    cost = {x.worker_id: x.cost for x in scores}
    assert cost["gpu"] < cost["cpu"] < cost["disk"] < cost["none"]
    off = {x.worker_id: x.offload_score for x in scores}
    assert off["cpu"] == pytest.approx(18.0) and off["disk"] == pytest.approx(10.0)


def test_predicted_load_spreads_a_burst_before_metrics_catch_up() -> None:
    s = Scorer(ScorerConfig(seed=0), block_size=16)
    loads = {w: WorkerLoad() for w in "abc"}
    cs = [cand(w, load=loads[w]) for w in "abc"]
    picks = []
    for _ in range(6):
        chosen, _ = s.select(cs, PrefixMatches({}, {}, 8))
        picks.append(chosen.worker_id)
        ld = loads[chosen.worker_id]
        ld.requests += 1
        ld.active_blocks += 8
        for c in cs:
            c.dirty = True
    assert collections.Counter(picks) == {"a": 2, "b": 2, "c": 2}


def test_full_kv_cache_is_penalized() -> None:
    s = Scorer(ScorerConfig(seed=0, kv_full_penalty=10.0), block_size=16)
    cs = [cand("full", used=990, total=1000), cand("free", used=900, total=1000)]
    chosen, _ = s.select(cs, PrefixMatches({"full": 8}, {}, 8))
    assert chosen.worker_id == "free"


def test_dynamo_cost_formula_and_temperature() -> None:
    cfg = ScorerConfig(mode="dynamo", overlap_weight=2.0, seed=1)
    s = Scorer(cfg, block_size=16)
    la = WorkerLoad()
    la.active_blocks, la.prefill_tokens = 10, 32
    cs = [Candidate("a", None, la), Candidate("b", None, WorkerLoad())]
    _, scores = s.select(cs, PrefixMatches({"a": 6}, {}, 8), explain=True)
    cost = {x.worker_id: x.cost for x in scores}
    # a: 2 * ((8 - 6) + 32/16) + (10 + 8) = 26;  b: 2 * 8 + 8 = 24
    assert cost == {"a": 26.0, "b": 24.0}
    # temperature 0 is argmin; a high temperature samples both
    assert {s.select(cs, PrefixMatches({"a": 6}, {}, 8))[0].worker_id for _ in range(20)} == {"b"}
    hot = Scorer(ScorerConfig(mode="dynamo", overlap_weight=2.0, temperature=5.0, seed=1), 16)
    picks = collections.Counter(
        hot.select(cs, PrefixMatches({"a": 6}, {}, 8))[0].worker_id for _ in range(400)
    )
    assert picks["a"] > 100 and picks["b"] > picks["a"]


def test_baseline_policies() -> None:
    cs = [cand("a", running=3), cand("b", running=1), cand("c", running=2)]
    m = PrefixMatches({"a": 8}, {}, 8)
    rr = Scorer(ScorerConfig(mode="round_robin"), 16)
    assert [rr.select(cs, m)[0].worker_id for _ in range(4)] == ["a", "b", "c", "a"]
    ll = Scorer(ScorerConfig(mode="least_loaded"), 16)
    assert ll.select(cs, m)[0].worker_id == "b"
    rnd = Scorer(ScorerConfig(mode="random", seed=3), 16)
    assert {rnd.select(cs, m)[0].worker_id for _ in range(50)} == {"a", "b", "c"}


def test_no_candidates_is_an_error() -> None:
    with pytest.raises(ValueError):
        Scorer(ScorerConfig(), 16).select([], PrefixMatches({}, {}, 1))


def test_dynamo_counts_each_active_block_once_per_worker() -> None:
    """Issue 14's example: worker a holds a 100-block prefix shared by 10 running requests;
    an 11th request of that prefix plus 11 new blocks costs a 11 prefill + (100 + 11) decode
    = 122 in Dynamo's active-sequence tracker (each active block once per worker), not
    11 + 10 * 100 + 111 = 1122, so it goes to the cache, not to the empty worker b (222)."""
    from dynamo_ext.router.sequences import ActiveSequences

    prefix = list(range(1, 101))
    seqs = ActiveSequences()
    for i in range(10):
        seqs.add(f"r{i}", "a", len(prefix), 0, hashes=prefix)
    prefix.append(999)  # the caller's list grows later (an engine's output blocks): no effect
    del prefix[-1]
    assert seqs.load("a").active_blocks == 1000 and seqs.load("a").unique_blocks == 100
    s = Scorer(ScorerConfig(mode="dynamo", overlap_weight=1.0, seed=0), block_size=16)
    cs = [Candidate("a", None, seqs.load("a")), Candidate("b", None, seqs.load("b"))]
    prompt = prefix + list(range(1000, 1011))
    chosen, scores = s.select(cs, PrefixMatches({"a": 100}, {}, 111), True, hashes=prompt)
    assert {x.worker_id: x.cost for x in scores} == {"a": 122.0, "b": 222.0}
    assert chosen.worker_id == "a"
    # Finishing releases each request's share; the last one frees the blocks.
    for i in range(9):
        seqs.finish(f"r{i}")
    assert seqs.load("a").unique_blocks == 100
    seqs.finish("r9")
    assert seqs.load("a").unique_blocks == 0 and seqs.load("a").active_blocks == 0


def test_kv_credits_a_prefix_still_in_flight_on_a_worker() -> None:
    """A conversation's previous turn is still prefilling on worker a: the index knows 10
    of its blocks, the reservation all 40. The next turn (40 + 8 blocks) costs a 8 new
    blocks there, not 38, so it follows the conversation instead of going to idle b."""
    from dynamo_ext.router.sequences import ActiveSequences

    prev = list(range(1, 41))
    seqs = ActiveSequences()
    seqs.add("t1", "a", 41, 0, hashes=prev)
    prompt = prev + list(range(500, 508))
    m = PrefixMatches({"a": 10}, {}, 48)
    cs = [Candidate("a", None, seqs.load("a")), Candidate("b", None, seqs.load("b"))]
    s = Scorer(ScorerConfig(seed=0, decode_weight=0.0625), block_size=16)
    _, scores = s.select(cs, m, True, hashes=prompt)
    cost = {x.worker_id: x.cost for x in scores}
    assert cost["a"] == pytest.approx(8 + 41 / 16 + 1 / 16) and cost["b"] == 48
    off = Scorer(ScorerConfig(seed=0, inflight_credit=False), block_size=16)
    _, scores = off.select(cs, m, True, hashes=prompt)
    assert {x.worker_id: x.cost for x in scores}["a"] == pytest.approx(38 + 41 / 16 + 1 / 16)
    # Without the hashes (a router that reserves without them) nothing changes.
    _, scores = s.select(cs, m, True)
    assert {x.worker_id: x.cost for x in scores}["a"] == pytest.approx(38 + 41 / 16 + 1 / 16)


def _metrics(wid: str, prefill_q: int = 0, running: int = 0, used: int = 0) -> WorkerMetrics:
    return WorkerMetrics(
        wid,
        1,
        0.0,
        running=running,
        kv_used_blocks=used,
        kv_total_blocks=1000,
        prefill_queue_tokens=prefill_q,
    )


def test_a_prefill_queue_the_router_reserved_and_saw_drain_is_not_counted_again() -> None:
    """Metrics are up to a period old: a queue they show of requests this router routed and
    that have prefilled since (their reservation released) must not keep the worker looking
    busy. Before the fix the cost took max(reservation, metrics) and sent this prompt away
    from its cache."""
    from dynamo_ext.router.sequences import ActiveSequences

    seqs = ActiveSequences()
    s = Scorer(ScorerConfig(seed=0), block_size=16)
    a, b = Candidate("a", None, seqs.load("a")), Candidate("b", None, seqs.load("b"))
    seqs.add("r1", "a", 101, 1600)  # 100 blocks to prefill on a
    s.observe(a, _metrics("a", prefill_q=1600, running=1, used=101))  # its snapshot
    s.observe(b, _metrics("b"))
    seqs.prefill_done("r1")  # a has prefilled r1; its next metrics are not here yet
    seqs.finish("r1")
    a.dirty = True
    chosen, _ = s.select([a, b], PrefixMatches({"a": 20}, {}, 32))
    assert chosen.worker_id == "a"


def test_load_the_metrics_show_beyond_the_routers_reservations_counts() -> None:
    """Requests someone else routed (another frontend, this router's earlier life) are in
    the metrics only: they count on top of the router's own reservations."""
    from dynamo_ext.router.sequences import ActiveSequences

    seqs = ActiveSequences()
    s = Scorer(ScorerConfig(seed=0, miss_weight=0.0), block_size=16)
    a, b = Candidate("a", None, seqs.load("a")), Candidate("b", None, seqs.load("b"))
    s.observe(a, _metrics("a", prefill_q=16 * 400, running=3))  # nothing of ours
    s.observe(b, _metrics("b"))
    seqs.add("mine", "b", 11, 160)  # 10 blocks of our own on b
    b.dirty = True
    chosen, scores = s.select([a, b], PrefixMatches({"a": 30}, {}, 32), explain=True)
    assert chosen.worker_id == "b"
    by = {x.worker_id: x.cost for x in scores}
    assert by["a"] >= 400 + 2  # external queue + the two blocks to compute
    assert by["b"] < by["a"]


def test_miss_weight_grows_with_the_share_of_busy_workers() -> None:
    """A recomputed block costs the fleet more when other workers are busy too: the same
    prompt waits behind a's queue for its cache on a busy fleet, and goes to an idle
    worker when the fleet is mostly idle."""

    def pick(c_busy: bool) -> str:
        s = Scorer(ScorerConfig(seed=0, miss_weight=2.0), block_size=16)
        cs = [Candidate(w, None, WorkerLoad()) for w in "abc"]
        s.observe(cs[0], _metrics("a", prefill_q=16 * 30))
        s.observe(cs[1], _metrics("b"))
        s.observe(cs[2], _metrics("c", prefill_q=16 * 200 if c_busy else 0))
        chosen, _ = s.select(cs, PrefixMatches({"a": 16}, {}, 32))
        return chosen.worker_id

    # one busy worker of three: a = 30 + 16 * (1 + 2/3) = 56.7, b = c = 32 * 1.67 = 53.3
    assert pick(c_busy=False) in ("b", "c")
    # two of three: a = 30 + 16 * (1 + 4/3) = 67.3, b = 32 * 2.33 = 74.7
    assert pick(c_busy=True) == "a"


# ---- the service's CostCache against the reference (no cache) -----------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dynamo_ext.config import RouterConfig  # noqa: E402
from dynamo_ext.hashing import BlockHasher  # noqa: E402
from dynamo_ext.protocol import (  # noqa: E402
    BlockStored,
    KVEventBatch,
    PrefillFinished,
    RequestFinished,
    RouteRequest,
    WorkerRegistration,
    encode,
    seq_bytes,
)
from dynamo_ext import native  # noqa: E402
from dynamo_ext.router.service import RouterService  # noqa: E402

_BS = 4
_PREFIXES = [[p * 1000 + i for i in range(_BS * 6)] for p in range(4)]
_op = st.one_of(
    st.tuples(st.just("route"), st.integers(0, 3), st.integers(0, 6), st.booleans()),
    st.tuples(st.just("store"), st.integers(0, 5), st.integers(0, 3), st.integers(1, 6)),
    st.tuples(st.just("finish"), st.integers(0, 50)),
    st.tuples(st.just("prefill_done"), st.integers(0, 50)),
    st.tuples(
        st.just("metrics"), st.integers(0, 5), st.integers(0, 4), st.integers(0, 40), st.booleans()
    ),
    st.tuples(st.just("down"), st.integers(0, 5)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, max_size=60), miss=st.sampled_from([0.0, 2.0]))
def test_the_cost_cache_gives_the_reference_costs(ops: list, miss: float) -> None:
    """The service's routes use a ``CostCache`` (only workers touched since the last route
    are refreshed; in-flight credit probes only hit workers and first-block holders): after
    any mix of routes, finishes, metrics, stores and departures its costs equal the
    reference's, which visits every candidate."""
    s = RouterService(
        RouterConfig(
            block_size=_BS, metrics_port=None, scorer=ScorerConfig(miss_weight=miss, seed=0)
        )
    )
    h = BlockHasher(_BS)
    ids = [f"w{i}" for i in range(6)]
    for w in ids:
        s.register(WorkerRegistration(w, block_size=_BS), static=True)
    seqs = dict.fromkeys(ids, 0)
    beats = dict.fromkeys(ids, 0)
    inflight: list[str] = []
    checked = native_checked = 0
    for n, op in enumerate(ops):
        kind = op[0]
        if kind == "store":
            _, w, p, k = op
            toks = _PREFIXES[p][: k * _BS]
            ev = BlockStored(h.hash_tokens(toks), None, toks, _BS, None, None, None)
            st_ = s.workers[ids[w]].stream
            s.ingest.on_live(st_, [b"", seq_bytes(seqs[ids[w]]), encode(KVEventBatch(0.0, [ev]))])
            seqs[ids[w]] += 1
        elif kind == "finish" and inflight:
            s.dispatch(RequestFinished(inflight.pop(op[1] % len(inflight))))
        elif kind == "prefill_done" and inflight:
            s.dispatch(PrefillFinished(inflight[op[1] % len(inflight)]))
        elif kind == "metrics":
            _, w, running, queue, full = op
            beats[ids[w]] += 1
            s.on_metrics(
                WorkerMetrics(
                    ids[w],
                    beats[ids[w]],
                    0.0,
                    running=running,
                    kv_used_blocks=99 if full else 10,
                    kv_total_blocks=100,
                    prefill_queue_tokens=queue * _BS,
                )
            )
        elif kind == "down":
            s.report_failure(ids[op[1]], "test")
        elif kind == "route":
            _, p, extra, track = op
            toks = _PREFIXES[p][: 2 * _BS] + [7_000_000 + n * 10 + i for i in range(extra * _BS)]
            cands, _mask, pos = s.candidates("aggregated", None)
            if not cands:
                continue
            hashes = [x for c in s.hash_chunks(toks) for x in c]
            matches = s.index.find_matches(hashes, _mask)
            cache = s._cost_caches[("aggregated", None)]
            ref = s.scorer._kv_costs(cands, matches, pos, hashes)  # type: ignore[arg-type]
            got = s.scorer._kv_costs(cands, matches, pos, hashes, cache)  # type: ignore[arg-type]
            assert got == ref, (n, op)
            # The route's pick without a cost per worker: the reference's choice and cost,
            # ties drawn from the same generator (its state after, too).
            rng = s.scorer._rng
            state = rng.getstate()
            want = s.scorer._argmin(ref, cands)  # type: ignore[arg-type]
            after = rng.getstate()
            # Both ways: the Python loop (the reference) and dynamo_ext._native.kv_pick.
            for on in (False, True):
                old = native.set_enabled(on)
                try:
                    rng.setstate(state)
                    pick = s.scorer._kv_pick(cands, matches, pos, hashes, cache)  # type: ignore[arg-type]
                finally:
                    native.set_enabled(old)
                assert pick == (want, ref[want]), (n, op, on)
                assert rng.getstate() == after
            if native.IMPL is not None and not cache.full and matches.num_blocks:
                # the C loop took this case (None would mean it declined to the reference)
                holders = cache.first_holders.get(hashes[0])  # type: ignore[union-attr]
                ow = s.scorer.config.overlap_weight + s.scorer.config.miss_weight * (
                    cache.busy / len(cands)
                )
                got_c = native.IMPL.kv_pick(
                    matches.gpu, pos, cache.base, cache.order, ow, ow * len(hashes),
                    hashes, holders, cands,
                )
                assert got_c is not None and got_c[0] == ref[want] and want in got_c[1]
                native_checked += 1
            checked += 1
            rid = f"r{n}"
            r = s.route(RouteRequest(request_id=rid, token_ids=toks, track=track))
            if track and hasattr(r, "worker_id"):
                inflight.append(rid)
    assert checked == sum(1 for o in ops if o[0] == "route") or any(o[0] == "down" for o in ops)
