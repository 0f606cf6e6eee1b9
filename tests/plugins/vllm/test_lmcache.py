"""The LMCache path, as far as it runs on this CPU-only machine.

LMCache 0.5.6 imports here (installed with ``--no-deps``: its CUDA packages are not needed
to import), its vLLM connector loads, and our LMCache config parses. It cannot move KV on
the CPU platform: ``CreateGPUConnector`` has connectors for CUDA, XPU, MUSA and HPU only and
raises ``No supported cpu connector found.``; vLLM's LMCacheConnectorV1 then runs in
"degraded mode (recompute)". These tests pin that reason down (the first one fails the day
LMCache gains a CPU connector, which is the day to switch the CPU tests to it) and check the
LMCache side of our config. The tiers themselves run here through vLLM's own offloading
API: see ``test_offload.py``.

The pool behind LMCache (``plugins/vllm/lmcache.py``), through LMCache's own loader and
classes: LMCache's ``RemoteBackend`` is built from a YAML config that names our plugin only in
``remote_storage_plugins`` / ``extra_config`` (the lines of the adapter's docstring), over a
real ``LocalCPUBackend`` whose allocator hands out real ``TensorMemoryObj``s; chunks go
through LMCache's naive serde into the pool and come back byte for byte.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# every test here runs LMCache's own classes
lmcache = pytest.importorskip("lmcache", reason="lmcache not installed (scripts/install.sh)")

import torch  # noqa: E402
from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.gpu_connector import CreateGPUConnector, EngineType  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402
from lmcache.v1.storage_backend.remote_backend import RemoteBackend  # noqa: E402

from dynamo_ext.plugins.vllm.lmcache import DynamoPoolConnector  # noqa: E402
from dynamo_ext.pool import KvPool  # noqa: E402

EXAMPLE = Path(__file__).parents[3] / "examples" / "lmcache" / "lmcache.yaml"


def test_lmcache_has_no_cpu_kv_connector() -> None:
    cfg = LMCacheEngineConfig.from_defaults(chunk_size=128, local_cpu=True, max_local_cpu_size=0.1)
    md = LMCacheMetadata(
        model_name="tiny",
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=torch.float32,
        kv_shape=(2, 2, 128, 1, 64),
    )
    with pytest.raises(RuntimeError, match="No supported cpu connector"):
        CreateGPUConnector(cfg, md, EngineType.VLLM)


def test_vllm_lmcache_connector_imports() -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import (
        LMCacheConnectorV1,
    )

    assert LMCacheConnectorV1.__name__ == "LMCacheConnectorV1"


def test_example_lmcache_config_parses(tmp_path: Path) -> None:
    cfg = LMCacheEngineConfig.from_file(str(EXAMPLE))
    assert cfg.local_cpu is True
    assert cfg.max_local_cpu_size > 0
    assert cfg.local_disk and cfg.max_local_disk_size > 0
    assert cfg.chunk_size == 256
    assert cfg.remote_storage_plugins == ["dynamo_pool"]
    extra = cfg.extra_config
    module = extra["remote_storage_plugin.dynamo_pool.module_path"]
    assert module == "dynamo_ext.plugins.vllm.lmcache"
    # the class it names is importable: LMCache would load it by this config alone
    from dynamo_ext.plugins.vllm.lmcache import DynamoPoolConnectorAdapter

    assert extra["remote_storage_plugin.dynamo_pool.class_name"] == (
        DynamoPoolConnectorAdapter.__name__
    )


CHUNK = 16
KV_SHAPE = (2, 2, CHUNK, 2, 8)  # layers, k/v, tokens, heads, head size


def _config(tmp_path: Path, **extra: Any) -> LMCacheEngineConfig:
    root = tmp_path / "pool"
    lines = [
        f"chunk_size: {CHUNK}",
        "local_cpu: true",
        "max_local_cpu_size: 0.05",
        "remote_serde: naive",
        'remote_storage_plugins: ["dynamo_pool"]',
        "extra_config:",
        "  remote_storage_plugin.dynamo_pool.module_path: dynamo_ext.plugins.vllm.lmcache",
        "  remote_storage_plugin.dynamo_pool.class_name: DynamoPoolConnectorAdapter",
        f"  remote_storage_plugin.dynamo_pool.root: {root}",
        "  remote_storage_plugin.dynamo_pool.capacity_gb: 1",
        "  remote_storage_plugin.dynamo_pool.sweep_interval_s: 0",
    ] + [f"  {k}: {v}" for k, v in extra.items()]
    path = tmp_path / "lmcache.yaml"
    path.write_text("\n".join(lines) + "\n")
    return LMCacheEngineConfig.from_file(str(path))


def _metadata() -> LMCacheMetadata:
    return LMCacheMetadata(
        model_name="tiny",
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=torch.float16,
        kv_shape=KV_SHAPE,
        chunk_size=CHUNK,
    )


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    t = threading.Thread(target=lp.run_forever, daemon=True)
    t.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    t.join(timeout=5)
    lp.close()


def _backend(tmp_path: Path, loop: asyncio.AbstractEventLoop, **extra: Any) -> tuple:
    cfg = _config(tmp_path, **extra)
    md = _metadata()
    cpu = LocalCPUBackend(cfg, md)
    return RemoteBackend(cfg, md, loop, cpu, "cpu", plugin_name="dynamo_pool"), cpu, md


def _key(i: int) -> CacheEngineKey:
    return CacheEngineKey("tiny", 1, 0, 0x1234_5678_0000 + i, torch.float16)


def _filled(cpu: LocalCPUBackend, md: LMCacheMetadata, seed: int) -> Any:
    obj = cpu.allocate(md.get_shapes(), md.get_dtypes(), None)
    g = torch.Generator().manual_seed(seed)
    obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=g).to(obj.tensor.dtype))
    return obj


@pytest.mark.parametrize("save_chunk_meta", [True, False])
def test_remote_backend_roundtrip_through_pool(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, save_chunk_meta: bool
) -> None:
    backend, cpu, md = _backend(tmp_path, loop, save_chunk_meta=save_chunk_meta)
    conn = backend.connection
    inner = getattr(conn, "connector", None) or getattr(conn, "_connector", None) or conn
    assert isinstance(inner, DynamoPoolConnector), type(inner)
    assert inner.save_chunk_meta is save_chunk_meta

    objs = [_filled(cpu, md, i) for i in range(3)]
    expect = [o.tensor.clone() for o in objs]
    keys = [_key(i) for i in range(3)]
    assert not backend.contains(keys[0])
    for fut in [backend.submit_put_task(k, o) for k, o in zip(keys, objs, strict=True)]:
        if fut is not None:
            fut.result(timeout=10)
    assert all(backend.contains(k) for k in keys)
    assert backend.batched_contains([keys[0], keys[1], _key(99), keys[2]]) == 2

    for k, want in zip(keys, expect, strict=True):
        got = backend.get_blocking(k)
        assert got is not None
        assert torch.equal(got.tensor, want)
        got.ref_count_down()
    assert backend.get_blocking(_key(99)) is None

    # a chunk damaged on disk is a miss, never wrong KV
    path = Path(inner.pool.path_of(keys[1].to_string()))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert backend.get_blocking(keys[1]) is None
    assert inner.pool.stats()["corrupt"] == 1

    assert backend.remove(keys[0]) and not backend.contains(keys[0])
    backend.close()


def test_chunk_written_by_one_worker_is_read_by_another(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    a, cpu_a, md = _backend(tmp_path, loop)
    obj = _filled(cpu_a, md, 7)
    want = obj.tensor.clone()
    fut = a.submit_put_task(_key(1), obj)
    if fut is not None:
        fut.result(timeout=10)
    b, _, _ = _backend(tmp_path, loop)  # a second LMCache instance on the same pool root
    got = b.get_blocking(_key(1))
    assert got is not None and torch.equal(got.tensor, want)
    # and the bytes are in the pool under LMCache's key string
    assert KvPool(tmp_path / "pool", sweep_interval_s=0).contains(_key(1).to_string())
    a.close()
    b.close()


def test_missing_root_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dynamo_ext.errors import ConfigError
    from dynamo_ext.plugins.vllm.lmcache import pool_from_config

    monkeypatch.delenv("DYNAMO_EXT_POOL_ROOT", raising=False)
    cfg = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, extra_config={})
    with pytest.raises(ConfigError, match="remote_storage_plugin.dynamo_pool.root"):
        pool_from_config(cfg)
    monkeypatch.setenv("DYNAMO_EXT_POOL_ROOT", str(tmp_path / "env"))
    pool = pool_from_config(cfg)
    assert pool.root == str(tmp_path / "env")
    pool.close()
