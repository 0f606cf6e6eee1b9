"""The global KV pool's store: KV chunks as files under one directory tree shared by every
worker, the directory being a 3FS mount in production and any local folder in tests.

A chunk lives at ``root/<2 hex>/<32 hex>.kv``, the name being a 128-bit BLAKE2b of the
caller's key (a chained prefix hash, LMCache's key string, a HiCache page hash), so any key
maps to a safe, evenly sharded name. A file is a 32-byte header (magic, format version,
checksum algorithm, payload length, payload checksum) followed by the payload, written to a
unique temporary name in the same directory and renamed over the final name: a reader sees
the old chunk, the new chunk, or none, never a half-written one. Every read checks magic,
length and checksum; a chunk that fails is a miss, counted as ``corrupt`` and unlinked if
the name still points at the inode that was read. Capacity is shared by all processes on
one root: each process's puts are added to its own view of the bytes used, and once that
view passes the limit, or every ``sweep_interval_s`` on a background thread, a pass scans
the tree and unlinks the chunks with the oldest mtime down to ``low_watermark`` of the
limit. A read hit bumps the chunk's mtime (at most once a second), so mtime order is the
LRU order across processes.

One process per pool sweeps: the holder of a lease file (``.sweeper``: owner and time,
replaced by rename, renewed before and after every scan, taken over once stale for three
sweep intervals and at least two seconds;
a file, not ``flock``, so it holds across 3FS clients on several hosts). Its scans journal
the chunks that vanished since its previous scan (evicted by anyone, or deleted) to
``.journal/NNNNNNNN.log`` lines ``<wall time> <path>``; every process that needs to know
(a tier that announced chunks to a router) tails the journal: O(removals), not O(pool),
per process. When the lease changes hands, the new sweeper's first scan has nothing to
compare with, so followers reconcile once with a full scan (``on_scan``).

I/O is ``os.writev``/``os.readv`` of header and payload straight from and into the caller's
buffers: the payload is never copied in Python. On a real 3FS mount with ``hf3fs_fuse.io``
(``hf3fs-py-usrbio``) importable, the payload goes through 3FS's user-space ring instead of
FUSE (``_UsrbioIO``).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dynamo_ext.errors import DynamoExtError

_xxhash: Any
try:  # xxh3 runs at ~16 GB/s here, zlib.crc32 at ~2.5 GB/s: that is the read ratio.
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - xxhash is a dependency; kept for odd installs
    _xxhash = None

logger = logging.getLogger(__name__)

MAGIC = b"DXKV"
VERSION = 1
CK_CRC32 = 1
CK_XXH3_64 = 2
# magic, version, checksum algorithm, reserved, payload length, checksum
_HEADER = struct.Struct("<4sHHQQQ")
HEADER_SIZE = _HEADER.size  # 32
SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
MAX_KEY_BYTES = 4096
_TOUCH_EVERY_S = 1.0  # mtime resolution of the cross-process LRU
_STALE_TMP_S = 300.0  # a temp file this old belongs to a writer that died
LEASE = ".sweeper"
JOURNAL = ".journal"
_LEASE_STALE_SWEEPS = 3  # a lease not renewed for this many sweep intervals is taken over
_LEASE_STALE_MIN_S = 2.0  # ... and for at least this long (a busy host's thread may lag)
_JOURNAL_ROTATE_BYTES = 1 << 20
_JOURNAL_KEEP = 4  # journal files kept; a follower further behind reconciles


class PoolError(DynamoExtError):
    """A KV pool operation was called wrongly (bad key, buffer too small)."""


class InvalidKeyError(PoolError, ValueError):
    """The key is not a non-empty str of at most 4096 UTF-8 bytes without NUL."""


class BufferTooSmallError(PoolError, ValueError):
    """``get_into`` was given a buffer smaller than the stored payload."""


def _checksum_fn(algo: int) -> Any:
    if algo == CK_XXH3_64:
        return None if _xxhash is None else _xxhash.xxh3_64_intdigest
    if algo == CK_CRC32:
        return zlib.crc32
    return None


def _checksum(algo: int, views: Sequence[Any]) -> int:
    """Checksum of the concatenation of ``views``, without concatenating them."""
    if len(views) == 1:
        return int(_checksum_fn(algo)(views[0]))
    if algo == CK_XXH3_64:
        h = _xxhash.xxh3_64()
        for v in views:
            h.update(v)
        return int(h.intdigest())
    ck = 0
    for v in views:
        ck = zlib.crc32(v, ck)
    return ck


DEFAULT_CHECKSUM = CK_XXH3_64 if _xxhash is not None else CK_CRC32


@dataclass
class PoolStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    puts: int = 0
    put_errors: int = 0
    evictions: int = 0
    sweeps: int = 0  # scans this process made as the pool's sweeper
    journaled: int = 0  # vanished chunks this process journaled as the sweeper
    lease_takeovers: int = 0
    reconciles: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    bytes_used: int = 0  # whole pool (all processes): last scan + this process's puts since
    chunks: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def on_hf3fs_mount(path: str) -> str | None:
    """The 3FS mount point ``path`` lies on, from /proc/mounts, or None."""
    real = os.path.realpath(path)
    best: str | None = None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or "hf3fs" not in parts[2]:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and (
                    best is None or len(mnt) > len(best)
                ):
                    best = mnt
    except OSError:
        return None
    return best


class _UsrbioIO:
    """Payload I/O through 3FS's user-space ring (``hf3fs_fuse.io``, package hf3fs-py-usrbio).

    UNTESTED here: the package does not build on this machine and there is no 3FS mount;
    written from 3FS's ``hf3fs_fuse/io.py`` and ``tests/fuse/usrbio.py``. One registered
    shared-memory iovec and one read and one write ring per thread; the payload is staged in
    the iovec (3FS DMA-reads/writes it, so FUSE's kernel copies are skipped).
    """

    def __init__(self, mount: str, h3io: Any) -> None:
        self.mount = mount
        self.h3io = h3io
        self._tls = threading.local()

    def _ctx(self, size: int) -> Any:
        from multiprocessing import shared_memory

        ctx = self._tls
        if getattr(ctx, "size", 0) < size:
            cap = max(size, 1 << 20)
            shm = shared_memory.SharedMemory(size=cap, create=True)
            ctx.iov = self.h3io.make_iovec(shm, self.mount, 0, -1)
            shm.unlink()  # the iovec's symlink keeps the mapping reachable for 3FS
            ctx.shm = shm
            ctx.rd = self.h3io.make_ioring(self.mount, 1, True, 0)
            ctx.wr = self.h3io.make_ioring(self.mount, 1, False, 0)
            ctx.size = cap
        return ctx

    def pwrite(self, fd: int, parts: Sequence[Any], total: int) -> None:
        ctx = self._ctx(total)
        off = 0
        for p in parts:
            n = len(memoryview(p).cast("B"))
            ctx.shm.buf[off : off + n] = memoryview(p).cast("B")
            off += n
        self.h3io.register_fd(fd)
        try:
            ctx.wr.prepare(ctx.iov[:total], False, fd, 0)
            res = ctx.wr.submit().wait(min_results=1)[0].result
            if res != total:
                raise OSError(-res if res < 0 else 5, "usrbio short write")
            self.h3io.force_fsync(fd)  # 3FS updates the file length only on fsync
        finally:
            self.h3io.deregister_fd(fd)

    def pread(self, fd: int, size: int, dst: memoryview) -> int:
        """Read the file's first ``size`` bytes (header and payload) into ``dst``."""
        ctx = self._ctx(size)
        self.h3io.register_fd(fd)
        try:
            ctx.rd.prepare(ctx.iov[:size], True, fd, 0)
            res = ctx.rd.submit().wait(min_results=1)[0].result
        finally:
            self.h3io.deregister_fd(fd)
        if res < 0:
            raise OSError(-res, "usrbio read failed")
        dst[:res] = ctx.shm.buf[:res]
        return int(res)


def _load_usrbio(root: str, use_usrbio: bool | None) -> _UsrbioIO | None:
    if use_usrbio is False:
        return None
    mount = on_hf3fs_mount(root)
    try:
        import hf3fs_fuse.io as h3io
    except ImportError:
        h3io = None
    if mount is None or h3io is None:
        if use_usrbio:
            raise PoolError(
                f"use_usrbio=True but {'no 3FS mount under ' + root if mount is None else ''}"
                f"{'hf3fs_fuse.io is not importable' if h3io is None else ''}"
            )
        return None
    return _UsrbioIO(mount, h3io)


class KvPool:
    """KV chunks in a shared directory (a 3FS mount), keyed by strings; see the module doc.

    Thread-safe and multi-process-safe on one ``root``. ``capacity_bytes=None`` means no
    limit (no eviction); ``sweep_interval_s=0`` disables the background sweeper.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity_bytes: int | None = None,
        *,
        sweep_interval_s: float = 10.0,
        low_watermark: float = 0.9,
        fsync: bool = False,
        use_usrbio: bool | None = None,
        checksum: int = DEFAULT_CHECKSUM,
        on_scan: Callable[[set[str], float], None] | None = None,
        on_removed: Callable[[list[tuple[float, str]]], None] | None = None,
    ) -> None:
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise PoolError(f"capacity_bytes must be > 0 or None, got {capacity_bytes}")
        if not 0.0 < low_watermark <= 1.0:
            raise PoolError(f"low_watermark must be in (0, 1], got {low_watermark}")
        if _checksum_fn(checksum) is None:
            raise PoolError(f"checksum algorithm {checksum} is not available")
        self.root = os.path.abspath(os.fspath(root))
        os.makedirs(self.root, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.low_watermark = low_watermark
        self.fsync = fsync
        self._algo = checksum
        self._usrbio = _load_usrbio(self.root, use_usrbio)
        self._stats = PoolStats()
        self._lock = threading.Lock()  # counters and the bytes-used view
        self._evict_lock = threading.Lock()  # one eviction pass at a time per process
        self._counter = itertools.count()
        self._stop = threading.Event()
        # A tier that announced chunks learns which ones left the pool (evicted by any
        # process sharing it, or deleted), to announce their removal: ``on_removed`` gets
        # journal entries (wall time found missing, chunk path) as the sweeper writes them;
        # ``on_removed`` is called every sweep interval, with no entries too;
        # ``on_scan`` gets every chunk path that exists and the wall time of the scan, when
        # the journal cannot be trusted (a new sweeper, or this process fell behind).
        self._on_scan = on_scan
        self._on_removed = on_removed
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._interval = sweep_interval_s
        self._lease_owner: str | None = None  # as last read
        self._prev: set[str] | None = None  # sweeper: paths at its previous scan
        self._jpos: tuple[int, int] | None = None  # follower: (journal file no, offset)
        self._sweeper: threading.Thread | None = None
        if capacity_bytes is not None or sweep_interval_s > 0:
            self._scan_and_evict()  # start from the pool's real size
        if sweep_interval_s > 0:
            self._follow()  # from the journal's end: earlier removals are not ours
            self._sweeper = threading.Thread(
                target=self._sweep_loop,
                args=(sweep_interval_s,),
                name="kvpool-sweeper",
                daemon=True,
            )
            self._sweeper.start()

    # ------------------------------------------------------------------ naming
    def path_of(self, key: str) -> str:
        """The final file name of ``key`` (sharded by the first byte of its digest)."""
        if not isinstance(key, str):
            raise InvalidKeyError(f"pool keys are str, got {type(key).__name__}")
        raw = key.encode("utf-8", "surrogatepass")
        if not raw or len(raw) > MAX_KEY_BYTES or b"\x00" in raw:
            raise InvalidKeyError(
                f"pool key must be 1..{MAX_KEY_BYTES} UTF-8 bytes without NUL, got {key[:64]!r}"
                f" ({len(raw)} bytes)"
            )
        h = hashlib.blake2b(raw, digest_size=16).hexdigest()
        return os.path.join(self.root, h[:2], h + SUFFIX)

    # ------------------------------------------------------------------ writes
    def put(self, key: str, data: Any) -> bool:
        """Store ``data`` (any buffer, or a sequence of buffers written back to back) under
        ``key``, replacing a previous chunk atomically. False on an I/O error (logged)."""
        path = self.path_of(key)
        parts = (
            [memoryview(d).cast("B") for d in data]
            if isinstance(data, list | tuple)
            else [memoryview(data).cast("B")]
        )
        length = sum(p.nbytes for p in parts)
        ck = _checksum(self._algo, parts)
        header = _HEADER.pack(MAGIC, VERSION, self._algo, 0, length, ck)
        d = os.path.dirname(path)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.{next(self._counter)}{TMP_SUFFIX}"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                os.makedirs(d, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                if self._usrbio is not None:
                    self._usrbio.pwrite(fd, [header, *parts], HEADER_SIZE + length)
                else:
                    _writev_all(fd, [header, *parts])
                if self.fsync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:
            logger.exception("kv pool: put %r failed", key)
            with self._lock:
                self._stats.put_errors += 1
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False
        with self._lock:
            s = self._stats
            s.puts += 1
            s.bytes_written += length
            s.bytes_used += HEADER_SIZE + length
            s.chunks += 1
            over = self.capacity_bytes is not None and s.bytes_used > self.capacity_bytes
        if over:
            self._scan_and_evict()
        return True

    # ------------------------------------------------------------------ reads
    def get(self, key: str) -> bytes | None:
        """The payload stored under ``key``, or None (missing or corrupt)."""
        path = self.path_of(key)
        fd = self._open_or_miss(path)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            size = st.st_size - HEADER_SIZE
            if size < 0:
                self._corrupt(path, st, "short header")
                return None
            payload: bytes | memoryview
            if self._usrbio is not None:
                buf = bytearray(st.st_size)
                got = self._usrbio.pread(fd, st.st_size, memoryview(buf))
                header, payload = bytes(buf[:HEADER_SIZE]), memoryview(buf)[HEADER_SIZE:got]
            else:
                header = os.read(fd, HEADER_SIZE)
                # os.read allocates the bytes object and reads into it: no copy after.
                payload = os.read(fd, size) if size else b""
            if self._verify(path, st, header, [memoryview(payload)], len(payload)) is None:
                return None
            self._hit(fd, st, len(payload))
            return payload if isinstance(payload, bytes) else bytes(payload)
        finally:
            os.close(fd)

    def get_into(self, key: str, buf: Any) -> int | None:
        """Read the payload of ``key`` into ``buf``: a writable buffer, or a list of them
        filled in order (scatter read, e.g. a metadata buffer then the KV buffer). Returns the
        payload length, or None (missing or corrupt). Raises ``BufferTooSmallError``."""
        path = self.path_of(key)
        bufs = buf if isinstance(buf, list | tuple) else [buf]
        dsts = [memoryview(b).cast("B") for b in bufs]
        room = sum(d.nbytes for d in dsts)
        fd = self._open_or_miss(path)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            need = max(st.st_size - HEADER_SIZE, 0)
            if need > room:
                head = os.pread(fd, HEADER_SIZE, 0)
                if self._verify_header(path, st, head) is None:
                    return None
                raise BufferTooSmallError(
                    f"chunk {key!r} holds {need} bytes, the buffers only {room}"
                )
            views: list[memoryview] = []
            left = need
            for d in dsts:
                if left <= 0:
                    break
                views.append(d[: min(left, d.nbytes)])
                left -= views[-1].nbytes
            header = bytearray(HEADER_SIZE)
            if self._usrbio is not None:
                tmp = memoryview(bytearray(st.st_size))
                got = self._usrbio.pread(fd, st.st_size, tmp)
                header[:] = tmp[:HEADER_SIZE]
                off = HEADER_SIZE
                for v in views:
                    v[:] = tmp[off : off + v.nbytes]
                    off += v.nbytes
            else:
                got = _readv_all(fd, [header, *views])
            n = self._verify(path, st, bytes(header), views, got - HEADER_SIZE)
            if n is None:
                return None
            self._hit(fd, st, n)
            return n
        finally:
            os.close(fd)

    def contains(self, key: str) -> bool:
        """Whether a chunk is stored under ``key`` (not verified: ``get`` checks it)."""
        return os.path.exists(self.path_of(key))

    def batch_exists(self, keys: Iterable[str]) -> int:
        """How many leading ``keys`` are stored (prefix semantics, as HiCache/LMCache ask)."""
        n = 0
        for k in keys:
            if not self.contains(k):
                break
            n += 1
        return n

    def delete(self, key: str) -> bool:
        """Remove ``key``; False if it was not there."""
        path = self.path_of(key)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return False
        with self._lock:
            self._stats.bytes_used = max(0, self._stats.bytes_used - size)
            self._stats.chunks = max(0, self._stats.chunks - 1)
        return True

    def stats(self) -> dict[str, int]:
        """This process's counters; ``bytes_used``/``chunks`` are the whole pool's as of the
        last scan plus this process's writes since."""
        with self._lock:
            return self._stats.as_dict()

    def close(self) -> None:
        """Stop the sweeper and hand its lease back; the chunks stay."""
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=10)
            self._sweeper = None
            if self._read_lease()[0] == self.instance:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.root, LEASE))

    @property
    def is_sweeper(self) -> bool:
        return self._lease_owner == self.instance

    def __enter__(self) -> KvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _open_or_miss(self, path: str) -> int | None:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            with self._lock:
                self._stats.misses += 1
            return None

    def _verify(
        self, path: str, st: os.stat_result, header: bytes, views: list[memoryview], got: int
    ) -> int | None:
        fields = self._verify_header(path, st, header)
        if fields is None:
            return None
        algo, length, ck = fields
        if got != length:
            self._corrupt(path, st, f"read {got} of {length} bytes")
            return None
        if _checksum_fn(algo) is None:
            self._corrupt(path, st, f"unknown checksum algorithm {algo}")
            return None
        if _checksum(algo, views) != ck:
            self._corrupt(path, st, "checksum mismatch")
            return None
        return length

    def _verify_header(
        self, path: str, st: os.stat_result, header: bytes
    ) -> tuple[int, int, int] | None:
        """(checksum algorithm, payload length, checksum) of a sound header, else None."""
        if len(header) != HEADER_SIZE:
            self._corrupt(path, st, "short header")
            return None
        magic, version, algo, _, length, ck = _HEADER.unpack(header)
        if magic != MAGIC or version != VERSION:
            self._corrupt(path, st, "bad magic/version")
            return None
        if length != st.st_size - HEADER_SIZE:
            self._corrupt(path, st, f"file holds {st.st_size - HEADER_SIZE} of {length} bytes")
            return None
        return algo, length, ck

    def _corrupt(self, path: str, st: os.stat_result, why: str) -> None:
        """Count and drop a corrupt chunk (a miss to the caller)."""
        logger.warning("kv pool: corrupt chunk %s (%s): dropped", path, why)
        with self._lock:
            self._stats.corrupt += 1
            self._stats.misses += 1
        try:  # only if a writer has not replaced it since we opened it
            now = os.stat(path)
            if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
                os.unlink(path)
        except OSError:
            pass

    def _hit(self, fd: int, st: os.stat_result, n: int) -> None:
        if time.time() - st.st_mtime > _TOUCH_EVERY_S:
            try:
                os.utime(fd)  # LRU recency, visible to every process's sweeper
            except OSError:
                pass
        with self._lock:
            self._stats.hits += 1
            self._stats.bytes_read += n

    def _sweep_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                previous = self._lease_owner
                if self._take_lease():
                    self._scan_and_evict(journal=True)
                    self._take_lease()  # renewed after the scan too: a long scan is no lapse
                if previous is not None and self._lease_owner != previous:
                    self._reconcile(f"sweeper lease moved from {previous} to {self._lease_owner}")
                else:
                    self._follow()
            except Exception:  # the sweeper must outlive one bad pass
                logger.exception("kv pool: sweep failed")

    # ---- the sweeper lease
    def _read_lease(self) -> tuple[str | None, float]:
        try:
            with open(os.path.join(self.root, LEASE)) as f:
                owner, ts = f.read().split()
            return owner, float(ts)
        except (OSError, ValueError):
            return None, 0.0

    def _take_lease(self) -> bool:
        """Renew our lease, or take a missing or stale one; True if we are the sweeper."""
        owner, ts = self._read_lease()
        stale = time.time() - ts > max(_LEASE_STALE_SWEEPS * self._interval, _LEASE_STALE_MIN_S)
        if owner != self.instance and not stale:
            self._lease_owner = owner
            return False
        path = os.path.join(self.root, LEASE)
        tmp = f"{path}.{os.getpid()}.{next(self._counter)}{TMP_SUFFIX}"
        try:
            with open(tmp, "w") as f:
                f.write(f"{self.instance} {time.time():.3f}\n")
            if owner is None:
                # No lease yet: create it only if nobody else just did (link is atomic
                # create-if-absent), so pools starting together never both hold it.
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    self._lease_owner = self._read_lease()[0]
                    return False
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except OSError as exc:
            logger.warning("kv pool %s: cannot write the sweeper lease: %s", self.root, exc)
            return False
        # Two takers may race: the last rename wins; the other reads it back and yields.
        self._lease_owner = self._read_lease()[0]
        won = self._lease_owner == self.instance
        if won and owner != self.instance:
            with self._lock:
                self._stats.lease_takeovers += 1
            self._prev = None
            logger.info("kv pool %s: %s is the sweeper (was %s)", self.root, self.instance, owner)
        return won

    # ---- the removal journal
    def _journal_files(self) -> list[int]:
        try:
            names = os.listdir(os.path.join(self.root, JOURNAL))
        except FileNotFoundError:
            return []
        return sorted(int(n[:-4]) for n in names if n.endswith(".log") and n[:-4].isdigit())

    def _journal_path(self, no: int) -> str:
        return os.path.join(self.root, JOURNAL, f"{no:08d}.log")

    def _journal_end(self) -> tuple[int, int]:
        """(file no, size) of the journal's newest file: where a follower starts reading."""
        files = self._journal_files()
        if not files:
            return 0, 0
        return files[-1], os.path.getsize(self._journal_path(files[-1]))

    def _journal(self, vanished: Iterable[str], ts: float) -> None:
        lines = "".join(f"{ts:.3f} {os.path.relpath(p, self.root)}\n" for p in vanished)
        if not lines:
            return
        os.makedirs(os.path.join(self.root, JOURNAL), exist_ok=True)
        files = self._journal_files() or [0]
        no = files[-1]
        try:
            if os.path.getsize(self._journal_path(no)) > _JOURNAL_ROTATE_BYTES:
                no += 1
        except FileNotFoundError:
            pass
        with open(self._journal_path(no), "a") as f:
            f.write(lines)
        for old in files:
            if old <= no - _JOURNAL_KEEP:
                with contextlib.suppress(OSError):
                    os.unlink(self._journal_path(old))
        with self._lock:
            self._stats.journaled += lines.count("\n")

    def _follow(self) -> None:
        """Deliver journal entries written since the last call to ``on_removed``."""
        if self._on_removed is None:
            return
        if self._jpos is None:  # start at the end
            self._jpos = self._journal_end()
            return
        files = self._journal_files()
        no, off = self._jpos
        if files and no < files[0]:
            self._reconcile(f"removal journal rotated past this process (at file {no})")
            return
        out: list[tuple[float, str]] = []
        while True:
            try:
                with open(self._journal_path(no), "rb") as f:
                    f.seek(off)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            end = data.rfind(b"\n") + 1  # complete lines only
            for line in data[:end].decode("utf-8", "replace").splitlines():
                ts, _, rel = line.partition(" ")
                try:
                    out.append((float(ts), os.path.join(self.root, rel)))
                except ValueError:
                    logger.warning("kv pool %s: bad journal line %r skipped", self.root, line)
            off += end
            nxt = [n for n in files if n > no]
            if end < len(data) or not nxt:
                break
            no, off = nxt[0], 0
        self._jpos = (no, off)
        self._on_removed(out)  # every sweep, entries or not (a tier checks young chunks)

    def _reconcile(self, why: str) -> None:
        """The journal cannot tell what left the pool: hand ``on_scan`` the full listing."""
        self._jpos = self._journal_end()  # follow on from the journal's end after this
        if self._on_scan is None:
            return
        started = time.time()
        entries, _ = self._scan()
        with self._lock:
            self._stats.reconciles += 1
        logger.info("kv pool %s: reconciling with a full scan (%s)", self.root, why)
        self._on_scan({p for _, _, p in entries}, started)

    def _scan(self) -> tuple[list[tuple[float, int, str]], int]:
        """(mtime, size, path) of every chunk; stale temp files of dead writers removed."""
        entries: list[tuple[float, int, str]] = []
        total = 0
        now = time.time()
        try:
            shards = [
                e
                for e in os.scandir(self.root)
                if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
            ]
        except FileNotFoundError:
            return entries, 0
        for shard in shards:
            try:
                it = list(os.scandir(shard.path))
            except FileNotFoundError:
                continue
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if e.name.endswith(SUFFIX):
                    entries.append((st.st_mtime, st.st_size, e.path))
                    total += st.st_size
                elif e.name.endswith(TMP_SUFFIX) and now - st.st_mtime > _STALE_TMP_S:
                    try:
                        os.unlink(e.path)
                    except OSError:
                        pass
        return entries, total

    def _scan_and_evict(self, journal: bool = False) -> int:
        """Rescan the pool; evict oldest-mtime chunks down to the low watermark if over;
        as the sweeper (``journal``), journal what vanished since its previous scan.
        Returns the number of chunks this pass evicted."""
        if not self._evict_lock.acquire(blocking=False):
            return 0  # another thread of ours is on it
        try:
            started = time.time()
            entries, total = self._scan()
            evicted = 0
            gone: set[str] = set()
            cap = self.capacity_bytes
            if cap is not None and total > cap:
                target = int(cap * self.low_watermark)
                entries.sort()
                for mtime, size, path in entries:
                    if total <= target:
                        break
                    try:  # a reader may have touched it since the scan: then keep it
                        if os.stat(path).st_mtime != mtime:
                            continue
                        os.unlink(path)
                    except FileNotFoundError:  # another process evicted it
                        total -= size
                        continue
                    except OSError:
                        continue
                    total -= size
                    evicted += 1
                    gone.add(path)
            if journal:
                now = {p for _, _, p in entries} - gone
                if self._prev is not None:
                    self._journal(self._prev - now, started)
                self._prev = now
            with self._lock:
                s = self._stats
                s.bytes_used = total
                s.chunks = len(entries) - evicted
                s.evictions += evicted
                s.sweeps += int(journal)
            return evicted
        finally:
            self._evict_lock.release()


def _writev_all(fd: int, parts: list[Any]) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        n = os.writev(fd, views)
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _readv_all(fd: int, bufs: list[Any]) -> int:
    """readv until the buffers are full or EOF; total bytes read."""
    views = [memoryview(b).cast("B") for b in bufs if len(memoryview(b).cast("B"))]
    total = 0
    while views:
        n = os.readv(fd, views)
        if n == 0:
            break
        total += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total
