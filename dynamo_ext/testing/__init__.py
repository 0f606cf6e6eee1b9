"""Test helpers shipped with the package: free ports, polling, a router child process, the
tiny model (``dynamo_ext.testing.tiny_model``).

Used by our tests, benchmarks, examples and local fleets, and by anyone testing a gateway
against a real router. Production code (router, frontend, plugins at run time) never
imports this package.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

__all__ = ["RouterProc", "client_curve", "free_port", "wait_for"]

from dynamo_ext.security import Curve, CurveConfig, load_curve
from dynamo_ext.testing.ports import free_port  # one port policy everywhere


def client_curve(keys: Path, name: str) -> Curve:
    """The ``Curve`` of client ``name`` whose keys ``security.generate_keys`` wrote into
    ``keys``, connecting to the router whose key is ``keys/router.key.pub``."""
    c = load_curve(
        CurveConfig(
            secret_key_file=str(keys / f"{name}.key"),
            server_public_key=str(keys / "router.key.pub"),
        )
    )
    assert c is not None
    return c


async def wait_for(cond: Callable[[], object], timeout: float = 10.0, every: float = 0.05):
    """Await until ``cond()`` (sync or async) is truthy; return its value or fail."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met in {timeout}s (last value {last!r})")


class RouterProc:
    """``dynamo-ext router`` as a child process, with its log kept for failures."""

    def __init__(self, tmp: Path, config: dict) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        cfg = {"bind": self.endpoint, "metrics_port": self.metrics_port, **config}
        self.config_path = tmp / f"router-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / f"router-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RouterProc:
        # A restart appends to the same log: only what this start writes counts, or the
        # last life's "router listening" line would return before this one binds.
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo_ext.cli", "router", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited {self.proc.returncode}:\n{self.log()}")
            if b"router listening" in self.log_path.read_bytes()[offset:]:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"router did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def scrape(self) -> str:
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return r.read().decode()
