"""The SGLang launcher's own options and the SGLang command line built from them.

``python -m dynamo_ext.plugins.sglang.launch_server <SGLang args> --dynamo-ext-...``: the
``--dynamo-ext-*`` options (each also an environment variable) are ours and removed; every
other argument is SGLang's and passed through untouched, except that we add what the
worker needs and the user did not give (SGLang 0.5.23 flag names, checked in the tests
against SGLang's own parser):

- ``--kv-events-config``: a ZMQ publisher with a replay socket, which the launcher's sidecar
  subscribes to (an existing config is kept; its endpoint is used). SGLang binds both
  sockets itself and we learn nothing back before it runs, so instead of a port picked
  ahead (which anything may take meanwhile) they are IPC endpoints with a fresh name
  (``ipc_endpoint``): the sidecar always runs beside SGLang, and a name has no race;
- ``--enable-metrics``: the Prometheus ``/metrics`` the sidecar polls;
- ``--page-size``: the router's block size (SGLang's default page of 1 token would make
  every token a block);
- ``--disaggregation-mode prefill|decode``, ``--disaggregation-transfer-backend nixl`` and
  ``--disaggregation-bootstrap-port`` for a prefill or decode role;
- ``--enable-hierarchical-cache --hicache-storage-backend dynamic
  --hicache-storage-backend-extra-config {...}`` with ``--dynamo-ext-pool-root DIR``: the
  dynamo-ext pool as SGLang HiCache storage, loaded by SGLang's dynamic backend factory
  (``backend_name``/``module_path``/``class_name`` in the extra config).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from dynamo_ext.config import advertise
from dynamo_ext.errors import ConfigError
from dynamo_ext.protocol import Role
from dynamo_ext.worker_env import worker_env

SGLANG_CMD_ENV = "DYNAMO_EXT_SGLANG_CMD"
HICACHE_MODULE = "dynamo_ext.plugins.sglang.hicache"
HICACHE_CLASS = "DynamoExtHiCacheStorage"
HICACHE_BACKEND_NAME = "dynamo_ext_pool"
DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's --disaggregation-bootstrap-port default

SglangMode = Literal["null", "prefill", "decode"]


class LauncherConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The launcher's own options (``split_argv``: flags, then environment), validated at
    construction with a ``ConfigError`` naming the field."""

    router: str | None = None
    worker_id: str | None = None
    role: Role | None = None  # None: from --disaggregation-mode, else "both"
    advertise_host: str = "127.0.0.1"
    http_endpoint: str | None = None
    kv_endpoint: str = "tcp://*:0"  # our republished, vLLM-schema KV events
    replay_endpoint: str = "tcp://*:0"
    metrics_endpoint: str = "tcp://*:0"
    metrics_period_s: float = 0.5
    # an idle SGLang event stream is asked for batches past the last one this often
    resync_s: float = 5.0
    block_size: int = 16
    hash_algo: str = "sha256"
    hash_seed: str | None = None
    transfer_backend: str = "nixl"
    bootstrap_port: int | None = None
    pool_root: str | None = None
    sglang_cmd: list[str] = msgspec.field(
        default_factory=lambda: [sys.executable, "-m", "sglang.launch_server"]
    )

    def __post_init__(self) -> None:
        if self.router is not None and not self.router.startswith(("tcp://", "ipc://")):
            raise ConfigError(
                "router", f"must be a ZMQ endpoint like tcp://host:port, got {self.router!r}"
            )
        if self.role is not None and self.role not in ("prefill", "decode", "both"):
            raise ConfigError("role", f"must be prefill, decode or both, got {self.role!r}")
        if self.block_size <= 0:
            raise ConfigError("block_size", f"must be > 0, got {self.block_size}")
        if self.metrics_period_s <= 0:
            raise ConfigError("metrics_period_s", f"must be > 0, got {self.metrics_period_s}")
        if self.resync_s <= 0:
            raise ConfigError("resync_s", f"must be > 0, got {self.resync_s}")


