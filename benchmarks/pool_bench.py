"""``dynamo-ext bench pool``: write and read bandwidth of the KV pool (``KvPool``) against
plain file writes and reads of the same bytes in the same directory, in the same run.

The plain side is the physical limit of the disk the pool sits on: ``open(p, "wb").write``
and ``open(p, "rb").read`` / ``readinto`` of files holding exactly the chunk bytes. The pool
side adds its header, checksum (xxh3 on write and on every read), unique temp name and
rename, and the sharded directory. Both sides write fresh names every repeat; repeats
alternate which side goes first (use an even number), and ``os.sync()`` runs, untimed, before
every timed phase so neither side pays for the other's dirty pages. Two page-cache regimes,
both applied to both sides alike:

* ``cold`` (the target): every write is followed by ``fdatasync`` (plain) / ``KvPool(fsync=
  True)`` so a write costs reaching the disk, and before the read phase every file of both
  sides is synced and dropped from the page cache with ``posix_fadvise(DONTNEED)``, so a read
  costs the disk. This is the pool's real job: chunks that outlive RAM.
* ``hot``: no fsync, no drop: writes land in and reads come from the page cache, so the
  difference is the pool's CPU cost over a memcpy (shown, not the target).

Reads are timed twice: ``get`` (returns new bytes) vs ``open().read()``, and ``get_into``
(into a preallocated buffer, what the engines use) vs ``readinto``. The last line printed is
one JSON object with ``write_ratio_vs_plain`` and ``read_ratio_vs_plain`` of the cold regime
(get vs read), the MB/s behind them, and ``target_met`` (both >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Any

from dynamo_ext.pool import KvPool

TARGET = 0.8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None, help="directory on the disk to measure (a temp dir)")
    p.add_argument("--chunk-mb", type=float, default=16.0, help="chunk size in MiB (16)")
    p.add_argument("--total-mb", type=float, default=256.0, help="MiB per side per repeat (256)")
    p.add_argument("--repeats", type=int, default=4, help="interleaved repeats (4, even)")
    p.add_argument("--cache", choices=["cold", "hot", "both"], default="both")
    p.add_argument(
        "--sweep-chunks",
        type=int,
        default=20000,
        help="pool size for the sweep cost (0: skip): one full scan, what every worker did "
        "each sweep before one sweeper, vs following the removal journal (20000)",
    )
    p.add_argument("--json", action="store_true", help="only the JSON line on stdout")


def _drop(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _run_regime(root: str, chunks: list[bytes], n: int, repeats: int, cold: bool) -> dict:
    size = len(chunks[0])
    plain_dir = os.path.join(root, "plain")
    pool_dir = os.path.join(root, "pool")
    os.makedirs(plain_dir, exist_ok=True)
    pool = KvPool(pool_dir, None, sweep_interval_s=0, fsync=cold)
    buf = bytearray(size)
    t: dict[str, float] = {
        k: 0.0 for k in ("pw", "qw", "pr", "qr", "pri", "qri")
    }  # p: plain, q: pool; w write, r read, ri read into

    def plain_write(names: list[str]) -> None:
        for i, name in enumerate(names):
            with open(name, "wb") as f:
                f.write(chunks[i % len(chunks)])
                if cold:
                    f.flush()
                    os.fdatasync(f.fileno())

    def pool_write(keys: list[str]) -> None:
        for i, k in enumerate(keys):
            if not pool.put(k, chunks[i % len(chunks)]):
                raise OSError(f"pool put {k} failed")

    def plain_read(names: list[str]) -> None:
        for name in names:
            with open(name, "rb") as f:
                if len(f.read()) != size:
                    raise OSError("short plain read")

    def pool_read(keys: list[str]) -> None:
        for k in keys:
            d = pool.get(k)
            if d is None or len(d) != size:
                raise OSError(f"pool miss on {k}")

    def plain_read_into(names: list[str]) -> None:
        for name in names:
            with open(name, "rb", buffering=0) as f:
                if f.readinto(buf) != size:
                    raise OSError("short plain read")

    def pool_read_into(keys: list[str]) -> None:
        for k in keys:
            if pool.get_into(k, buf) != size:
                raise OSError(f"pool miss on {k}")

    def timed(slot: str, fn: Any, arg: list[str]) -> None:
        os.sync()  # untimed: each side starts with no dirty pages of the other's to flush
        t0 = time.perf_counter()
        fn(arg)
        t[slot] += time.perf_counter() - t0

    try:
        for rep in range(repeats):
            names = [os.path.join(plain_dir, f"r{rep}-{i}.bin") for i in range(n)]
            keys = [f"bench/r{rep}/{i:08x}" for i in range(n)]
            pool_files = [pool.path_of(k) for k in keys]
            pool_first = rep % 2 == 1
            order = [("qw", pool_write, keys), ("pw", plain_write, names)]
            for slot, fn, arg in order if pool_first else order[::-1]:
                timed(slot, fn, arg)
            for slot_p, fn_p, slot_q, fn_q in (
                ("pr", plain_read, "qr", pool_read),
                ("pri", plain_read_into, "qri", pool_read_into),
            ):
                if cold:
                    _drop(names + pool_files)
                order = [(slot_q, fn_q, keys), (slot_p, fn_p, names)]
                for slot, fn, arg in order if pool_first else order[::-1]:
                    timed(slot, fn, arg)
            for p in names + pool_files:
                os.unlink(p)
    finally:
        pool.close()
    mb = size * n * repeats / 1e6
    mbps = {k: mb / v for k, v in t.items()}
    st = pool.stats()
    return {
        "write_mb_s_pool": round(mbps["qw"], 1),
        "write_mb_s_plain": round(mbps["pw"], 1),
        "read_mb_s_pool": round(mbps["qr"], 1),
        "read_mb_s_plain": round(mbps["pr"], 1),
        "read_into_mb_s_pool": round(mbps["qri"], 1),
        "read_into_mb_s_plain": round(mbps["pri"], 1),
        "write_ratio_vs_plain": round(mbps["qw"] / mbps["pw"], 3),
        "read_ratio_vs_plain": round(mbps["qr"] / mbps["pr"], 3),
        "read_into_ratio_vs_plain": round(mbps["qri"] / mbps["pri"], 3),
        "pool_hits": st["hits"],
        "pool_corrupt": st["corrupt"],
    }


def _sweep_cost(base: str, n: int, removed_frac: float = 0.01) -> dict[str, Any]:
    """Per-process cost of learning what left the pool: a full scan (each worker scanned
    the pool every sweep) vs following the sweeper's journal of ``removed_frac`` removals."""
    root = os.path.join(base, "sweep")
    got: list[tuple[float, str]] = []
    sweeper = KvPool(root, sweep_interval_s=0)
    follower = KvPool(root, sweep_interval_s=0, on_removed=got.extend)
    for i in range(n):
        sweeper.put(f"s{i}", b"k" * 64)
    scans = []
    for _ in range(3):
        t0 = time.perf_counter()
        sweeper._scan()
        scans.append(time.perf_counter() - t0)
    sweeper._scan_and_evict(journal=True)  # the sweeper's listing
    follower._follow()  # start at the journal's end
    k = max(1, int(n * removed_frac))
    for i in range(k):
        os.unlink(sweeper.path_of(f"s{i}"))
    t0 = time.perf_counter()
    sweeper._scan_and_evict(journal=True)
    t_sweeper = time.perf_counter() - t0
    t0 = time.perf_counter()
    follower._follow()
    t_follow = time.perf_counter() - t0
    assert len(got) == k, (len(got), k)
    scan = sorted(scans)[1]
    return {
        "chunks": n,
        "removed": k,
        "full_scan_ms": round(scan * 1e3, 2),
        "sweeper_scan_and_journal_ms": round(t_sweeper * 1e3, 2),
        "follow_journal_ms": round(t_follow * 1e3, 3),
        "per_worker_ratio_vs_full_scan": round(t_follow / scan, 4),
    }


