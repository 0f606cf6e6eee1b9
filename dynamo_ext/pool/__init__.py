"""The global KV pool: KV chunks in a shared directory (a 3FS mount), keyed by chained
prefix hash, shared by every worker; adapters for LMCache and SGLang HiCache sit beside it."""

from dynamo_ext.pool.store import (
    BufferTooSmallError,
    InvalidKeyError,
    KvPool,
    PoolError,
    on_hf3fs_mount,
)

__all__ = ["BufferTooSmallError", "InvalidKeyError", "KvPool", "PoolError", "on_hf3fs_mount"]
