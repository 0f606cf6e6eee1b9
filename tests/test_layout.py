"""The rooms of docs/architecture.md, held against the code's own imports (ast, no import
of the modules themselves), so the map stays true as the code moves."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("vllm", "sglang", "lmcache", "nixl")


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((ROOT / d).glob("*.py"))]


def offenders(
    paths: list[Path], banned: tuple[str, ...], allow: frozenset[str] = frozenset()
) -> list:
    bad = []
    for p in paths:
        rel = str(p.relative_to(ROOT))
        if rel in allow:
            continue
        for mod in imports(p):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                bad.append((rel, mod))
    return bad


def test_the_core_knows_no_engine_and_no_outer_room() -> None:
    core = [p for p in files("dynamo_ext", "dynamo_ext/pool") if p.name != "cli.py"]
    banned = ENGINES + (
        "dynamo_ext.plugins",
        "dynamo_ext.router",
        "dynamo_ext.sim",
        "dynamo_ext.testing",
        "dynamo_ext.benchmarks",
        "dynamo_ext.frontend",
    )
    assert offenders(core, banned) == []


def test_the_frontend_reaches_engines_only_through_the_handshake_registry() -> None:
    banned = ENGINES + ("dynamo_ext.plugins", "dynamo_ext.sim", "dynamo_ext.testing")
    assert offenders(files("dynamo_ext/frontend"), banned) == []


def test_the_router_depends_on_the_core_only() -> None:
    banned = ENGINES + (
        "dynamo_ext.plugins",
        "dynamo_ext.frontend",
        "dynamo_ext.testing",
        "dynamo_ext.sim",
    )
    assert offenders(files("router"), banned, allow=frozenset({"router/demo.py"})) == []


def test_ingest_and_service_own_no_socket() -> None:
    assert (
        offenders(
            files("router"),
            ("zmq",),
            allow={"router/server.py", "router/client.py", "router/demo.py", "router/identity.py"},
        )
        == []
    )


def test_plugins_do_not_import_each_other_and_production_never_imports_testing() -> None:
    assert offenders(files("plugins/vllm"), ("sglang", "dynamo_ext.plugins.sglang")) == []
    assert offenders(files("plugins/sglang"), ("dynamo_ext.plugins.vllm",)) == []
    allow = frozenset({"plugins/vllm/fleet.py", "plugins/vllm/serve.py"})
    prod = files("plugins/vllm", "plugins/sglang", "router", "dynamo_ext/frontend")
    assert offenders(prod, ("dynamo_ext.testing",), allow) == []


def test_no_module_reaches_into_anothers_underscored_names() -> None:
    """``from x import _name`` across modules (the rooms' public API only)."""
    bad = []
    for p in files(
        "dynamo_ext",
        "dynamo_ext/frontend",
        "dynamo_ext/sim",
        "router",
        "benchmarks",
        "plugins/vllm",
        "plugins/sglang",
    ):
        for node in ast.walk(ast.parse(p.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("dynamo_ext")
            ):
                bad += [
                    (str(p.relative_to(ROOT)), a.name)
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert bad == []


def test_every_import_path_is_the_real_file_from_a_plain_checkout() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import dynamo_ext.router.server as s, dynamo_ext.plugins.vllm."
            "stats as v; print(s.__file__); print(v.__file__)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    ).stdout.split()
    assert [os.path.realpath(p) for p in out] == [
        str(ROOT / "router" / "server.py"),
        str(ROOT / "plugins" / "vllm" / "stats.py"),
    ]