def run(
    root: str | None = None,
    chunk_mb: float = 16.0,
    total_mb: float = 256.0,
    repeats: int = 4,
    cache: str = "both",
    sweep_chunks: int = 0,
) -> dict[str, Any]:
    size = max(1, int(chunk_mb * (1 << 20)))
    n = max(1, int(total_mb * (1 << 20)) // size)
    chunks = [os.urandom(size) for _ in range(min(n, 4))]
    base = tempfile.mkdtemp(prefix="dynamo-ext-pool-bench-", dir=root)
    try:
        regimes = ["cold", "hot"] if cache == "both" else [cache]
        res = {
            r: _run_regime(os.path.join(base, r), chunks, n, repeats, r == "cold") for r in regimes
        }
        sweep = _sweep_cost(base, sweep_chunks) if sweep_chunks > 0 else None
    finally:
        shutil.rmtree(base, ignore_errors=True)
    from dynamo_ext.pool.store import CK_XXH3_64, DEFAULT_CHECKSUM

    main = res["cold"] if "cold" in res else res["hot"]
    out: dict[str, Any] = {
        "bench": "pool",
        "root": os.path.abspath(root or tempfile.gettempdir()),
        "chunk_bytes": size,
        "chunks_per_repeat": n,
        "repeats": repeats,
        "checksum": "xxh3_64" if DEFAULT_CHECKSUM == CK_XXH3_64 else "crc32",
        "regime": "cold" if "cold" in res else "hot",
        "regimes": res,
        "sweep": sweep,
    }
    for k in (
        "write_mb_s_pool",
        "write_mb_s_plain",
        "read_mb_s_pool",
        "read_mb_s_plain",
        "write_ratio_vs_plain",
        "read_ratio_vs_plain",
    ):
        out[k] = main[k]
    out["target_met"] = (
        main["write_ratio_vs_plain"] >= TARGET and main["read_ratio_vs_plain"] >= TARGET
    )
    return out


def main(args: argparse.Namespace) -> int:
    res = run(args.root, args.chunk_mb, args.total_mb, args.repeats, args.cache, args.sweep_chunks)
    if not args.json:
        print(json.dumps(res, indent=2))
    print(json.dumps(res))
    return 0
