"""Global prefix index: which worker caches which block, per storage tier.

Layout: one map per tier from a block hash to a bitmask of the workers holding it (bit =
the worker's slot): a dict, and for the GPU tier, where every request walks and most events
land, the extension's ``MaskMap`` (see _native.c; a dict where it is not built). Because
block hashes are chained (a block's hash covers its whole prefix), a prompt's blocks match
a worker up to the first block it lacks, so ``find_matches`` walks the prompt's hashes
once, AND-ing masks, and stops as soon as no candidate is left: one lookup and a few int
ops per block, whatever the fleet size.

Why not a radix tree of nodes as Dynamo's Rust indexer: in Python every node is an object of
~100+ bytes and every step a pointer chase through attribute dicts; a flat map keyed by the
chained hash is the same tree, addressed by path hash. The price is that clearing one
worker scans its tiers (O(blocks)); that happens on a worker restart, not per request.
Why a C table for the GPU tier: a dict's entry, index slot and key int cost ~100 bytes a
block (the table: 16 bytes a slot), each store paid the dict's probe through the C API,
and its resize at ~700k blocks stalled the event loop for tens of ms (the table grows in
128 segments, one at a time).
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence
from typing import Any

from dynamo_ext import native
from dynamo_ext.errors import DynamoExtError
from dynamo_ext.protocol import MEDIUM_CPU, MEDIUM_DISK, MEDIUM_GPU, MEDIUM_REMOTE, MEDIUM_STORAGE

# Lookup order after the GPU prefix: an engine tries its host memory first, then disk, then
# a remote pool; an unknown tier name goes last.
TIER_ORDER: tuple[str, ...] = (MEDIUM_GPU, MEDIUM_CPU, MEDIUM_DISK, MEDIUM_STORAGE, MEDIUM_REMOTE)

MAX_WORKERS = 4096


class IndexFullError(DynamoExtError, ValueError):
    """Every worker slot of the index is taken."""


class PrefixMatches:
    """Result of ``find_matches``: each worker's longest cached prefix of a prompt.

    ``gpu[worker]`` blocks are in the worker's device cache; ``offload[worker][tier]`` blocks
    continue that prefix from an offload tier (what an engine with an offload connector
    loads instead of recomputing). Workers with no hit are absent.
    """

    __slots__ = ("gpu", "offload", "num_blocks")

    def __init__(
        self, gpu: dict[str, int], offload: dict[str, dict[str, int]], num_blocks: int
    ) -> None:
        self.gpu = gpu
        self.offload = offload
        self.num_blocks = num_blocks

    def total(self, worker_id: str) -> int:
        off = self.offload.get(worker_id)
        return self.gpu.get(worker_id, 0) + (sum(off.values()) if off else 0)

    def per_tier(self, worker_id: str) -> dict[str, int]:
        out = {MEDIUM_GPU: self.gpu.get(worker_id, 0)}
        off = self.offload.get(worker_id)
        if off:
            out.update(off)
        return out


class KvIndex:
    """In-memory global index. Not thread-safe: one event loop owns it."""

    def __init__(self, max_blocks_per_worker: int = 0) -> None:
        self._tiers: dict[str, MutableMapping[int, int]] = {
            MEDIUM_GPU: native.new_table("MaskMap")
        }
        self._tier_rank: dict[str, int] = {t: i for i, t in enumerate(TIER_ORDER)}
        self._slots: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._bits: list[int] = []
        self._free: list[int] = []
        self._counts: list[dict[str, int]] = []
        self._all_mask = 0
        self.max_blocks_per_worker = max_blocks_per_worker
        self.dropped_over_capacity = 0  # blocks evicted to respect max_blocks_per_worker
        # With a capacity bound: per slot and tier, the held hashes in store order, so the
        # least recently stored are evicted first (never the block just stored).
        self._lru: list[dict[str, dict[int, None]]] = []

    # ---- workers -------------------------------------------------------------------
    def add_worker(self, worker_id: str) -> int:
        slot = self._slots.get(worker_id)
        if slot is not None:
            return slot
        if self._free:
            slot = self._free.pop()
            self._ids[slot] = worker_id
            self._counts[slot] = {}
            self._lru[slot] = {}
        else:
            slot = len(self._ids)
            if slot >= MAX_WORKERS:
                raise IndexFullError(f"index holds at most {MAX_WORKERS} workers")
            self._ids.append(worker_id)
            self._bits.append(1 << slot)
            self._counts.append({})
            self._lru.append({})
        self._slots[worker_id] = slot
        self._all_mask |= self._bits[slot]
        return slot

    def remove_worker(self, worker_id: str) -> None:
        slot = self._slots.pop(worker_id, None)
        if slot is None:
            return
        self._clear_slot(slot)
        self._all_mask &= ~self._bits[slot]
        self._ids[slot] = None
        self._free.append(slot)

    def clear_worker(self, worker_id: str, tier: str | None = None) -> None:
        """The worker's cache was cleared: one tier (AllBlocksCleared) or all (a restart)."""
        slot = self._slots.get(worker_id)
        if slot is not None:
            self._clear_slot(slot, tier)

    def _clear_slot(self, slot: int, tier: str | None = None) -> None:
        b = self._bits[slot]
        nb = ~b
        for t, d in self._tiers.items():
            if tier is not None and t != tier:
                continue
            self._counts[slot].pop(t, None)
            self._lru[slot].pop(t, None)
            table = native.native_table(d, "MaskMap")
            if table is not None:
                table.clear_slot(slot)
                continue
            hit = [(h, m) for h, m in d.items() if m & b]
            for h, m in hit:
                m &= nb
                if m:
                    d[h] = m
                else:
                    del d[h]

    def workers(self) -> list[str]:
        return list(self._slots)

    def slot_of(self, worker_id: str) -> int | None:
        return self._slots.get(worker_id)

    def mask_of(self, worker_ids: Iterable[str]) -> int:
        m = 0
        slots, bits = self._slots, self._bits
        for w in worker_ids:
            s = slots.get(w)
            if s is not None:
                m |= bits[s]
        return m

    def block_counts(self, worker_id: str) -> dict[str, int]:
        slot = self._slots.get(worker_id)
        return dict(self._counts[slot]) if slot is not None else {}

    def tier_sizes(self) -> dict[str, int]:
        """Distinct blocks held per tier (any worker)."""
        return {t: len(d) for t, d in self._tiers.items()}

    def holds(self, slot: int, h: int) -> bool:
        """Whether the worker in ``slot`` holds block ``h`` in any tier."""
        b = self._bits[slot]
        return any(d.get(h, 0) & b for d in self._tiers.values())

    def worker_blocks(self, worker_id: str) -> dict[str, list[int]]:
        """Every block hash the worker holds, per tier, sorted (the audit view; O(index))."""
        slot = self._slots.get(worker_id)
        if slot is None:
            return {}
        b = self._bits[slot]
        out = {}
        for t, d in self._tiers.items():
            table = native.native_table(d, "MaskMap")
            hs = table.slot_keys(slot) if table is not None else [h for h, m in d.items() if m & b]
            if hs:
                out[t] = sorted(hs)
        return out

    def num_entries(self) -> int:
        """Distinct (tier, block) keys held: the unit of ``bytes_per_block``."""
        return sum(len(d) for d in self._tiers.values())

    # ---- events (hot path) -----------------------------------------------------------
    def store(self, slot: int, hashes: Sequence[int], tier: str = MEDIUM_GPU) -> int:
        """Mark ``hashes`` cached by the worker in ``slot``; returns blocks newly added."""
        d = self._tiers.get(tier)
        if d is None:
            d = self._tiers[tier] = {}
            self._tier_rank.setdefault(tier, len(self._tier_rank))
        counts = self._counts[slot]
        b = self._bits[slot]
        get = d.get
        added = 0
        cap = self.max_blocks_per_worker
        if cap:
            return self._store_bounded(slot, hashes, tier, d, cap)
        impl = native.IMPL
        table = native.native_table(d, "MaskMap")
        if table is not None:
            added = table.store(hashes, slot)
        elif impl is not None and type(d) is dict:
            added = impl.store_blocks(d, hashes, b)
        else:
            for h in hashes:
                old = get(h, 0)
                if not old & b:
                    # A block held by one worker shares that worker's bit object: no new int.
                    d[h] = old | b if old else b
                    added += 1
        if added:
            counts[tier] = counts.get(tier, 0) + added
        return added

    def ingest_table(self) -> Any:
        """The GPU tier's ``MaskMap`` when a native ingest may store into it directly (the
        hot loops run native, no capacity bound: ``store`` would call its ``store``), else
        None. Whoever stores there reports the blocks it added with ``count_stored``."""
        impl = native.IMPL  # native_table's test, inline: this runs once per KV batch
        d = self._tiers[MEDIUM_GPU]
        if impl is None or self.max_blocks_per_worker or type(d) is not impl.MaskMap:
            return None
        return d

    def count_stored(self, slot: int, added: int, tier: str = MEDIUM_GPU) -> None:
        """``added`` blocks of ``tier`` newly held by ``slot``, stored past ``store``."""
        if added:
            counts = self._counts[slot]
            counts[tier] = counts.get(tier, 0) + added

    def _store_bounded(
        self, slot: int, hashes: Sequence[int], tier: str, d: MutableMapping[int, int], cap: int
    ) -> int:
        lru = self._lru[slot].setdefault(tier, {})
        b = self._bits[slot]
        nb = ~b
        added = 0
        for h in hashes:
            old = d.get(h, 0)
            if old & b:
                del lru[h]  # stored again: now the most recent
            else:
                d[h] = old | b if old else b
                added += 1
            lru[h] = None
        counts = self._counts[slot]
        over = len(lru) - cap
        if over > 0:
            it = iter(lru)
            victims = [next(it) for _ in range(over)]
            for h in victims:
                del lru[h]
                m = d[h] & nb
                if m:
                    d[h] = m
                else:
                    del d[h]
            self.dropped_over_capacity += over
        counts[tier] = len(lru)
        return added

    def remove(self, slot: int, hashes: Iterable[int], tier: str = MEDIUM_GPU) -> int:
        d = self._tiers.get(tier)
        if d is None:
            return 0
        table = None if self.max_blocks_per_worker else native.native_table(d, "MaskMap")
        if table is not None:
            removed = table.remove(hashes, slot)
        else:
            removed = self._remove_py(slot, hashes, tier, d)
        if removed:
            counts = self._counts[slot]
            counts[tier] = counts.get(tier, 0) - removed
        return removed

    def _remove_py(
        self, slot: int, hashes: Iterable[int], tier: str, d: MutableMapping[int, int]
    ) -> int:
        b = self._bits[slot]
        nb = ~b
        get = d.get
        removed = 0
        for h in hashes:
            old = get(h)
            if old is not None and old & b:
                m = old & nb
                if m:
                    d[h] = m
                else:
                    del d[h]
                removed += 1
                if self.max_blocks_per_worker:
                    self._lru[slot].get(tier, {}).pop(h, None)
        return removed

    # ---- queries (hot path) ----------------------------------------------------------
    def tier_prefix(self, hashes: Sequence[int], tier: str) -> int:
        """Length of the longest prefix of ``hashes`` that any worker holds in ``tier``."""
        d = self._tiers.get(tier)
        if not d:
            return 0
        n = 0
        for h in hashes:
            if not d.get(h):
                break
            n += 1
        return n

    def find_matches(
        self,
        hashes: Sequence[int],
        candidates: int | None = None,
        shared: dict[str, int] | None = None,
    ) -> PrefixMatches:
        """Each candidate worker's longest cached prefix of ``hashes``, per tier.

        ``candidates`` is a worker mask (``mask_of``); None means every worker. ``shared``
        maps a tier that several workers read (a global pool) to the mask of its readers: a
        block any worker stored there counts for all of them.
        """
        n = len(hashes)
        if not n:
            return PrefixMatches({}, {}, 0)
        alive = self._all_mask if candidates is None else candidates & self._all_mask
        ids = self._ids
        impl = native.IMPL
        d = self._tiers[MEDIUM_GPU]
        table = native.native_table(d, "MaskMap")
        if table is not None and len(self._tiers) == 1:
            # GPU only (no offload walk needs the slots): keyed by worker id in C.
            return PrefixMatches(table.walk(hashes, alive, ids), {}, n)
        if table is not None:
            gpu_len = table.walk(hashes, alive)
        elif impl is not None and type(d) is dict:
            gpu_len = impl.gpu_walk(d, hashes, alive)
        else:
            gpu_len = self.gpu_walk_py(hashes, alive)
        gpu: dict[str, int] = {ids[s]: ln for s, ln in gpu_len.items()}  # type: ignore[misc]
        offload: dict[str, dict[str, int]] = {}
        if len(self._tiers) > 1:
            tiers = [
                (t, d)
                for t, d in sorted(self._tiers.items(), key=lambda kv: self._tier_rank[kv[0]])
                if t != MEDIUM_GPU and d
            ]
            if tiers:
                cand = self._all_mask if candidates is None else candidates & self._all_mask
                self._offload_walk(hashes, cand, gpu_len, tiers, offload, shared or {})
        return PrefixMatches(gpu, offload, n)

    def gpu_walk_py(self, hashes: Sequence[int], alive: int) -> dict[int, int]:
        """Slot -> length of its GPU prefix of ``hashes``, for the slots of mask ``alive``
        with at least one leading block (the reference of ``dynamo_ext._native.gpu_walk``).
        """
        n = len(hashes)
        gpu_len: dict[int, int] = {}
        get = self._tiers[MEDIUM_GPU].get
        i = 0
        for h in hashes:
            m = get(h, 0) & alive
            if m != alive:
                if i:
                    dropped = alive ^ m
                    while dropped:
                        low = dropped & -dropped
                        gpu_len[low.bit_length() - 1] = i
                        dropped ^= low
                alive = m
                if not alive:
                    break
            i += 1
        else:
            while alive:
                low = alive & -alive
                gpu_len[low.bit_length() - 1] = n
                alive ^= low
        return gpu_len

    def _offload_walk(
        self,
        hashes: Sequence[int],
        cand: int,
        gpu_len: dict[int, int],
        tiers: list[tuple[str, MutableMapping[int, int]]],
        out: dict[str, dict[str, int]],
        shared: dict[str, int],
    ) -> None:
        """Continue each worker's GPU prefix through its offload tiers (first tier wins)."""
        n = len(hashes)
        start_at: dict[int, int] = {}
        for s, ln in gpu_len.items():
            if ln < n:
                start_at[ln] = start_at.get(ln, 0) | self._bits[s]
        with_gpu = 0
        for s in gpu_len:
            with_gpu |= self._bits[s]
        zero = cand & ~with_gpu
        if zero:
            start_at[0] = start_at.get(0, 0) | zero
        starts = sorted(start_at)
        counts: dict[int, dict[str, int]] = {}
        ids = self._ids
        alive = 0
        si = 0
        i = starts[0] if starts else n
        while i < n:
            if si < len(starts) and starts[si] == i:
                alive |= start_at[i]
                si += 1
            if not alive:
                if si >= len(starts):
                    break
                i = starts[si]
                continue
            h = hashes[i]
            cont = 0
            for t, d in tiers:
                m = d.get(h, 0)
                if m and t in shared:
                    # A shared-tier block counts for every reader while a live reader
                    # (one in the mask) vouches for it; a dead announcer credits nobody.
                    sm = shared[t]
                    if m & sm:
                        m |= sm
                m &= alive & ~cont
                if m:
                    cont |= m
                    while m:
                        low = m & -m
                        c = counts.setdefault(low.bit_length() - 1, {})
                        c[t] = c.get(t, 0) + 1
                        m ^= low
            alive = cont
            i += 1
        for s, c in counts.items():
            out[ids[s]] = c  # type: ignore[index]
