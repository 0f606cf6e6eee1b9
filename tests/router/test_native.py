"""dynamo_ext._native against its pure-Python references: the tokens-mode hash chain, the
index's GPU walk, on random prompts and random fleets under stores, removals, clears and
worker churn, and the tokens-mode ingest of a BlockStored straight from its msgpack bytes
(``stored_tokens``), on valid and hostile token arrays alike, alone and through the whole
ingest. Also: a missing or disabled extension falls back to the reference."""

from __future__ import annotations

import random
import subprocess
import sys
from array import array
from collections import Counter
from collections.abc import Iterator

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_ext import native
from dynamo_ext.config import RouterConfig
from dynamo_ext.hashing import BlockHasher, token_block_hashes, token_block_hashes_py
from dynamo_ext.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    WorkerRegistration,
    encode,
    pack_tokens,
    seq_bytes,
)
from dynamo_ext.router.indexer import KvIndex
from dynamo_ext.router.ingest import stored_tokens_py
from dynamo_ext.router.sequences import count_absent, count_down, count_up, run_in
from dynamo_ext.router.service import RouterService

pytestmark = pytest.mark.skipif(not native.available(), reason="dynamo_ext._native not built")

U32 = st.integers(0, 2**32 - 1)
PARENT = st.one_of(st.just(0), st.integers(0, 2**64 - 1), st.integers(-(2**70), 2**70))


@pytest.fixture
def reference() -> Iterator[None]:
    old = native.set_enabled(False)
    yield
    native.set_enabled(old)


@settings(max_examples=300, deadline=None)
@given(st.lists(U32, max_size=200), st.integers(1, 40), PARENT)
def test_token_hash_chain_equals_the_reference(toks: list[int], bs: int, parent: int) -> None:
    want = token_block_hashes_py(toks, bs, parent)
    assert native.IMPL is not None
    got_list = native.IMPL.token_block_hashes(toks, bs, parent)
    got_buf = native.IMPL.token_block_hashes(memoryview(pack_tokens(toks)).cast("I"), bs, parent)
    got_arr = native.IMPL.token_block_hashes(array("I", toks), bs, parent)
    assert got_list == got_buf == got_arr == want
    assert len(want) == len(toks) // bs


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**80), 2**80), max_size=64), st.integers(1, 8))
def test_token_hash_chain_of_any_int_equals_the_reference(toks: list[int], bs: int) -> None:
    # Token ids past uint32 (or negative) go through each item's own hash, as tuple() does.
    assert native.IMPL is not None
    assert native.IMPL.token_block_hashes(toks, bs, 7) == token_block_hashes_py(toks, bs, 7)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.sampled_from([0, 1, 2**30 - 1, 2**30, 2**31, 2**61 - 1, 2**61, -1, -2, True, False]),
        min_size=1,
        max_size=64,
    ),
    st.integers(4090, 9000),
    st.sampled_from([1, 16, 128]),
)
def test_token_hash_chain_past_the_stack_and_at_the_compact_edge(
    pattern: list[int], n: int, bs: int
) -> None:
    toks = (pattern * (n // len(pattern) + 1))[:n]
    # Past 4096 tokens the token hashes go to the heap; ints of one 30-bit digit are read
    # in place, every other int (and bool) through its own hash.
    assert native.IMPL is not None
    assert native.IMPL.token_block_hashes(toks, bs, 3) == token_block_hashes_py(toks, bs, 3)


def test_token_hash_chain_fails_cleanly_on_an_unhashable_token() -> None:
    assert native.IMPL is not None
    for n in (100, 5000):  # on the stack and on the heap
        toks: list[object] = [1] * n
        toks[n - 200] = []
        with pytest.raises(TypeError):
            native.IMPL.token_block_hashes(toks, 16)  # type: ignore[arg-type]


def test_token_hash_chain_rejects_what_python_rejects() -> None:
    assert native.IMPL is not None
    with pytest.raises(ValueError):
        native.IMPL.token_block_hashes([1, 2], 0)
    with pytest.raises(TypeError):
        native.IMPL.token_block_hashes(5, 16)  # type: ignore[arg-type]
    # bytes are not uint32s: they are read as a sequence of small ints, like tuple(bytes)
    b = bytes(range(32))
    assert native.IMPL.token_block_hashes(b, 16) == token_block_hashes_py(b, 16)


def test_block_hasher_tokens_mode_uses_the_chain(reference: None) -> None:
    toks = list(range(100))
    py = BlockHasher(16, "tokens").hash_tokens(toks, cache_salt="t")
    native.set_enabled(True)
    assert BlockHasher(16, "tokens").hash_tokens(toks, cache_salt="t") == py


# ---- the index walk ------------------------------------------------------------------
HASHES = st.integers(0, 40)  # a small space, so that prompts and stored chains collide
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("store"), st.integers(0, 69), st.lists(HASHES, max_size=12)),
        st.tuples(st.just("remove"), st.integers(0, 69), st.lists(HASHES, max_size=6)),
        st.tuples(st.just("clear"), st.integers(0, 69), st.just([])),
        st.tuples(st.just("drop"), st.integers(0, 69), st.just([])),
    ),
    max_size=60,
)


