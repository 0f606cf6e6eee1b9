"""The live ingest's one-call path (``_native.ingest_stored``, taken by ``KvIngest.on_live``
for a batch of GPU ``BlockStored`` events): the same index, engine -> router map, malformed
counts and stream state as the Python decode + apply, for vLLM's frames and for any bytes
(it declines what it does not take, and the Python path judges those)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_ext import native
from dynamo_ext.config import RouterConfig
from dynamo_ext.protocol import BlockStored, KVEventBatch, WorkerRegistration, encode, seq_bytes
from dynamo_ext.router.ingest import KvIngest
from dynamo_ext.router.service import RouterService

BS = 4
pytestmark = pytest.mark.skipif(not native.available(), reason="dynamo_ext._native not built")


def _stored(h: int, n: int, parent: int | None, medium: str | None = "GPU") -> BlockStored:
    toks = [(h * 7 + i) % 1000 for i in range(n * BS)]
    return BlockStored(list(range(h, h + n)), parent, toks, BS, None, medium, None)  # type: ignore[arg-type]


def _frame(*events: Any, dp: int | None = None) -> bytes:
    return encode(KVEventBatch(0.0, list(events), data_parallel_rank=dp))


def _ingested(frames: list[bytes], on: bool, cpu_first: bool = False) -> tuple:
    old = native.set_enabled(on)
    try:
        s = RouterService(RouterConfig(block_size=BS, metrics_port=None, hash_mode="tokens"))
        st_ = s.register(WorkerRegistration("w0", block_size=BS), static=True).stream
        if cpu_first:  # a parent held in an offload tier only
            s.ingest.on_live(st_, [b"", seq_bytes(0), _frame(_stored(900, 2, None, "CPU"))])
        for f in frames:
            s.ingest.on_live(st_, [b"", seq_bytes(st_.last_seq + 1), f])
        bad = {
            smp.labels["source"]: smp.value
            for m in s.metrics.malformed.collect()
            for smp in m.samples
            if smp.name.endswith("_total")
        }
        return (
            s.index.worker_blocks("w0"),
            bad,
            {t: dict(x) for t, x in st_.xlat.items()},
            st_.last_seq,
            st_.events_applied,
        )
    finally:
        native.set_enabled(old)


def _same(frames: list[bytes], cpu_first: bool = False) -> None:
    assert _ingested(frames, True, cpu_first) == _ingested(frames, False, cpu_first)


@pytest.mark.skipif(not native.enabled(), reason="the C path is off (DYNAMO_EXT_NATIVE=0)")
def test_vllm_frames_skip_the_python_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a stream's first store, a vLLM batch of GPU stores is decoded in C: the Python
    decoder is not called (it built a Struct, lists and an int per hash per batch)."""
    s = RouterService(RouterConfig(block_size=BS, metrics_port=None, hash_mode="tokens"))
    st_ = s.register(WorkerRegistration("w0", block_size=BS), static=True).stream
    s.ingest.on_live(st_, [b"", seq_bytes(0), _frame(_stored(1, 2, None))])
    calls: list[bytes] = []
    real = KvIngest.decode

    def counted(self: KvIngest, st_: Any, payload: bytes) -> Any:
        calls.append(payload)
        return real(self, st_, payload)

    monkeypatch.setattr(KvIngest, "decode", counted)
    s.ingest.on_live(st_, [b"", seq_bytes(1), _frame(_stored(3, 2, 2), _stored(10, 3, None))])
    assert calls == [] and st_.last_seq == 1 and s.index.num_entries() == 7


def test_same_as_python_for_shapes_it_takes_and_declines() -> None:
    orphan = _stored(50, 2, 4444)
    frames = [
        _frame(_stored(1, 2, None)),
        _frame(_stored(3, 2, 2), orphan, _stored(5, 1, 4)),  # an orphan amid good events
        _frame(_stored(6, 2, 901)),  # parent only in the CPU tier
        _frame(_stored(8, 1, None, None)),  # medium None is GPU
        _frame(_stored(9, 1, None), dp=3),
        _frame(),
        _frame(_stored(10, 1, None, "CPU")),  # declined: another tier
        _frame(BlockStored([11], None, [1, 2, 3], BS, None, "GPU", None)),  # bad count
        _frame(BlockStored([12], None, [1, 2.5, 3, 4], BS, None, "GPU", None)),  # type: ignore[list-item]
        _frame(BlockStored([-5], None, [1, 2, 3, 4], BS, None, "GPU", None)),
        _frame(BlockStored([b"\x01" * 32], None, [1, 2, 3, 4], BS, None, "GPU", None)),
        _frame(BlockStored([13], None, [1, 2, 3, 4, 5, 6, 7, 8], 8, None, "GPU", None)),
        _frame(BlockStored([14], None, [1, 2, 3, 4], BS, 7, "GPU", "lora-a")),
        _frame(BlockStored([15], None, [1, 2, 3, 4], BS, None, "GPU", None, [("k", 1)])),
    ]
    _same(frames, cpu_first=True)


def _map(ev: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode([0.0, [ev]])


def test_same_as_python_for_odd_maps() -> None:
    base = {
        "type": "BlockStored",
        "block_hashes": [20, 21],
        "parent_block_hash": None,
        "token_ids": list(range(2 * BS)),
        "block_size": BS,
    }
    frames = [
        _map(base),
        _map(dict(reversed(list(base.items())))),  # token_ids before block_hashes
        _map({**base, "lora_id": None, "session_id": "s", "x": {"a": [1, 2.0, None]}}),
        _map({**base, "x": b"bytes"}),
        _map({**base, "x": "é"}),
        _map({k: v for k, v in base.items() if k != "parent_block_hash"}),  # malformed
        _map({k: v for k, v in base.items() if k != "token_ids"}),
        _map({**base, "type": "BlockRemoved"}),
        _map({**base, "block_size": True}),
        _map({**base, "locality": "LOCAL"}),
        msgspec.msgpack.encode([1, [base], None, 9]),
        msgspec.msgpack.encode([0.0, [base]]) + b"\x00",
        msgspec.msgpack.encode(["ts", [base]]),
        msgspec.msgpack.encode([[1] * 40, [base]]),
    ]
    _same(frames)


def _vllm_frames() -> list[bytes]:
    return [
        _frame(_stored(1, 3, None)),
        _frame(_stored(4, 2, 3), _stored(30, 1, None)),
        _frame(_stored(6, 2, 5), dp=1),
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 2),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=4),
    st.sampled_from(["flip", "cut", "insert"]),
)
def test_same_as_python_for_corrupted_bytes(which: int, edits: list, how: str) -> None:
    """Hostile bytes: whatever a corrupted frame holds, the index, the maps and the malformed
    counts end as the Python path leaves them."""
    frames = _vllm_frames()
    raw = bytearray(frames[which])
    for pos, byte in edits:
        i = pos % len(raw)
        if how == "flip":
            raw[i] = byte
        elif how == "cut":
            del raw[i:]
            if not raw:
                break
        else:
            raw.insert(i, byte)
    frames[which] = bytes(raw)
    _same(frames)
