"""The KV pool as SGLang HiCache's L3 storage: ``DynamoExtHiCacheStorage``, loaded by
SGLang's own ``dynamic`` storage backend with no SGLang change.

SGLang's ``StorageBackendFactory`` imports ``module_path``/``class_name`` from the extra
config when ``--hicache-storage-backend dynamic`` and calls ``cls(storage_config, kwargs)``.
HiCache pages are keyed by SGLang's chained page hash; we prefix it with a namespace of the
model and the shard the page belongs to (TP rank/size unless MLA, PP rank), as SGLang's own
file backend does, so workers with the same layout share pages and others never mix them::

    python -m sglang.launch_server --model-path M --enable-hierarchical-cache \\
      --hicache-storage-backend dynamic \\
      --hicache-storage-backend-extra-config '{"backend_name": "dynamo_ext_pool",
        "module_path": "dynamo_ext.plugins.sglang.hicache",
        "class_name": "DynamoExtHiCacheStorage",
        "pool_root": "/mnt/3fs/kvpool", "pool_capacity_gb": 2048}'

Extra config keys: ``pool_root`` (or env ``DYNAMO_EXT_POOL_ROOT``), ``pool_capacity_gb``
(default: no limit), ``pool_sweep_interval_s`` (10), ``pool_fsync`` (false), and SGLang's
``interface_v1`` (1: the controller calls ``batch_get_v1``/``batch_set_v1`` with host
indices, which read and write the host pool's pages here). Page reads land directly in the
tensor SGLang hands us (``KvPool.get_into``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from dynamo_ext.errors import ConfigError
from dynamo_ext.pool import BufferTooSmallError, KvPool

logger = logging.getLogger(__name__)

ENV_ROOT = "DYNAMO_EXT_POOL_ROOT"


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy (it must be a contiguous CPU tensor)."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("HiCache pages must be contiguous CPU tensors")
    arr: Any = t.view(torch.uint8).numpy()
    return memoryview(arr).cast("B")


def pool_from_extra_config(extra: dict[str, Any] | None) -> KvPool:
    extra = extra or {}
    root = extra.get("pool_root") or os.environ.get(ENV_ROOT)
    if not root:
        raise ConfigError("extra_config.pool_root", f"set it (or {ENV_ROOT}) to the pool dir")
    try:
        cap = extra.get("pool_capacity_gb")
        capacity = None if cap in (None, "", 0) else int(float(cap) * (1 << 30))
        interval = float(extra.get("pool_sweep_interval_s", 10.0))
    except (TypeError, ValueError) as exc:
        raise ConfigError("extra_config.pool_capacity_gb/pool_sweep_interval_s", str(exc)) from exc
    fsync = str(extra.get("pool_fsync", False)).lower() in ("1", "true", "yes")
    return KvPool(root, capacity, sweep_interval_s=interval, fsync=fsync)


class DynamoExtHiCacheStorage(HiCacheStorage):
    """HiCache L3 storage over the shared KV pool (a 3FS mount or any shared directory)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None) -> None:
        self.config = storage_config
        self.pool = pool_from_extra_config(storage_config.extra_config)
        model = (storage_config.model_name or "model").replace("/", "-")
        shard = (
            "mla"
            if storage_config.is_mla_model
            else (f"tp{storage_config.tp_rank}of{storage_config.tp_size}")
        )
        if storage_config.pp_size > 1:
            shard += f"-pp{storage_config.pp_rank}of{storage_config.pp_size}"
        if storage_config.attn_cp_size > 1:
            shard += f"-cp{storage_config.attn_cp_rank}of{storage_config.attn_cp_size}"
        self.namespace = f"sglang/{model}/{shard}"
        # MLA pages are identical on every TP rank: one writer is enough.
        self.writer = storage_config.is_storage_writer
        logger.info("HiCache storage on the dynamo-ext KV pool %s (%s)", self.pool.root, shard)

    def _name(self, key: str) -> str:
        return f"{self.namespace}/{key}"

    # ------------------------------------------------------------------ legacy interface
    def get(
        self,
        key: str,
        target_location: torch.Tensor | None = None,
        target_sizes: Any = None,
    ) -> torch.Tensor | None:
        if target_location is None:
            data = self.pool.get(self._name(key))
            return None if data is None else torch.frombuffer(bytearray(data), dtype=torch.uint8)
        want = target_location.numel() * target_location.element_size()
        try:
            n = self.pool.get_into(self._name(key), _bytes_view(target_location))
        except BufferTooSmallError:
            n = None
        if n != want:  # missing, corrupt, or a page of another size: a miss
            return None
        return target_location

    def batch_get(
        self,
        keys: list[str],
        target_locations: Any = None,
        target_sizes: Any = None,
    ) -> list[torch.Tensor | None]:
        locs = target_locations or [None] * len(keys)
        return [self.get(k, t) for k, t in zip(keys, locs, strict=True)]

    def set(
        self,
        key: str,
        value: Any = None,
        target_location: Any = None,
        target_sizes: Any = None,
    ) -> bool:
        name = self._name(key)
        if not self.writer or self.pool.contains(name):
            return True  # content-addressed: the page already there is this page
        return self.pool.put(name, _bytes_view(value.contiguous()))

    def batch_set(
        self,
        keys: list[str],
        values: Any = None,
        target_locations: Any = None,
        target_sizes: Any = None,
    ) -> bool:
        return all(self.set(k, v) for k, v in zip(keys, values, strict=True))

    def exists(self, key: str) -> bool:
        return self.pool.contains(self._name(key))

    def batch_exists(
        self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> int:
        return self.pool.batch_exists(self._name(k) for k in keys)

    # ------------------------------------------------------------------ v1 (host indices)
    def _page_size(self) -> int:
        return int(getattr(self.mem_pool_host, "page_size", 1) or 1)

    def batch_get_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        host, ps = self.mem_pool_host, self._page_size()
        out: list[bool] = []
        for i, key in enumerate(keys):
            page = self.get(key, host.get_dummy_flat_data_page())
            if page is not None:
                host.set_from_flat_data_page(int(host_indices[i * ps]), page)
            out.append(page is not None)
        return out

    def batch_set_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        host, ps = self.mem_pool_host, self._page_size()
        return [
            self.set(key, host.get_data_page(int(host_indices[i * ps]), flat=True))
            for i, key in enumerate(keys)
        ]

    def clear(self) -> None:
        # The pool is shared with other workers: a flush here drops nothing of theirs.
        logger.info("HiCache clear: the shared KV pool keeps its chunks")

    def pool_stats(self) -> dict[str, int]:
        return self.pool.stats()

    def close(self) -> None:
        self.pool.close()
