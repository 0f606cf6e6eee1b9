"""KvPool: roundtrip, misses, integrity under concurrent processes, corruption, LRU capacity,
the background sweeper, key validation."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from dynamo_ext.pool import BufferTooSmallError, InvalidKeyError, KvPool
from dynamo_ext.pool.store import HEADER_SIZE


def _payload(key: str, version: int, size: int) -> bytes:
    """Self-describing bytes: a reader can tell a whole chunk from a mix of two writes."""
    unit = f"{key}:{version};".encode()
    return (unit * (size // len(unit) + 1))[:size]


def test_roundtrip_and_miss(tmp_path: Path) -> None:
    with KvPool(tmp_path, sweep_interval_s=0) as pool:
        data = os.urandom(100_000)
        assert pool.put("ns/00000000deadbeef-g0", data)
        assert pool.get("ns/00000000deadbeef-g0") == data
        buf = bytearray(200_000)
        assert pool.get_into("ns/00000000deadbeef-g0", buf) == len(data)
        assert bytes(buf[: len(data)]) == data
        assert pool.put("parts", [b"ab", memoryview(b"cd"), bytearray(b"ef")])
        assert pool.get("parts") == b"abcdef"
        md, kv = bytearray(2), bytearray(10)  # scatter read: metadata, then the KV buffer
        assert pool.get_into("parts", [md, kv]) == 6
        assert md == b"ab" and kv[:4] == b"cdef"
        assert pool.put("empty", b"")
        assert pool.get("empty") == b""
        assert pool.get("nope") is None
        assert pool.get_into("nope", buf) is None
        assert pool.contains("parts") and not pool.contains("nope")
        assert pool.batch_exists(["parts", "empty", "nope", "parts"]) == 2
        assert pool.batch_exists([]) == 0
        with pytest.raises(BufferTooSmallError):
            pool.get_into("ns/00000000deadbeef-g0", bytearray(10))
        assert pool.delete("parts") and not pool.delete("parts")
        assert pool.get("parts") is None
        s = pool.stats()
        assert s["hits"] == 5 and s["misses"] == 3 and s["corrupt"] == 0
        # names are sharded hashes: no key text on disk, no temp files left
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert files and all(p.suffix == ".kv" and len(p.parent.name) == 2 for p in files)


def test_bad_keys_rejected(tmp_path: Path) -> None:
    with KvPool(tmp_path, sweep_interval_s=0) as pool:
        for bad in ("", "a\x00b", "x" * 5000):
            with pytest.raises(InvalidKeyError, match="pool key"):
                pool.put(bad, b"1")
        with pytest.raises(InvalidKeyError, match="str"):
            pool.get(b"bytes-key")  # type: ignore[arg-type]
        # odd but legal keys are fine: slashes, dots, unicode
        assert pool.put("../../etc/passwd", b"1") and pool.get("../../etc/passwd") == b"1"
        assert not (tmp_path.parent / "etc").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "garbage"])
def test_corrupt_chunk_is_a_counted_miss(tmp_path: Path, damage: str) -> None:
    with KvPool(tmp_path, sweep_interval_s=0) as pool:
        data = os.urandom(50_000)
        pool.put("k", data)
        path = pool.path_of("k")
        raw = bytearray(Path(path).read_bytes())
        if damage == "truncate":
            raw = raw[: HEADER_SIZE + 1000]
        elif damage == "flip":
            raw[HEADER_SIZE + 777] ^= 0x01
        elif damage == "header":
            raw[0:4] = b"NOPE"
        else:
            raw += b"trailing"
        Path(path).write_bytes(bytes(raw))
        getter = pool.get if damage != "garbage" else (lambda k: pool.get_into(k, bytearray(1)))
        assert getter("k") is None
        assert pool.stats()["corrupt"] == 1
        assert not os.path.exists(path)  # dropped, so the next writer repairs it
        assert pool.get("k") is None and pool.stats()["corrupt"] == 1


def _writer(root: str, keys: list[str], size: int, rounds: int, seed: int) -> None:
    pool = KvPool(root, sweep_interval_s=0)
    for r in range(rounds):
        for k in keys:
            assert pool.put(k, _payload(k, seed * 1000 + r, size))


def _reader(root: str, keys: list[str], size: int, until: float, q: mp.Queue) -> None:
    pool = KvPool(root, sweep_interval_s=0)
    buf = bytearray(size)
    seen = bad = 0
    while time.monotonic() < until:
        for k in keys:
            d = pool.get(k)
            n = pool.get_into(k, buf)
            for got in (d, bytes(buf[:n]) if n is not None else None):
                if got is None:
                    continue
                seen += 1
                unit = got[: got.index(b";") + 1]
                if (
                    not unit.startswith(k.encode())
                    or got != (unit * (size // len(unit) + 1))[:size]
                ):
                    bad += 1
    q.put((seen, bad, pool.stats()["corrupt"]))


def test_concurrent_processes_never_see_partial_chunks(tmp_path: Path) -> None:
    # fork: the test module is not importable by name under --import-mode=importlib
    ctx = mp.get_context("fork")
    keys = [f"shared/{i:04x}" for i in range(8)]
    size = 1 << 20
    q: mp.Queue = ctx.Queue()
    until = time.monotonic() + 6.0
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), keys, size, 15, s)) for s in (1, 2)]
    readers = [
        ctx.Process(target=_reader, args=(str(tmp_path), keys, size, until, q)) for _ in (1, 2)
    ]
    for p in writers + readers:
        p.start()
    results = [q.get(timeout=60) for _ in readers]
    for p in writers + readers:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(r[0] for r in results) > 0, "readers never saw a chunk"
    assert all(r[1] == 0 for r in results), results
    assert all(r[2] == 0 for r in results), results
    assert not list(tmp_path.rglob("*.tmp"))


def test_lru_eviction_keeps_recently_read(tmp_path: Path) -> None:
    chunk = 100_000
    with KvPool(tmp_path, 10 * (chunk + HEADER_SIZE), sweep_interval_s=0) as pool:
        for i in range(10):
            pool.put(f"k{i}", os.urandom(chunk))
            os.utime(pool.path_of(f"k{i}"), (1000 + i, 1000 + i))  # k0 oldest
        assert pool.get("k0") is not None  # a hit makes k0 the most recent
        for i in range(10, 13):
            pool.put(f"k{i}", os.urandom(chunk))
        s = pool.stats()
        assert s["evictions"] >= 3
        assert s["bytes_used"] <= 10 * (chunk + HEADER_SIZE)
        assert pool.contains("k0"), "the recently read chunk was evicted"
        assert not pool.contains("k1") and not pool.contains("k2")
        assert all(pool.contains(f"k{i}") for i in range(10, 13))


def test_sweeper_evicts_other_processes_writes(tmp_path: Path) -> None:
    chunk = 50_000
    cap = 5 * (chunk + HEADER_SIZE)
    with KvPool(tmp_path, cap, sweep_interval_s=0.1) as sweeper:
        other = KvPool(tmp_path, sweep_interval_s=0)  # another writer, no limit of its own
        for i in range(20):
            other.put(f"o{i}", os.urandom(chunk))
        sweeps = sweeper.stats()["sweeps"]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (
            sweeper.stats()["sweeps"] < sweeps + 2 or sweeper.stats()["bytes_used"] > cap
        ):
            time.sleep(0.05)
        used = sum(p.stat().st_size for p in tmp_path.rglob("*.kv"))
        assert used <= cap and sweeper.stats()["evictions"] >= 15
        assert sweeper.stats()["sweeps"] >= 2


def _until(cond, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"not met in {timeout}s")


def test_one_sweeper_per_pool_and_followers_get_the_removal_journal(tmp_path: Path) -> None:
    """Three processes' worth of pools on one root: one lease holder scans; the others only
    read the journal of what vanished (deleted here, or evicted by the capacity pass)."""
    got: list[tuple[float, str]] = []
    pools = [KvPool(tmp_path, sweep_interval_s=0.05, on_removed=got.extend) for _ in range(3)]
    try:
        sweeper = _until(lambda: [p for p in pools if p.is_sweeper])
        assert len(sweeper) == 1
        others = [p for p in pools if not p.is_sweeper]
        for i in range(6):
            others[0].put(f"j{i}", b"x" * 1000)
        s0 = sweeper[0].stats()["sweeps"]
        _until(lambda: sweeper[0].stats()["sweeps"] >= s0 + 2)  # its listing holds them now
        assert sweeper[0].is_sweeper  # renewed before and after each scan: no lapse
        t_del = time.time()
        victims = sorted(others[0].path_of(f"j{i}") for i in (1, 4))
        for v in victims:
            os.unlink(v)
        # each of the three pools delivers both entries once
        _until(lambda: len(got) >= 6)
        time.sleep(0.3)
        assert sorted(p for _, p in got) == sorted(victims * 3)
        assert all(ts >= t_del - 0.01 for ts, _ in got)
        assert all(p.stats()["sweeps"] == 0 for p in others)  # followers never scanned
        assert all(p.stats()["reconciles"] == 0 for p in pools)
        assert sweeper[0].stats()["journaled"] == 2
    finally:
        for p in pools:
            p.close()


def _hold_lease(root: str) -> None:
    KvPool(root, sweep_interval_s=0.1)
    time.sleep(120)


def test_dead_sweepers_lease_is_taken_over_and_followers_reconcile(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    proc = ctx.Process(target=_hold_lease, args=(str(tmp_path),))
    proc.start()
    try:
        lease = tmp_path / ".sweeper"
        _until(lambda: lease.exists() and f":{proc.pid}:" in lease.read_text())
        scans: list[set[str]] = []
        pool = KvPool(tmp_path, sweep_interval_s=0.1, on_scan=lambda ex, ts: scans.append(ex))
        pool.put("still-here", b"y" * 100)
        time.sleep(0.5)
        assert not pool.is_sweeper  # the other process renews its lease
        os.kill(proc.pid, 9)  # dies holding it
        _until(lambda: pool.is_sweeper, timeout=5)
        st = pool.stats()
        assert st["lease_takeovers"] == 1 and st["reconciles"] == 1
        assert scans and pool.path_of("still-here") in scans[0]
    finally:
        proc.kill()
        proc.join()
        pool.close()
    assert not (tmp_path / ".sweeper").exists()  # handed back on close
