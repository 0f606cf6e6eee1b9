"""Real vLLM engines for the plugin tests: built and started once per session, always stopped.

Every test in this folder is marked ``engine`` (select with ``-m engine``); CI runs them.
Servers start with the CPU fast-start flags of ``dynamo_ext.engine_proc`` (one engine-core
process, eager mode, 1 GiB KV cache, 2048-token context).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dynamo_ext.engine_proc import CPU_FAST_ARGS, CPU_FAST_ENV, VllmServer, free_port
from dynamo_ext.tiny_model import build_tiny_model, default_model_dir

BLOCK_SIZE = 128  # vLLM's CPU block size


def pytest_collection_modifyitems(config, items) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.engine)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return build_tiny_model(default_model_dir())


def kv_events_args(pub_port: int, replay_port: int) -> list[str]:
    cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "topic": "kv",
        "endpoint": f"tcp://*:{pub_port}",
        "replay_endpoint": f"tcp://*:{replay_port}",
    }
    return ["--kv-events-config", json.dumps(cfg)]


@pytest.fixture(scope="session")
def start_vllm(tiny_model: Path, tmp_path_factory) -> Iterator[Callable[..., VllmServer]]:
    """``start_vllm(args, env, wait=True)`` -> a running server; all are stopped at the end."""
    servers: list[VllmServer] = []
    logs = tmp_path_factory.mktemp("vllm-logs")

    def start(
        extra_args: list[str], env: dict[str, str] | None = None, wait: bool = True
    ) -> VllmServer:
        port = free_port()
        s = VllmServer(
            tiny_model,
            port,
            extra_args=[*CPU_FAST_ARGS, *extra_args],
            env={**os.environ, **CPU_FAST_ENV, **(env or {})},
            log_path=logs / f"vllm-{port}.log",
        )
        servers.append(s)
        s.start()
        if wait:
            s.wait_ready()
        return s

    yield start
    for s in servers:
        s.stop()
