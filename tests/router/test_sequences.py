from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_ext import native
from dynamo_ext.router.sequences import ActiveSequences, run_in


def test_reserve_prefill_then_finish() -> None:
    s = ActiveSequences(ttl_s=60)
    s.add("r1", "w0", blocks=10, prefill_tokens=100)
    s.add("r2", "w0", blocks=5, prefill_tokens=50)
    ld = s.load("w0")
    assert (ld.requests, ld.active_blocks, ld.prefill_tokens) == (2, 15, 150)
    assert s.prefill_done("r1") == "w0"
    assert ld.prefill_tokens == 50
    assert s.finish("r1") == "w0" and s.finish("r1") is None
    assert (ld.requests, ld.active_blocks, ld.prefill_tokens) == (1, 5, 50)


def test_reroute_replaces_the_reservation() -> None:
    s = ActiveSequences()
    s.add("r1", "w0", 10, 100)
    s.add("r1", "w1", 10, 100)  # migrated
    assert s.load("w0").requests == 0 and s.load("w1").requests == 1


def test_expiry_and_drop_worker() -> None:
    s = ActiveSequences(ttl_s=10)
    s.add("r1", "w0", 3, 30)
    s.add("r2", "w1", 3, 30)
    assert s.expire(now=0) == []
    import time

    assert s.expire(now=time.monotonic() + 11) == ["w0", "w1"]
    assert len(s) == 0 and s.expired == 2
    s.add("r3", "w0", 3, 30)
    ld = s.load("w0")
    assert s.drop_worker("w0") == ["r3"]
    assert ld.requests == 0 and s.load("w0") is ld  # the same object, reset in place


def test_first_block_holders_follow_the_requests_in_flight() -> None:
    """The scorer's in-flight credit visits the workers in ``first_holders``: a request's
    first block is held while it runs and released by finish, expiry or its worker's drop."""
    from dynamo_ext.router.sequences import ActiveSequences

    s = ActiveSequences(ttl_s=60)
    s.add("a", "w1", 3, 0, hashes=[11, 12, 13])
    s.add("b", "w1", 2, 0, hashes=[11, 22])
    s.add("c", "w2", 2, 0, hashes=[11, 32])
    s.add("d", "w2", 1, 0, hashes=[41])
    assert s.first_holders == {11: {"w1": 2, "w2": 1}, 41: {"w2": 1}}
    s.finish("a")
    assert s.first_holders == {11: {"w1": 1, "w2": 1}, 41: {"w2": 1}}
    s.drop_worker("w2")
    assert s.first_holders == {11: {"w1": 1}}
    s.expire(now=1e18)
    assert s.first_holders == {}


OPS = st.lists(
    st.one_of(
        # a prompt of hashes from a small space (shared prefixes, repeats within a prompt),
        # now and then past u64 or below 0
        st.tuples(
            st.just("add"),
            st.integers(0, 7),
            st.integers(0, 3),
            st.one_of(
                st.none(),
                st.lists(st.integers(0, 30), max_size=70),
                st.lists(st.sampled_from([0, 5, 2**64 - 1, 2**64, -3]), max_size=5),
            ),
        ),
        st.tuples(st.just("finish"), st.integers(0, 7), st.just(0), st.none()),
        st.tuples(st.just("prefill_done"), st.integers(0, 7), st.just(0), st.none()),
        st.tuples(st.just("drop_worker"), st.just(0), st.integers(0, 3), st.none()),
        st.tuples(st.just("expire"), st.just(0), st.just(0), st.none()),
    ),
    max_size=40,
)


def _run(ops: list, on: bool, probes: list[list[int]]) -> list:
    """The ops on an ActiveSequences made with the extension on or off, and what the scorer
    reads of it after each: every worker's counts, new blocks of each probe prompt, the
    run of each through the active blocks, and first_holders."""
    old = native.set_enabled(on)
    try:
        s = ActiveSequences(ttl_s=60)
        if on and native.available():
            assert type(s.load("w0").block_refs) is not dict  # a U64Map
        seen: list = []
        for op, r, w, hashes in ops:
            if op == "add":
                s.add(f"r{r}", f"w{w}", len(hashes or ()) + 1, 16, hashes=hashes)
            elif op == "finish":
                seen.append(s.finish(f"r{r}"))
            elif op == "prefill_done":
                seen.append(s.prefill_done(f"r{r}"))
            elif op == "drop_worker":
                seen.append(s.drop_worker(f"w{w}"))
            else:
                seen.append(s.expire(now=1e18))
            for i in range(4):
                ld = s.load(f"w{i}")
                seen.append(
                    (
                        ld.requests,
                        ld.active_blocks,
                        ld.prefill_tokens,
                        ld.unique_blocks,
                        ld.hashed_blocks,
                        dict(ld.block_refs),
                        [ld.new_blocks(p) for p in probes],
                        [run_in(ld.block_refs, p, k, len(p)) for p in probes for k in (0, 2)],
                    )
                )
            seen.append({h: dict(ws) for h, ws in s.first_holders.items()})
        return seen
    finally:
        native.set_enabled(old)


@settings(max_examples=200, deadline=None)
@given(OPS, st.lists(st.lists(st.integers(0, 30), max_size=70), min_size=1, max_size=3))
def test_native_block_refs_equal_the_reference(ops: list, probes: list[list[int]]) -> None:
    """block_refs as a U64Map (count_up/count_down/run_in/count_absent in C) and as a dict
    (the Python loops) give the same unique_blocks, new_blocks, runs and first_holders."""
    assert _run(ops, True, probes) == _run(ops, False, probes)
