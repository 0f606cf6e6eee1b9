"""Peer adapter: NVIDIA Dynamo's own Rust radix-tree indexer, fed the same KV events as ours.

The router benchmark uses this module to run ``dynamo._core.RadixTree`` (from the optional
``ai-dynamo-runtime==1.6.1`` wheel, extra ``bench``) side by side with our ``KvIndex`` and
compare apply throughput and match latency. ``RadixTree.apply_event`` takes the JSON of
Dynamo's ``KvCacheEvent`` (serde_json; no msgpack)::

    {"event_id": <u64>, "data": {"stored": {"parent_hash": <u64>|null,
        "blocks": [{"block_hash": <u64>, "tokens_hash": <u64>}, ...]}}}
    {"event_id": <u64>, "data": {"removed": {"block_hashes": [<u64>, ...]}}}
    {"event_id": <u64>, "data": "cleared"}

(optional ``"dp_rank": <u32>``, default 0; ``mm_extra_info`` may be omitted). All hashes are
unsigned 64-bit: a negative JSON integer is rejected, so values are masked to ``2**64 - 1``.
The tree is keyed by *local* (content) hashes: a node's children are indexed by
``tokens_hash``, and ``find_matches`` takes the prompt's per-block local hashes and walks
from the root, so its score is the length of the cached prefix. The sequence hash
``block_hash`` is only a per-worker handle used to resolve ``parent_hash`` and removals; it
must be the same for the same prefix on every worker (Dynamo assumes so: a worker that stores
an existing node under a different ``block_hash`` can neither extend nor remove it later).
Removing a block cascades to its descendants on that worker, and removing a block the
worker does not hold makes ``apply_event`` raise ``RuntimeError`` after it has applied the
rest of the event. Dynamo's Rust logging is set to ``error`` (``DYN_LOG``) unless already
configured, so that expected misses do not print a warning line each.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import msgspec

_MASK64 = (1 << 64) - 1
_NOT_FOUND = "Failed to find block"
_PARENT_NOT_FOUND = "Failed to find parent block"

# Must precede the first import of dynamo._core: its tracing subscriber reads DYN_LOG once.
os.environ.setdefault("DYN_LOG", "error")

try:
    from dynamo._core import RadixTree as _RadixTree
except ImportError:  # the peer is optional (extra "bench")
    _RadixTree = None  # type: ignore[misc, assignment]

_json_encode = msgspec.json.Encoder().encode


def available() -> bool:
    """True iff ``dynamo._core.RadixTree`` imports (``pip install ai-dynamo-runtime==1.6.1``)."""
    return _RadixTree is not None


def _u64(h: int) -> int:
    return h & _MASK64


def encode_stored(
    block_hashes: Sequence[int],
    parent_hash: int | None,
    local_hashes: Sequence[int],
    event_id: int = 0,
) -> bytes:
    """JSON ``KvCacheEvent`` storing a chain of blocks under ``parent_hash`` (None = root).

    ``block_hashes[i]`` is block i's sequence (chained) hash, ``local_hashes[i]`` its content
    hash (Dynamo's ``tokens_hash``); ``parent_hash`` is the sequence hash of the block before
    the first one, which the worker must already hold.
    """
    if len(block_hashes) != len(local_hashes):
        raise ValueError(f"{len(block_hashes)} block hashes but {len(local_hashes)} local hashes")
    blocks = [
        {"block_hash": _u64(b), "tokens_hash": _u64(t)}
        for b, t in zip(block_hashes, local_hashes, strict=False)
    ]
    parent = None if parent_hash is None else _u64(parent_hash)
    return _json_encode(
        {"event_id": event_id, "data": {"stored": {"parent_hash": parent, "blocks": blocks}}}
    )


def encode_removed(block_hashes: Sequence[int], event_id: int = 0) -> bytes:
    """JSON ``KvCacheEvent`` removing blocks (by sequence hash) and their descendants."""
    hashes = [_u64(b) for b in block_hashes]
    return _json_encode({"event_id": event_id, "data": {"removed": {"block_hashes": hashes}}})


def encode_cleared(event_id: int = 0) -> bytes:
    """JSON ``KvCacheEvent`` dropping every block of the worker (``AllBlocksCleared``)."""
    return _json_encode({"event_id": event_id, "data": "cleared"})


class DynamoRadixTree:
    """``dynamo._core.RadixTree`` behind the shape of our index's store/remove/match calls.

    Worker ids are Dynamo's: unsigned 64-bit ints (map our string ids to ints first).
    Every event goes to the tree as JSON bytes; ``store``/``remove`` encode and apply in one
    call, ``apply_bytes`` applies bytes built beforehand by ``encode_stored``/
    ``encode_removed`` so that a benchmark can time the tree alone. Not the place for
    multimodal blocks or data-parallel ranks: everything is ``dp_rank`` 0.
    """

    def __init__(self) -> None:
        if _RadixTree is None:
            raise RuntimeError(
                "dynamo._core is not importable: pip install ai-dynamo-runtime==1.6.1"
            )
        self._tree: Any = _RadixTree()
        self._event_id = 0

    def _next_id(self) -> int:
        self._event_id += 1
        return self._event_id

    def apply_bytes(self, worker_id: int, data: bytes) -> None:
        """Apply one pre-encoded event as is; raises Dynamo's ValueError/RuntimeError."""
        self._tree.apply_event(worker_id, data)

    def store(
        self,
        worker_id: int,
        block_hashes: list[int],
        parent_hash: int | None,
        local_hashes: list[int],
    ) -> None:
        """Record that ``worker_id`` now caches the chain ``block_hashes`` after ``parent_hash``.

        Raises ``KeyError`` when the worker does not hold ``parent_hash`` (Dynamo drops the
        whole event then).
        """
        data = encode_stored(block_hashes, parent_hash, local_hashes, self._next_id())
        try:
            self._tree.apply_event(worker_id, data)
        except RuntimeError as exc:
            if _PARENT_NOT_FOUND in str(exc):
                raise KeyError(parent_hash) from exc
            raise

    def remove(self, worker_id: int, block_hashes: list[int], strict: bool = False) -> None:
        """Forget blocks of ``worker_id`` by sequence hash, with their descendants.

        Blocks the worker does not hold (never stored, or already gone with a removed
        ancestor) are skipped; with ``strict`` they raise ``KeyError`` after the others
        are removed.
        """
        data = encode_removed(block_hashes, self._next_id())
        try:
            self._tree.apply_event(worker_id, data)
        except RuntimeError as exc:
            if _NOT_FOUND not in str(exc):
                raise
            if strict:
                missing = f"worker {worker_id} lacks some of {len(block_hashes)} blocks"
                raise KeyError(missing) from exc

    def clear(self, worker_id: int) -> None:
        """Drop all blocks of ``worker_id`` through a ``cleared`` event."""
        self._tree.apply_event(worker_id, encode_cleared(self._next_id()))

    def clear_all_blocks(self, worker_id: int) -> None:
        """Drop all blocks of ``worker_id`` but keep it known to the tree."""
        self._tree.clear_all_blocks(worker_id)

    def remove_worker(self, worker_id: int) -> None:
        """Drop ``worker_id`` and all its blocks."""
        self._tree.remove_worker(worker_id)

    def find_matches(self, local_hashes: list[int], early_exit: bool = False) -> dict[int, int]:
        """Worker id -> number of leading blocks of the prompt it caches (absent if 0).

        Takes the prompt's per-block *local* (content) hashes, not sequence hashes: Dynamo
        walks its tree from the root by ``tokens_hash``.
        """
        if local_hashes and (min(local_hashes) < 0 or max(local_hashes) > _MASK64):
            local_hashes = [_u64(h) for h in local_hashes]
        scores: dict[tuple[int, int], int] = self._tree.find_matches(
            local_hashes, early_exit
        ).scores
        out: dict[int, int] = {}
        for (worker_id, _dp_rank), n in scores.items():
            if n > out.get(worker_id, 0):
                out[worker_id] = n
        return out

    def find_matches_raw(self, local_hashes: list[int]) -> Any:
        """Dynamo's own ``OverlapScores`` (keys ``(worker_id, dp_rank)``), for timing the call
        alone; ``local_hashes`` must already be unsigned 64-bit."""
        return self._tree.find_matches(local_hashes)

    def dump_events(self) -> list[str]:
        """The tree as JSON ``RouterEvent`` strings, one per (block, worker)."""
        result: list[str] = self._tree.dump_tree_as_events()
        return result