def both(idx: KvIndex, hashes: list[int], cand: int | None):
    old = native.set_enabled(True)
    try:
        a = idx.find_matches(hashes, cand)
        native.set_enabled(False)
        b = idx.find_matches(hashes, cand)
    finally:
        native.set_enabled(old)
    return a, b


@settings(max_examples=300, deadline=None)
@given(OPS, st.lists(st.lists(HASHES, max_size=20), min_size=1, max_size=5), st.data())
def test_find_matches_native_equals_the_reference(ops, prompts, data) -> None:
    # Up to 70 workers: masks wider than one 64-bit word, slots freed and reused.
    idx = KvIndex()
    for op, w, hs in ops:
        wid = f"w{w}"
        if op == "store":
            idx.store(idx.add_worker(wid), hs, data.draw(st.sampled_from(["GPU", "GPU", "CPU"])))
        elif op == "remove" and idx.slot_of(wid) is not None:
            idx.remove(idx.slot_of(wid), hs)  # type: ignore[arg-type]
        elif op == "clear":
            idx.clear_worker(wid)
        elif op == "drop":
            idx.remove_worker(wid)
    workers = idx.workers()
    for hs in prompts:
        subset = data.draw(st.lists(st.sampled_from(workers), unique=True)) if workers else []
        for cand in (None, idx.mask_of(subset)):
            a, b = both(idx, hs, cand)
            assert a.gpu == b.gpu and list(a.gpu) == list(b.gpu)  # same order too
            assert a.offload == b.offload and a.num_blocks == b.num_blocks


@settings(max_examples=200, deadline=None)
@given(OPS, st.data())
def test_store_native_equals_the_reference(ops, data) -> None:
    """The same events applied natively and by the reference leave the same index."""
    idx = {True: KvIndex(), False: KvIndex()}
    for op, w, hs in ops:
        wid = f"w{w}"
        tier = data.draw(st.sampled_from(["GPU", "CPU"]))
        got = {}
        for on, ix in idx.items():
            old = native.set_enabled(on)
            try:
                if op == "store":
                    got[on] = ix.store(ix.add_worker(wid), hs, tier)
                elif op == "remove" and ix.slot_of(wid) is not None:
                    got[on] = ix.remove(ix.slot_of(wid), hs, tier)  # type: ignore[arg-type]
                elif op == "clear":
                    ix.clear_worker(wid)
                elif op == "drop":
                    ix.remove_worker(wid)
            finally:
                native.set_enabled(old)
        assert got[True] == got[False] if got else True
    a, b = idx[True], idx[False]
    assert a.workers() == b.workers() and a.tier_sizes() == b.tier_sizes()
    for wid in a.workers():
        assert a.worker_blocks(wid) == b.worker_blocks(wid)
        assert a.block_counts(wid) == b.block_counts(wid)


