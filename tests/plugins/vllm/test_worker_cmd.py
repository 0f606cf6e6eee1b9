"""``dynamo-ext worker vllm|sglang``: the printed command parses back into the flags and
variables our plugins read (every role, CURVE), and a real vLLM worker started through the
exec path registers with a real router, indexes a prompt's blocks and serves a completion."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from dynamo_ext.plugins.sglang.config import build_sglang_argv, split_argv
from dynamo_ext.plugins.vllm.config import validate_connector_config
from dynamo_ext.plugins.vllm.launcher import CPU_FAST_ARGS, CPU_FAST_ENV, log_tail
from dynamo_ext.plugins.vllm.worker_cmd import VllmWorkerSpec, vllm_worker_command
from dynamo_ext.router.client import RouterClient
from dynamo_ext.testing import free_port

ROUTER = "tcp://10.0.0.1:5600"


def printed(*args: str, env: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """Run ``dynamo-ext worker ... --print`` and split its line into (env, argv)."""
    ours, extra = list(args), []
    if "--" in ours:
        extra = ours[ours.index("--") :]
        ours = ours[: ours.index("--")]
    out = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "worker", *ours, "--print", *extra],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    ).stdout
    words = shlex.split(out)
    assert len(out.strip().splitlines()) == 1, out
    found: dict[str, str] = {}
    if words[0] == "env":
        words.pop(0)
        while "=" in words[0] and not words[0].startswith("/"):
            k, v = words.pop(0).split("=", 1)
            found[k] = v
    return found, words


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize("role", ["prefill", "decode", "both"])
def test_vllm_print_roles(role: str) -> None:
    env, argv = printed(
        "vllm", "/models/m", "--role", role, "--router", ROUTER, "--worker-id", "w7",
        "--port", "8123", "--advertise-host", "10.0.0.7", "--", "--block-size", "16",
    )  # fmt: skip
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--model") == "/models/m" and flag(argv, "--port") == "8123"
    assert argv[-2:] == ["--block-size", "16"]  # vLLM's own flags after --, untouched
    assert env["DYNAMO_EXT_WORKER_ROUTER"] == ROUTER
    assert env["DYNAMO_EXT_WORKER_ID"] == "w7"
    assert env["DYNAMO_EXT_WORKER_ROLE"] == role
    assert env["DYNAMO_EXT_WORKER_HOST"] == "10.0.0.7"
    kve = json.loads(flag(argv, "--kv-events-config") or "")
    assert kve == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "topic": "kv",
        "endpoint": "tcp://*:5557",
        "replay_endpoint": "tcp://*:5558",
    }
    kvt_raw = flag(argv, "--kv-transfer-config")
    if role == "both":
        assert kvt_raw is None and "VLLM_NIXL_SIDE_CHANNEL_PORT" not in env
        return
    kvt = json.loads(kvt_raw or "")
    assert kvt["kv_connector"] == "DynamoExtConnector"
    assert kvt["kv_role"] == {"prefill": "kv_producer", "decode": "kv_consumer"}[role]
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5600"
    # what the connector will check at start, with the printed variables
    cfg = validate_connector_config(kvt["kv_role"], kvt.get("kv_connector_extra_config"), env)
    assert (cfg.router, cfg.worker_id, cfg.role, cfg.advertise_host) == (
        ROUTER, "w7", role, "10.0.0.7",
    )  # fmt: skip


def test_vllm_print_json_and_curve(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable, "-m", "dynamo_ext.cli", "worker", "vllm", "m", "--router", ROUTER,
            "--curve-secret-key", "/keys/worker.key", "--curve-server-key", "/pub/router.key.pub",
            "--metrics-port", "5559", "--print", "--json",
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    cmd = json.loads(out)
    env, argv = cmd["env"], cmd["argv"]
    assert env["DYNAMO_EXT_WORKER_CURVE_SECRET_KEY"] == "/keys/worker.key"
    assert env["DYNAMO_EXT_WORKER_CURVE_SERVER_KEY"] == "/pub/router.key.pub"
    assert env["DYNAMO_EXT_WORKER_METRICS"] == "tcp://*:5559"
    # the stat logger speaks CURVE with these keys: so must the KV event publisher
    assert json.loads(flag(argv, "--kv-events-config") or "")["publisher"] == "dynamo_ext_curve"
    # keys already in the environment count too
    env2, argv2 = printed(
        "vllm", "m", "--router", ROUTER, env={"DYNAMO_EXT_WORKER_CURVE_SECRET_KEY": "/k"}
    )
    assert json.loads(flag(argv2, "--kv-events-config") or "")["publisher"] == "dynamo_ext_curve"
    bad = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "worker", "vllm", "m", "--router", "r:5600"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "router" in bad.stderr, bad.stderr


def test_vllm_flags_we_set_are_refused_and_a_transfer_config_of_yours_is_checked() -> None:
    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dynamo_ext.cli", "worker", "vllm", "m", "--role", "prefill",
             "--router", ROUTER, "--print", "--", *extra],
            capture_output=True, text=True,
        )  # fmt: skip

    for flag_ in ("--port", "--kv-events-config", "--model", "--host"):
        r = run(f"{flag_}=x")
        assert r.returncode == 2 and "set by dynamo-ext worker" in r.stderr, r.stderr
    wrong = json.dumps({"kv_connector": "DynamoExtConnector", "kv_role": "kv_consumer"})
    r = run("--kv-transfer-config", wrong)
    assert r.returncode == 2 and "kv_producer" in r.stderr, r.stderr
    multi = json.dumps({"kv_connector": "MultiConnector", "kv_role": "kv_both"})
    r = run("--kv-transfer-config", multi)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv.count("--kv-transfer-config") == 1 and flag(argv, "--kv-transfer-config") == multi


@pytest.mark.parametrize("role", ["prefill", "decode", "both"])
def test_sglang_print_goes_through_the_launcher(role: str) -> None:
    env, argv = printed(
        "sglang", "/models/m", "--role", role, "--router", ROUTER, "--worker-id", "s1",
        "--port", "30001", "--block-size", "32", "--", "--tp", "2",
    )  # fmt: skip
    assert argv[:3] == [sys.executable, "-m", "dynamo_ext.plugins.sglang.launch_server"]
    assert env == {}
    # the launcher's own parsing of what was printed: our options, then SGLang's argv
    cfg, rest = split_argv(argv[3:], env={})
    plan = build_sglang_argv(cfg, rest)
    assert (cfg.router, cfg.worker_id, plan.role, plan.page_size) == (ROUTER, "s1", role, 32)
    assert flag(plan.argv, "--model-path") == "/models/m" and flag(plan.argv, "--tp") == "2"
    mode = flag(plan.argv, "--disaggregation-mode")
    assert mode == {"prefill": "prefill", "decode": "decode", "both": None}[role]
    assert json.loads(flag(plan.argv, "--kv-events-config") or "")["publisher"] == "zmq"


def test_one_builder_for_the_local_fleet() -> None:
    """LocalFleet's workers are built by the same function as the printed command."""
    from dynamo_ext.plugins.vllm.fleet import worker_spec

    spec = worker_spec(Path("/m"), "decode", "d0", "tcp://127.0.0.1:1", 2345)
    cmd = vllm_worker_command(spec, environ={})
    assert cmd.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "2345"
    assert json.loads(flag(cmd.argv, "--kv-transfer-config") or "")["kv_role"] == "kv_consumer"
    assert cmd.argv[-len(CPU_FAST_ARGS) :] == list(CPU_FAST_ARGS)
    assert isinstance(spec, VllmWorkerSpec)


