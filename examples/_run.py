"""Shared by the example scripts: start a LocalFleet, print how to use it, stop on Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from dynamo_ext.plugins.vllm.fleet import LocalFleet
from dynamo_ext.testing.tiny_model import build_tiny_model, default_model_dir


def main(aggregated: int, prefill: int, decode: int, description: str) -> None:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", type=Path, help="model folder (default: the tiny local Llama)")
    p.add_argument("--port", type=int, default=8080, help="frontend port")
    p.add_argument("--workdir", type=Path, default=Path("out/example"))
    args = p.parse_args()
    model = args.model or build_tiny_model(default_model_dir())
    fleet = LocalFleet(
        model,
        aggregated=aggregated,
        prefill=prefill,
        decode=decode,
        workdir=args.workdir,
        frontend_port=args.port,
    )
    print(
        f"starting router, {prefill} prefill, {decode} decode, {aggregated} aggregated "
        f"worker(s) and the frontend (logs in {args.workdir}/) ...",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        fleet.start()
        assert fleet.router is not None
        print(f"\nOpenAI endpoint: {fleet.url}/v1   (model {fleet.served_model_name!r})")
        print(
            f"router: {fleet.router.endpoint}  metrics: "
            f"http://127.0.0.1:{fleet.router.metrics_port}/metrics, {fleet.url}/metrics"
        )
        print(
            f"\ncurl {fleet.url}/v1/completions -H 'Content-Type: application/json' -d "
            f'\'{{"model": "{fleet.served_model_name}", "prompt": "Hello, my name is",'
            f' "max_tokens": 16}}\'\n\nCtrl-C stops everything.',
            flush=True,
        )
        stop.wait()
    finally:
        print("stopping ...", flush=True)
        fleet.stop()