def test_store_native_shares_the_worker_bit_and_refuses_non_ints() -> None:
    assert native.IMPL is not None
    bit = 1 << 200
    d: dict[int, int] = {5: 1, 6: bit, 7: 0}
    assert native.IMPL.store_blocks(d, [5, 6, 7, 8, 8], bit) == 3
    assert d == {5: 1 | bit, 6: bit, 7: bit, 8: bit} and d[8] is bit and d[7] is bit
    with pytest.raises(TypeError):
        native.IMPL.store_blocks({1: "x"}, [1], 2)  # type: ignore[dict-item]


def test_find_matches_native_on_a_wide_fleet() -> None:
    # 4096 slots: masks of 64 words; a block held by every worker, then one by the last.
    idx = KvIndex()
    slots = [idx.add_worker(f"w{i}") for i in range(4096)]
    for s in slots:
        idx.store(s, [1, 2])
    idx.store(slots[-1], [3, 4])
    idx.store(slots[100], [3])
    a, b = both(idx, [1, 2, 3, 4, 5], None)
    assert a.gpu == b.gpu
    assert a.gpu["w4095"] == 4 and a.gpu["w100"] == 3 and a.gpu["w0"] == 2
    a, b = both(idx, [1, 2, 3, 4], idx.mask_of(["w4095", "w7"]))
    assert a.gpu == b.gpu == {"w7": 2, "w4095": 4}


def test_gpu_walk_refuses_bad_masks() -> None:
    assert native.IMPL is not None
    with pytest.raises(ValueError):
        native.IMPL.gpu_walk({}, [1], -1)
    with pytest.raises(OverflowError):
        native.IMPL.gpu_walk({1: 1}, [1], 1 << 5000)
    with pytest.raises(TypeError):
        native.IMPL.gpu_walk({1: "x"}, [1], 3)  # type: ignore[dict-item]


def test_a_missing_build_falls_back_with_a_warning() -> None:
    """The extension made unimportable: routing still works, on the reference, and says so."""
    code = (
        "import sys, logging; logging.basicConfig(level=logging.WARNING)\n"
        "sys.modules['dynamo_ext._native'] = None\n"  # import of it raises ImportError
        "from dynamo_ext import native\n"
        "from dynamo_ext.hashing import token_block_hashes, token_block_hashes_py\n"
        "from dynamo_ext.router.metrics import RouterMetrics\n"
        "from prometheus_client import generate_latest\n"
        "assert not native.available() and not native.enabled()\n"
        "t = list(range(64))\n"
        "assert token_block_hashes(t, 16) == token_block_hashes_py(t, 16)\n"
        "page = generate_latest(RouterMetrics().registry).decode()\n"
        "assert 'dynamo_ext_router_native 0.0' in page, page\n"
        "print('fallback ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "fallback ok" in r.stdout
    assert "dynamo_ext._native is not built" in r.stderr


def test_the_router_reports_native_on() -> None:
    from prometheus_client import generate_latest

    from dynamo_ext.router.metrics import RouterMetrics

    page = generate_latest(RouterMetrics().registry).decode()
    assert "dynamo_ext_router_native 1.0" in page
    assert token_block_hashes is not token_block_hashes_py


# ---- tokens-mode BlockStored from its undecoded token_ids ------------------------------
MSGPACK_INT = st.one_of(
    st.integers(0, 2**32 - 1),
    st.integers(-(2**63), 2**64 - 1),  # every msgpack int width, signed and unsigned
    st.sampled_from([-1, -2, -32, -33, 127, 128, 2**61 - 1, 2**61, -(2**61), 2**64 - 1]),
)
NOT_INT = st.one_of(
    st.floats(allow_nan=False), st.booleans(), st.none(), st.text(max_size=3), st.binary(max_size=3)
)


def both_stored(raw: bytes, bs: int, parent: int, hashes: list[int]):
    """``stored_tokens`` natively (into a dict and into a U64Map) and by the reference:
    (result or error class, xlat) of each; the native two must agree with each other."""
    assert native.IMPL is not None
    out = []
    for fn, x in (
        (native.IMPL.stored_tokens, native.IMPL.U64Map()),
        (native.IMPL.stored_tokens, {}),
        (stored_tokens_py, {}),
    ):
        x[-5] = 9  # an earlier block's entry, kept whatever happens
        x[2**64 - 1] = 4
        try:
            got: object = fn(raw, bs, parent, hashes, x)  # type: ignore[operator]
        except Exception as exc:  # noqa: BLE001 - the class is the result
            got = type(exc)
        out.append((got, dict(x)))
    assert out[0] == out[1]
    return out[1:]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.integers(0, 5), PARENT, st.data())
