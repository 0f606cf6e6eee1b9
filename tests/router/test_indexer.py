"""KvIndex against a brute-force model: per worker and tier, a set of block hashes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_ext.router.indexer import TIER_ORDER, KvIndex

TIERS = ["GPU", "CPU", "DISK"]


class Model:
    def __init__(self) -> None:
        self.held: dict[str, dict[str, set[int]]] = {}

    def find(self, hashes: list[int], candidates: set[str] | None = None):
        gpu: dict[str, int] = {}
        off: dict[str, dict[str, int]] = {}
        for w, tiers in self.held.items():
            if candidates is not None and w not in candidates:
                continue
            g = 0
            for h in hashes:
                if h not in tiers.get("GPU", set()):
                    break
                g += 1
            if g:
                gpu[w] = g
            counts: dict[str, int] = {}
            for h in hashes[g:]:
                for t in TIER_ORDER[1:]:
                    if h in tiers.get(t, set()):
                        counts[t] = counts.get(t, 0) + 1
                        break
                else:
                    break
            if counts:
                off[w] = counts
        return gpu, off


def test_chains_share_prefix_and_diverge() -> None:
    idx = KvIndex()
    a, b = idx.add_worker("a"), idx.add_worker("b")
    idx.store(a, [1, 2, 3, 4])
    idx.store(b, [1, 2, 9])
    m = idx.find_matches([1, 2, 3, 4, 5])
    assert m.gpu == {"a": 4, "b": 2}
    assert m.num_blocks == 5
    assert idx.find_matches([7, 1, 2]).gpu == {}  # a prefix must start at the first block


def test_remove_breaks_the_prefix_at_the_removed_block() -> None:
    idx = KvIndex()
    a = idx.add_worker("a")
    idx.store(a, [1, 2, 3, 4])
    assert idx.remove(a, [3]) == 1
    assert idx.find_matches([1, 2, 3, 4]).gpu == {"a": 2}
    assert idx.remove(a, [3]) == 0  # removing twice is harmless
    assert idx.block_counts("a") == {"GPU": 3}


def test_offload_tier_continues_gpu_prefix() -> None:
    idx = KvIndex()
    a, b = idx.add_worker("a"), idx.add_worker("b")
    idx.store(a, [1, 2])
    idx.store(a, [3, 4], "CPU")
    idx.store(a, [5], "DISK")
    idx.store(b, [1, 2, 3, 4, 5], "DISK")
    m = idx.find_matches([1, 2, 3, 4, 5, 6])
    assert m.gpu == {"a": 2}
    assert m.offload == {"a": {"CPU": 2, "DISK": 1}, "b": {"DISK": 5}}
    assert m.per_tier("a") == {"GPU": 2, "CPU": 2, "DISK": 1}
    assert m.total("b") == 5


def test_clear_and_remove_worker_and_slot_reuse() -> None:
    idx = KvIndex()
    a, b = idx.add_worker("a"), idx.add_worker("b")
    idx.store(a, [1, 2, 3])
    idx.store(a, [4], "CPU")
    idx.store(b, [1, 2])
    idx.clear_worker("a", "GPU")
    assert idx.find_matches([1, 2, 3]).gpu == {"b": 2}
    assert idx.block_counts("a") == {"CPU": 1}
    idx.remove_worker("b")
    assert idx.find_matches([1, 2]).gpu == {}
    c = idx.add_worker("c")
    assert c == b  # the freed slot is reused, with no stale bits
    assert idx.find_matches([1, 2]).gpu == {}
    assert idx.num_entries() == 1  # only a's CPU block is left


def test_candidates_mask_limits_the_answer() -> None:
    idx = KvIndex()
    a, b = idx.add_worker("a"), idx.add_worker("b")
    idx.store(a, [1, 2])
    idx.store(b, [1, 2, 3])
    m = idx.find_matches([1, 2, 3], idx.mask_of(["a"]))
    assert m.gpu == {"a": 2}


def test_capacity_bound_evicts_least_recently_stored_never_the_newest() -> None:
    # Was: the bound kept the oldest blocks and dropped every new one.
    idx = KvIndex(max_blocks_per_worker=3)
    a = idx.add_worker("a")
    idx.store(a, [1, 2, 3, 4, 5])
    assert idx.dropped_over_capacity == 2
    assert idx.block_counts("a") == {"GPU": 3}
    assert idx.worker_blocks("a") == {"GPU": [3, 4, 5]}
    idx.store(a, [3])  # stored again: now the most recent
    idx.store(a, [6])
    assert sorted(idx.worker_blocks("a")["GPU"]) == [3, 5, 6]
    idx.remove(a, [5])
    idx.store(a, [7])
    assert sorted(idx.worker_blocks("a")["GPU"]) == [3, 6, 7]
    assert idx.block_counts("a") == {"GPU": 3}


ops = st.lists(
    st.tuples(
        st.sampled_from(["store", "store", "store", "remove", "clear", "drop"]),
        st.integers(0, 4),  # worker
        st.sampled_from(TIERS),
        st.lists(st.integers(0, 12), min_size=1, max_size=6),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=ops,
    queries=st.lists(st.lists(st.integers(0, 12), max_size=8), min_size=1, max_size=5),
    cand=st.one_of(st.none(), st.sets(st.integers(0, 4))),
)
def test_index_matches_brute_force_model(ops, queries, cand) -> None:
    idx = KvIndex()
    model = Model()
    for op, w, tier, hashes in ops:
        wid = f"w{w}"
        if op == "drop":
            idx.remove_worker(wid)
            model.held.pop(wid, None)
            continue
        slot = idx.add_worker(wid)
        tiers = model.held.setdefault(wid, {})
        if op == "store":
            added = idx.store(slot, hashes, tier)
            before = set(tiers.get(tier, set()))
            tiers.setdefault(tier, set()).update(hashes)
            assert added == len(tiers[tier] - before)
        elif op == "remove":
            removed = idx.remove(slot, hashes, tier)
            held = tiers.get(tier, set())
            assert removed == len(held & set(hashes))
            held.difference_update(hashes)
        else:
            idx.clear_worker(wid, tier)
            tiers.pop(tier, None)
    for wid, tiers in model.held.items():
        assert idx.block_counts(wid) == {t: len(s) for t, s in tiers.items() if s} | {
            t: 0 for t, s in tiers.items() if not s and t in idx.block_counts(wid)
        }
    names = None if cand is None else {f"w{c}" for c in cand}
    mask = None if names is None else idx.mask_of(names)
    for q in queries:
        m = idx.find_matches(q, mask)
        gpu, off = model.find(q, names)
        assert m.gpu == gpu, (q, ops)
        assert m.offload == off, (q, ops)
