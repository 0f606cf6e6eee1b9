"""``dynamo-ext bench engines``: the benchmarks on real vLLM engines and on the disk, run by
one command that writes their results JSON and the README's tables (between
``<!-- bench-engines:begin -->`` and ``<!-- bench-engines:end -->``), so that no figure of
theirs is typed by hand.

Each benchmark runs as its own ``dynamo-ext bench NAME --json`` process, with its defaults
(the commands are written beside each table): ``serve`` (round robin against KV routing
through the frontend on a 2-worker vLLM fleet), ``prefill`` (the batch prefill scheduler
against vLLM's stock scheduler), ``prefetch`` (router-driven prefetch of pool-only
prefixes) and ``pool`` (the KV pool against plain files on the same disk). A benchmark that
fails is reported as failed, with its exit status, and the others still run. ``serve-ab``
is ``bench serve --routing-backend router,dynamo_core --rounds 3``: one real fleet routed by
our router and by Dynamo's core in the frontend, judged by the engines' own counters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- bench-engines:begin -->", "<!-- bench-engines:end -->"
BENCHES = ("serve", "serve-ab", "prefill", "prefetch", "pool")
# The command line of each (after ``dynamo-ext bench``); --json is added.
_ARGS = {"serve-ab": ["serve", "--routing-backend", "router,dynamo_core", "--rounds", "3"]}


def _last_json(stdout: str) -> dict[str, Any]:
    """The benchmark's result: its last line, or the last JSON object it printed indented."""
    lines = stdout.strip().splitlines()
    if lines:
        try:
            out = json.loads(lines[-1])
            if isinstance(out, dict):
                return out
        except json.JSONDecodeError:
            pass
    starts = [i for i, line in enumerate(lines) if line.startswith("{")]
    for i in reversed(starts):
        try:
            out = json.loads("\n".join(lines[i:]))
        except json.JSONDecodeError:
            continue
        if isinstance(out, dict):
            return out
    raise ValueError("no JSON object in the benchmark's output")


def run_one(name: str, timeout_s: float = 1800.0) -> dict[str, Any]:
    argv = [*_ARGS.get(name, [name]), "--json"]
    cmd = [sys.executable, "-m", "dynamo_ext.cli", "bench", *argv]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    wall = round(time.monotonic() - t0, 1)
    res: dict[str, Any] = {"command": " ".join(["dynamo-ext bench", *argv]), "wall_s": wall}
    if p.returncode != 0:
        return {**res, "failed": p.returncode, "stderr_tail": p.stderr[-2000:]}
    try:
        res["result"] = _last_json(p.stdout)
    except ValueError as exc:
        return {**res, "failed": "no result", "stderr_tail": f"{exc}\n{p.stderr[-2000:]}"}
    return res


def _serve(r: dict[str, Any]) -> list[str]:
    out = [
        "| router | TTFT p50 / p90 / p99 (ms) | ITL p50 (ms) | tok/s | frontend hit rate | lost |",
        "|---|---|---|---|---|---|",
    ]
    for mode, m in r["modes"].items():
        out.append(
            f"| {mode} | {m['ttft_p50_ms']} / {m['ttft_p90_ms']} / {m['ttft_p99_ms']} | "
            f"{m['itl_p50_ms']} | {m['throughput_tok_s']} | "
            f"{m.get('frontend_prefix_hit_rate')} | {m['lost']} |"
        )
    if "ttft_p50_ratio_rr_over_kv" in r:
        out += [
            "",
            f"Round robin over KV routing: TTFT p50 {r['ttft_p50_ratio_rr_over_kv']}x, p90 "
            f"{r['ttft_p90_ratio_rr_over_kv']}x ({r['workers']} workers, {r['requests']} "
            "requests).",
        ]
    return out


def _serve_ab(r: dict[str, Any]) -> list[str]:
    out = [
        f"{r['workers']} vLLM workers, {r['requests']} requests at concurrency "
        f"{r['concurrency']}, {r['rounds']} rounds (medians; prefix caches reset between "
        f"arms); judged by {r['judge']}:",
        "",
        "| routing backend | TTFT p50 / p90 (ms) | engine hit rate (per round) | cached token "
        "share | predicted / reported cached tokens |",
        "|---|---|---|---|---|",
    ]
    for b, m in r["backends"].items():
        per = " / ".join(str(x["engine_hit_rate"]) for x in m.get("rounds", [])) or str(
            m["engine_hit_rate"]
        )
        out.append(
            f"| {b} | {m['ttft_p50_ms']} / {m['ttft_p90_ms']} | {per} | "
            f"{m.get('cached_token_share')} | {m.get('predicted_cached_tokens')} / "
            f"{m.get('reported_cached_tokens')} |"
        )
    if "engine_hit_rate_router_minus_dynamo" in r:
        out += [
            "",
            "Ours minus Dynamo's core, engine hit rate: "
            f"{r['engine_hit_rate_router_minus_dynamo']:+}; TTFT p50 Dynamo over ours "
            f"{r['ttft_p50_ratio_dynamo_over_router']}x.",
        ]
    return out


