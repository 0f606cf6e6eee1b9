"""KV event payloads made by SGLang's own code (needs ``sglang`` importable).

SGLang cannot serve a model on a CPU-only machine (its kernels need CUDA), but its event
path is pure Python: ``sglang.srt.mem_cache.events.KVCacheEventRecorder`` turns radix tree
nodes into ``BlockStored``/``BlockRemoved``/``AllBlocksCleared`` (hashes included, by
SGLang's chain of page hashes) and ``ZmqEventPublisher`` encodes ``KVEventBatch`` with
``msgspec.msgpack.Encoder``. We drive the recorder with minimal radix nodes and encode with
SGLang's classes. Two stand-ins, because their SGLang originals don't import here:
``_Key`` has the attributes of ``radix_cache.RadixKey`` (that module needs torchvision), and
each node's ``hash_value`` (SGLang's per-page SHA-256 hex chain, normally computed by a C++
extension JIT-compiled with torch) is preset to a SHA-256 chain of our own; the recorder
then does what SGLang does with it: int64 conversion, parent links, LoRA namespacing,
coalescing. Hash values are opaque to consumers, which re-key blocks by their tokens.

``python tests/plugins/sglang/sglang_recorder.py`` rewrites
``fixtures/sglang_0.5.23_kv_events.msgpack``, which tests use when SGLang does not import.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from pathlib import Path
from types import SimpleNamespace

import msgspec

FIXTURE = Path(__file__).parent / "fixtures" / "sglang_0.5.23_kv_events.msgpack"
PAGE = 4


class _Key:
    """``RadixKey``'s attributes: raw tokens, namespace, bigram flag; ``len`` in tokens."""

    def __init__(
        self, token_ids: list[int], extra_key: str | None = None, cache_salt: str | None = None
    ) -> None:
        self.token_ids = array("q", token_ids)
        self.extra_key = extra_key
        self.cache_salt = cache_salt
        self.is_bigram = False
        self.limit = None

    def __len__(self) -> int:
        return len(self.token_ids)


def _chain(parent_hex: str | None, tokens: list[int]) -> list[str]:
    out = []
    prev = bytes.fromhex(parent_hex) if parent_hex else b""
    for i in range(0, len(tokens), PAGE):
        prev = hashlib.sha256(prev + array("q", tokens[i : i + PAGE]).tobytes()).digest()
        out.append(prev.hex())
    return out


class _Node:
    """The attributes of ``sglang.srt.mem_cache.radix_cache.TreeNode`` the recorder reads."""

    def __init__(self, key: _Key, parent: _Node | None) -> None:
        self.key = key
        self.parent = parent
        self.hash_value: list[str] | None = None
        self.event_hash_value: list[str] | None = None
        if parent is not None:
            prior = parent.hash_value[-1] if parent.hash_value else None
            self.hash_value = _chain(prior, list(key.token_ids))
            if key.extra_key is not None or key.cache_salt is not None:
                # compute_node_event_hash_values: a salted chain starts from the salt's seed.
                seed = (
                    hashlib.sha256(b"sglang-cache-salt-v1\0" + key.cache_salt.encode()).hexdigest()
                    if key.cache_salt is not None
                    else prior
                )
                self.event_hash_value = _chain(seed, list(key.token_ids))


def record_batches() -> list[bytes]:
    """A session of SGLang KV events, one encoded ``KVEventBatch`` per scheduler step:

    0. request A stores 3 pages (tokens 1..12) from the root;
    1. request B extends A by 2 pages (13..20) and HiCache backs A's 3 pages up to host;
    2. a LoRA request and a salted request store 1 namespaced page each (the salted page
       has A's first tokens); eviction removes B's 2 device pages;
    3. flush_cache: AllBlocksCleared.
    """
    from sglang.srt.disaggregation.kv_events import KVEventBatch, StorageMedium
    from sglang.srt.mem_cache.events import KVCacheEventRecorder

    rec = KVCacheEventRecorder(enabled=True, page_size=PAGE)
    # What the scheduler does when a LoRA request is admitted (Req has these two fields).
    rec.lora_names.register(SimpleNamespace(lora_id="a" * 32, extra_key="a" * 32), "adapter-x")
    root = _Node(_Key([]), None)
    root.hash_value = []
    a = _Node(_Key(list(range(1, 13))), root)
    b = _Node(_Key(list(range(13, 21))), a)
    lora = _Node(_Key([7, 7, 7, 7], extra_key="a" * 32), root)
    salted = _Node(_Key([1, 2, 3, 4], cache_salt="tenant-1"), root)

    enc = msgspec.msgpack.Encoder()  # what ZmqEventPublisher._publisher_thread uses
    out: list[bytes] = []

    def step(ts: float) -> None:
        out.append(enc.encode(KVEventBatch(ts=ts, events=rec.take(), attn_dp_rank=0)))

    rec.record_store(a)
    step(1.0)
    rec.record_store(b)
    rec.record_store(a, medium=StorageMedium.CPU)
    step(2.0)
    rec.record_store(lora)
    rec.record_store(salted)
    rec.record_remove(b)
    step(3.0)
    rec.record_all_cleared()
    step(4.0)
    return out


def load_fixture() -> list[bytes]:
    return msgspec.msgpack.decode(FIXTURE.read_bytes(), type=list[bytes])


if __name__ == "__main__":
    batches = record_batches()
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_bytes(msgspec.msgpack.encode(batches))
    for raw in batches:
        print(msgspec.msgpack.decode(raw))
    print(f"wrote {len(batches)} batches to {FIXTURE}", file=sys.stderr)
