"""Wire messages of dynamo-ext: every byte that crosses a socket is one of these Structs.

Two families live here. The KV event Structs mirror ``vllm/distributed/kv_events.py`` of
vLLM 0.32 field for field (same tags, same ``array_like`` batch, same ``omit_defaults``), so
the router decodes a stock vLLM stream unchanged and our own publishers (offload tiers,
the mocker) emit bytes a vLLM consumer could read. The control family (metrics, registration,
routing) is ours: tagged unions on one ZMQ ROUTER socket, framed as
``[PROTOCOL_HEADER, payload]`` so a peer speaking another version is refused with an error
instead of being misread. Nothing here imports an engine.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal

import msgspec

PROTOCOL_VERSION: Final = 1
PROTOCOL_HEADER: Final = b"dynamo-ext/1"

# vLLM's ZmqEventPublisher end-of-replay marker: seq -1 as 8 signed big-endian bytes.
REPLAY_END_SEQ: Final = (-1).to_bytes(8, "big", signed=True)

MEDIUM_GPU: Final = "GPU"
MEDIUM_CPU: Final = "CPU"
MEDIUM_DISK: Final = "DISK"
MEDIUM_STORAGE: Final = "STORAGE"  # vLLM's name for its own storage offload tier
MEDIUM_REMOTE: Final = "REMOTE"


def event_tier(medium: str | None, locality: str | None = None) -> str:
    """The router tier of a KV event: vLLM's tiering offload reports its disk tier as
    ``STORAGE``/``LOCAL`` and a shared pool as ``STORAGE``/``REMOTE``."""
    if medium is None:
        return MEDIUM_GPU
    if medium == MEDIUM_STORAGE and locality is not None:
        return MEDIUM_REMOTE if locality == "REMOTE" else MEDIUM_DISK
    return medium


# A vLLM block hash on the wire: int (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1, the default)
# or the raw sha256 bytes.
ExternalBlockHash = bytes | int

Role = Literal["prefill", "decode", "both"]
# Which engine serves a worker: it picks the prefill/decode handshake a gateway speaks
# (vLLM's kv_transfer_params, SGLang's bootstrap_host/bootstrap_port/bootstrap_room).
Engine = Literal["vllm", "sglang"]
RequestRole = Literal["prefill", "decode", "aggregated"]


# --------------------------------------------------------------------------------------
# KV events, identical to vLLM's (vllm/distributed/kv_events.py).
# --------------------------------------------------------------------------------------
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the tagged KV cache events (tag field ``type`` = class name)."""


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(EventBatch):
    events: list[KVEvent]


# Lean views of the same bytes for the router's ingest path when it trusts the engine's
# hashes: decoding skips token_ids and the other fields instead of building them.
class StoredHashes(msgspec.Struct, tag="BlockStored", gc=False):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    block_size: int
    # Kept undecoded: the router only checks how many there are (msgpack array header).
    token_ids: msgspec.Raw = msgspec.Raw()
    medium: str | None = None
    locality: str | None = None


class RemovedHashes(msgspec.Struct, tag="BlockRemoved", gc=False):
    block_hashes: list[ExternalBlockHash]
    medium: str | None = None
    locality: str | None = None


class Cleared(msgspec.Struct, tag="AllBlocksCleared", gc=False):
    pass


class HashesBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[StoredHashes | RemovedHashes | Cleared]
    data_parallel_rank: int | None = None


# --------------------------------------------------------------------------------------
# Worker -> router: load metrics (PUB, same [topic, seq, payload] framing as KV events).
# --------------------------------------------------------------------------------------
# A count a worker reports (requests, blocks, tokens): never negative, and bounded, so that
# no report can make a worker's load look negative or overflow what reads it (Dynamo's core
# takes kv_total_blocks as an unsigned 64-bit int). Checked at decode: out of range is
# malformed, counted, dropped.
Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 48)]


class WorkerMetrics(msgspec.Struct, tag="metrics", omit_defaults=True, gc=False):
    worker_id: str
    heartbeat: Annotated[int, msgspec.Meta(ge=0)]
    ts: float
    role: Role = "both"
    running: Count = 0
    waiting: Count = 0
    kv_used_blocks: Count = 0
    kv_total_blocks: Count = 0
    # Blocks held per offload tier ("CPU", "DISK", "REMOTE", ...).
    offload_blocks: dict[str, Count] = {}
    prefill_queue_tokens: Count = 0
    # Prefix-cache counters of the engine (monotonic), for hit-rate metrics.
    prefix_cache_queries: Count = 0
    prefix_cache_hits: Count = 0


