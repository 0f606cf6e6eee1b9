"""The index's GPU tier in C (``_native.MaskMap``, block hash -> worker mask in a flat table)
against the pure-Python index on a dict: random fleets of up to 140 workers (masks inline,
of one wide worker, and interned across several words) under stores, removals, tier and
worker clears, worker churn, eviction by ``max_blocks_per_worker`` and several tiers must
leave every public view equal, and every query answer the same. Also the table alone
against a dict, the one-call ingest storing into it against ``store``, and the engine hash
map (``U64Map``, segmented the same way) through its growth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_ext import native
from dynamo_ext.router.indexer import KvIndex

pytestmark = pytest.mark.skipif(not native.available(), reason="dynamo_ext._native not built")

# Small values collide (shared prefixes); big, negative and > 64-bit ints take the table's
# other paths (keys past [0, 2**64) live in a dict beside it).
HASH = st.one_of(
    st.integers(0, 12),
    st.integers(2**64 - 4, 2**64 - 1),
    st.integers(-5, -1),
    st.just(2**64 + 3),
)
WORKER = st.one_of(st.integers(0, 5), st.integers(60, 70), st.integers(125, 140))
TIER = st.sampled_from(["GPU", "GPU", "GPU", "CPU", "DISK"])
OP = st.one_of(
    st.tuples(st.just("store"), WORKER, st.lists(HASH, max_size=10), TIER),
    st.tuples(st.just("remove"), WORKER, st.lists(HASH, max_size=6), TIER),
    st.tuples(st.just("clear"), WORKER, st.just([]), st.one_of(st.none(), TIER)),
    st.tuples(st.just("drop"), WORKER, st.just([]), st.none()),
)


def _under(on: bool, fn: Callable[[], Any]) -> Any:
    old = native.set_enabled(on)
    try:
        return fn()
    finally:
        native.set_enabled(old)


def _apply(ix: KvIndex, op: str, w: int, hs: list[int], tier: str | None) -> Any:
    wid = f"w{w}"
    if op == "store":
        # Fill the slots below ``w`` too, so that slot numbers reach past 63 and 127.
        for i in range(w + 1):
            ix.add_worker(f"w{i}")
        return ix.store(ix.add_worker(wid), hs, tier or "GPU")
    slot = ix.slot_of(wid)
    if op == "remove":
        return ix.remove(slot, hs, tier or "GPU") if slot is not None else None
    if op == "clear":
        return ix.clear_worker(wid, tier)
    return ix.remove_worker(wid)


def _views(ix: KvIndex, prompts: list[list[int]]) -> tuple:
    per_worker = {
        w: (ix.worker_blocks(w), ix.block_counts(w), ix.slot_of(w)) for w in ix.workers()
    }
    matches = []
    for hs in prompts:
        for cand in (None, ix.mask_of(ix.workers()[::2])):
            m = ix.find_matches(hs, cand)
            matches.append((m.gpu, list(m.gpu), m.offload, m.num_blocks))
        matches.append(tuple(ix.tier_prefix(hs, t) for t in ("GPU", "CPU")))
        slots = [ix.slot_of(w) for w in ix.workers()]
        matches.append(tuple(ix.holds(s, h) for s in slots if s is not None for h in hs))
    return (
        ix.workers(),
        ix.tier_sizes(),
        ix.num_entries(),
        per_worker,
        ix.dropped_over_capacity,
        matches,
    )


@settings(max_examples=400, deadline=None)
@given(
    st.lists(OP, max_size=60),
    st.sampled_from([0, 0, 3, 7]),
    st.lists(st.lists(HASH, max_size=12), min_size=1, max_size=4),
)
def test_native_index_equals_the_reference(ops: list, cap: int, prompts: list) -> None:
    nat = _under(True, lambda: KvIndex(max_blocks_per_worker=cap))
    ref = _under(False, lambda: KvIndex(max_blocks_per_worker=cap))
    assert type(nat._tiers["GPU"]) is native._MODULE.MaskMap  # type: ignore[union-attr]
    assert type(ref._tiers["GPU"]) is dict
    for op, w, hs, tier in ops:
        got = _under(True, lambda: _apply(nat, op, w, hs, tier))
        want = _under(False, lambda: _apply(ref, op, w, hs, tier))
        assert got == want, (op, w, hs, tier)
    want = _under(False, lambda: _views(ref, prompts))
    assert _under(True, lambda: _views(nat, prompts)) == want
    # The Python loops read the native table as they read a dict: same answers.
    assert _under(False, lambda: _views(nat, prompts)) == want


MASK = st.one_of(
    st.integers(1, 2**63 - 1),
    st.integers(1, 2**130).filter(lambda m: m > 0),
    st.sampled_from([1 << 63, 1 << 64, 1 << 200, (1 << 63) | 1, (1 << 4095) | (1 << 64)]),
)
KEY = st.one_of(st.integers(0, 50), st.integers(2**64 - 3, 2**64 - 1), st.integers(-3, -1))
TOP = st.one_of(
    st.tuples(st.just("set"), KEY, MASK),
    st.tuples(st.just("del"), KEY, st.none()),
    st.tuples(st.just("store"), st.lists(KEY, max_size=8), st.integers(0, 200)),
    st.tuples(st.just("remove"), st.lists(KEY, max_size=8), st.integers(0, 200)),
    st.tuples(st.just("clear_slot"), st.none(), st.integers(0, 200)),
)


def _dict_flip(d: dict[int, int], keys: list[int], slot: int, on: bool) -> int:
    b, n = 1 << slot, 0
    for k in keys:
        old = d.get(k, 0)
        if on and not old & b:
            d[k] = old | b
            n += 1
        elif not on and old & b:
            if old & ~b:
                d[k] = old & ~b
            else:
                del d[k]
            n += 1
    return n


@settings(max_examples=400, deadline=None)
@given(st.lists(TOP, max_size=40), st.lists(KEY, max_size=10), st.integers(0, 2**150))
def test_table_behaves_as_a_dict(ops: list, walk: list[int], alive: int) -> None:
    assert native._MODULE is not None
    m = native._MODULE.MaskMap()
    d: dict[int, int] = {}
    for op, a, b in ops:
        if op == "set":
            m[a] = b
            d[a] = b
        elif op == "del":
            if a in d:
                del m[a]
                del d[a]
            else:
                with pytest.raises(KeyError):
                    del m[a]
        elif op == "store":
            assert m.store(a, b) == _dict_flip(d, a, b, True)
        elif op == "remove":
            assert m.remove(a, b) == _dict_flip(d, a, b, False)
        else:
            held = [k for k, v in d.items() if v >> b & 1]
            assert sorted(m.slot_keys(b)) == sorted(held)
            assert m.clear_slot(b) == _dict_flip(d, held, b, False)
        assert len(m) == len(d)
    assert sorted(m.items()) == sorted(d.items())
    assert all(m.get(k) == d.get(k) and (k in m) == (k in d) for k in range(-3, 51))
    ix = KvIndex()
    ix._tiers["GPU"] = d  # the Python walk, over the dict model
    by_slot = _under(False, lambda: ix.gpu_walk_py(walk, alive))
    assert m.walk(walk, alive) == by_slot
    # Keyed by worker id in C: what find_matches made of the slots in Python.
    ids = [f"w{i}" for i in range(151)]
    assert m.walk(walk, alive, ids) == {ids[s]: n for s, n in by_slot.items()}
    assert m.walk(walk, alive, None) == by_slot
    # Every interned wide mask is released with the last block that used it.
    for k in list(d):
        del m[k]
    assert len(m) == 0 and m.wide_masks() == 0


def test_table_refuses_what_is_not_a_mask() -> None:
    assert native._MODULE is not None
    m = native._MODULE.MaskMap()
    for bad in (0, -1, "x", 1.0):
        with pytest.raises(ValueError):
            m[1] = bad
    with pytest.raises(OverflowError):
        m[1] = 1 << 5000
    with pytest.raises(ValueError):
        m.store([1], 4096)
    with pytest.raises(TypeError):
        m.store([[1]], 0)  # an unhashable key, as a dict says
    with pytest.raises(ValueError):
        m.walk([1], -1)
    m.store([1], 3)
    with pytest.raises(TypeError):
        m.walk([1], 1 << 3, ("w0",))  # ids: a list
    with pytest.raises(IndexError):
        m.walk([1], 1 << 3, ["w0"])  # slot 3 has no id
    del m[1]
    assert len(m) == 0


def test_a_big_index_survives_its_growth_and_a_clear() -> None:
    # Many segment doublings, then a worker clear that empties most of the table.
    nat = _under(True, KvIndex)
    ref = _under(False, KvIndex)
    for ix, on in ((nat, True), (ref, False)):
        def fill(ix: KvIndex = ix) -> None:
            a, b, c = ix.add_worker("a"), ix.add_worker("b"), ix.add_worker("c")
            ix.store(a, range(0, 60_000))
            ix.store(b, range(50_000, 70_000))
            ix.store(c, [h * 7919 % 2**64 for h in range(10_000)])
            ix.clear_worker("a")
            ix.remove(b, range(60_000, 61_000))

        _under(on, fill)
    held = (set(range(50_000, 70_000)) - set(range(60_000, 61_000))) | {
        h * 7919 for h in range(10_000)
    }
    assert nat.tier_sizes() == ref.tier_sizes() == {"GPU": len(held)}
    for w in ("a", "b", "c"):
        assert nat.worker_blocks(w) == ref.worker_blocks(w)
        assert nat.block_counts(w) == ref.block_counts(w)
    hs = list(range(50_000, 50_100))
    assert _under(True, lambda: nat.find_matches(hs).gpu) == {"b": 100}


def _frame(events: list[tuple[int, int, int | None]]) -> bytes:
    from dynamo_ext.protocol import BlockStored, KVEventBatch, encode

    evs = [
        BlockStored(
            list(range(h, h + n)),
            parent,
            [(h * 7 + i) % 1000 for i in range(n * 4)],
            4,
            None,
            "GPU",
            None,
        )
        for h, n, parent in events
    ]
    return encode(KVEventBatch(0.0, evs))  # type: ignore[arg-type]


EVENT = st.tuples(
    st.integers(0, 40), st.integers(0, 5), st.one_of(st.none(), st.integers(0, 45))
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(EVENT, max_size=4), max_size=8), st.sampled_from([0, 62, 63, 100]))
def test_ingest_into_the_table_equals_ingest_then_store(batches: list, slot: int) -> None:
    mod = native._MODULE
    assert mod is not None
    fused, split = mod.MaskMap(), mod.MaskMap()
    fused.store([7], 5)  # another worker's block already there
    split.store([7], 5)
    xf, xs = {"GPU": mod.U64Map()}, {"GPU": mod.U64Map()}
    for b in batches:
        f = _frame(b)
        got = mod.ingest_stored(f, 4, xf, fused, slot)
        want = mod.ingest_stored(f, 4, xs)
        if want is None:
            assert got is None
            continue
        hashes, events, orphans = want
        assert got == (split.store(hashes, slot), events, orphans)
    assert sorted(fused.items()) == sorted(split.items())
    assert sorted(xf["GPU"].items()) == sorted(xs["GPU"].items())


@pytest.mark.parametrize("bs,n", [(4, 1500), (16, 257), (7, 3), (4096, 1), (5000, 1)])
def test_long_events_hash_as_the_reference(bs: int, n: int) -> None:
    """Token ids are read in chunks and hashed four blocks at a time: every chunk and
    remainder gives token_block_hashes' chain; a block longer than a chunk is declined."""
    from dynamo_ext.hashing import token_block_hashes_py
    from dynamo_ext.protocol import BlockStored, KVEventBatch, encode

    mod = native._MODULE
    assert mod is not None
    toks = [(i * 2654435761) % (1 << 31) if i % 3 else i % 200 for i in range(n * bs)]
    ev = BlockStored(list(range(n)), None, toks, bs, None, "GPU", None)  # type: ignore[arg-type]
    got = mod.ingest_stored(encode(KVEventBatch(0.0, [ev])), bs, {"GPU": mod.U64Map()})
    if bs > 4096:
        assert got is None
    else:
        assert got is not None and got[0] == token_block_hashes_py(toks, bs, 0)


def test_engine_map_survives_its_growth_and_deletions() -> None:
    """U64Map (the engine -> router hash map), grown segment by segment past 100k keys,
    with deletions inside probe runs on the way: a dict's items, a dict's answers."""
    mod = native._MODULE
    assert mod is not None
    m, d = mod.U64Map(), {}
    for i in range(120_000):
        k = (i * 0x9E3779B97F4A7C15) % 2**64
        m[k] = d[k] = i
        if i % 3 == 0:
            gone = ((i // 2) * 0x9E3779B97F4A7C15) % 2**64
            assert m.pop(gone, None) == d.pop(gone, None)
    assert len(m) == len(d) and sorted(m.items()) == sorted(d.items())
    assert all(m.get(k) == v for k, v in d.items())
    m.clear()
    assert len(m) == 0 and m.get(next(iter(d))) is None
