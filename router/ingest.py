"""KV event ingestion: per-stream sequence state, batch decoding, validation and applying
batches to the index. No sockets: the server feeds it frames and runs the replays it asks
for, the simulator and benchmarks call it directly.

A worker's stream is ``[topic, seq, payload]`` batches from vLLM's ``ZmqEventPublisher`` (or
ours). The rules, per stream:

* batches apply in seq order; a seq already applied (a replay overlapping the live stream)
  is a duplicate; a seq going back below what a replay covered is a restarted publisher;
* a seq gap asks for a replay (``on_live`` returns the seq to replay from); while a replay
  runs, live batches wait in a bounded buffer, so the index never applies a batch before
  the batches it follows;
* a replay that comes back short (a hole: the publisher's send buffer dropped frames) is
  retried from the hole; what no replay can fill is *lost*: the stream advances past it
  (one loss counts as one gap, not one per later batch), the worker's index is marked
  stale, and, where the publisher can replay its history, rebuilt from it;
* every payload is decoded and validated on its own: a malformed batch (bad msgpack, too
  deep, wrong block size, token count, hash type, unknown tier) is counted with its origin
  and dropped, and nothing it holds reaches the index.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, Final

import msgspec

from dynamo_ext import native
from dynamo_ext.errors import DynamoExtError
from dynamo_ext.hashing import BlockHasher, to_external, token_block_hashes, token_block_hashes_py
from dynamo_ext.protocol import (
    MEDIUM_CPU,
    MEDIUM_DISK,
    MEDIUM_GPU,
    MEDIUM_REMOTE,
    MEDIUM_STORAGE,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Cleared,
    HashesBatch,
    KVEventBatch,
    RemovedHashes,
    StoredHashes,
    event_tier,
    hashes_batch_decoder,
    kv_batch_decoder,
    seq_from_bytes,
)
from dynamo_ext.router.indexer import KvIndex
from dynamo_ext.router.metrics import RouterMetrics, remove_label

log = logging.getLogger(__name__)

Batch = KVEventBatch | HashesBatch
# Tiers an event may name; anything else is malformed (it would create an index tier and
# a metrics label per distinct string).
_KNOWN_MEDIA: Final = frozenset(
    (None, MEDIUM_GPU, MEDIUM_CPU, MEDIUM_DISK, MEDIUM_STORAGE, MEDIUM_REMOTE)
)
_KNOWN_LOCALITY: Final = frozenset((None, "LOCAL", "REMOTE"))
MAX_HASH_BYTES: Final = 32  # a sha256 digest; vLLM sends ints by default
# Errors a payload may raise while decoding: msgspec's own, and RecursionError from a
# payload nested deeper than msgspec's recursion bound.
DECODE_ERRORS: Final = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)

Malformed = Callable[[str, str, object], None]


class InvalidEvent(DynamoExtError, ValueError):
    """A decoded event that breaks the stream's rules (block size, hashes, tier)."""


class StreamState:
    """One worker's KV stream as the ingest sees it."""

    __slots__ = (
        "worker_id",
        "slot",
        "last_seq",
        "live_last",
        "xlat",
        "hash_checked",
        "events_applied",
        "replaying",
        "pending",
        "overflowed",
        "replay_hole",
        "stale",
        "lost_batches",
        "can_replay",
        "replay_first",
        "needs_rebuild",
    )

    def __init__(self, worker_id: str, slot: int, can_replay: bool) -> None:
        self.worker_id = worker_id
        self.slot = slot
        self.can_replay = can_replay
        self.last_seq = -1  # last applied batch; -1: nothing yet
        # Last seq seen on the live stream: a live seq below it is a restarted publisher;
        # one above it but already applied (<= last_seq) came through a replay first.
        self.live_last = -1
        # tokens mode only: engine hash -> router hash, per tier (``native.new_table``: a
        # U64Map, a third of a dict's memory per block, no key object per entry).
        self.xlat: dict[str, MutableMapping[int, int]] = {}
        self.hash_checked = False
        self.events_applied = 0
        self.replaying = False
        self.pending: deque[tuple[int, Batch]] = deque()
        self.overflowed = False  # live batches dropped while a replay ran
        self.replay_hole = False  # the running replay skipped a seq
        self.stale = ""  # why the index may differ from the worker's cache; "" if exact
        self.lost_batches = 0
        self.replay_first: int | None = None  # first seq a replay applied
        self.needs_rebuild = False  # lost batches a replay of the whole history may restore