def test_stored_tokens_equals_the_reference(bs: int, nblocks: int, parent: int, data) -> None:
    toks = data.draw(st.lists(MSGPACK_INT, min_size=bs * nblocks, max_size=bs * nblocks))
    hashes = data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=nblocks, max_size=nblocks))
    raw = msgspec.msgpack.encode(toks)
    (a, xa), (b, xb) = both_stored(raw, bs, parent, hashes)
    assert a == b == token_block_hashes_py(toks, bs, parent)
    want = {-5: 9, 2**64 - 1: 4, **dict(zip(hashes, a, strict=True))}  # type: ignore[arg-type]
    assert xa == xb == want
    # msgspec.Raw, what the lean decoder hands over, reads the same
    assert native.IMPL is not None
    assert native.IMPL.stored_tokens(msgspec.Raw(raw), bs, parent, hashes, {}) == a


def _header(n: int, kind: int) -> bytes:
    """A msgpack array header of ``n`` items, in one of its three widths (kind 1, 2 may be
    non-minimal, still valid msgpack)."""
    if kind == 0 and n < 16:
        return bytes([0x90 | n])
    if kind <= 1 and n < 2**16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 4), st.integers(0, 4), st.data())
def test_stored_tokens_refuses_what_the_reference_refuses(bs: int, nblocks: int, data) -> None:
    """Hostile token arrays: a wrong count, a non-int item, a truncated or padded buffer,
    another msgpack type, random bytes. Both raise ValueError (the ingest counts it as an
    InvalidEvent) and leave xlat as it was, or both read the same hashes."""
    n = bs * nblocks
    hashes = list(range(100, 100 + nblocks))
    ints = data.draw(st.lists(MSGPACK_INT, min_size=n, max_size=n))
    items = [msgspec.msgpack.encode(t) for t in ints]
    how = data.draw(st.sampled_from(["count", "item", "truncate", "trail", "type", "random"]))
    if how == "count":
        m = data.draw(st.integers(0, n + 3).filter(lambda m: m != n))
        other = data.draw(st.lists(MSGPACK_INT, min_size=m, max_size=m))
        body = [msgspec.msgpack.encode(t) for t in other]
        raw = _header(m, data.draw(st.integers(0, 2))) + b"".join(body)
    elif how == "item" and n:
        i = data.draw(st.integers(0, n - 1))
        bad = data.draw(st.one_of(NOT_INT.map(msgspec.msgpack.encode), st.just(b"\x91\x01")))
        items[i] = bad
        raw = _header(n, data.draw(st.integers(0, 2))) + b"".join(items)
    elif how == "truncate":
        whole = _header(n, data.draw(st.integers(0, 2))) + b"".join(items)
        raw = whole[: data.draw(st.integers(0, max(len(whole) - 1, 0)))]
    elif how == "trail":
        raw = _header(n, data.draw(st.integers(0, 2))) + b"".join(items)
        raw += data.draw(st.binary(min_size=1, max_size=4))
    elif how == "type":
        a_map = st.dictionaries(st.text(max_size=2), MSGPACK_INT, max_size=2)
        raw = msgspec.msgpack.encode(data.draw(st.one_of(NOT_INT, a_map)))
    else:
        raw = data.draw(st.binary(max_size=40))
    (a, xa), (b, xb) = both_stored(raw, bs, 3, hashes)
    assert a == b if isinstance(a, list) else (a is b is ValueError), (how, raw, a, b)
    assert xa == xb
    if not isinstance(a, list):
        assert xa == {-5: 9, 2**64 - 1: 4}  # nothing of a refused event reached the map


