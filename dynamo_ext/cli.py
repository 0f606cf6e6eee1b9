"""``dynamo-ext``: the one command line of the project.

dynamo-ext router [--config FILE] [--bind EP] [--block-size N] ...   run the router sidecar
dynamo-ext router --demo                                             router + synthetic fleet
dynamo-ext bench router [--workers 8,64,256] [--blocks N] [--json]   router hot-path benchmark
dynamo-ext bench pool [--root DIR] [--chunk-mb N] [--total-mb N] [--json]   KV pool vs plain I/O
dynamo-ext keys gen DIR --name NAME                                  CURVE key pair files
dynamo-ext keys show FILE                                            public key and key id
dynamo-ext worker vllm|sglang MODEL --role R --router EP [--print]   run a worker (or print it)
dynamo-ext serve [--workers N | --prefill N --decode M]              a whole local fleet
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

from dynamo_ext.errors import ConfigError

log = logging.getLogger(__name__)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _parse_worker(spec: str) -> dict[str, Any]:
    """``id=w0,kv=tcp://h:5557,replay=tcp://h:5558,metrics=tcp://h:5559,http=http://h:8000``"""
    keys = {
        "id": "worker_id",
        "role": "role",
        "kv": "kv_events_endpoint",
        "topic": "kv_events_topic",
        "replay": "replay_endpoint",
        "metrics": "metrics_endpoint",
        "http": "http_endpoint",
        "nixl": "nixl_endpoint",
    }
    out: dict[str, Any] = {}
    for part in spec.split(","):
        k, sep, v = part.partition("=")
        if not sep or k not in keys:
            raise ConfigError("--worker", f"bad item {part!r} in {spec!r} (keys: {sorted(keys)})")
        out[keys[k]] = v
    if "worker_id" not in out:
        raise ConfigError("--worker", f"{spec!r} has no id=")
    return out


def _router_main(args: argparse.Namespace) -> int:
    from dynamo_ext.config import RouterConfig, load_config
    from dynamo_ext.router.server import RouterServer

    overrides: dict[str, Any] = {
        "bind": args.bind,
        "metrics_port": args.metrics_port,
        "block_size": args.block_size,
        "hash_mode": args.hash_mode,
        "hash_algo": args.hash_algo,
        "worker_timeout_s": args.worker_timeout,
    }
    if args.scorer:
        overrides["scorer"] = {"mode": args.scorer}
    if args.log_decisions:
        overrides["log_decisions"] = True
    if args.insecure:
        overrides["insecure"] = True
    if args.worker:
        overrides["workers"] = [_parse_worker(w) for w in args.worker]
    if args.demo:
        from dynamo_ext.router.demo import run_demo

        return asyncio.run(run_demo(args.demo_workers, args.demo_requests))
    cfg = load_config(RouterConfig, args.config, overrides)

    async def main() -> None:
        srv = RouterServer(cfg)
        await srv.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("router shutting down")
        await srv.stop()

    asyncio.run(main())
    return 0


def _frontend_main(args: argparse.Namespace) -> int:
    from dynamo_ext.config import load_config
    from dynamo_ext.frontend.app import run
    from dynamo_ext.frontend.config import FrontendConfig

    overrides: dict[str, Any] = {
        "model": args.model,
        "served_model_name": args.served_model_name,
        "host": args.host,
        "port": args.port,
        "router": args.router,
        "max_model_len": args.max_model_len,
        "min_remote_prefill_tokens": args.min_remote_prefill_tokens,
        "migration_limit": args.migration_limit,
        "routing_backend": args.routing_backend,
    }
    if args.no_disaggregation:
        overrides["disaggregation"] = False
    cfg = load_config(FrontendConfig, args.config, overrides, env_prefix="DYNAMO_EXT_FRONTEND__")
    run(cfg)
    return 0


