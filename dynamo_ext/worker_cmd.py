"""What every engine's ``dynamo-ext worker`` command shares: the common options, the
command as argv + environment, and run-or-print. Standard library only: no engine import.
``plugins/vllm/worker_cmd.py`` and ``plugins/sglang/worker_cmd.py`` build on it."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from dynamo_ext.protocol import Role

ROLES: tuple[Role, ...] = ("prefill", "decode", "both")
CURVE_SECRET_ENV = "DYNAMO_EXT_WORKER_CURVE_SECRET_KEY"
CURVE_SERVER_ENV = "DYNAMO_EXT_WORKER_CURVE_SERVER_KEY"


def curve_env(secret_key: str | None, server_key: str | None) -> dict[str, str]:
    """The worker's CURVE key files as its environment (both or none)."""
    if secret_key and server_key:
        return {CURVE_SECRET_ENV: secret_key, CURVE_SERVER_ENV: server_key}
    return {}


@dataclass
class WorkerCommand:
    """A process to start: ``argv`` with ``env`` added to the caller's environment."""

    argv: list[str]
    env: dict[str, str]

    def shell(self) -> str:
        """One shell line: ``env K=V ... python -m vllm...``, every word quoted."""
        words = [*(["env"] if self.env else []), *(f"{k}={v}" for k, v in self.env.items())]
        words += self.argv
        return " ".join(shlex.quote(w) for w in words)

    def to_json(self) -> str:
        return json.dumps({"argv": self.argv, "env": self.env})


def split_extra(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Our arguments and the engine's, split at the first ``--``."""
    args = list(argv)
    if "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1 :]
    return args, []


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options every engine's worker command takes."""
    p.add_argument("model", help="model name or folder, as the engine takes it")
    p.add_argument("--role", choices=ROLES, default="both", help="prefill | decode | both")
    p.add_argument("--router", required=True, help="router control socket, tcp://host:5600")
    p.add_argument("--worker-id", help="id in the router (default: hostname:port)")
    p.add_argument("--host", default="0.0.0.0", help="HTTP bind address")
    p.add_argument("--advertise-host", help="address other hosts reach this worker at")
    p.add_argument("--curve-secret-key", help="this worker's CURVE secret key file")
    p.add_argument("--curve-server-key", help="the router's CURVE public key file")
    p.add_argument("--python", default=sys.executable, help="interpreter of the engine")
    p.add_argument("--print", action="store_true", help="print the command instead of running it")
    p.add_argument("--json", action="store_true", help="with --print: {argv, env} as JSON")


def run_or_print(cmd: WorkerCommand, print_only: bool, as_json: bool) -> int:
    """Print the command, or replace this process with it (never returns then)."""
    if print_only:
        print(cmd.to_json() if as_json else cmd.shell(), flush=True)
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd.argv[0], cmd.argv, {**os.environ, **cmd.env})
