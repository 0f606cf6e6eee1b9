"""Placeholder: lands with the cluster simulator issue."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    raise SystemExit("not implemented yet")
