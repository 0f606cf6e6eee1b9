"""The LMCache path, as far as it runs on this CPU-only machine.

LMCache 0.5.6 imports here (installed with ``--no-deps``: its CUDA packages are not needed
to import), its vLLM connector loads, and our LMCache config parses. It cannot move KV on
the CPU platform: ``CreateGPUConnector`` has connectors for CUDA, XPU, MUSA and HPU only and
raises ``No supported cpu connector found.``; vLLM's LMCacheConnectorV1 then runs in
"degraded mode (recompute)". These tests pin that reason down (the first one fails the day
LMCache gains a CPU connector, which is the day to switch the CPU tests to it) and check the
LMCache side of our config. The tiers themselves run here through vLLM's own offloading
API: see ``test_offload.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

lmcache = pytest.importorskip("lmcache", reason="lmcache not installed (scripts/install.sh)")

import torch  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.gpu_connector import CreateGPUConnector, EngineType  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402

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
