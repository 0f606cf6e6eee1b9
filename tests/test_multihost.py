"""A fleet across hosts: router, frontend, mocker workers, a client and a real vLLM worker each
in a network namespace of its own, joined by veth pairs to a bridge in a hub namespace
(10.231.0.0/24, addresses only inside the namespaces; nothing listens on the test's own
network). Every endpoint a worker registers must carry its own host's address and be reached
from another host: the router subscribes to its KV events and metrics, the frontend forwards
to its HTTP endpoint, the client reaches the frontend.

Needs root and iproute2 (``ip netns``); skips with the reason otherwise. Everything created
(namespaces, links, processes) is removed at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from dynamo_ext.plugins.vllm.launcher import CPU_FAST_ARGS, CPU_FAST_ENV, log_tail

SUBNET = "10.231.0"
HOSTS = {"router": 1, "frontend": 2, "mocker": 3, "client": 4, "vllm": 5}
MODEL = "tiny"
BLOCK = 128  # vLLM's CPU block size: the mockers use it too, one router indexes both

# run inside the client namespace: asks the router or the frontend, prints JSON
PROBE = r"""
import asyncio, json, sys
import httpx
from dynamo_ext.router.client import RouterClient
import msgspec

async def main(what, arg):
    if what == "workers":
        async with RouterClient(arg, timeout_s=3.0) as c:
            st = await c.workers()
        print(json.dumps(msgspec.to_builtins(st)))
    elif what == "get":
        r = httpx.get(arg, timeout=5)
        print(json.dumps({"status": r.status_code}))
    elif what == "post":
        url, body = arg.split(" ", 1)
        r = httpx.post(url, json=json.loads(body), timeout=120)
        print(json.dumps({"status": r.status_code, "body": r.json()}))
    elif what == "route":
        ep, body = arg.split(" ", 1)
        kw = json.loads(body)
        async with RouterClient(ep, timeout_s=3.0) as c:
            d = await c.route("probe", kw["tokens"], exclude_workers=kw["exclude"], track=False)
        print(json.dumps({"worker_id": d.worker_id, "http": d.http_endpoint}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Net:
    """The namespaces of one test run and the processes started in them."""

    tag: str
    tmp: Path
    router: str = ""
    frontend: str = ""
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    @property
    def hub(self) -> str:
        return f"{self.tag}-hub"

    def addr(self, host: str) -> str:
        return f"{SUBNET}.{HOSTS[host]}"

    def up(self) -> None:
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for host in HOSTS:
            ns = self.ns(host)
            _ip("netns", "add", ns)
            peer = f"v{HOSTS[host]}"
            _ip("-n", self.hub, "link", "add", peer, "type", "veth", "peer", "name", "eth0",
                "netns", ns)  # fmt: skip
            _ip("-n", self.hub, "link", "set", peer, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def start(self, host: str, argv: list[str], env: dict[str, str] | None = None) -> Path:
        log = self.tmp / f"{host}-{len(self.procs)}.log"
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *argv],  # ip execs argv: p is the process
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
        self.procs.append((host, p, log))
        return log

    def probe(self, what: str, arg: str) -> dict:
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns("client"), sys.executable, "-c", PROBE, what, arg],
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return dict(json.loads(out.stdout))

    def check_alive(self) -> None:
        for host, p, log in self.procs:
            assert p.poll() is None, f"{host} exited {p.returncode}:\n{log_tail(log)}"

    def down(self) -> None:
        for _host, p, _log in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for _host, p, _log in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
            try:  # an engine core left in the group
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for host in [*HOSTS, "hub"]:
            _ip("netns", "del", f"{self.tag}-{host}", check=False)


def _skip_reason() -> str | None:
    if shutil.which("ip") is None:
        return "no `ip` (iproute2) on PATH"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"dxt{uuid.uuid4().hex[:6]}-probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, tmp_path_factory) -> Iterator[Net]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    net = Net(f"dxt{uuid.uuid4().hex[:4]}", tmp_path_factory.mktemp("multihost"))
    try:
        try:
            net.up()
        except subprocess.CalledProcessError as exc:  # e.g. no veth or bridge in this kernel
            pytest.skip(f"cannot build the namespaces' network: {' '.join(exc.cmd)}: {exc.stderr}")
        router_ep = f"tcp://{net.addr('router')}:5600"
        cfg = net.tmp / "router.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {"bind": router_ep, "insecure": True, "block_size": BLOCK, "worker_timeout_s": 3.0}
            )
        )
        py = sys.executable
        net.start("router", [py, "-m", "dynamo_ext.cli", "router", "--config", str(cfg)])
        net.start("mocker", [
            py, "-m", "dynamo_ext.sim", "--workers", "2", "--router", router_ep,
            "--host", net.addr("mocker"), "--model", MODEL, "--block-size", str(BLOCK),
            "--speedup", "20", "--metrics-period", "0.2",
        ])  # fmt: skip
        net.start("frontend", [
            py, "-m", "dynamo_ext.cli", "frontend", "--model", str(tiny_model),
            "--served-model-name", MODEL, "--host", net.addr("frontend"), "--port", "8080",
            "--router", router_ep,
        ])  # fmt: skip
        net.router = router_ep
        net.frontend = f"http://{net.addr('frontend')}:8080"
        deadline = time.monotonic() + 240
        while True:
            net.check_alive()
            try:
                up = [w for w in net.probe("workers", router_ep)["workers"] if w["up"]]
                r = net.probe("get", f"{net.frontend}/health")
                if len(up) == 2 and r["status"] == 200:
                    break
            except (AssertionError, subprocess.TimeoutExpired, json.JSONDecodeError):
                pass
            assert time.monotonic() < deadline, "fleet not up in 240 s"
            time.sleep(1.0)
        yield net
    finally:
        net.down()
    leftover = [ln for ln in _ip("netns", "list").stdout.splitlines() if net.tag in ln]
    assert leftover == [], leftover


