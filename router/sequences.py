"""Predicted load: requests the router sent to a worker and that were not reported done yet.

Worker metrics arrive once a period; between two of them a burst of requests would all see
the same stale load and pile onto one worker. Each routed request therefore reserves its
prefill tokens (until ``prefill_done``) and its blocks (until ``finish``) on its worker at
once. Entries expire after a TTL so a caller that dies never leaves phantom load behind.

Given the request's block hashes (``add(..., hashes=)``), a worker's load also counts each
active block once (``WorkerLoad.unique_blocks``), as Dynamo's active-sequence tracker does:
ten running requests that share a 100-block prefix hold 100 blocks of it, not 1000.
Those counts (``block_refs``) live in the extension's ``U64Map`` where it runs: its
``count_up``/``count_down``/``run_in``/``count_absent`` loops over a prompt's hashes in C;
the Python loops here are their reference (tests/router/test_native.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import MutableMapping, Sequence

from dynamo_ext import native

try:  # Counter.update's C loop: refs[h] = refs.get(h, 0) + 1 for each h, on any dict
    from collections import _count_elements as _count_into  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - CPython has it since 3.2

    def _count_into(refs: dict[int, int], hashes: Sequence[int]) -> None:
        for h in hashes:
            refs[h] = refs.get(h, 0) + 1


def count_up(refs: MutableMapping[int, int], hashes: Sequence[int]) -> None:
    """``refs[h] += 1`` for each hash in turn (1 where absent)."""
    m = native.native_table(refs, "U64Map")
    if m is not None:
        m.count_up(hashes)
    else:
        _count_into(refs, hashes)


def count_down(refs: MutableMapping[int, int], hashes: Sequence[int]) -> None:
    """``refs[h] -= 1`` for each hash in turn, deleted at 0. An absent hash raises KeyError
    with the hashes before it taken and those after it not, natively too."""
    m = native.native_table(refs, "U64Map")
    if m is not None:
        m.count_down(hashes)
        return
    for h in hashes:
        c = refs[h] - 1
        if c:
            refs[h] = c
        else:
            del refs[h]


def run_in(refs: MutableMapping[int, int], hashes: Sequence[int], start: int, stop: int) -> int:
    """The first ``k >= start`` with ``hashes[k]`` not in ``refs``; ``min(stop, len(hashes))``
    (or ``start`` past it) when the run reaches it."""
    m = native.native_table(refs, "U64Map")
    if m is not None:
        return m.run_in(hashes, start, stop)  # type: ignore[no-any-return]
    if start < 0 or stop < 0:
        raise ValueError("run_in: start and stop must be >= 0")
    stop = min(stop, len(hashes))
    k = start
    while k < stop and hashes[k] in refs:
        k += 1
    return k


def count_absent(refs: MutableMapping[int, int], hashes: Sequence[int]) -> int:
    """How many of ``hashes`` (each duplicate too) are not in ``refs``."""
    m = native.native_table(refs, "U64Map")
    if m is not None:
        return m.count_absent(hashes)  # type: ignore[no-any-return]
    return sum(1 for h in hashes if h not in refs)


class _Seq:
    __slots__ = ("worker_id", "blocks", "prefill_tokens", "deadline", "hashes")

    def __init__(
        self,
        worker_id: str,
        blocks: int,
        prefill_tokens: int,
        deadline: float,
        hashes: Sequence[int] | None,
    ) -> None:
        self.worker_id = worker_id
        self.blocks = blocks
        self.prefill_tokens = prefill_tokens
        self.deadline = deadline
        self.hashes = hashes


class WorkerLoad:
    """One worker's reserved load. ``active_blocks`` sums every request's blocks;
    ``block_refs`` counts the requests holding each hashed block (requests added with
    hashes; a ``U64Map`` where the extension runs, else a dict), ``hashed_blocks`` the
    blocks so counted, with multiplicity."""

    __slots__ = ("requests", "active_blocks", "prefill_tokens", "block_refs", "hashed_blocks")

    def __init__(self) -> None:
        self.requests = 0
        self.active_blocks = 0
        self.prefill_tokens = 0
        self.block_refs: MutableMapping[int, int] = native.new_table("U64Map")
        self.hashed_blocks = 0

    @property
    def unique_blocks(self) -> int:
        """Active blocks with each hashed block counted once (Dynamo's count)."""
        return self.active_blocks - self.hashed_blocks + len(self.block_refs)

    def new_blocks(self, hashes: Sequence[int]) -> int:
        """How many of a prompt's blocks would be new to this worker's active set."""
        refs = self.block_refs
        if not refs:
            return len(hashes)
        return count_absent(refs, hashes)


class ActiveSequences:
    def __init__(self, ttl_s: float = 600.0) -> None:
        self.ttl_s = ttl_s
        # Insertion order == deadline order (one TTL for all), so expiry pops from the front.
        self._seqs: OrderedDict[str, _Seq] = OrderedDict()
        self._load: dict[str, WorkerLoad] = {}
        # First block hash of each request in flight (added with hashes) -> worker -> count:
        # the scorer's in-flight credit visits only the workers that may continue a prompt.
        self.first_holders: dict[int, dict[str, int]] = {}
        self.expired = 0

    def load(self, worker_id: str) -> WorkerLoad:
        wl = self._load.get(worker_id)
        if wl is None:
            wl = self._load[worker_id] = WorkerLoad()
        return wl

    def add(
        self,
        request_id: str,
        worker_id: str,
        blocks: int,
        prefill_tokens: int,
        hashes: Sequence[int] | None = None,
    ) -> None:
        """Reserve ``blocks`` and ``prefill_tokens`` on the worker. ``hashes``: the prompt's
        block hashes, so that shared blocks count once in ``unique_blocks``; ``blocks``
        beyond them (a partial block, output) count apart. Copied: a caller's list may grow
        after the call (an engine appends its output blocks to it), and finish must take
        back exactly what was added."""
        if request_id in self._seqs:
            self.finish(request_id)  # a re-route (migration) replaces the old reservation
        if hashes is not None:
            hashes = tuple(hashes)
        self._seqs[request_id] = _Seq(
            worker_id, blocks, prefill_tokens, time.monotonic() + self.ttl_s, hashes
        )
        wl = self.load(worker_id)
        wl.requests += 1
        wl.active_blocks += blocks
        wl.prefill_tokens += prefill_tokens
        if hashes:
            count_up(wl.block_refs, hashes)
            wl.hashed_blocks += len(hashes)
            holders = self.first_holders.setdefault(hashes[0], {})
            holders[worker_id] = holders.get(worker_id, 0) + 1

    def prefill_done(self, request_id: str) -> str | None:
        """Returns the request's worker, or None for an unknown request."""
        s = self._seqs.get(request_id)
        if s is None:
            return None
        self.load(s.worker_id).prefill_tokens -= s.prefill_tokens
        s.prefill_tokens = 0
        return s.worker_id

    def finish(self, request_id: str) -> str | None:
        """Returns the request's worker, or None for an unknown request."""
        s = self._seqs.pop(request_id, None)
        if s is None:
            return None
        wl = self.load(s.worker_id)
        wl.requests -= 1
        wl.active_blocks -= s.blocks
        wl.prefill_tokens -= s.prefill_tokens
        if s.hashes:
            count_down(wl.block_refs, s.hashes)
            wl.hashed_blocks -= len(s.hashes)
            self._unhold(s)
        return s.worker_id

    def _unhold(self, s: _Seq) -> None:
        assert s.hashes
        first = s.hashes[0]
        holders = self.first_holders[first]
        c = holders[s.worker_id] - 1
        if c:
            holders[s.worker_id] = c
        else:
            del holders[s.worker_id]
            if not holders:
                del self.first_holders[first]

    def drop_worker(self, worker_id: str) -> list[str]:
        """Forget a dead worker's requests; returns their ids (callers may migrate them)."""
        gone = [rid for rid, s in self._seqs.items() if s.worker_id == worker_id]
        for rid in gone:
            s = self._seqs.pop(rid)
            if s.hashes:
                self._unhold(s)
        # Reset in place: routers keep a reference to the WorkerLoad of each worker.
        wl = self.load(worker_id)
        wl.requests = wl.active_blocks = wl.prefill_tokens = wl.hashed_blocks = 0
        wl.block_refs.clear()
        return gone

    def expire(self, now: float | None = None) -> list[str]:
        """Drop requests past their TTL; returns the workers whose load changed."""
        now = time.monotonic() if now is None else now
        touched: list[str] = []
        while self._seqs:
            rid, s = next(iter(self._seqs.items()))
            if s.deadline > now:
                break
            self.finish(rid)
            touched.append(s.worker_id)
        self.expired += len(touched)
        return touched

    def __len__(self) -> int:
        return len(self._seqs)