def test_stored_tokens_refuses_bad_arguments() -> None:
    assert native.IMPL is not None
    raw = msgspec.msgpack.encode(list(range(4)))
    for fn in (native.IMPL.stored_tokens, stored_tokens_py):
        with pytest.raises(ValueError):
            fn(raw, 0, 0, [], {})
        with pytest.raises(ValueError):
            fn(b"", 4, 0, [1], {})  # token_ids absent (msgspec.Raw())
        with pytest.raises(TypeError):
            fn(raw, 2, 0, [[1], 2], {})  # an unhashable engine hash
    with pytest.raises(TypeError):
        native.IMPL.stored_tokens(raw, 4, 0, [1], [])  # type: ignore[arg-type]
    m = native.IMPL.U64Map()
    with pytest.raises(TypeError):
        native.IMPL.stored_tokens(raw, 2, 0, [1, [2]], m)  # type: ignore[list-item]
    assert len(m) == 0  # refused whole: not even the first block


# ---- U64Map, a dict for the engine hash -> router hash map ----------------------------
MAP_KEYS = st.one_of(
    st.integers(0, 40),  # a small space: collisions, probe runs, deletions inside them
    st.integers(0, 2**64 - 1),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.binary(max_size=2),
)
MAP_VALUES = st.one_of(
    st.integers(0, 2**64 - 2), st.just(2**64 - 1), st.integers(-(2**70), 2**70), st.text(max_size=2)
)
MAP_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), MAP_KEYS, MAP_VALUES),
        st.tuples(st.just("del"), MAP_KEYS, st.none()),
        st.tuples(st.just("pop"), MAP_KEYS, st.none()),
        st.tuples(st.just("pop_default"), MAP_KEYS, MAP_VALUES),
        st.tuples(st.just("get"), MAP_KEYS, MAP_VALUES),
        st.tuples(st.just("in"), MAP_KEYS, st.none()),
        st.tuples(
            st.just("update"), st.lists(st.tuples(MAP_KEYS, MAP_VALUES), max_size=4), st.none()
        ),
        st.tuples(
            st.just("update_dict"), st.dictionaries(MAP_KEYS, MAP_VALUES, max_size=4), st.none()
        ),
        st.tuples(st.just("clear"), st.none(), st.none()),
    ),
    max_size=120,
)


def _apply_op(m, op: str, k, v):  # type: ignore[no-untyped-def]
    try:
        if op == "set":
            m[k] = v
        elif op == "del":
            del m[k]
        elif op == "pop":
            return ("ok", m.pop(k))
        elif op == "pop_default":
            return ("ok", m.pop(k, v))
        elif op == "get":
            return ("ok", m.get(k), m.get(k, v))
        elif op == "in":
            return ("ok", k in m)
        elif op in ("update", "update_dict"):
            m.update(k)
        else:
            m.clear()
    except KeyError:
        return ("KeyError",)
    return ("ok",)


