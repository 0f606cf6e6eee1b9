"""Shared fixtures: real router processes and real vLLM engines, started once and always
stopped. vLLM servers use the CPU fast-start flags of ``dynamo_ext.plugins.vllm.launcher`` (one
engine-core process, eager mode, 1 GiB KV cache, 2048-token context)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dynamo_ext.plugins.vllm.launcher import CPU_FAST_ARGS, CPU_FAST_ENV, VllmServer
from dynamo_ext.testing import RouterProc, free_port
from dynamo_ext.testing.tiny_model import build_tiny_model, default_model_dir

ENGINE_FIXTURES = frozenset({"start_vllm"})  # tiny_model only builds files


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that starts a real engine must say so with ``@pytest.mark.engine``, so that
    ``-m "not engine"`` never starts one by surprise."""
    unmarked = [
        item.nodeid
        for item in items
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("engine") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests that use an engine fixture without the engine marker: " + ", ".join(unmarked)
        )


@pytest.fixture
def router_factory(tmp_path: Path) -> Iterator[Callable[..., RouterProc]]:
    procs: list[RouterProc] = []

    def make(**config) -> RouterProc:
        p = RouterProc(tmp_path, config)
        procs.append(p)
        return p.start()

    yield make
    for p in procs:
        p.stop()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return build_tiny_model(default_model_dir())


@pytest.fixture(scope="module")
def start_vllm(tiny_model: Path, tmp_path_factory) -> Iterator[Callable[..., VllmServer]]:
    """``start_vllm(args, env, wait=True)`` -> a running server; stopped when the module ends,
    so idle engines of one module don't slow the next one down on a 2-core machine."""
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
