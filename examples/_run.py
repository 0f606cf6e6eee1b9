"""Shared by the example scripts: ``dynamo-ext serve`` with the example's fleet shape."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynamo_ext.plugins.vllm import serve


def main(aggregated: int, prefill: int, decode: int, description: str) -> None:
    p = argparse.ArgumentParser(description=description)
    serve.add_arguments(p)
    p.description = description
    p.set_defaults(workdir=Path("out/example"))
    if prefill or decode:
        p.set_defaults(prefill=prefill, decode=decode)
    else:
        p.set_defaults(workers=aggregated)
    sys.exit(serve.main(p.parse_args()))
