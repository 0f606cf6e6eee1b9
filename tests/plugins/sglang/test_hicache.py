"""The KV pool as SGLang HiCache storage, created by SGLang's own factory from the extra
config of ``--hicache-storage-backend dynamic`` (SGLang's ABC and factory import without
CUDA). The v1 methods run against a stand-in for the host KV pool: a real ``HostKVCache``
needs a device KV pool, which needs a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# every test here builds the backend through SGLang's own factory
pytest.importorskip("sglang", reason="sglang not installed")

import torch  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

from dynamo_ext.errors import ConfigError  # noqa: E402
from dynamo_ext.plugins.sglang.hicache import DynamoExtHiCacheStorage  # noqa: E402

PAGE = 4096


def _config(root: Path, tp_rank: int = 0, tp_size: int = 1, **extra: Any) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=True,
        model_name="org/tiny",
        extra_config={
            "backend_name": "dynamo_ext_pool",
            "module_path": "dynamo_ext.plugins.sglang.hicache",
            "class_name": "DynamoExtHiCacheStorage",
            "pool_root": str(root),
            "pool_capacity_gb": 1,
            "pool_sweep_interval_s": 0,
            **extra,
        },
    )


def _create(cfg: HiCacheStorageConfig) -> DynamoExtHiCacheStorage:
    backend = StorageBackendFactory.create_backend("dynamic", cfg, None)
    assert isinstance(backend, DynamoExtHiCacheStorage) and isinstance(backend, HiCacheStorage)
    return backend


def _page(seed: int) -> torch.Tensor:
    return torch.randn(PAGE // 2, generator=torch.Generator().manual_seed(seed)).to(torch.float16)


def test_factory_loads_backend_and_pages_roundtrip(tmp_path: Path) -> None:
    s = _create(_config(tmp_path))
    keys = [f"{i:064x}" for i in range(4)]
    pages = [_page(i) for i in range(4)]
    assert s.batch_exists(keys) == 0
    assert s.batch_set(keys[:3], pages[:3])
    assert s.batch_exists(keys) == 3 and s.exists(keys[0]) and not s.exists(keys[3])
    dst = [torch.empty(PAGE // 2, dtype=torch.float16) for _ in keys]
    got = s.batch_get(keys, dst)
    for i in range(3):
        assert got[i] is dst[i] and torch.equal(dst[i], pages[i])  # read in place
    assert got[3] is None
    assert s.get(keys[0], torch.empty(10, dtype=torch.float16)) is None  # wrong page size
    assert s.pool_stats()["hits"] == 3
    s.close()


def test_workers_share_pages_only_with_the_same_shard(tmp_path: Path) -> None:
    a = _create(_config(tmp_path, tp_rank=0, tp_size=2))
    b = _create(_config(tmp_path, tp_rank=0, tp_size=2))  # rank 0 of another replica
    c = _create(_config(tmp_path, tp_rank=1, tp_size=2))
    assert a.set("k", _page(1))
    assert b.exists("k") and torch.equal(
        b.get("k", torch.empty(PAGE // 2, dtype=torch.float16)), _page(1)
    )
    assert not c.exists("k")
    for s in (a, b, c):
        s.close()


class _HostPool:
    """Stand-in for SGLang's HostKVCache page API (flat pages of a host buffer)."""

    def __init__(self, pages: int) -> None:
        self.page_size = 16
        self.buf = torch.zeros(pages, PAGE, dtype=torch.uint8)

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        return self.buf[index // self.page_size]

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.empty(PAGE, dtype=torch.uint8)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        self.buf[index // self.page_size].copy_(data_page)


def test_v1_interface_with_host_indices(tmp_path: Path) -> None:
    s = _create(_config(tmp_path, interface_v1=1))
    host = _HostPool(4)
    s.register_mem_pool_host(host)  # type: ignore[arg-type]
    host.buf[0].random_(0, 255)
    host.buf[1].random_(0, 255)
    idx = torch.arange(0, 2 * host.page_size)
    assert s.batch_set_v1(["p0", "p1"], idx) == [True, True]
    want = host.buf[:2].clone()
    dst = torch.arange(2 * host.page_size, 4 * host.page_size)
    assert s.batch_get_v1(["p0", "p1", "nope"], torch.cat([dst, dst[:16]])) == [True, True, False]
    assert torch.equal(host.buf[2:4], want)
    s.close()


def test_missing_pool_root_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DYNAMO_EXT_POOL_ROOT", raising=False)
    cfg = _config(tmp_path)
    assert cfg.extra_config is not None
    del cfg.extra_config["pool_root"]
    with pytest.raises(ConfigError, match="pool_root"):
        StorageBackendFactory.create_backend("dynamic", cfg, None)
    monkeypatch.setenv("DYNAMO_EXT_POOL_ROOT", str(tmp_path / "env"))
    _create(cfg).close()