# --------------------------------------------------------------------------------------
# Control plane on the router's ROUTER socket.
# --------------------------------------------------------------------------------------
class WorkerRegistration(msgspec.Struct, tag="register", omit_defaults=True):
    worker_id: str
    role: Role = "both"
    http_endpoint: str | None = None  # base URL of the worker's OpenAI server
    kv_events_endpoint: str | None = None  # ZMQ PUB of vLLM KV events
    kv_events_topic: str = ""
    replay_endpoint: str | None = None  # ZMQ ROUTER replay socket of the publisher
    metrics_endpoint: str | None = None  # ZMQ PUB of WorkerMetrics
    nixl_endpoint: str | None = None  # NIXL side channel host:port
    prefetch_endpoint: str | None = None  # ZMQ PULL of the worker's pool tier (PrefetchRequest)
    block_size: int | None = None
    model: str | None = None
    # Unique per process start: a registration repeated by the same process (a keep-alive
    # that heals a router restart) keeps the index; a new instance id means an empty cache.
    instance_id: str = ""
    engine: Engine = "vllm"
    # SGLang PD only: host:port of the prefill worker's bootstrap server
    # (--disaggregation-bootstrap-port), sent as bootstrap_host/bootstrap_port.
    bootstrap_endpoint: str | None = None
    # Data parallel: each DP engine of one server is its own worker (own cache, own KV
    # stream); the router keys it as ``worker_id`` + ``@dp<rank>`` (``dp_worker_id``).
    data_parallel_rank: int | None = None


def dp_worker_id(worker_id: str, data_parallel_rank: int | None) -> str:
    """The router's id for one data-parallel engine of a worker."""
    return worker_id if data_parallel_rank is None else f"{worker_id}@dp{data_parallel_rank}"


class WorkerDeregistration(msgspec.Struct, tag="deregister"):
    worker_id: str


class RouteRequest(msgspec.Struct, tag="route", omit_defaults=True):
    """Ask for a worker. Give ``token_ids`` or the prompt's precomputed ``block_hashes``."""

    request_id: str
    role: RequestRole = "aggregated"
    token_ids: list[int] | None = None
    block_hashes: list[int] | None = None
    num_tokens: int | None = None  # prompt length when only hashes are sent
    exclude_workers: list[str] = []
    # Reserve predicted load on the chosen worker until RequestFinished (default) or not.
    track: bool = True
    explain: bool = False  # return the score of every candidate, not only the winner
    # Route only to workers serving this model (workers that registered one); None: any.
    model: str | None = None
    # The tenant's vLLM ``cache_salt``: the engine hashes it into the prompt's first block,
    # so the router does too (a salted prompt never matches another tenant's blocks).
    cache_salt: str | None = None
    # The prompt as uint32 little-endian bytes instead of ``token_ids``: decoding a bin is a
    # copy, decoding a list of ints runs per int, on the router's event loop.
    token_bytes: bytes | None = None
    # ``block_hashes`` computed by the caller with the router's hashing as it announced it
    # (``FleetState.hashing``); a router that hashes otherwise refuses them (hash_mismatch)
    # instead of matching hashes that can never hit.
    hashed_as: str | None = None


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """``RouteRequest.token_bytes`` of a prompt."""
    a = array("I", token_ids)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


class PrefillFinished(msgspec.Struct, tag="prefill_done"):
    """The request's prompt is in the worker's cache: its prefill load is gone."""

    request_id: str


class RequestFinished(msgspec.Struct, tag="finished", omit_defaults=True):
    request_id: str
    # What the router predicted the worker had cached for the prompt and what the worker
    # reported it reused (vLLM's usage.prompt_tokens_details.cached_tokens), in tokens:
    # the router's index checks itself against the engine with these.
    predicted_cached_tokens: int | None = None
    actual_cached_tokens: int | None = None


class WorkerFailed(msgspec.Struct, tag="worker_failed"):
    """A caller saw the worker refuse or drop a connection: stop routing to it now."""

    worker_id: str
    reason: str = ""


class RouterQuery(msgspec.Struct, tag="query"):
    """Ask for the router's view of the fleet (debugging, tests, gateways)."""

    what: Literal["workers", "index"] = "workers"
    worker_id: str | None = None  # "index": whose indexed blocks to return