@settings(max_examples=300, deadline=None)
@given(MAP_OPS)
def test_u64map_behaves_as_a_dict(ops) -> None:
    assert native.IMPL is not None
    m, d = native.IMPL.U64Map(), {}
    for op, k, v in ops:
        assert _apply_op(m, op, k, v) == _apply_op(d, op, k, v), (op, k, v)
        assert len(m) == len(d)
    assert dict(m) == d and dict(m.items()) == d
    # (a bool key comes back as the int it equals, as a dict would find it either way)
    assert set(m) == set(m.keys()) == set(d) and len(list(m)) == len(d)
    assert Counter(m.values()) == Counter(d.values())


def test_u64map_many_keys_grow_and_delete() -> None:
    """Growth past many resizes, and deletions in the middle of long probe runs."""
    import random

    assert native.IMPL is not None
    rng = random.Random(3)
    m, d = native.IMPL.U64Map(), {}
    for _ in range(100_000):
        k = rng.randrange(4000) if rng.random() < 0.7 else rng.getrandbits(64)
        r = rng.random()
        if r < 0.55:
            d[k] = m[k] = rng.getrandbits(63)
        elif r < 0.85:
            assert m.pop(k, None) == d.pop(k, None)
        else:
            assert m.get(k) == d.get(k)
    assert dict(m) == d and len(m) == len(d)
    # A table of 16 slots kept 2/3 full: probe runs that wrap past its end, deleted from.
    for _ in range(100):  # new keys each round: other slots, other runs
        keys = [rng.getrandbits(64) for _ in range(11)]
        small, sd = native.IMPL.U64Map(), {}
        for _ in range(1000):
            k = rng.choice(keys)
            if rng.random() < 0.5:
                sd[k] = small[k] = 7
            else:
                assert small.pop(k, None) == sd.pop(k, None)
            assert all(small.get(j) == sd.get(j) for j in keys)
    with pytest.raises(TypeError):
        m[[1]] = 2  # type: ignore[index]
    with pytest.raises(TypeError):
        hash(m)
    m.clear()
    assert len(m) == 0 and list(m) == [] and m.get(5) is None


# ---- U64Map as a counter: ActiveSequences' block_refs ----------------------------------
EDGES = [0, 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1, 2**64, 2**64 + 1, -1, -(2**63), -(2**64)]
REF_KEYS = st.one_of(
    st.integers(0, 12),  # a small space: duplicates within one call and across calls
    st.sampled_from(EDGES),
    st.integers(0, 2**64 - 1),
    st.integers(-(2**70), 2**70),
    st.booleans(),  # True is the key 1, as to a dict
)
# Stored values that counting takes out of the table's range (0 - 1, 2**64 - 2 + 1) or
# through Python's arithmetic (a float, a str that refuses it).
REF_VALUES = st.one_of(st.integers(-2, 3), st.sampled_from(EDGES), st.just(1.5), st.just("x"))
_PLAIN_KEY_LISTS = st.lists(REF_KEYS, max_size=80)  # past a batch (32)
REF_KEY_LISTS = st.one_of(
    _PLAIN_KEY_LISTS,
    # an unhashable key mid-way
    _PLAIN_KEY_LISTS.map(lambda ks: ks[: len(ks) // 2] + [[0]] + ks[len(ks) // 2 :]),
)
REF_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("up"), _PLAIN_KEY_LISTS),
        st.tuples(st.just("down"), REF_KEY_LISTS),
        # keys that are there, then (miss) one that is not, mid-way
        st.tuples(
            st.just("down_held"), st.integers(0, 2**16), st.one_of(st.none(), st.sampled_from(EDGES))
        ),
        st.tuples(st.just("up"), REF_KEY_LISTS),
        st.tuples(st.just("run"), REF_KEY_LISTS, st.integers(0, 90), st.integers(0, 90)),
        st.tuples(st.just("absent"), REF_KEY_LISTS),
        st.tuples(st.just("set"), REF_KEYS, REF_VALUES),
        st.tuples(st.just("clear")),
    ),
    max_size=40,
)


