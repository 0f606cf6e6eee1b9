"""The example scripts start a whole system, print the endpoint and a curl line, serve,
and stop cleanly on Ctrl-C (SIGINT), leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dynamo_ext.testing import free_port

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,pgid"], capture_output=True, text=True).stdout
    rows = [list(map(int, ln.split())) for ln in out.splitlines()[1:] if ln.strip()]
    kids, frontier = set(), {pid}
    while frontier:
        nxt = {p for p, pp, _ in rows if pp in frontier} - kids
        kids |= nxt
        frontier = nxt
    return sorted(kids)


def test_aggregated_example_serves_and_stops_on_ctrl_c(tiny_model, tmp_path) -> None:
    port = free_port()
    p = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "aggregated.py"),
            "--model",
            str(tiny_model),
            "--port",
            str(port),
            "--workdir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 600
        assert p.stdout is not None
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        out = "".join(lines)
        assert f"OpenAI endpoint: http://127.0.0.1:{port}/v1" in out, out
        assert "curl http://127.0.0.1:" in out
        body = {"model": "tiny-llama", "prompt": "Hello, my name is", "max_tokens": 4}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 4
        kids = _children(p.pid)
        assert len(kids) >= 4  # router, 2 workers (+ engine cores), frontend
        p.send_signal(signal.SIGINT)
        assert p.wait(120) == 0
        time.sleep(1)
        alive = [
            k
            for k in kids
            if os.path.exists(f"/proc/{k}") and "zombie" not in open(f"/proc/{k}/status").read()
        ]
        assert alive == [], alive
    finally:
        if p.poll() is None:
            p.kill()
