"""SGLang's KV events, translated to the vLLM schema the router indexes.

SGLang 0.5.23 publishes with vLLM's framing (``sglang/srt/disaggregation/kv_events.py``:
``ZmqEventPublisher``, ``[topic, seq, payload]`` on PUB, a ROUTER replay socket answering
``[b"", start_seq]`` with the buffered batches and a ``-1`` end marker) and almost vLLM's
payload, but not quite, so a stock router cannot read it as is:

- ``BlockStored`` omits ``lora_name`` when it is None (``omit_defaults``), which vLLM's
  schema requires, and carries ``cache_salt``, which vLLM's does not;
- ``medium`` names its tiers ``GPU``, ``CPU_PINNED``, ``DISK``, ``EXTERNAL``;
- block hashes are SGLang's own (signed int64 of a SHA-256 chain over page tokens), not
  vLLM's, so a router that hashes prompts the vLLM way never matches them;
- ``token_ids`` of a bigram (EAGLE) page are ``(token, next_token)`` pairs.

``SglangEventTranslator`` decodes SGLang batches with a tolerant mirror of its Structs and
emits vLLM ``BlockStored``/``BlockRemoved``/``AllBlocksCleared``: tiers renamed, every block
re-keyed with vLLM's chained block hash of its tokens (the router's ``engine`` hash mode;
a ``tokens``-mode router re-hashes the carried token ids itself), namespaced blocks
(LoRA, cache salt) kept apart through ``extra_keys``. It remembers SGLang hash -> our hash
per tier, as the router does in tokens mode, to translate removals and parents; the map
holds exactly the blocks the engine holds. Anything it cannot translate is counted by
reason and dropped, never raised.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import msgspec

from dynamo_ext.hashing import BlockHasher, engine_hash_fn, to_external
from dynamo_ext.protocol import (
    MEDIUM_CPU,
    MEDIUM_DISK,
    MEDIUM_GPU,
    MEDIUM_REMOTE,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
)

log = logging.getLogger(__name__)


# sglang.srt.disaggregation.kv_events.StorageMedium -> our router tiers.
MEDIUM_MAP: dict[str | None, str] = {
    None: MEDIUM_GPU,
    "GPU": MEDIUM_GPU,
    "CPU_PINNED": MEDIUM_CPU,
    "CPU": MEDIUM_CPU,
    "DISK": MEDIUM_DISK,
    "EXTERNAL": MEDIUM_REMOTE,
}


# Mirrors of sglang/srt/disaggregation/kv_events.py (0.5.23), loose where SGLang is loose.
class SgBlockStored(msgspec.Struct, tag="BlockStored", gc=False):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[Any]  # ints, or [token, next] pairs for bigram pages
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    cache_salt: str | None = None
    session_id: str | None = None
    lora_name: str | None = None


class SgBlockRemoved(msgspec.Struct, tag="BlockRemoved", gc=False):
    block_hashes: list[int]
    medium: str | None = None


class SgAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", gc=False):
    pass


class SgEventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[msgspec.Raw]  # decoded one by one: a bad event drops alone
    attn_dp_rank: int | None = None


SgEvent = SgBlockStored | SgBlockRemoved | SgAllBlocksCleared
sg_batch_decoder = msgspec.msgpack.Decoder(SgEventBatch)
sg_event_decoder = msgspec.msgpack.Decoder(SgEvent)


class SglangEventTranslator:
    """SGLang ``KVEventBatch`` payloads in, vLLM-schema events out.

    ``block_size``, ``hash_algo`` and ``hash_seed`` must be the router's (``block_size`` is
    SGLang's ``--page-size``).
    """

    def __init__(
        self, block_size: int, hash_algo: str = "sha256", hash_seed: str | None = None
    ) -> None:
        self.block_size = block_size
        self._fn = engine_hash_fn(hash_algo)
        self._none = BlockHasher(block_size, "engine", hash_algo, hash_seed).none_hash
        # Per tier: SGLang hash -> (our int hash, our full digest for chaining children).
        self.tiers: dict[str, dict[int, tuple[int, bytes]]] = {}
        self.dropped: Counter[str] = Counter()
        self.translated = 0

    def _drop(self, reason: str, detail: object = "") -> None:
        if not self.dropped[reason]:
            log.warning("dropping SGLang KV event (%s) %s; counted from now on", reason, detail)
        self.dropped[reason] += 1

    def held(self, tier: str = MEDIUM_GPU) -> int:
        return len(self.tiers.get(tier, ()))

    def translate_payload(self, payload: bytes) -> tuple[float, list[KVEvent]] | None:
        """Decode one SGLang batch payload; None (counted) when it is malformed."""
        try:
            batch = sg_batch_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._drop("malformed_batch", exc)
            return None
        return batch.ts, self.translate(batch.events)

    def translate(self, events: list[msgspec.Raw] | list[SgEvent]) -> list[KVEvent]:
        out: list[KVEvent] = []
        for raw in events:
            if isinstance(raw, msgspec.Raw):
                try:
                    ev: Any = sg_event_decoder.decode(raw)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    self._drop("malformed_event", exc)
                    continue
            else:
                ev = raw
            t = type(ev)
            if t is SgBlockStored:
                stored = self._stored(ev)
                if stored is not None:
                    out.append(stored)
            elif t is SgBlockRemoved:
                removed = self._removed(ev)
                if removed is not None:
                    out.append(removed)
            elif t is SgAllBlocksCleared:
                # SGLang clears its device cache (flush_cache); host tiers are kept.
                self.tiers.pop(MEDIUM_GPU, None)
                out.append(AllBlocksCleared())
            else:
                self._drop("unknown_event", ev)
        self.translated += len(out)
        return out

    def _tier(self, medium: str | None) -> str | None:
        tier = MEDIUM_MAP.get(medium)
        if tier is None:
            self._drop("unknown_medium", medium)
        return tier

    def _parent(self, sg_parent: int | None) -> bytes | None:
        if sg_parent is None:
            return self._none
        # The parent may sit in another tier (a host copy continues a device prefix).
        for m in self.tiers.values():
            hit = m.get(sg_parent)
            if hit is not None:
                return hit[1]
        return None

    def _stored(self, ev: SgBlockStored) -> BlockStored | None:
        tier = self._tier(ev.medium)
        if tier is None:
            return None
        bs = ev.block_size
        n = len(ev.block_hashes)
        if bs != self.block_size:
            # A trailing partial page (SGLang emits block_size=len(tokens)) or a page size
            # other than the router's: neither can be indexed as a full block.
            self._drop("block_size", f"{bs} != {self.block_size}")
            return None
        if n == 0 or len(ev.token_ids) != n * bs:
            self._drop("token_count", f"{len(ev.token_ids)} tokens for {n} blocks of {bs}")
            return None
        tokens = ev.token_ids
        if tokens and not isinstance(tokens[0], int):
            try:  # bigram page: (token, next_token) pairs; the first of each is the token
                tokens = [int(p[0]) for p in tokens]
            except (TypeError, ValueError, IndexError):
                self._drop("token_ids", tokens[:2])
                return None
        prev = self._parent(ev.parent_block_hash)
        if prev is None:
            self._drop("orphan", "BlockStored whose parent block is unknown")
            return None
        namespaced = ev.lora_name is not None or ev.cache_salt is not None
        extra = ("sglang-ns", ev.lora_name or "", ev.cache_salt or "") if namespaced else None
        parent = None
        if ev.parent_block_hash is not None:
            parent = to_external(prev)
        m = self.tiers.setdefault(tier, {})
        fn = self._fn
        ours: list[int] = []
        for i, sg_hash in enumerate(ev.block_hashes):
            prev = fn((prev, tuple(tokens[i * bs : (i + 1) * bs]), extra))
            h = to_external(prev)
            m[sg_hash] = (h, prev)
            ours.append(h)
        return BlockStored(
            block_hashes=ours,  # type: ignore[arg-type]
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=bs,
            lora_id=None,
            medium=tier,
            lora_name=ev.lora_name,
            extra_keys=[extra] * n if namespaced else None,
        )

    def _removed(self, ev: SgBlockRemoved) -> BlockRemoved | None:
        tier = self._tier(ev.medium)
        if tier is None:
            return None
        m = self.tiers.get(tier)
        ours: list[int] = []
        unknown = 0
        for sg_hash in ev.block_hashes:
            hit = m.pop(sg_hash, None) if m else None
            if hit is None:
                unknown += 1
            else:
                ours.append(hit[0])
        if unknown:
            self._drop("unknown_removed", f"{unknown} blocks")
        if not ours:
            return None
        return BlockRemoved(block_hashes=ours, medium=tier)  # type: ignore[arg-type]