def _ref_op(m, op: tuple, held: list):  # type: ignore[no-untyped-def]
    """One counting op on ``m`` (a U64Map runs its C method, a dict the Python reference in
    router.sequences); the result, or the exception's type and args."""
    name, *args = op
    try:
        if name == "up":
            count_up(m, args[0])
        elif name in ("down", "down_held"):
            count_down(m, held if name == "down_held" else args[0])
        elif name == "run":
            return ("ok", run_in(m, args[0], args[1], args[2]))
        elif name == "absent":
            return ("ok", count_absent(m, tuple(args[0])))  # a tuple as well as a list
        elif name == "set":
            m[args[0]] = args[1]
        else:
            m.clear()
    except (KeyError, TypeError) as e:
        return (type(e).__name__, e.args if isinstance(e, KeyError) else ())
    return ("ok",)


@settings(max_examples=400, deadline=None)
@given(REF_OPS)
def test_u64map_counts_as_the_reference_on_a_dict(ops) -> None:
    """count_up/count_down/run_in/count_absent natively equal router.sequences' Python loops
    on a dict after every step: duplicates in one call, keys at the edges of u64 and past
    them, values counted out of the table's range, and a count_down that meets an absent
    key (KeyError, the keys before it taken) or an unhashable one."""
    assert native.IMPL is not None
    m, d = native.IMPL.U64Map(), {}
    for op in ops:
        held: list = []
        if op[0] == "down_held":  # a release of keys present, duplicates up to their count
            rng = random.Random(op[1])
            held = [k for k, c in d.items() if type(c) is int and c > 0 for _ in range(min(c, 3))]
            held = rng.sample(held, rng.randint(0, len(held)))
            if op[2] is not None and op[2] not in d:
                held.insert(rng.randint(0, len(held)), op[2])
        assert _ref_op(m, op, held) == _ref_op(d, op, held), op
        assert len(m) == len(d) and dict(m) == d, op
        assert {k: type(v) for k, v in m.items()} == {k: type(v) for k, v in d.items()}


def test_u64map_counting_refuses_bad_arguments() -> None:
    assert native.IMPL is not None
    m = native.IMPL.U64Map()
    m.count_up(range(3))  # any sequence
    assert dict(m) == {0: 1, 1: 1, 2: 1}
    for call in (
        lambda: m.count_up(5),
        lambda: m.count_down(None),
        lambda: m.count_absent(7),
        lambda: m.run_in(3, 0),
        lambda: m.count_up(),
        lambda: m.run_in([1]),
        lambda: m.run_in([1], "0"),
    ):
        with pytest.raises(TypeError):
            call()  # type: ignore[operator]
    with pytest.raises(ValueError):
        m.run_in([0, 1], -1)
    with pytest.raises(ValueError):
        run_in({}, [0, 1], -1, 2)
    assert m.run_in([0, 1, 2, 3], 0) == 3 and m.run_in([0, 1, 2], 1, 2) == 2
    assert m.run_in([0], 5) == 5 and m.run_in([0, 1], 2, 1) == 2


def test_u64map_counting_survives_a_key_that_changes_the_list() -> None:
    """The slow path runs Python code (a key's __hash__/__eq__): one that empties the keys'
    list mid-call must leave no dangling read, and count as the loop over the list does."""
    assert native.IMPL is not None

    class Shrinker:
        def __init__(self, keys: list) -> None:
            self.keys = keys

        def __hash__(self) -> int:
            del self.keys[2:]
            return 7

        def __eq__(self, other: object) -> bool:
            return self is other

    for m in (native.IMPL.U64Map(), {}):
        keys: list = [1, 2]
        keys += [Shrinker(keys)] + list(range(100, 200))
        count_up(m, keys)
        assert sorted(v for v in m.values()) == [1, 1, 1] and len(keys) == 2