# option (without --dynamo-ext-) -> (field, env var, type)
_OPTIONS: dict[str, tuple[str, str, type]] = {
    "router": ("router", "DYNAMO_EXT_WORKER_ROUTER", str),
    "worker-id": ("worker_id", "DYNAMO_EXT_WORKER_ID", str),
    "role": ("role", "DYNAMO_EXT_WORKER_ROLE", str),
    "advertise-host": ("advertise_host", "DYNAMO_EXT_WORKER_HOST", str),
    "http-endpoint": ("http_endpoint", "DYNAMO_EXT_WORKER_HTTP", str),
    "kv-endpoint": ("kv_endpoint", "DYNAMO_EXT_WORKER_KV_ENDPOINT", str),
    "replay-endpoint": ("replay_endpoint", "DYNAMO_EXT_WORKER_REPLAY_ENDPOINT", str),
    "metrics-endpoint": ("metrics_endpoint", "DYNAMO_EXT_WORKER_METRICS", str),
    "metrics-period": ("metrics_period_s", "DYNAMO_EXT_WORKER_METRICS_PERIOD", float),
    "resync-s": ("resync_s", "DYNAMO_EXT_WORKER_RESYNC_S", float),
    "block-size": ("block_size", "DYNAMO_EXT_WORKER_BLOCK_SIZE", int),
    "hash-algo": ("hash_algo", "DYNAMO_EXT_WORKER_HASH_ALGO", str),
    "hash-seed": ("hash_seed", "DYNAMO_EXT_WORKER_HASH_SEED", str),
    "transfer-backend": ("transfer_backend", "DYNAMO_EXT_WORKER_TRANSFER_BACKEND", str),
    "bootstrap-port": ("bootstrap_port", "DYNAMO_EXT_WORKER_BOOTSTRAP_PORT", int),
    "pool-root": ("pool_root", "DYNAMO_EXT_POOL_ROOT", str),
}


def options_help() -> str:
    """The launcher's own options, one a line, with their environment variables."""
    lines = ["dynamo-ext launcher options (all other arguments go to sglang.launch_server):"]
    for opt, (_dest, var, typ) in _OPTIONS.items():
        lines.append(f"  --dynamo-ext-{opt:<17} {typ.__name__:<6} env {var}")
    return "\n".join(lines)


def split_argv(
    argv: list[str], env: dict[str, str] | None = None
) -> tuple[LauncherConfig, list[str]]:
    """Our options (flags, then environment) and SGLang's untouched remainder."""
    env = dict(os.environ if env is None else env)
    p = argparse.ArgumentParser(
        prog="dynamo_ext.plugins.sglang.launch_server", add_help=False, allow_abbrev=False
    )
    for opt, (dest, _, _typ) in _OPTIONS.items():
        p.add_argument(f"--dynamo-ext-{opt}", dest=dest, type=str, default=None)
    ns, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--dynamo-ext-")]
    if unknown:
        raise ConfigError(unknown[0][2:].split("=")[0], "unknown dynamo-ext launcher option")
    values: dict[str, object] = {}
    for dest, var, typ in _OPTIONS.values():
        raw = getattr(ns, dest)
        if raw is None:
            raw = worker_env(env, var)
        if raw is None:
            continue
        try:
            values[dest] = typ(raw)
        except ValueError as exc:
            raise ConfigError(dest, f"expected {typ.__name__}, got {raw!r}") from exc
    cmd = env.get(SGLANG_CMD_ENV)
    if cmd:
        values["sglang_cmd"] = shlex.split(cmd)
    return LauncherConfig(**values), rest  # type: ignore[arg-type]


def ipc_endpoint(name: str) -> str:
    """A fresh local ZMQ endpoint for a socket SGLang binds: Linux's abstract namespace (no
    file, gone with the socket), elsewhere a socket file in the temp directory."""
    unique = f"dynamo-ext-{uuid.uuid4().hex}-{name}"
    if sys.platform.startswith("linux"):
        return f"ipc://@{unique}"
    return f"ipc://{os.path.join(tempfile.gettempdir(), unique)}"


def _flag(args: list[str], name: str) -> str | None:
    """The value of ``--name v`` / ``--name=v`` in SGLang's args (last one wins)."""
    val = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            val = args[i + 1]
        elif a.startswith(name + "="):
            val = a[len(name) + 1 :]
    return val


