"""``dynamo-ext bench vllm-router [TRACE]``: vLLM's own router (``vllm-router`` 0.1.17) as
the third arm of one live replay, beside ours and Dynamo's SelectionService, each given
the same tuning budget over its own knobs.

Every arm replays the same trace through a fresh mocker fleet over real sockets
(``sim.replay --live``): ``round_robin`` and ``kv`` through our router process,
``dynamo_core`` through Dynamo's SelectionService, ``vllm_router_kv`` (kv_aware on the
fleet's KV events) and ``vllm_router_cache`` (cache_aware, its approximate prompt tree)
through vllm-router's HTTP proxy (``sim.vllm_router``). Figures are the engines' own:
TTFT p50/p90/p99, ITL, e2e, goodput, prefix hit rate.
Virtual time runs ``--time-scale`` (default 2) times the wall clock: at replay's 10 a
scheduling stall of a loaded machine is ten times longer in the figures (one arm's TTFT p50
read 1.1 s in one run and 43 s in the next, same settings, on a 2-core machine shared).

``--budget N`` (default 1: shipped defaults only) tunes each vllm-router arm by ``N`` live
replays of that arm alone, its defaults first and then settings drawn (seeded) from
``sim.vllm_router.TUNE_SPACE``, keeping the lowest objective of ``bench tune`` (geometric
mean of TTFT p50 and p99); the final replay runs every arm, the vllm-router ones with
their best settings. Our scorer and Dynamo's get the same budget from ``bench tune``
(virtual time, same objective); in this live replay our ``kv`` arm runs the router's
defaults and ``dynamo_core`` Dynamo's unless ``--dynamo-knobs`` is given.

``--diagnose`` first runs the experiment that found kv_aware's configuration
(``sim.vllm_router.diagnose``: a prompt cached on a chosen worker, then repeated through
vllm-router on vLLM's empty topic with the engines' block size, on topic ``kv``, and with
``--kv-event-block-size 16``).

JSON out: ``{"replay": <bench replay --live JSON>, "tuning": {arm: {...}}, "diagnosis"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path
from typing import Any

from dynamo_ext.errors import ConfigError
from dynamo_ext.sim import replay
from dynamo_ext.sim.tune import objective
from dynamo_ext.sim.vllm_router import (
    DEFAULTS,
    TUNE_SPACE,
    VLLM_ROUTER_POLICIES,
    binary,
    diagnose,
    draw,
)

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "synthetic_trace.jsonl"
ARMS = "round_robin,kv,dynamo_core,vllm_router_kv,vllm_router_cache"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", nargs="?", default=str(SAMPLE), help="Mooncake trace (JSON lines)")
    p.add_argument("--policies", default=ARMS, help=f"replay arms (default {ARMS})")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--limit", type=int, default=300, help="first K requests")
    p.add_argument("--speedup", type=float, default=1.0, help="arrival speedup (load)")
    p.add_argument(
        "--time-scale", type=float, default=2.0, help="virtual s per wall s (low: less noise)"
    )
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--budget", type=int, default=1, help="live replays per vllm-router arm")
    p.add_argument("--seed", type=int, default=0, help="tuning draws")
    p.add_argument("--dynamo-knobs", help="dynamo_core's KvRouterConfig knobs (JSON)")
    p.add_argument("--diagnose", action="store_true", help="run the kv_aware config probe")
    p.add_argument("--json", action="store_true", help="one JSON line only")


def _replay_args(
    common: dict[str, Any],
    policies: str,
    vllm_knobs: dict[str, float],
    dynamo_knobs: str | None,
) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    replay.add_arguments(ap)
    argv = [common["trace"], "--live", "--json", "--plot", "none", "--policies", policies]
    for k in ("workers", "limit", "speedup", "time_scale", "block_size"):
        argv += ["--" + k.replace("_", "-"), str(common[k])]
    if vllm_knobs:
        argv += ["--vllm-router-knobs", json.dumps(vllm_knobs)]
    if dynamo_knobs:
        argv += ["--dynamo-knobs", dynamo_knobs]
    return ap.parse_args(argv)


def run(
    trace: str = str(SAMPLE),
    policies: str = ARMS,
    workers: int = 8,
    limit: int = 300,
    speedup: float = 1.0,
    time_scale: float = 2.0,
    block_size: int = 64,
    budget: int = 1,
    seed: int = 0,
    dynamo_knobs: str | None = None,
    diagnosis: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """The live replay of every arm in ``policies``, the vllm-router arms tuned with
    ``budget`` live replays each; ``{"replay", "tuning", "diagnosis"?}``."""
    if budget < 1:
        raise ConfigError("budget", f"must be >= 1, got {budget}")
    names = [n.strip() for n in policies.split(",") if n.strip()]
    vr = [n for n in names if n in VLLM_ROUTER_POLICIES]
    if vr and binary() is None:
        raise ConfigError("policies", "vllm-router not installed (pip install vllm-router==0.1.17)")
    out: dict[str, Any] = {}
    if diagnosis:
        out["diagnosis"] = asyncio.run(diagnose())
    common = {
        "trace": trace,
        "workers": workers,
        "limit": limit,
        "speedup": speedup,
        "time_scale": time_scale,
        "block_size": block_size,
    }
    tuning: dict[str, Any] = {}
    best_knobs: dict[str, float] = {}
    rng = random.Random(seed)
    for name in vr if budget > 1 else []:
        pol = VLLM_ROUTER_POLICIES[name]
        trials = []
        for i in range(budget):
            knobs = dict(DEFAULTS[pol]) if i == 0 else draw(TUNE_SPACE[pol], rng)
            knobs = {k: v for k, v in knobs.items() if k in TUNE_SPACE[pol]}
            args = _replay_args(common, name, knobs, None)
            fig = asyncio.run(replay.run_live(args))["policies"][name]
            trials.append({"knobs": knobs, "objective": round(objective(fig), 2), **_short(fig)})
            if progress:
                print(f"  {name} trial {i}: {trials[-1]}", file=sys.stderr, flush=True)
        best = min(trials, key=lambda t: t["objective"])
        tuning[name] = {
            "best": best["knobs"],
            "best_objective": best["objective"],
            "trials": trials,
        }
        if best is not trials[0]:
            best_knobs.update(best["knobs"])
    args = _replay_args(common, ",".join(names), best_knobs, dynamo_knobs)
    out["replay"] = asyncio.run(replay.run_live(args))
    out["tuning"] = tuning
    out["budget"] = budget
    return out


def _short(fig: dict[str, Any]) -> dict[str, Any]:
    keys = ("ttft_p50_ms", "ttft_p99_ms", "prefix_hit_rate", "goodput_req_s")
    return {k: fig[k] for k in keys}


def main(args: argparse.Namespace) -> int:
    res = run(
        args.trace,
        args.policies,
        args.workers,
        args.limit,
        args.speedup,
        args.time_scale,
        args.block_size,
        args.budget,
        args.seed,
        args.dynamo_knobs,
        args.diagnose,
        progress=not args.json,
    )
    if not args.json:
        from dynamo_ext.sim.report import table

        print(table(res["replay"]["policies"]))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":  # pragma: no cover - the CLI is dynamo-ext bench vllm-router
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