ControlMessage = (
    WorkerRegistration
    | WorkerDeregistration
    | RouteRequest
    | PrefillFinished
    | RequestFinished
    | WorkerFailed
    | RouterQuery
)


class WorkerScore(msgspec.Struct, omit_defaults=True, gc=False):
    worker_id: str
    # Prompt blocks found per tier, counted along the worker's longest cached prefix.
    prefix_hit_blocks: dict[str, int]
    offload_score: float  # blocks of recompute saved by offload-tier hits
    new_prefill_blocks: float  # blocks that must be recomputed (offload hits partly)
    running: int
    waiting: int
    kv_usage: float
    predicted_prefill_tokens: int  # routed, prefill not yet reported done
    predicted_active_blocks: int  # routed, not yet reported finished
    cost: float


class RouteResponse(msgspec.Struct, tag="routed", omit_defaults=True):
    request_id: str
    worker_id: str
    http_endpoint: str | None
    nixl_endpoint: str | None
    num_blocks: int
    chosen: WorkerScore
    worker_role: Role = "both"
    block_size: int = 0
    candidates: list[WorkerScore] = []
    decision_us: float = 0.0
    engine: Engine = "vllm"
    bootstrap_endpoint: str | None = None  # the chosen worker's (SGLang PD bootstrap)


class Ack(msgspec.Struct, tag="ack"):
    ok: bool = True
    detail: str = ""


class WorkerState(msgspec.Struct, omit_defaults=True):
    worker_id: str
    role: Role
    up: bool
    http_endpoint: str | None
    indexed_blocks: dict[str, int]
    last_metrics: WorkerMetrics | None = None
    active_requests: int = 0  # routed by this router, not reported finished
    stale: str = ""  # why the index may differ from the worker's cache ("" if exact)
    last_seq: int = -1  # last KV batch applied
    hit_error_tokens: float = 0.0  # mean |predicted - reported| cached tokens, recent
    registration: WorkerRegistration | None = None  # what it registered (its endpoints)


class FleetState(msgspec.Struct, tag="fleet"):
    workers: list[WorkerState]
    # How the router hashes prompts, "<mode>/<block size>" (``RouteRequest.hashed_as``):
    # in "tokens/..." a caller can hash the prompt itself, natively, and send the hashes.
    hashing: str = ""


class WorkerIndex(msgspec.Struct, tag="index"):
    """The audit answer: every block hash the router indexes for one worker, per tier."""

    worker_id: str
    blocks: dict[str, list[int]]
    last_seq: int = -1
    stale: str = ""


class PrefetchRequest(msgspec.Struct, tag="prefetch", omit_defaults=True):
    """Router -> worker cache manager: stage these blocks in CPU memory now.

    ``block_hashes`` are the chained (event) hashes of the prompt's blocks past the
    worker's memory tiers, in order; the worker stages the longest prefix its disk tier or
    the global pool holds.
    """

    request_id: str
    block_hashes: list[int]
    group_idx: int = 0


class ErrorReply(msgspec.Struct, tag="error"):
    code: str  # bad_request | no_worker | version | internal | unavailable | hash_mismatch
    message: str
    request_id: str | None = None


ReplyMessage = RouteResponse | Ack | FleetState | WorkerIndex | ErrorReply

# Shared encoders/decoders: building them once keeps per-message allocation off the hot path.
encoder = msgspec.msgpack.Encoder()
kv_batch_decoder = msgspec.msgpack.Decoder(KVEventBatch)
hashes_batch_decoder = msgspec.msgpack.Decoder(HashesBatch)
metrics_decoder = msgspec.msgpack.Decoder(WorkerMetrics)
control_decoder = msgspec.msgpack.Decoder(ControlMessage)
reply_decoder = msgspec.msgpack.Decoder(ReplyMessage)
prefetch_decoder = msgspec.msgpack.Decoder(PrefetchRequest)


def decode_prefetch(raw: bytes) -> PrefetchRequest:
    return prefetch_decoder.decode(raw)


def encode(msg: msgspec.Struct) -> bytes:
    return encoder.encode(msg)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def seq_from_bytes(raw: bytes) -> int:
    if len(raw) != 8:
        raise msgspec.DecodeError(f"sequence frame must be 8 bytes, got {len(raw)}")
    return int.from_bytes(raw, "big", signed=True)
