"""``dynamo-ext bench prefill``: batch prefill scheduler vs vLLM's stock scheduler.

Placeholder module so the CLI wiring exists; the benchmark lands with the scheduler.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    raise SystemExit("dynamo-ext bench prefill: not implemented yet")