def _has(args: list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


@dataclass
class SglangPlan:
    """What the launcher starts and what the sidecar needs to know about it."""

    argv: list[str]
    role: Role
    page_size: int
    host: str
    port: int
    kv_endpoint: str  # SGLang's PUB, as the sidecar connects to it
    kv_replay_endpoint: str | None
    kv_topic: str
    bootstrap_port: int | None
    http_endpoint: str
    worker_id: str
    model: str | None


def build_sglang_argv(cfg: LauncherConfig, args: list[str]) -> SglangPlan:
    """SGLang's command line with our additions; raises ``ConfigError`` naming the field."""
    out = list(args)
    mode = _flag(out, "--disaggregation-mode")
    role: Role = cfg.role or {"prefill": "prefill", "decode": "decode"}.get(mode or "", "both")  # type: ignore[assignment]
    want = {"prefill": "prefill", "decode": "decode", "both": "null"}[role]
    if mode is not None and mode != want:
        raise ConfigError("role", f"role {role!r} contradicts --disaggregation-mode {mode!r}")
    dp = _flag(out, "--dp-size") or _flag(out, "--dp") or "1"
    if dp != "1":
        raise ConfigError(
            "dp_size",
            f"one launcher serves one KV cache; got --dp-size {dp}: run one launcher "
            "per data-parallel replica",
        )

    page = _flag(out, "--page-size")
    if page is None:
        out += ["--page-size", str(cfg.block_size)]
        page_size = cfg.block_size
    else:
        page_size = int(page)
        if page_size != cfg.block_size:
            raise ConfigError(
                "block_size",
                f"SGLang --page-size {page_size} differs from the router's block size "
                f"{cfg.block_size} (--dynamo-ext-block-size)",
            )

    kv_json = _flag(out, "--kv-events-config")
    if kv_json is None:
        kv: dict[str, Any] = {
            "publisher": "zmq",
            "endpoint": ipc_endpoint("kv"),
            "bind": True,
            "replay_endpoint": ipc_endpoint("replay"),
            "topic": "kv",
        }
        out += ["--kv-events-config", json.dumps(kv)]
    else:
        try:
            kv = json.loads(kv_json)
        except json.JSONDecodeError as exc:
            raise ConfigError("kv_events_config", f"not JSON: {exc}") from exc
        if kv.get("publisher", "null") != "zmq":
            raise ConfigError("kv_events_config", "publisher must be 'zmq' for dynamo-ext")
        if kv.get("format", "default") != "default":
            raise ConfigError("kv_events_config", "format must be 'default' (SGLang's)")
    if not _has(out, "--enable-metrics"):
        out.append("--enable-metrics")

    bootstrap: int | None = None
    if role != "both":
        if mode is None:
            out += ["--disaggregation-mode", want]
        if not _has(out, "--disaggregation-transfer-backend"):
            out += ["--disaggregation-transfer-backend", cfg.transfer_backend]
        b = _flag(out, "--disaggregation-bootstrap-port")
        if b is None:
            bootstrap = cfg.bootstrap_port or DEFAULT_BOOTSTRAP_PORT
            out += ["--disaggregation-bootstrap-port", str(bootstrap)]
        else:
            bootstrap = int(b)

    if cfg.pool_root is not None:
        if _has(out, "--hicache-storage-backend"):
            raise ConfigError(
                "pool_root", "--dynamo-ext-pool-root sets --hicache-storage-backend; give one"
            )
        if not _has(out, "--enable-hierarchical-cache"):
            out.append("--enable-hierarchical-cache")
        extra = {
            "backend_name": HICACHE_BACKEND_NAME,
            "module_path": HICACHE_MODULE,
            "class_name": HICACHE_CLASS,
            "pool_root": cfg.pool_root,
        }
        out += [
            "--hicache-storage-backend",
            "dynamic",
            "--hicache-storage-backend-extra-config",
            json.dumps(extra),
        ]

    host = _flag(out, "--host") or "127.0.0.1"  # SGLang's defaults
    port = int(_flag(out, "--port") or "30000")
    adv = cfg.advertise_host if host in ("0.0.0.0", "::", "") else host
    http = cfg.http_endpoint or f"http://{adv}:{port}"
    worker_id = cfg.worker_id or f"{socket.gethostname()}:{port}"
    model = _flag(out, "--served-model-name") or _flag(out, "--model-path") or _flag(out, "--model")
    kv_ep = kv.get("endpoint", "tcp://*:5557")
    replay = kv.get("replay_endpoint")
    return SglangPlan(
        argv=out,
        role=role,
        page_size=page_size,
        host=host,
        port=port,
        kv_endpoint=advertise(kv_ep, "127.0.0.1"),  # the sidecar runs beside SGLang
        kv_replay_endpoint=advertise(replay, "127.0.0.1") if replay else None,
        kv_topic=kv.get("topic", ""),
        bootstrap_port=bootstrap,
        http_endpoint=http,
        worker_id=worker_id,
        model=model,
    )
