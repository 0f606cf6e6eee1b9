"""Engine tests of the vLLM plugin (fixtures `tiny_model`, `start_vllm` live in tests/conftest.py).

Every test that starts a vLLM server carries the ``engine`` marker (select with ``-m engine``,
skip with ``-m "not engine"``); ``tests/conftest.py`` refuses to collect one that does not.
CI runs them. Servers start with the CPU fast-start flags of
``dynamo_ext.plugins.vllm.launcher`` (one engine-core process, eager mode, 1 GiB KV cache,
2048-token context).
"""

from __future__ import annotations

import json

BLOCK_SIZE = 128  # vLLM's CPU block size


def kv_events_args(pub_port: int, replay_port: int) -> list[str]:
    cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "topic": "kv",
        "endpoint": f"tcp://*:{pub_port}",
        "replay_endpoint": f"tcp://*:{replay_port}",
    }
    return ["--kv-events-config", json.dumps(cfg)]
