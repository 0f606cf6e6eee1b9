"""SGLang KV events -> vLLM-schema events the router indexes.

Payloads: ``fixtures/sglang_0.5.23_kv_events.msgpack``, made by SGLang 0.5.23's own
``KVCacheEventRecorder`` and ``KVEventBatch`` (``sglang_recorder.py`` says how). When SGLang
imports here (``scripts/install.sh`` installs it ``--no-deps``), the recorder runs again
and must reproduce the fixture, and events encoded by SGLang's classes are translated.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import msgspec
import pytest

from dynamo_ext.hashing import BlockHasher
from dynamo_ext.plugins.sglang.events import SglangEventTranslator
from dynamo_ext.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    encode,
    kv_batch_decoder,
)

HERE = Path(__file__).parent
FIXTURE = HERE / "fixtures" / "sglang_0.5.23_kv_events.msgpack"
PAGE = 4


def batches() -> list[bytes]:
    return msgspec.msgpack.decode(FIXTURE.read_bytes(), type=list[bytes])


def vllm_hashes(tokens: list[int]) -> list[int]:
    """What a router in its default mode (vLLM's sha256 chain) names these blocks."""
    return BlockHasher(PAGE, "engine", "sha256").hash_tokens(tokens)


def _recorder():
    spec = importlib.util.spec_from_file_location("sglang_recorder", HERE / "sglang_recorder.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stock_schema_rejects_sglang_payloads() -> None:
    """Why a translation is needed: vLLM's schema requires lora_name, SGLang omits it."""
    with pytest.raises(msgspec.ValidationError, match="lora_name"):
        kv_batch_decoder.decode(batches()[0])


def test_translates_recorded_session() -> None:
    tr = SglangEventTranslator(PAGE)
    out = [tr.translate_payload(b) for b in batches()]
    assert all(o is not None for o in out)
    (ts0, e0), (ts1, e1), (ts2, e2), (ts3, e3) = out  # type: ignore[misc]
    assert (ts0, ts1, ts2, ts3) == (1.0, 2.0, 3.0, 4.0)
    a = list(range(1, 13))
    ab = list(range(1, 21))

    # step 0: 3 device pages from the root, re-keyed to vLLM's hashes of their tokens
    [s] = e0
    assert isinstance(s, BlockStored)
    assert s.block_hashes == vllm_hashes(a)
    assert s.parent_block_hash is None and s.medium == "GPU" and s.block_size == PAGE
    assert s.token_ids == a

    # step 1: B continues A on the device; HiCache backs A up to host (CPU_PINNED -> CPU)
    gpu, cpu = e1
    assert isinstance(gpu, BlockStored) and isinstance(cpu, BlockStored)
    assert gpu.block_hashes == vllm_hashes(ab)[3:]
    assert gpu.parent_block_hash == vllm_hashes(a)[-1]
    assert cpu.medium == "CPU" and cpu.block_hashes == vllm_hashes(a)

    # step 2: namespaced pages stay apart from plain ones; removal of B by our hashes
    lora, salted, removed = e2
    assert isinstance(lora, BlockStored) and isinstance(salted, BlockStored)
    assert lora.lora_name == "adapter-x" and lora.extra_keys is not None
    assert lora.block_hashes != vllm_hashes([7, 7, 7, 7])
    assert salted.token_ids == [1, 2, 3, 4] and salted.extra_keys is not None
    assert salted.block_hashes != vllm_hashes([1, 2, 3, 4])
    assert isinstance(removed, BlockRemoved)
    assert removed.block_hashes == vllm_hashes(ab)[3:] and removed.medium == "GPU"

    # step 3: flush_cache clears the device tier only
    assert [type(e) for e in e3] == [AllBlocksCleared]
    assert tr.held("GPU") == 0 and tr.held("CPU") == 3
    assert not tr.dropped

    # the output is vLLM's schema: the router's stock decoder reads it
    for events in (e0, e1, e2, e3):
        from dynamo_ext.protocol import KVEventBatch

        back = kv_batch_decoder.decode(encode(KVEventBatch(ts=1.0, events=events)))
        assert back.events == events


def test_malformed_input_is_counted_and_dropped() -> None:
    tr = SglangEventTranslator(PAGE)
    assert tr.translate_payload(b"\xc1 not msgpack") is None
    assert tr.translate_payload(msgspec.msgpack.encode({"not": "a batch"})) is None
    good = {
        "type": "BlockStored",
        "block_hashes": [11],
        "parent_block_hash": None,
        "token_ids": [1, 2, 3, 4],
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
    }
    events = [
        {"type": "Bogus"},
        {"type": "BlockStored", "block_hashes": "nope"},
        {**good, "medium": "TAPE"},
        {**good, "block_hashes": [12], "parent_block_hash": 999},  # unknown parent
        {**good, "block_hashes": [13], "token_ids": [1, 2], "block_size": 2},  # partial page
        {**good, "block_hashes": [14, 15]},  # 2 blocks, 4 tokens
        {"type": "BlockRemoved", "block_hashes": [424242], "medium": "GPU"},
        good,
    ]
    res = tr.translate_payload(msgspec.msgpack.encode([5.0, events, 0]))
    assert res is not None
    ts, out = res
    assert [type(e) for e in out] == [BlockStored]  # the one good event survives
    assert out[0].block_hashes == vllm_hashes([1, 2, 3, 4])
    assert tr.dropped == {
        "malformed_batch": 2,
        "malformed_event": 2,
        "unknown_medium": 1,
        "orphan": 1,
        "block_size": 1,
        "token_count": 1,
        "unknown_removed": 1,
    }


def test_bigram_pages_index_their_tokens() -> None:
    # EAGLE's bigram radix keys publish (token, next_token) pairs per position
    tr = SglangEventTranslator(PAGE)
    ev = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": [[1, 2], [2, 3], [3, 4], [4, 5]],
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
    }
    res = tr.translate_payload(msgspec.msgpack.encode([1.0, [ev], 0]))
    assert res is not None
    [s] = res[1]
    assert s.token_ids == [1, 2, 3, 4] and s.block_hashes == vllm_hashes([1, 2, 3, 4])


def test_fixture_is_what_sglang_records_now() -> None:
    pytest.importorskip("sglang.srt.mem_cache.events", reason="SGLang not installed")
    assert _recorder().record_batches() == batches()


def test_translates_events_encoded_by_sglang_classes() -> None:
    kv = pytest.importorskip("sglang.srt.disaggregation.kv_events", reason="SGLang not installed")
    enc = msgspec.msgpack.Encoder()  # ZmqEventPublisher's encoder
    root = kv.BlockStored(
        block_hashes=[-5, 6],
        parent_block_hash=None,
        token_ids=list(range(8)),
        block_size=4,
        lora_id=None,
        medium=kv.StorageMedium.GPU,
    )
    child = kv.BlockStored(
        block_hashes=[-7],
        parent_block_hash=6,
        token_ids=[8, 9, 10, 11],
        block_size=4,
        lora_id=None,
        medium=kv.StorageMedium.DISK,
        session_id="s",
    )
    ext = kv.BlockStored(
        block_hashes=[-5],
        parent_block_hash=None,
        token_ids=[0, 1, 2, 3],
        block_size=4,
        lora_id=None,
        medium=kv.StorageMedium.EXTERNAL,
    )
    gone = kv.BlockRemoved(block_hashes=[6, -5], medium=kv.StorageMedium.GPU)
    raw = enc.encode(kv.KVEventBatch(ts=9.0, events=[root, child, ext, gone], attn_dp_rank=0))
    tr = SglangEventTranslator(PAGE)
    res = tr.translate_payload(raw)
    assert res is not None
    s_root, s_child, s_ext, s_gone = res[1]
    full = vllm_hashes(list(range(12)))
    assert s_root.block_hashes == full[:2] and s_root.medium == "GPU"
    assert s_child.block_hashes == full[2:] and s_child.medium == "DISK"
    assert s_child.parent_block_hash == full[1]
    assert s_ext.medium == "REMOTE" and s_ext.block_hashes == full[:1]
    assert isinstance(s_gone, BlockRemoved) and s_gone.block_hashes == full[1::-1]
    assert not tr.dropped
