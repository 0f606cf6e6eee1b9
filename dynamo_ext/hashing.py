"""Block hashing: the chained hash that names a block of prompt tokens.

The router must name a prompt's blocks exactly as the engine names the blocks it caches, or
no lookup ever hits. Two modes:

* ``engine``: reproduce vLLM's own prefix-cache hash (``hash_block_tokens`` of
  ``vllm/v1/core/kv_cache_utils.py``): ``H(parent_bytes, tuple(block_tokens), extra_keys)``
  with ``H`` one of vLLM's ``sha256`` (pickle), ``sha256_cbor``, ``xxhash``, ``xxhash_cbor``, the
  first parent ``NONE_HASH = H(seed)`` where seed is ``PYTHONHASHSEED`` or vLLM's fixed
  ``"vllm-none-hash"``, and the published value the low 64 bits as an int (vLLM's default
  ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``). The router then indexes the engine's hashes as
  they arrive, with no per-block translation.
* ``tokens``: when the engine's hash cannot be reproduced (a random per-process seed, xxhash
  without PYTHONHASHSEED), the router hashes the ``token_ids`` carried in ``BlockStored``
  itself with a fast 64-bit chained hash, and maps the engine's hashes to its own per worker
  so that ``BlockRemoved`` still finds them.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Literal

import cbor2

from dynamo_ext import native
from dynamo_ext.errors import ConfigError

HashMode = Literal["engine", "tokens"]
HashAlgo = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]

VLLM_DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
_MASK64 = (1 << 64) - 1


def _sha256(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _xxhash_fn(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    try:
        import xxhash  # optional, as in vLLM
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("hash_algo", "xxhash algorithms need `pip install xxhash`") from exc

    def fn(obj: Any) -> bytes:
        return xxhash.xxh3_128_digest(serialize(obj))

    return fn


def engine_hash_fn(algo: str) -> Callable[[Any], bytes]:
    if algo == "sha256":
        return _sha256
    if algo == "sha256_cbor":
        return _sha256_cbor
    if algo == "xxhash":
        return _xxhash_fn(lambda o: pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL))
    if algo == "xxhash_cbor":
        return _xxhash_fn(lambda o: cbor2.dumps(o, canonical=True))
    raise ConfigError("hash_algo", f"unknown hash algorithm {algo!r}")


def to_external(h: bytes) -> int:
    """vLLM's ``maybe_convert_block_hash`` with int hashes on: the low 64 bits, big-endian."""
    return int.from_bytes(h, "big") & _MASK64


class BlockHasher:
    """Names full blocks of a token sequence the way the index keys them.

    ``hash_tokens`` gives one int per full block; a trailing partial block is not cached by
    engines and is never hashed.
    """

    def __init__(
        self,
        block_size: int,
        mode: HashMode = "engine",
        algo: str = "sha256",
        seed: str | None = None,
    ) -> None:
        if block_size <= 0:
            raise ConfigError("block_size", f"must be > 0, got {block_size}")
        if mode not in ("engine", "tokens"):
            raise ConfigError("hash_mode", f"must be 'engine' or 'tokens', got {mode!r}")
        self.block_size = block_size
        self.mode: HashMode = mode
        self.algo = algo
        if mode == "engine":
            self._fn = engine_hash_fn(algo)
            if seed is None:
                seed = os.environ.get("PYTHONHASHSEED")
            if seed is None:
                if algo.startswith("xxhash"):
                    raise ConfigError(
                        "hash_seed",
                        "vLLM seeds xxhash randomly per process: set PYTHONHASHSEED on the "
                        "engines and hash_seed here, or use hash_mode 'tokens'",
                    )
                seed = VLLM_DEFAULT_NONE_HASH_SEED
            self.none_hash: bytes = self._fn(seed)

    def hash_tokens(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[int]:
        if self.mode == "tokens":
            return token_block_hashes(token_ids, self.block_size, salt_parent(cache_salt))
        return self.engine_chain(None, token_ids, salt_extra_keys(cache_salt))

    def engine_chain(
        self,
        parent: bytes | None,
        token_ids: Sequence[int],
        extra_keys: Sequence[tuple[Any, ...] | None] | None = None,
    ) -> list[int]:
        """Chained engine hashes of the full blocks of ``token_ids`` after ``parent``."""
        return self.chain(parent, token_ids, extra_keys)[0]

    def chain(
        self,
        parent: bytes | None,
        token_ids: Sequence[int],
        extra_keys: Sequence[tuple[Any, ...] | None] | None = None,
    ) -> tuple[list[int], bytes | None]:
        """The one engine-mode chain: the published 64-bit hashes of the full blocks of
        ``token_ids`` after ``parent`` (a full digest, None: the first block), and the last
        full digest (``parent`` when no block is full), where a continuation starts: a
        request's output blocks, a trace's next block."""
        fn = self._fn
        bs = self.block_size
        prev = parent or self.none_hash
        out: list[int] = []
        for i in range(len(token_ids) // bs):
            extra = extra_keys[i] if extra_keys and i < len(extra_keys) else None
            prev = fn((prev, tuple(token_ids[i * bs : (i + 1) * bs]), extra))
            out.append(int.from_bytes(prev, "big") & _MASK64)
        return out, (prev if out else parent)


def salt_extra_keys(cache_salt: str | None) -> list[tuple[Any, ...] | None] | None:
    """vLLM's extra keys for a request's ``cache_salt`` (``generate_block_hash_extra_keys``
    of vLLM 0.32): ``("cache_salt", salt)`` in the first block only, the rest None. One
    entry covers any prompt: ``chain`` reads entries past the list's end as None."""
    return [(("cache_salt", cache_salt),)] if cache_salt else None


def salt_parent(cache_salt: str | None) -> int:
    """``tokens`` mode: a salted prompt's chain starts from a parent derived from the salt."""
    if not cache_salt:
        return 0
    return int.from_bytes(hashlib.sha256(cache_salt.encode()).digest()[:8], "big")


def token_block_hashes(token_ids: Sequence[int], block_size: int, parent: int = 0) -> list[int]:
    """The router's own chained 64-bit block hash (``tokens`` mode).

    Python's tuple hash over ints is deterministic across processes and platforms of the
    same word size (PYTHONHASHSEED only salts str/bytes): block i is
    ``hash((block i-1's hash, tuple(block i's tokens))) & (2**64 - 1)``, the first parent
    ``parent``. The C extension (``dynamo_ext._native``) computes that same tuple hash
    without building tuples, straight from a packed uint32 buffer (``RouteRequest.
    token_bytes``) or a list; ``token_block_hashes_py`` is the reference it is tested equal
    to and the fallback where it is not built.
    """
    impl = native.IMPL
    if impl is not None:
        return impl.token_block_hashes(token_ids, block_size, parent)
    return token_block_hashes_py(token_ids, block_size, parent)


def token_block_hashes_py(token_ids: Sequence[int], block_size: int, parent: int = 0) -> list[int]:
    """Pure-Python ``token_block_hashes`` (the reference)."""
    out: list[int] = []
    prev = parent
    toks = tuple(token_ids)
    for i in range(len(toks) // block_size):
        prev = hash((prev, toks[i * block_size : (i + 1) * block_size])) & _MASK64
        out.append(prev)
    return out