def _completion(net: Net, prompt: str) -> dict:
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 4})
    r = net.probe("post", f"{net.frontend}/v1/completions {body}")
    assert r["status"] == 200, r
    return dict(r["body"])


def _workers(net: Net) -> dict[str, dict]:
    return {w["worker_id"]: w for w in net.probe("workers", net.router)["workers"]}


def _advertised(net: Net, worker_id: str) -> dict[str, str]:
    """The endpoints the router took from a worker's registration (its "added" log line)."""
    log = next(log for host, _p, log in net.procs if host == "router").read_text()
    line = next(ln for ln in log.splitlines() if f"worker {worker_id} added (" in ln)
    return dict(re.findall(r"\b(kv|metrics|http)=(\S+?)(?=[\s)])", line))


def test_mockers_across_hosts(fleet: Net) -> None:
    net = fleet
    # nothing of the fleet is reachable from the test's own network namespace
    assert net.addr("router") not in _ip("-4", "addr").stdout
    long = "the quick brown fox jumps over the lazy dog " * 40  # several 128-token blocks
    for i in range(4):
        assert _completion(net, f"{i} {long}")["usage"]["completion_tokens"] == 4
    ws = _workers(net)
    assert set(ws) == {"mocker-0", "mocker-1"}
    for w in ws.values():
        # advertised at the mocker host's address, served to the frontend on another host
        assert w["http_endpoint"].startswith(f"http://{net.addr('mocker')}:"), w
        ads = _advertised(net, w["worker_id"])
        assert set(ads) == {"kv", "metrics", "http"}, ads
        assert all(f"//{net.addr('mocker')}:" in ep for ep in ads.values()), ads
        assert w["up"] and w.get("last_metrics") is not None  # metrics crossed hosts
    deadline = time.monotonic() + 20
    while sum(sum(w["indexed_blocks"].values()) for w in ws.values()) == 0:
        assert time.monotonic() < deadline, ws  # KV events crossed hosts
        time.sleep(0.5)
        ws = _workers(net)
    net.check_alive()


@pytest.mark.engine
def test_real_vllm_worker_on_its_own_host(fleet: Net, tiny_model: Path) -> None:
    net = fleet
    host = net.addr("vllm")
    log = net.start(
        "vllm",
        [
            sys.executable, "-m", "dynamo_ext.cli", "worker", "vllm", str(tiny_model),
            "--role", "both", "--router", net.router,
            "--worker-id", "vllm-0", "--host", host, "--advertise-host", host,
            "--metrics-period", "0.2", "--", *CPU_FAST_ARGS, "--served-model-name", MODEL,
        ],
        env=CPU_FAST_ENV,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while True:
        net.check_alive()
        w = _workers(net).get("vllm-0")
        if w and w["up"] and w.get("last_metrics") is not None:
            break
        assert time.monotonic() < deadline, log_tail(log)
        time.sleep(1.0)
    assert w["http_endpoint"] == f"http://{host}:8000"
    ads = _advertised(net, "vllm-0")
    assert ads["kv"] == f"tcp://{host}:5557" and ads["metrics"].startswith(f"tcp://{host}:"), ads
    # the router picks vLLM when the mockers are excluded; the client reaches it there
    tokens = list(range(1000, 1300))
    body = json.dumps({"tokens": tokens, "exclude": ["mocker-0", "mocker-1"]})
    d = net.probe("route", f"{net.router} {body}")
    assert d == {"worker_id": "vllm-0", "http": f"http://{host}:8000"}
    req = json.dumps({"model": MODEL, "prompt": tokens, "max_tokens": 4})
    r = net.probe("post", f"{d['http']}/v1/completions {req}")
    assert r["status"] == 200 and r["body"]["usage"]["completion_tokens"] == 4, r
    deadline = time.monotonic() + 20
    while sum(_workers(net)["vllm-0"]["indexed_blocks"].values()) < 2:
        assert time.monotonic() < deadline  # its KV events reached the router's host
        time.sleep(0.5)
    # and the frontend, on a third host, serves through a fleet that includes it
    long = "a fleet across hosts " * 60
    for i in range(3):
        assert _completion(net, f"{i} {long}")["usage"]["completion_tokens"] == 4
