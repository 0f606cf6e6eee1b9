"""``python -m dynamo_ext.sim``: the same as ``dynamo-ext mocker``."""

from __future__ import annotations

import argparse
import logging
import sys

from dynamo_ext.sim.cli import add_arguments, main

if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ap = argparse.ArgumentParser(prog="python -m dynamo_ext.sim")
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