@pytest.mark.engine
def test_exec_worker_registers_and_serves(tiny_model: Path, router_factory, tmp_path) -> None:
    router = router_factory(block_size=128, worker_timeout_s=3.0)
    port = free_port()
    log = tmp_path / "worker.log"
    argv = [
        sys.executable, "-m", "dynamo_ext.cli", "worker", "vllm", str(tiny_model),
        "--role", "both", "--router", router.endpoint, "--worker-id", "exec-0",
        "--host", "127.0.0.1", "--port", str(port), "--kv-port", str(free_port()),
        "--replay-port", str(free_port()), "--metrics-period", "0.2",
        "--", *CPU_FAST_ARGS,
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **CPU_FAST_ENV},
        start_new_session=True,
    )
    try:
        # exec: the process we started *is* vLLM's API server, no wrapper in between
        deadline = time.monotonic() + 30
        while "vllm.entrypoints.openai.api_server" not in " ".join(
            psutil.Process(proc.pid).cmdline()
        ):
            assert time.monotonic() < deadline and proc.poll() is None, log_tail(log)
            time.sleep(0.1)

        async def registered() -> bool:
            async with RouterClient(router.endpoint) as c:
                st = await c.workers()
            return any(
                w.worker_id == "exec-0" and w.up and w.last_metrics is not None for w in st.workers
            )

        deadline = time.monotonic() + 300
        while not asyncio.run(registered()):
            assert proc.poll() is None, log_tail(log)
            assert time.monotonic() < deadline, log_tail(log)
            time.sleep(0.5)

        prompt = list(range(1000, 1000 + 300))  # two full blocks of 128

        async def route() -> str | None:
            async with RouterClient(router.endpoint) as c:
                return (await c.route("r1", prompt, track=False)).http_endpoint

        url = asyncio.run(route())
        assert url == f"http://127.0.0.1:{port}"
        # the stat logger registers at engine start, before vLLM's HTTP server listens
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log_tail(log)
            time.sleep(0.5)
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": str(tiny_model), "prompt": prompt, "max_tokens": 4},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4

        async def indexed() -> int:
            async with RouterClient(router.endpoint) as c:
                st = await c.workers()
            return sum(
                next(w for w in st.workers if w.worker_id == "exec-0").indexed_blocks.values()
            )

        deadline = time.monotonic() + 20
        while (n := asyncio.run(indexed())) < 2:
            assert time.monotonic() < deadline, n
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(5)


def test_engine_threads_split_the_cores_and_an_explicit_setting_wins(monkeypatch) -> None:
    from dynamo_ext.plugins.vllm.launcher import engine_threads_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert engine_threads_env(2, cpus=2) == {"OMP_NUM_THREADS": "1"}
    assert engine_threads_env(3, cpus=2) == {"OMP_NUM_THREADS": "1"}  # never 0
    assert engine_threads_env(2, cpus=16) == {"OMP_NUM_THREADS": "8"}
    assert engine_threads_env(0, cpus=4) == {"OMP_NUM_THREADS": "4"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert engine_threads_env(2) == {"OMP_NUM_THREADS": "3"}
