"""The Dynamo peer adapter drives Dynamo's Rust RadixTree as documented. The tests that run
the tree skip without ``dynamo._core`` (extra ``bench``); the event encoders run everywhere."""

from __future__ import annotations

import json

import pytest

from dynamo_ext.benchmarks import dynamo_peer
from dynamo_ext.benchmarks.dynamo_peer import DynamoRadixTree

needs_dynamo = pytest.mark.skipif(
    not dynamo_peer.available(), reason="dynamo._core not installed (extra bench)"
)

BIG = 2**64 - 1  # block hashes are unsigned 64-bit; exercise the top bit


def _chain(locals_: list[int], salt: int = 0) -> list[int]:
    """Toy sequence hashes: each a function of the whole prefix of local hashes."""
    out, h = [], 0x9E3779B97F4A7C15 ^ salt
    for t in locals_:
        h = (h * 0x100000001B3 ^ t) & BIG
        out.append(h)
    return out


SHARED = [BIG, BIG - 1, 2**63, 7]  # 4 shared prefix blocks, top bit set on three
W1_LOCAL = SHARED + [101, 102, 103]
W2_LOCAL = SHARED + [201, 202]
W1_SEQ = _chain(W1_LOCAL)
W2_SEQ = _chain(W2_LOCAL)


@pytest.fixture
def tree() -> DynamoRadixTree:
    if not dynamo_peer.available():
        pytest.skip("dynamo._core not installed (extra bench)")
    t = DynamoRadixTree()
    # worker 1 in two events (second chained on the first's last block), worker 2 in one
    t.store(1, W1_SEQ[:4], None, W1_LOCAL[:4])
    t.store(1, W1_SEQ[4:], W1_SEQ[3], W1_LOCAL[4:])
    t.store(2, W2_SEQ, None, W2_LOCAL)
    return t


@needs_dynamo
def test_available() -> None:
    assert dynamo_peer.available()


def test_prefix_lengths(tree: DynamoRadixTree) -> None:
    assert tree.find_matches(W1_LOCAL) == {1: 7, 2: 4}
    assert tree.find_matches(W2_LOCAL) == {1: 4, 2: 6}
    assert tree.find_matches(SHARED[:2]) == {1: 2, 2: 2}
    assert tree.find_matches(W1_LOCAL + [999]) == {1: 7, 2: 4}
    assert tree.find_matches([5, *SHARED]) == {}  # first block unknown: no prefix


def test_matches_on_local_not_sequence_hashes(tree: DynamoRadixTree) -> None:
    assert tree.find_matches(W1_SEQ) == {}


def test_remove_cascades_to_descendants(tree: DynamoRadixTree) -> None:
    tree.remove(1, [W1_SEQ[5]])
    assert tree.find_matches(W1_LOCAL) == {1: 5, 2: 4}
    tree.remove(2, [W2_SEQ[1]])  # worker 2 keeps only block 0
    assert tree.find_matches(W2_LOCAL) == {1: 4, 2: 1}
    # W1_SEQ[6] went with its parent: skipped by default, KeyError when strict
    tree.remove(1, [W1_SEQ[6]])
    with pytest.raises(KeyError):
        tree.remove(1, [W1_SEQ[6]], strict=True)
    assert tree.find_matches(W1_LOCAL) == {1: 5, 2: 1}


def test_store_needs_parent(tree: DynamoRadixTree) -> None:
    with pytest.raises(KeyError):
        tree.store(2, [12345], W1_SEQ[6], [55])  # worker 2 never held W1_SEQ[6]
    assert tree.find_matches(W1_LOCAL) == {1: 7, 2: 4}


def test_remove_worker_and_clear(tree: DynamoRadixTree) -> None:
    tree.remove_worker(1)
    assert tree.find_matches(W1_LOCAL) == {2: 4}
    tree.clear(2)
    assert tree.find_matches(W2_LOCAL) == {}
    tree.store(2, W2_SEQ[:2], None, W2_LOCAL[:2])
    assert tree.find_matches(W2_LOCAL) == {2: 2}
    tree.clear_all_blocks(2)
    assert tree.find_matches(W2_LOCAL) == {}


@needs_dynamo
def test_pre_encoded_bytes() -> None:
    t = DynamoRadixTree()
    data = dynamo_peer.encode_stored(W2_SEQ, None, W2_LOCAL, event_id=1)
    assert json.loads(data) == {
        "event_id": 1,
        "data": {
            "stored": {
                "parent_hash": None,
                "blocks": [
                    {"block_hash": b, "tokens_hash": h}
                    for b, h in zip(W2_SEQ, W2_LOCAL, strict=False)
                ],
            }
        },
    }
    t.apply_bytes(9, data)
    assert t.find_matches(W2_LOCAL) == {9: 6}
    t.apply_bytes(9, dynamo_peer.encode_removed([W2_SEQ[2]], event_id=2))
    assert t.find_matches(W2_LOCAL) == {9: 2}
    t.apply_bytes(9, dynamo_peer.encode_cleared(event_id=3))
    assert t.find_matches(W2_LOCAL) == {}


@needs_dynamo
def test_signed_hashes_are_masked() -> None:
    t = DynamoRadixTree()
    t.store(3, [-1, -2], None, [-3, 4])  # as two's complement: 2**64-1, 2**64-2, 2**64-3
    assert t.find_matches([BIG - 2, 4]) == {3: 2}
    assert t.find_matches([-3, 4]) == {3: 2}
    t.remove(3, [BIG - 1], strict=True)
    assert t.find_matches([BIG - 2, 4]) == {3: 1}


def test_length_mismatch_rejected() -> None:
    with pytest.raises(ValueError):
        dynamo_peer.encode_stored([1, 2], None, [1])
