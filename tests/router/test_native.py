"""dynamo_ext._native against its pure-Python references: the tokens-mode hash chain and the
index's GPU walk, on random prompts and random fleets under stores, removals, clears and
worker churn. Also: a missing or disabled extension falls back to the reference."""

from __future__ import annotations

import subprocess
import sys
from array import array
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_ext import native
from dynamo_ext.hashing import BlockHasher, token_block_hashes, token_block_hashes_py
from dynamo_ext.protocol import pack_tokens
from dynamo_ext.router.indexer import KvIndex

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