class KvIngest:
    """Decodes, validates and applies KV batches for every worker's stream."""

    def __init__(
        self,
        index: KvIndex,
        hasher: BlockHasher,
        metrics: RouterMetrics,
        malformed: Malformed,
        *,
        block_size: int,
        hash_mode: str,
        hash_algo: str,
        buffer_batches: int = 10_000,
    ) -> None:
        self.index = index
        self.hasher = hasher
        self.metrics = metrics
        self.malformed = malformed
        self.block_size = block_size
        self.tokens_mode = hash_mode == "tokens"
        self.hash_algo = hash_algo
        self.buffer_batches = buffer_batches
        self.streams: dict[str, StreamState] = {}
        # Label children looked up once: ``labels()`` per batch costs more than a store.
        self._blocks_stored = metrics.kv_blocks.labels("stored")
        self._blocks_removed = metrics.kv_blocks.labels("removed")

    # ------------------------------------------------------------------ streams
    def add_stream(self, worker_id: str, slot: int, can_replay: bool) -> StreamState:
        st = StreamState(worker_id, slot, can_replay)
        self.streams[worker_id] = st
        self.metrics.index_stale.labels(worker_id).set(0)
        return st

    def remove_stream(self, worker_id: str) -> None:
        if self.streams.pop(worker_id, None) is not None:
            remove_label(self.metrics.index_stale, worker_id)

    def reset(self, st: StreamState, why: str) -> None:
        """The worker's cache is empty again (a restart): forget its index and stream."""
        log.warning("worker %s: %s, clearing its index", st.worker_id, why)
        self.metrics.restarts.labels(st.worker_id).inc()
        self.index.clear_worker(st.worker_id)
        st.xlat.clear()
        st.needs_rebuild = False
        self._set_stale(st, "")

    def _set_stale(self, st: StreamState, why: str) -> None:
        if why and not st.stale:
            log.warning("worker %s: index marked stale: %s", st.worker_id, why)
        st.stale = why
        self.metrics.index_stale.labels(st.worker_id).set(1 if why else 0)

    # ------------------------------------------------------------------ decoding
    def decode(self, st: StreamState, payload: bytes) -> Batch:
        """Decode one payload (raises one of ``DECODE_ERRORS``)."""
        # The full decode only to check once that the router reproduces the engine's
        # hashes; otherwise the lean view: tokens mode hashes the token ids straight from
        # their msgpack bytes (``_store_tokens``) instead of building a list of ints first.
        if not self.tokens_mode and not st.hash_checked:
            return kv_batch_decoder.decode(payload)
        return hashes_batch_decoder.decode(payload)

    def _decode(self, st: StreamState, payload: bytes, source: str) -> Batch | None:
        try:
            return self.decode(st, payload)
        except DECODE_ERRORS as exc:
            self.malformed(source, st.worker_id, exc)
        except Exception as exc:  # noqa: BLE001 - one payload must never stop a stream
            self.malformed(source, st.worker_id, f"{type(exc).__name__}: {exc}")
        return None

    # ------------------------------------------------------------------ live stream
    def on_live(self, st: StreamState, frames: Sequence[bytes]) -> int | None:
        """One live ``[topic, seq, payload]`` message. Returns the seq to replay from when
        the caller should start a replay (and then call ``begin_replay``), else None."""
        if len(frames) == 3 and not st.replaying and self.tokens_mode:
            # The stream's common case, the next seq of a batch of GPU BlockStored events,
            # decoded and applied in one C call; anything else takes the path below.
            raw = frames[1]
            impl = native.IMPL
            if impl is not None and len(raw) == 8 and st.xlat.get(MEDIUM_GPU) is not None:
                seq = int.from_bytes(raw, "big", signed=True)
                last = st.last_seq
                if seq >= st.live_last and seq >= 0 and (seq == last + 1 or last < 0):
                    if self._apply_native(st, impl, frames[2]):
                        st.live_last = st.last_seq = seq
                        return None
        if len(frames) != 3:
            self.malformed("kv", st.worker_id, f"{len(frames)} frames")
            return None
        try:
            seq = seq_from_bytes(frames[1])
        except msgspec.DecodeError as exc:
            self.malformed("kv", st.worker_id, exc)
            return None
        if seq < 0:
            self.malformed("kv", st.worker_id, f"negative seq {seq}")
            return None
        batch = self._decode(st, frames[2], "kv")
        went_back = seq < st.live_last
        st.live_last = seq
        if st.replaying:
            if went_back:
                # Restarted while a replay of its old history ran: start over from this.
                self.reset(st, f"KV seq went back to {seq} during a replay: restart")
                st.last_seq = -1
                st.pending.clear()
                self._set_stale(st, "restarted during a replay")
            if batch is None:
                return None
            if len(st.pending) >= self.buffer_batches:
                # Bounded: drop the buffer; the replay's end rebuilds the stream.
                st.pending.clear()
                st.overflowed = True
                self.metrics.kv_dropped.labels("buffer").inc()
            st.pending.append((seq, batch))
            return None
        return self._sequence(st, seq, batch, went_back)

    def _sequence(
        self, st: StreamState, seq: int, batch: Batch | None, went_back: bool = False
    ) -> int | None:
        last = st.last_seq
        if last < 0 or seq == last + 1:
            self._apply_logged(st, batch)
        elif seq <= last:
            if not went_back:
                return None  # already applied (through a replay, or sent twice)
            # The publisher's counter went back: a new process with an empty cache.
            self.reset(st, f"KV seq went back {last} -> {seq}: restart")
            self._apply_logged(st, batch)
        else:
            self.metrics.seq_gaps.labels(st.worker_id).inc()
            log.warning("worker %s KV seq gap: expected %d got %d", st.worker_id, last + 1, seq)
            if st.can_replay and batch is not None:
                st.pending.append((seq, batch))
                return last + 1
            self._lost(st, seq - last - 1, f"batches {last + 1}..{seq - 1} lost, no replay")
            self._apply_logged(st, batch)
        st.last_seq = seq
        return None

    def _lost(self, st: StreamState, n: int, why: str) -> None:
        st.lost_batches += n
        st.needs_rebuild = st.can_replay
        self.metrics.kv_dropped.labels("lost").inc(n)
        self._set_stale(st, why)

    # ------------------------------------------------------------------ replay
    def begin_replay(self, st: StreamState) -> None:
        st.replaying = True
        st.replay_hole = False
        st.replay_first = None

    def on_replayed(self, st: StreamState, seq_frame: bytes, payload: bytes) -> None:
        """One replayed batch (the replay socket's ``seq`` and ``payload`` frames)."""
        try:
            seq = seq_from_bytes(seq_frame)
        except msgspec.DecodeError as exc:
            self.malformed("replay", st.worker_id, exc)
            return
        if seq <= st.last_seq or st.replay_hole:
            return
        if st.last_seq >= 0 and seq != st.last_seq + 1:
            # The publisher skipped seqs (its send buffer was full): ask again from the hole.
            st.replay_hole = True
            return
        batch = self._decode(st, payload, "replay")
        self._apply_logged(st, batch)
        st.last_seq = seq
        if st.replay_first is None:
            st.replay_first = seq

    def replay_round(self, st: StreamState) -> int | None:
        """A replay round ended. Returns the seq to ask from again when it came back short
        (it skipped a seq), else None."""
        if st.replay_hole:
            self.metrics.replays.labels(st.worker_id, "short").inc()
            st.replay_hole = False
            return st.last_seq + 1
        return None

    def end_replay(self, st: StreamState) -> bool:
        """The replay is over: apply the batches that waited, in order. Returns True when the
        stream lost batches that a full rebuild from the publisher's history could restore
        (the caller may then ``rebuild``)."""
        st.replaying = False
        lost = False
        if st.overflowed:
            st.overflowed = False
            lost = True
            self._lost(st, 0, "live batches dropped while a replay ran")
        pending, st.pending = st.pending, deque()
        for seq, batch in pending:
            last = st.last_seq
            if seq <= last:
                continue
            if last >= 0 and seq != last + 1:
                self._lost(st, seq - last - 1, f"replay did not fill {last + 1}..{seq - 1}")
                lost = True
            self._apply_logged(st, batch)
            st.last_seq = seq
        return lost and st.can_replay

    def replay_unanswered(self, st: StreamState, kind: str) -> None:
        """A start-up replay (or a rebuild) got no answer: the history it should have brought
        is missing until one does; asked again later."""
        if kind in ("initial", "rebuild") and st.can_replay:
            st.needs_rebuild = True
            self._set_stale(st, f"{kind} replay unanswered")

    def rebuild(self, st: StreamState) -> None:
        """Before replaying the publisher's whole history: start the worker's index over."""
        self.index.clear_worker(st.worker_id)
        st.xlat.clear()
        st.last_seq = -1

    def rebuilt(self, st: StreamState) -> None:
        """A rebuild's replay ended; exact again only if the history started at seq 0 (else
        the index holds a subset of the cache: no false hit, some missed)."""
        st.needs_rebuild = False
        if st.replay_first == 0:
            self._set_stale(st, "")
        else:
            self._set_stale(st, "rebuilt from partial history")

    # ------------------------------------------------------------------ applying
    def _apply_native(self, st: StreamState, impl: Any, payload: bytes) -> bool:
        """``decode`` + ``apply`` of one payload by ``ingest_stored`` when it takes it (see
        there: the same result); False, nothing changed, when the payload is the Python
        path's."""
        # Where the index allows it, the C call also stores the blocks into its GPU table
        # (no int object per block, no second pass); else it returns them for ``store``.
        table = self.index.ingest_table()
        try:
            if table is not None:
                done = impl.ingest_stored(payload, self.block_size, st.xlat, table, st.slot)
            else:
                done = impl.ingest_stored(payload, self.block_size, st.xlat)
        except Exception as exc:  # noqa: BLE001 - counted, as _apply_logged does
            self.malformed("kv", st.worker_id, f"{type(exc).__name__}: {exc}")
            return True
        if done is None:
            return False
        local, events, orphans = done
        if orphans:
            for _ in range(orphans):
                self.malformed("kv_orphan", st.worker_id, "BlockStored with unknown parent")
        if table is not None:
            stored = local
            self.index.count_stored(st.slot, stored, MEDIUM_GPU)
        else:
            stored = self.index.store(st.slot, local, MEDIUM_GPU) if local else 0
        if stored:
            self._blocks_stored.inc(stored)
        st.events_applied += events
        return True

    def _apply_logged(self, st: StreamState, batch: Batch | None) -> None:
        if batch is None:
            return
        try:
            self.apply(st, batch)
        except Exception as exc:  # noqa: BLE001 - counted; the stream goes on
            self.malformed("kv", st.worker_id, f"{type(exc).__name__}: {exc}")

    def apply(self, st: StreamState, batch: Batch) -> None:
        """Apply one decoded batch; an invalid event is counted and skipped."""
        index = self.index
        slot = st.slot
        tokens_mode = self.tokens_mode
        stored = removed = 0
        for ev in batch.events:
            t = type(ev)
            try:
                if t is StoredHashes or t is BlockStored:
                    if tokens_mode:
                        stored += self._store_tokens(st, ev)  # type: ignore[arg-type]
                    else:
                        stored += self._store(st, ev)  # type: ignore[arg-type]
                elif t is BlockRemoved or t is RemovedHashes:
                    tier = self._tier(ev)  # type: ignore[arg-type]
                    hashes = self._hashes(ev.block_hashes)  # type: ignore[union-attr]
                    if self.tokens_mode:
                        x = st.xlat.get(tier)
                        if not x:
                            continue
                        hashes = [x.pop(h) for h in hashes if h in x]
                    removed += index.remove(slot, hashes, tier)
                elif t is AllBlocksCleared or t is Cleared:
                    index.clear_worker(st.worker_id, MEDIUM_GPU)
                    st.xlat.pop(MEDIUM_GPU, None)
            except InvalidEvent as exc:
                self.malformed("kv_event", st.worker_id, exc)
        st.events_applied += len(batch.events)
        if stored:
            self._blocks_stored.inc(stored)
        if removed:
            self._blocks_removed.inc(removed)

    def _tier(self, ev: StoredHashes | BlockStored | BlockRemoved | RemovedHashes) -> str:
        if ev.medium not in _KNOWN_MEDIA or ev.locality not in _KNOWN_LOCALITY:
            raise InvalidEvent(f"unknown tier {ev.medium!r}/{ev.locality!r}"[:120])
        return event_tier(ev.medium, ev.locality)

    @staticmethod
    def _hashes(hashes: list[int | bytes]) -> list[int]:
        """vLLM sends int hashes by default; raw sha256 bytes become the same 64-bit int."""
        if hashes and type(hashes[0]) is not int:
            out = []
            for h in hashes:
                if type(h) is not int:
                    if len(h) > MAX_HASH_BYTES:  # type: ignore[arg-type]
                        raise InvalidEvent(f"block hash of {len(h)} bytes")  # type: ignore[arg-type]
                    h = to_external(h)  # type: ignore[arg-type]
                out.append(h)
            return out  # type: ignore[return-value]
        return hashes  # type: ignore[return-value]

    def _store(self, st: StreamState, ev: StoredHashes | BlockStored) -> int:
        tier = self._tier(ev)
        hashes = self._hashes(ev.block_hashes)
        raw = ev.token_ids
        token_ids: list[int] | None = raw if isinstance(raw, list) else None
        n_tokens = len(token_ids) if token_ids is not None else _raw_array_len(raw)  # type: ignore[arg-type]
        if ev.block_size == 0 and not n_tokens:
            # vLLM's offloading connector announces a chunk it did not see computed (a
            # placeholder) with no tokens and block_size 0: its hashes are still exact.
            return self.index.store(st.slot, hashes, tier)
        if ev.block_size != self.block_size:
            raise InvalidEvent(f"block_size {ev.block_size}, router uses {self.block_size}")
        if n_tokens is not None and n_tokens != len(hashes) * self.block_size:
            raise InvalidEvent(
                f"{n_tokens} token ids for {len(hashes)} blocks of {self.block_size}"
            )
        parent = ev.parent_block_hash
        if parent is not None and hashes:
            p = self._hashes([parent])[0]
            if not self.index.holds(st.slot, p):
                # Not wrong (the chain is in the hashes), but its prefix is unknown to
                # us: a lost batch or an evicted parent. Counted, applied.
                self.metrics.orphan_blocks.inc(len(hashes))
        if not st.hash_checked and tier == MEDIUM_GPU and token_ids is not None:
            self._check_hash(st, ev, hashes)  # type: ignore[arg-type]
        return self.index.store(st.slot, hashes, tier)

    def _store_tokens(self, st: StreamState, ev: StoredHashes | BlockStored) -> int:
        """tokens mode: re-key the blocks from their token ids, chained from the router
        hash of the engine's parent, and remember engine hash -> ours for later events.
        The checks (and their order) are ``_store``'s; the token count is checked by
        ``stored_tokens_py`` (or its C twin) on the way, except where an orphan would hide it."""
        # The tier and hashes of a stock vLLM GPU event without calls (``_tier``,
        # ``_hashes`` for anything else): this runs once per event of the stream.
        medium = ev.medium
        if (medium is None or medium == MEDIUM_GPU) and ev.locality is None:
            tier = MEDIUM_GPU
        else:
            tier = self._tier(ev)
        hashes: list[int] = ev.block_hashes  # type: ignore[assignment]
        if hashes and type(hashes[0]) is not int:
            hashes = self._hashes(ev.block_hashes)
        raw = ev.token_ids
        bs = ev.block_size
        if bs != self.block_size:
            if bs == 0 and not _n_tokens(raw):
                return 0  # an offload placeholder (see ``_store``): nothing to re-key from
            raise InvalidEvent(f"block_size {bs}, router uses {self.block_size}")
        xlat = st.xlat
        x = xlat.get(tier)
        if x is None:
            x = xlat[tier] = native.new_table("U64Map")
        parent = ev.parent_block_hash
        if parent is None:
            p = 0
        else:
            ph = parent if type(parent) is int else self._hashes([parent])[0]
            found = x.get(ph)
            if found is None:
                # The parent may sit in another tier (offload continues a GPU prefix).
                for other in xlat.values():
                    found = other.get(ph)
                    if found is not None:
                        break
            if found is None:
                n = _n_tokens(raw)
                if n is not None and n != len(hashes) * bs:
                    raise InvalidEvent(f"{n} token ids for {len(hashes)} blocks of {bs}")
                self.malformed("kv_orphan", st.worker_id, "BlockStored with unknown parent")
                return 0
            p = found
        try:
            if type(raw) is list:  # a decoded BlockStored (an in-process caller)
                if len(raw) != len(hashes) * bs:
                    raise ValueError(f"{len(raw)} token ids for {len(hashes)} blocks of {bs}")
                local = token_block_hashes(raw, bs, p)
                x.update(zip(hashes, local, strict=True))
            else:
                impl = native.IMPL
                if impl is not None:
                    local = impl.stored_tokens(raw, bs, p, hashes, x)
                else:
                    local = stored_tokens_py(raw, bs, p, hashes, x)  # type: ignore[arg-type]
        except ValueError as exc:
            raise InvalidEvent(str(exc)[:200]) from None
        return self.index.store(st.slot, local, tier)

    def _check_hash(self, st: StreamState, ev: BlockStored, hashes: list[int]) -> None:
        """Once per worker: can we reproduce the engine's hash from its tokens?"""
        if ev.parent_block_hash is not None or ev.extra_keys or ev.lora_name:
            return
        st.hash_checked = True
        mine = self.hasher.engine_chain(None, ev.token_ids[: len(hashes) * ev.block_size])
        if mine != hashes:
            self.metrics.hash_mismatch.labels(st.worker_id).inc()
            log.error(
                "worker %s: engine block hashes differ from the router's (%s): check "
                "hash_algo / hash_seed (PYTHONHASHSEED) or use hash_mode 'tokens'",
                st.worker_id,
                self.hash_algo,
            )


