"""Predicted load: requests the router sent to a worker and that were not reported done yet.

Worker metrics arrive once a period; between two of them a burst of requests would all see
the same stale load and pile onto one worker. Each routed request therefore reserves its
prefill tokens (until ``prefill_done``) and its blocks (until ``finish``) on its worker at
once. Entries expire after a TTL so a caller that dies never leaves phantom load behind.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class _Seq:
    __slots__ = ("worker_id", "blocks", "prefill_tokens", "deadline")

    def __init__(self, worker_id: str, blocks: int, prefill_tokens: int, deadline: float) -> None:
        self.worker_id = worker_id
        self.blocks = blocks
        self.prefill_tokens = prefill_tokens
        self.deadline = deadline


class WorkerLoad:
    __slots__ = ("requests", "active_blocks", "prefill_tokens")

    def __init__(self) -> None:
        self.requests = 0
        self.active_blocks = 0
        self.prefill_tokens = 0


class ActiveSequences:
    def __init__(self, ttl_s: float = 600.0) -> None:
        self.ttl_s = ttl_s
        # Insertion order == deadline order (one TTL for all), so expiry pops from the front.
        self._seqs: OrderedDict[str, _Seq] = OrderedDict()
        self._load: dict[str, WorkerLoad] = {}
        self.expired = 0

    def load(self, worker_id: str) -> WorkerLoad:
        wl = self._load.get(worker_id)
        if wl is None:
            wl = self._load[worker_id] = WorkerLoad()
        return wl

    def add(self, request_id: str, worker_id: str, blocks: int, prefill_tokens: int) -> None:
        if request_id in self._seqs:
            self.finish(request_id)  # a re-route (migration) replaces the old reservation
        self._seqs[request_id] = _Seq(
            worker_id, blocks, prefill_tokens, time.monotonic() + self.ttl_s
        )
        wl = self.load(worker_id)
        wl.requests += 1
        wl.active_blocks += blocks
        wl.prefill_tokens += prefill_tokens

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
        return s.worker_id

    def drop_worker(self, worker_id: str) -> list[str]:
        """Forget a dead worker's requests; returns their ids (callers may migrate them)."""
        gone = [rid for rid, s in self._seqs.items() if s.worker_id == worker_id]
        for rid in gone:
            del self._seqs[rid]
        # Reset in place: routers keep a reference to the WorkerLoad of each worker.
        wl = self.load(worker_id)
        wl.requests = wl.active_blocks = wl.prefill_tokens = 0
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