def _bench_main(args: argparse.Namespace) -> int:
    if args.what == "router":
        from dynamo_ext.benchmarks.router_bench import run

        workers = [int(x) for x in args.workers.split(",")]
        res = run(
            workers, args.blocks, args.queries, peer=not args.no_peer, curve=not args.no_curve
        )
        if args.json:
            print(json.dumps(res))
        else:
            print(json.dumps(res, indent=2))
        return 0
    raise ConfigError("bench", f"unknown benchmark {args.what!r}")  # pragma: no cover


def _keys_main(args: argparse.Namespace) -> int:
    from dynamo_ext import security

    if args.what == "gen":
        sec, pub = security.generate_keys(args.dir, args.name, force=args.force)
        public = security.load_public(str(pub))
        print(f"secret {sec}\npublic {pub}\nkey {public.decode()}\nid {security.key_id(public)}")
        return 0
    public = security.load_public(args.file, "FILE")
    print(f"{public.decode()} {security.key_id(public)}")
    return 0


def _worker_main(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        from dynamo_ext.plugins.vllm import worker_cmd
    else:
        from dynamo_ext.plugins.sglang import worker_cmd  # type: ignore[no-redef]
    return worker_cmd.main(args.argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamo-ext", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("router", help="run the KV-aware router sidecar")
    r.add_argument("--config", help="YAML or TOML file (RouterConfig fields)")
    r.add_argument("--bind", help="control socket, e.g. tcp://0.0.0.0:5600")
    r.add_argument("--metrics-port", type=int, help="Prometheus port (0: any free port)")
    r.add_argument("--block-size", type=int, help="tokens per KV block, as the engines")
    r.add_argument("--hash-mode", choices=["engine", "tokens"])
    r.add_argument("--hash-algo", help="engine hash: sha256 | sha256_cbor | xxhash | xxhash_cbor")
    r.add_argument("--scorer", choices=["kv", "dynamo", "round_robin", "random", "least_loaded"])
    r.add_argument("--worker-timeout", type=float, help="seconds without metrics: worker down")
    r.add_argument(
        "--worker",
        action="append",
        help="static worker: id=w0,kv=tcp://h:5557,replay=...,metrics=...,http=...",
    )
    r.add_argument("--log-decisions", action="store_true", help="log every decision's breakdown")
    r.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback bind without CURVE keys (anyone on the network may speak)",
    )
    r.add_argument(
        "--demo",
        action="store_true",
        help="run the router with a synthetic fleet over real sockets and exit",
    )
    r.add_argument("--demo-workers", type=int, default=4)
    r.add_argument("--demo-requests", type=int, default=40)
    r.set_defaults(func=_router_main)

    b = sub.add_parser("bench", help="benchmarks (JSON output)")
    bsub = b.add_subparsers(dest="what", required=True)
    br = bsub.add_parser("router", help="router hot path vs Dynamo's radix tree")
    br.add_argument("--workers", default="8,64,256", help="fleet sizes, comma separated")
    br.add_argument("--blocks", type=int, default=1_000_000, help="blocks indexed per fleet")
    br.add_argument("--queries", type=int, default=2000, help="route calls timed per size")
    br.add_argument("--no-peer", action="store_true", help="skip Dynamo's radix tree baseline")
    br.add_argument("--no-curve", action="store_true", help="skip the CURVE vs plaintext sockets")
    br.add_argument("--json", action="store_true", help="one JSON object on one line")
    br.set_defaults(func=_bench_main)
    from dynamo_ext.benchmarks import (
        engines_report,
        pool_bench,
        prefetch_bench,
        prefill_bench,
        route_cost_bench,
        serve_bench,
        simcheck_bench,
        stall_bench,
        vllm_router_bench,
    )
    from dynamo_ext.sim import chaos, replay, suite, tune, workloads

    # benchmarks that declare their own arguments (add_arguments) and run through main(args)
    for name, mod, help_ in (
        ("prefill", prefill_bench, "batch prefill scheduler vs vLLM's stock scheduler"),
        ("serve", serve_bench, "prefix-sharing load through the frontend, per router mode"),
        ("replay", replay, "replay a Mooncake trace through simulated workers"),
        ("tune", tune, "the same sweep budget over our scorer's knobs and Dynamo's"),
        ("workload", workloads, "write a generated workload (chat, tenants, ...) as a trace"),
        ("report", suite, "tune, replay the sample trace and generated workloads, write README"),
        ("prefetch", prefetch_bench, "TTFT of disk/pool-only prefixes, with/without prefetch"),
        ("pool", pool_bench, "KV pool write/read MB/s vs plain files on the same disk"),
        ("route-cost", route_cost_bench, "a route as the caller pays it, beside Dynamo's select"),
        ("stall", stall_bench, "short-route latency while the router hashes a huge prompt"),
        ("chaos", chaos, "real router + mocker fleet under seeded faults, invariants checked"),
        ("vllm-router", vllm_router_bench, "live replay: ours, Dynamo's core, vllm-router"),
        ("simcheck", simcheck_bench, "simulator vs real vLLM fleet; round robin vs Dynamo's"),
        ("engines", engines_report, "serve, prefill, prefetch, pool benchmarks; write README"),
    ):
        bm = bsub.add_parser(name, help=help_)
        mod.add_arguments(bm)
        bm.set_defaults(func=mod.main)

    fe = sub.add_parser("frontend", help="OpenAI-compatible HTTP frontend over the router")
    fe.add_argument("--config", help="YAML or TOML file (FrontendConfig fields)")
    fe.add_argument("--model", help="model folder (tokenizer, chat template)")
    fe.add_argument("--served-model-name")
    fe.add_argument("--host")
    fe.add_argument("--port", type=int)
    fe.add_argument("--router", help="router control socket, e.g. tcp://127.0.0.1:5600")
    fe.add_argument("--max-model-len", type=int)
    fe.add_argument(
        "--no-disaggregation", action="store_true", help="never use remote prefill workers"
    )
    fe.add_argument("--min-remote-prefill-tokens", type=int)
    fe.add_argument("--migration-limit", type=int)
    fe.add_argument("--routing-backend", choices=("router", "dynamo_core", "embedded"), help="who picks")
    fe.set_defaults(func=_frontend_main)

    k = sub.add_parser("keys", help="CURVE key files for the ZeroMQ planes")
    ksub = k.add_subparsers(dest="what", required=True)
    kg = ksub.add_parser("gen", help="write DIR/NAME.key (secret, 0600) and DIR/NAME.key.pub")
    kg.add_argument("dir")
    kg.add_argument("--name", required=True)
    kg.add_argument("--force", action="store_true", help="replace existing files")
    ks = ksub.add_parser("show", help="print a key file's public key and key id")
    ks.add_argument("file")
    k.set_defaults(func=_keys_main)

    # dynamo-ext worker vllm|sglang MODEL ... [-- engine args]: the engine's module parses
    # everything after the engine name itself ("+" prefix: argparse leaves "--x" alone)
    wk = sub.add_parser("worker", help="run (or --print) a vLLM/SGLang worker of the fleet")
    wsub = wk.add_subparsers(dest="engine", required=True)
    for engine in ("vllm", "sglang"):
        we = wsub.add_parser(engine, add_help=False, prefix_chars="+", help=f"{engine} worker")
        we.add_argument("argv", nargs=argparse.REMAINDER)
        we.set_defaults(func=_worker_main)

    from dynamo_ext.plugins.vllm import serve as serve_cmd

    sv = sub.add_parser("serve", help="router + frontend + supervised vLLM workers, locally")
    serve_cmd.add_arguments(sv)
    sv.set_defaults(func=serve_cmd.main)

    from dynamo_ext.sim import cli as mocker_cli

    m = sub.add_parser("mocker", help="simulated vLLM workers (KV events, metrics, HTTP)")
    mocker_cli.add_arguments(m)
    m.set_defaults(func=mocker_cli.main)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"dynamo-ext: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
