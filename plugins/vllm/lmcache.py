"""The KV pool as an LMCache remote storage backend, loaded by LMCache's config alone.

LMCache (0.5.x) builds one ``RemoteBackend`` per entry of ``remote_storage_plugins`` and
asks its ``ConnectorManager`` for a connector for ``plugin://<name>``; for a plugin that is
not built in, ``extra_config["remote_storage_plugin.<name>.module_path"/".class_name"]``
name the class to import. ``DynamoPoolConnectorAdapter`` answers for every plugin whose type
(the part before a dot) is ``dynamo_pool`` and creates a ``DynamoPoolConnector``: LMCache's
``RemoteConnector`` over ``KvPool``. Chunks are LMCache's own remote layout (the
``RemoteMetadata`` header then the KV bytes, as ``FSConnector`` writes them) inside the
pool's checksummed file, keyed by ``CacheEngineKey.to_string()``; a read scatters the pool
payload straight into the metadata buffer and the ``MemoryObj`` LMCache allocated.

LMCache config (YAML), a CPU tier in front of the pool (LMCache's remote backends need it)::

    chunk_size: 256
    local_cpu: true
    max_local_cpu_size: 40.0
    remote_serde: naive
    remote_storage_plugins: ["dynamo_pool"]
    extra_config:
      remote_storage_plugin.dynamo_pool.module_path: dynamo_ext.plugins.vllm.lmcache
      remote_storage_plugin.dynamo_pool.class_name: DynamoPoolConnectorAdapter
      remote_storage_plugin.dynamo_pool.root: /mnt/3fs/kvpool        # or DYNAMO_EXT_POOL_ROOT
      remote_storage_plugin.dynamo_pool.capacity_gb: 2048             # optional: no limit
      remote_storage_plugin.dynamo_pool.sweep_interval_s: 10          # optional
      remote_storage_plugin.dynamo_pool.fsync: false                  # optional

``class_name: DynamoPoolConnector`` works too (LMCache then wraps it itself), but LMCache
does not pass the plugin name to such a class, so only the ``dynamo_pool`` keys are read.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from lmcache.logging import init_logger
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.protocol import RemoteMetadata
from lmcache.v1.storage_backend.connector import (
    ConnectorAdapter,
    ConnectorContext,
    extract_plugin_type,
)
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

from dynamo_ext.errors import ConfigError
from dynamo_ext.pool.store import KvPool

logger = init_logger(__name__)

PLUGIN_TYPE = "dynamo_pool"
ENV_ROOT = "DYNAMO_EXT_POOL_ROOT"


def _setting(config: LMCacheEngineConfig | None, plugin: str, name: str, default: Any) -> Any:
    extra = (config.extra_config if config is not None else None) or {}
    return extra.get(f"remote_storage_plugin.{plugin}.{name}", default)


def pool_from_config(config: LMCacheEngineConfig | None, plugin: str = PLUGIN_TYPE) -> KvPool:
    """The ``KvPool`` an LMCache config describes (see the module doc for the keys)."""
    field = f"extra_config.remote_storage_plugin.{plugin}"
    root = _setting(config, plugin, "root", None) or os.environ.get(ENV_ROOT)
    if not root:
        raise ConfigError(f"{field}.root", f"set it (or {ENV_ROOT}) to the pool directory")
    cap = _setting(config, plugin, "capacity_gb", None)
    try:
        capacity = None if cap in (None, "", 0) else int(float(cap) * (1 << 30))
        interval = float(_setting(config, plugin, "sweep_interval_s", 10.0))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field}.capacity_gb/sweep_interval_s", str(exc)) from exc
    fsync = str(_setting(config, plugin, "fsync", False)).lower() in ("1", "true", "yes")
    return KvPool(root, capacity, sweep_interval_s=interval, fsync=fsync)


class DynamoPoolConnector(RemoteConnector):
    """LMCache ``RemoteConnector`` over the shared KV pool."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        local_cpu_backend: LocalCPUBackend,
        config: LMCacheEngineConfig | None,
        plugin_name: str | None = None,
        pool: KvPool | None = None,
    ) -> None:
        super().__init__(local_cpu_backend.config, local_cpu_backend.metadata)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self.pool = (
            pool if pool is not None else pool_from_config(config, plugin_name or PLUGIN_TYPE)
        )
        logger.info(
            "dynamo-ext KV pool connector at %s (chunk %d B, chunk meta %s)",
            self.pool.root,
            self.full_chunk_size_bytes,
            self.save_chunk_meta,
        )

    @staticmethod
    def _name(key: CacheEngineKey) -> str:
        return key.to_string()

    async def exists(self, key: CacheEngineKey) -> bool:
        return self.pool.contains(self._name(key))

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return self.pool.contains(self._name(key))

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[CacheEngineKey]) -> int:
        return self.pool.batch_exists(self._name(k) for k in keys)

    def _read(self, key: CacheEngineKey) -> MemoryObj | None:
        obj = self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes, self.meta_fmt)
        if obj is None:
            logger.debug("dynamo pool: no CPU buffer for %s", key)
            return None
        try:
            data = obj.byte_array
            if self.save_chunk_meta:
                md_buf = bytearray(self.remote_metadata_bytes)
                n = self.pool.get_into(self._name(key), [md_buf, data])
                if n is None or n <= len(md_buf):
                    obj.ref_count_down()
                    return None
                n -= len(md_buf)
                md = RemoteMetadata.deserialize(md_buf)
                if md.length != n:
                    logger.warning("dynamo pool: %s says %d bytes, holds %d", key, md.length, n)
                    obj.ref_count_down()
                    return None
            else:
                n = self.pool.get_into(self._name(key), data)
                if not n:
                    obj.ref_count_down()
                    return None
            return self.reshape_partial_chunk(obj, n)
        except Exception:
            obj.ref_count_down()
            raise

    async def get(self, key: CacheEngineKey) -> MemoryObj | None:
        return await self.loop.run_in_executor(None, self._read, key)

    def _write(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        data = memory_obj.byte_array
        parts: list[Any] = [data]
        if self.save_chunk_meta:
            md = RemoteMetadata(
                len(data),
                memory_obj.get_shapes(),
                memory_obj.get_dtypes(),
                memory_obj.get_memory_format(),
            )
            parts.insert(0, md.serialize())
        if not self.pool.put(self._name(key), parts):
            raise OSError(f"dynamo pool: put {key} failed")

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        await self.loop.run_in_executor(None, self._write, key, memory_obj)

    def remove_sync(self, key: CacheEngineKey) -> bool:
        return self.pool.delete(self._name(key))

    async def list(self) -> list[str]:
        # Names on disk are hashes of the keys: the pool cannot list LMCache keys.
        return []

    async def close(self) -> None:
        self.pool.close()


class DynamoPoolConnectorAdapter(ConnectorAdapter):
    """Answers ``plugin://dynamo_pool[.instance]``; the instance's settings are read from
    ``remote_storage_plugin.<plugin name>.*``."""

    def __init__(self) -> None:
        super().__init__(f"plugin://{PLUGIN_TYPE}")

    def can_parse(self, url: str) -> bool:
        return url.startswith("plugin://") and (
            extract_plugin_type(url[len("plugin://") :]) == PLUGIN_TYPE
        )

    def create_connector(self, context: ConnectorContext) -> RemoteConnector:
        return DynamoPoolConnector(
            context.loop,
            context.local_cpu_backend,
            context.config,
            plugin_name=context.plugin_name or PLUGIN_TYPE,
        )