# ---- the whole tokens-mode ingest, native and reference --------------------------------
BS = 4
TOKEN_IDS = st.one_of(
    st.lists(st.integers(0, 50), min_size=BS, max_size=3 * BS),  # a small vocabulary: repeats
    st.lists(st.one_of(st.integers(0, 50), NOT_INT), min_size=1, max_size=2 * BS),
)
EVENTS = st.lists(
    st.one_of(
        st.tuples(
            st.just("store"),
            st.integers(0, 20),
            TOKEN_IDS,
            st.sampled_from([None, "GPU", "CPU"]),
            st.sampled_from([BS, BS, 0, 8]),  # the router's, a placeholder's, another
        ),
        st.tuples(
            st.just("remove"),
            st.integers(0, 20),
            st.lists(st.integers(0, 60), max_size=4),
            st.sampled_from([None, "CPU"]),
            st.just(0),
        ),
        st.tuples(st.just("clear"), st.just(0), st.just([]), st.just(None), st.just(0)),
    ),
    max_size=30,
)


def _batches(events: list, per_batch: int) -> list[bytes]:
    """Engine hashes are small ints, so that parents, repeats and removals collide."""
    evs: list = []
    for op, h, toks, medium, bs in events:
        if op == "store":
            n = max(len(toks) // BS, 1)
            parent = None if h % 3 == 0 else h + 5
            evs.append(BlockStored(list(range(h, h + n)), parent, toks, bs, None, medium, None))
        elif op == "remove":
            evs.append(BlockRemoved(toks, medium))
        else:
            evs.append(AllBlocksCleared())
    return [
        encode(KVEventBatch(0.0, evs[i : i + per_batch])) for i in range(0, len(evs), per_batch)
    ]


def _ingested(frames: list[bytes], on: bool) -> tuple[dict, dict, dict]:
    old = native.set_enabled(on)
    try:
        s = RouterService(RouterConfig(block_size=BS, metrics_port=None, hash_mode="tokens"))
        st_ = s.register(WorkerRegistration("w0", block_size=BS), static=True).stream
        for seq, f in enumerate(frames):
            s.ingest.on_live(st_, [b"", seq_bytes(seq), f])
        bad = {
            smp.labels["source"]: smp.value
            for m in s.metrics.malformed.collect()
            for smp in m.samples
            if smp.name.endswith("_total")
        }
        return s.index.worker_blocks("w0"), bad, {t: dict(x) for t, x in st_.xlat.items()}
    finally:
        native.set_enabled(old)


@settings(max_examples=150, deadline=None)
@given(EVENTS, st.integers(1, 4))
def test_tokens_mode_ingest_native_equals_the_reference(events: list, per_batch: int) -> None:
    """The same frames (stores with good and bad token arrays, orphans, offload tiers,
    placeholders, removals, clears) leave the same index, the same engine -> router map
    and the same malformed counts, natively and on the reference."""
    frames = _batches(events, per_batch)
    assert _ingested(frames, True) == _ingested(frames, False)


def test_tokens_mode_ingest_counts_a_bad_token_array_and_goes_on() -> None:
    good = BlockStored([1], None, [1, 2, 3, 4], BS, None, None, None)
    bad = [
        BlockStored([2], None, [1, 2, 3], BS, None, None, None),  # wrong count
        BlockStored([3], None, [1, 2.5, 3, 4], BS, None, None, None),  # non-int
        BlockStored([4], None, [1, 2, "x", 4], BS, None, None, None),
        BlockStored([5], None, [[1], 2, 3, 4], BS, None, None, None),
    ]
    for on in (True, False):
        blocks, bad_counts, xlat = _ingested([encode(KVEventBatch(0.0, [*bad, good]))], on)
        assert bad_counts.get("kv_event") == len(bad) and set(xlat["GPU"]) == {1}
        assert blocks == {"GPU": token_block_hashes_py([1, 2, 3, 4], BS)}