_token_ids_decoder: Final = msgspec.msgpack.Decoder(list[int])


def stored_tokens_py(
    raw: msgspec.Raw | bytes,
    block_size: int,
    parent: int,
    hashes: list[int],
    xlat: MutableMapping[int, int],
) -> list[int]:
    """A tokens-mode ``BlockStored``'s router hashes from its undecoded ``token_ids`` (the
    msgpack bytes of the array), chained from ``parent``; ``xlat`` gains engine hash ->
    router hash for each block. ValueError, ``xlat`` untouched, unless ``raw`` is one
    msgpack array of ``len(hashes) * block_size`` ints (what msgspec reads as
    ``list[int]``). The reference of ``dynamo_ext._native.stored_tokens``, which parses the
    bytes without building the list; tests/router/test_native.py holds them equal."""
    if block_size <= 0:
        raise ValueError("block_size must be > 0")
    try:
        toks = _token_ids_decoder.decode(raw)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise ValueError(f"token_ids: {exc}") from None
    if len(toks) != len(hashes) * block_size:
        raise ValueError(f"{len(toks)} token ids for {len(hashes)} blocks of {block_size}")
    local = token_block_hashes_py(toks, block_size, parent)
    xlat.update(zip(hashes, local, strict=True))
    return local


def _n_tokens(raw: list[int] | msgspec.Raw | None) -> int | None:
    """How many token ids an event carries, decoded or not (None: none sent)."""
    return len(raw) if type(raw) is list else _raw_array_len(raw)  # type: ignore[arg-type]


def _raw_array_len(raw: msgspec.Raw | None) -> int | None:
    """Length of an undecoded msgpack array from its header (None: not an array)."""
    if raw is None:
        return None
    b = bytes(memoryview(raw)[:5])
    if not b:
        return None
    t = b[0]
    if 0x90 <= t <= 0x9F:
        return t & 0x0F
    if t == 0xDC and len(b) >= 3:
        return int.from_bytes(b[1:3], "big")
    if t == 0xDD and len(b) >= 5:
        return int.from_bytes(b[1:5], "big")
    raise InvalidEvent("token_ids is not an array")
