"""Shared fixtures: router processes started for real and always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dynamo_ext.testing import RouterProc


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