def _prefill(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    out = [
        f"{c['requests']} prompts of ~{c['prompt_words']} tokens x {c['rounds']} rounds, "
        f"concurrency {c['concurrency']}, max_tokens 1, max wait {c['max_wait_ms']} ms:",
        "",
        "| scheduler | engine steps | prefill tokens / step | TTFT p50 / p90 (s) | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for name in ("stock", "batch"):
        s = r[name]
        out.append(
            f"| {name} | {s['steps']:.0f} | {s['prefill_tokens_per_step']} | "
            f"{s['ttft_p50_s']} / {s['ttft_p90_s']} | {s['wall_s']} |"
        )
    rat = r["ratios_batch_over_stock"]
    out += ["", "Batch over stock: " + ", ".join(f"{k} {v}x" for k, v in rat.items()) + "."]
    return out


def _prefetch(r: dict[str, Any]) -> list[str]:
    out = [
        f"{r['prefixes']} pool-only prefixes per run, prefetched {r['lead_ms']:.0f} ms ahead "
        "or not, alternately (TTFT p50):",
        "",
        "| pool read cost | with prefetch (s) | without (s) | ratio | chunks staged ahead "
        "(prefetch arm) / read on the request's path (baseline arm) |",
        "|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        where = (
            "the worker's own disk tier"
            if run["source"] == "disk"
            else f"pool + {run['emulated_latency_ms']:g} ms per chunk"
        )
        out.append(
            f"| {where} | {run['prefetch']['ttft_p50_s']} | {run['baseline']['ttft_p50_s']} | "
            f"{run['ttft_ratio_prefetch_vs_baseline']} | {run['chunks_staged']} / "
            f"{run['chunks_read_on_path']} |"
        )
    return out


def _pool(r: dict[str, Any]) -> list[str]:
    out = [
        f"{r['chunk_bytes'] >> 20} MiB chunks, {r['chunks_per_repeat']} per side per repeat, "
        f"{r['repeats']} repeats alternating which side goes first, checksum {r['checksum']}; "
        "ratios are pool over plain files on the same disk:",
        "",
        "| page cache | write MB/s pool / plain | read MB/s pool / plain | write ratio | read "
        "ratio |",
        "|---|---|---|---|---|",
    ]
    for regime, g in r.get("regimes", {}).items():
        out.append(
            f"| {regime} | {g['write_mb_s_pool']} / {g['write_mb_s_plain']} | "
            f"{g['read_mb_s_pool']} / {g['read_mb_s_plain']} | {g['write_ratio_vs_plain']} | "
            f"{g['read_ratio_vs_plain']} |"
        )
    sw = r.get("sweep")
    if sw:
        out += [
            "",
            f"Sweep ({sw['chunks']} chunks, {sw['removed']} removed): a full scan "
            f"{sw['full_scan_ms']} ms, the sweeper's scan and journal "
            f"{sw['sweeper_scan_and_journal_ms']} ms, following its journal "
            f"{sw['follow_journal_ms']} ms "
            f"({sw['per_worker_ratio_vs_full_scan']}x a full scan).",
        ]
    out += ["", f"Target (cold, >= 0.8 of plain): {'met' if r.get('target_met') else 'not met'}."]
    return out


_RENDER = {
    "serve": _serve,
    "serve-ab": _serve_ab,
    "prefill": _prefill,
    "prefetch": _prefetch,
    "pool": _pool,
}
_TITLE = {
    "serve": "Real engines through the frontend",
    "serve-ab": "Our router against Dynamo's core on one real fleet",
    "prefill": "Batch prefill",
    "prefetch": "Router-driven prefetch",
    "pool": "KV pool backend",
}


def markdown(res: dict[str, Any]) -> str:
    host = res["host"]
    out = [
        f"Produced by `{res['command']}` ({res['wall_s']} s) on {host['cpus']} CPUs (load "
        f"average {host['load_avg_1m']} at the start); results in `{res['results']}`.",
    ]
    for name, b in res["benches"].items():
        out += ["", f"**{_TITLE.get(name, name)}** (`{b['command']}`, {b['wall_s']} s):", ""]
        if "failed" in b:
            out.append(f"Failed ({b['failed']}): see the results JSON.")
            continue
        try:
            out += _RENDER[name](b["result"])
        except (KeyError, TypeError) as exc:  # a result of another shape: say so, keep going
            out.append(f"Result not rendered ({type(exc).__name__}: {exc}); see the JSON.")
    return "\n".join(out) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", default="", help=f"subset of {','.join(BENCHES)}")
    p.add_argument("--out-dir", default="out", help="results JSON")
    p.add_argument("--readme", default="", help="README to rewrite between the markers")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per benchmark")


def main(args: argparse.Namespace) -> int:
    names = [n for n in (args.only.split(",") if args.only else BENCHES) if n]
    bad = [n for n in names if n not in BENCHES]
    if bad:
        print(f"unknown benchmarks {bad}; choose from {','.join(BENCHES)}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    host = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    benches: dict[str, Any] = {}
    for n in names:
        print(f"bench engines: {n}", file=sys.stderr, flush=True)
        benches[n] = run_one(n, args.timeout_s)
    argv = sys.argv[sys.argv.index("engines") + 1 :] if "engines" in sys.argv else []
    results = out_dir / "bench-engines.json"
    res = {
        "command": " ".join(["dynamo-ext bench engines", *argv]),
        "wall_s": round(time.monotonic() - t0, 1),
        "host": host,
        "results": str(results),
        "benches": benches,
    }
    results.write_text(json.dumps(res, indent=1))
    md = markdown(res)
    from dynamo_ext.sim.render import write_readme  # one marker-block writer for both reports

    if args.readme and not write_readme(Path(args.readme), md, BEGIN, END):
        print(f"{args.readme} has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    failed = [n for n, b in benches.items() if "failed" in b]
    print(json.dumps({"results": str(results), "failed": failed}))
    return 1 if any("failed" in b for b in benches.values()) else 0
