"""``dynamo-ext worker sglang``: the launcher command line of an SGLang dynamo-ext worker.

``dynamo-ext worker sglang MODEL --role prefill|decode|both --router EP [...] [-- SGLang args]``
``os.execvpe``\\s ``python -m dynamo_ext.plugins.sglang.launch_server`` with the launcher's
``--dynamo-ext-*`` options (``plugins/sglang/config.py`` turns them into SGLang's
``--kv-events-config``, ``--enable-metrics``, ``--page-size`` and the PD flags); ``--print``
prints the command and environment instead. The options and the printing are every
engine's (``dynamo_ext/worker_cmd.py``, standard library only, no engine import).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from dynamo_ext.errors import ConfigError
from dynamo_ext.protocol import Role
from dynamo_ext.worker_cmd import (
    ROLES,
    WorkerCommand,
    add_common_arguments,
    curve_env,
    run_or_print,
    split_extra,
)

LAUNCHER_MODULE = "dynamo_ext.plugins.sglang.launch_server"


@dataclass
class SglangWorkerSpec:
    model: str
    role: Role
    router: str
    worker_id: str | None = None
    host: str = "0.0.0.0"
    port: int = 30000
    block_size: int | None = None  # None: the launcher's default (16)
    bootstrap_port: int | None = None
    advertise_host: str | None = None
    curve_secret_key: str | None = None
    curve_server_key: str | None = None
    python: str = field(default_factory=lambda: sys.executable)
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError("role", f"must be one of {list(ROLES)}, got {self.role!r}")
        if (self.curve_secret_key is None) != (self.curve_server_key is None):
            raise ConfigError(
                "curve", "give both the worker's secret key and the router's public key"
            )


def sglang_worker_command(spec: SglangWorkerSpec) -> WorkerCommand:
    argv = [
        spec.python,
        "-m",
        LAUNCHER_MODULE,
        "--model-path",
        spec.model,
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        "--dynamo-ext-router",
        spec.router,
        "--dynamo-ext-role",
        spec.role,
    ]
    if spec.worker_id:
        argv += ["--dynamo-ext-worker-id", spec.worker_id]
    if spec.advertise_host:
        argv += ["--dynamo-ext-advertise-host", spec.advertise_host]
    if spec.block_size is not None:
        argv += ["--dynamo-ext-block-size", str(spec.block_size)]
    if spec.bootstrap_port is not None:
        argv += ["--dynamo-ext-bootstrap-port", str(spec.bootstrap_port)]
    env = curve_env(spec.curve_secret_key, spec.curve_server_key)
    return WorkerCommand([*argv, *spec.extra_args], env)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamo-ext worker sglang",
        description="Run (or --print) SGLang through the dynamo-ext launcher; SGLang's own "
        "flags go after --.",
    )
    add_common_arguments(p)
    p.add_argument("--port", type=int, default=30000, help="HTTP port")
    p.add_argument("--block-size", type=int, help="SGLang page size = the router's block size")
    p.add_argument("--bootstrap-port", type=int, help="PD bootstrap port (prefill/decode)")
    return p


def main(argv: Sequence[str]) -> int:
    ours, extra = split_extra(argv)
    ns = build_parser().parse_args(ours)
    spec = SglangWorkerSpec(
        model=ns.model,
        role=ns.role,
        router=ns.router,
        worker_id=ns.worker_id,
        host=ns.host,
        port=ns.port,
        block_size=ns.block_size,
        bootstrap_port=ns.bootstrap_port,
        advertise_host=ns.advertise_host,
        curve_secret_key=ns.curve_secret_key,
        curve_server_key=ns.curve_server_key,
        python=ns.python,
        extra_args=extra,
    )
    return run_or_print(sglang_worker_command(spec), ns.print, ns.json)


__all__ = ["SglangWorkerSpec", "main", "sglang_worker_command"]
