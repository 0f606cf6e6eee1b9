from __future__ import annotations

from dynamo_ext.router.sequences import ActiveSequences


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
