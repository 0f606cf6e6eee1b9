"""``dynamo-ext mocker`` (and ``python -m dynamo_ext.sim``): a simulated vLLM fleet that
registers with a router and serves OpenAI HTTP until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Callable

import msgspec

from dynamo_ext.sim.fleet import MockerFleet
from dynamo_ext.sim.model import MockerConfig

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Simulated vLLM workers: KV events, metrics, registration, OpenAI HTTP."
    p.add_argument("--config", help="YAML or TOML file of MockerConfig fields (timing: ...)")
    p.add_argument("--workers", type=int, default=4, help="simulated workers in this process")
    p.add_argument("--router", help="router control socket, e.g. tcp://127.0.0.1:5600")
    p.add_argument("--host", default="127.0.0.1", help="bind address of every socket")
    p.add_argument("--advertise-host", help="host name peers use (default: --host)")
    p.add_argument("--http-port", type=int, default=0, help="one HTTP port for all (0: any)")
    p.add_argument("--prefix", default="mocker", help="worker ids are PREFIX-0 .. PREFIX-N-1")
    p.add_argument("--model", default="mocker", help="served model name")
    p.add_argument("--block-size", type=int)
    p.add_argument("--num-gpu-blocks", type=int)
    p.add_argument("--gpu-kv-gb", type=float)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--cpu-kv-gb", type=float, help="CPU offload tier size (0: none)")
    p.add_argument("--speedup", type=float, help="virtual seconds per wall-clock second")
    p.add_argument("--metrics-period", type=float, help="seconds between WorkerMetrics")
    p.add_argument("--json", action="store_true", help="print the fleet's endpoints as JSON")


def config_from_args(args: argparse.Namespace) -> MockerConfig:
    from dynamo_ext.config import load_config

    overrides = {
        "block_size": getattr(args, "block_size", None),
        "num_gpu_blocks": getattr(args, "num_gpu_blocks", None),
        "gpu_kv_gb": getattr(args, "gpu_kv_gb", None),
        "max_num_batched_tokens": getattr(args, "max_num_batched_tokens", None),
        "max_num_seqs": getattr(args, "max_num_seqs", None),
        "cpu_kv_gb": getattr(args, "cpu_kv_gb", None),
        "speedup": getattr(args, "speedup", None),
        "metrics_period_s": getattr(args, "metrics_period", None),
    }
    return load_config(
        MockerConfig, getattr(args, "config", None), overrides, env_prefix="DYNAMO_EXT_MOCKER__"
    )


async def run_fleet(
    args: argparse.Namespace, cfg: MockerConfig, ready: Callable[[MockerFleet], None]
) -> None:
    fleet = MockerFleet(
        args.workers,
        cfg,
        router=args.router,
        host=args.host,
        advertise_host=args.advertise_host,
        http_port=args.http_port,
        prefix=args.prefix,
        model=args.model,
    )
    await fleet.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    ready(fleet)
    try:
        await stop.wait()
    finally:
        await fleet.stop()


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)

    def ready(fleet: MockerFleet) -> None:
        regs = [msgspec.to_builtins(fleet.registration(w)) for w in fleet.workers.values()]
        info = {
            "workers": len(regs),
            "http": fleet.http_base,
            "metrics": fleet.metrics_endpoint,
            "router": fleet.router,
            "gpu_blocks": cfg.gpu_blocks(),
            "cpu_blocks": cfg.cpu_blocks(),
            "block_size": cfg.block_size,
            "timing": cfg.timing.name,
        }
        if args.json:
            print(json.dumps({**info, "registrations": regs}), flush=True)
        else:
            log.info("mocker fleet up: %s", json.dumps(info))

    asyncio.run(run_fleet(args, cfg, ready))
    return 0
