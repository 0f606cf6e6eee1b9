"""The README's first command: ``dynamo-ext router --demo`` runs and KV routing pays."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_kv_routing_beats_round_robin() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynamo_ext.cli",
            "--log-level",
            "WARNING",
            "router",
            "--demo",
            "--demo-requests",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    summary = json.loads(out.strip().splitlines()[-1].removeprefix("summary: "))
    assert summary["kv"]["predicted_equals_actual"] is True
    assert summary["kv"]["prefix_hit_rate"] > summary["round_robin"]["prefix_hit_rate"]
    assert "-> worker-" in out


def test_bad_flag_value_fails_with_the_field_name(tmp_path) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text("scorer:\n  temperature: -1\n")
    p = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "router", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert "temperature" in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "router", "--worker", "kv=tcp://x:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "--worker" in p.stderr
