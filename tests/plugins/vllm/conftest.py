"""Engine tests of the vLLM plugin (fixtures `tiny_model`, `start_vllm` live in tests/conftest.py).

Every test in this folder is marked ``engine`` (select with ``-m engine``); CI runs them.
Servers start with the CPU fast-start flags of ``dynamo_ext.plugins.vllm.launcher`` (one engine-core
process, eager mode, 1 GiB KV cache, 2048-token context).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BLOCK_SIZE = 128  # vLLM's CPU block size


def pytest_collection_modifyitems(config, items) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.engine)


def kv_events_args(pub_port: int, replay_port: int) -> list[str]:
    cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "topic": "kv",
        "endpoint": f"tcp://*:{pub_port}",
        "replay_endpoint": f"tcp://*:{replay_port}",
    }
    return ["--kv-events-config", json.dumps(cfg)]
