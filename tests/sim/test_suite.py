"""``dynamo-ext bench tune`` and ``bench report``: the same budget for both sides, and the
report's JSON, tables and README rewrite between the markers (tiny sizes)."""

from __future__ import annotations

import argparse
import json
import math
from array import array
from pathlib import Path

import pytest

from dynamo_ext.errors import ConfigError
from dynamo_ext.sim.report import PolicyRun, Rec

from dynamo_ext.sim import render, suite, tune
from dynamo_ext.sim.model import MockerConfig
from dynamo_ext.sim.trace import TracePrompts, load_trace

HEAD = Path(__file__).parent / "fixtures" / "mooncake_synthetic_head200.jsonl"


def test_sweep_gives_each_side_the_same_budget_defaults_first() -> None:
    rows = load_trace(HEAD, 60)
    mcfg = MockerConfig(block_size=64)
    res = tune.sweep(TracePrompts(rows, 64), mcfg, 4, 4.0, 3, sides=("ours",))
    trials = res["ours"]["trials"]
    assert len(trials) == 3 and trials[0]["knobs"] == tune.our_defaults()
    assert res["ours"]["best_objective"] == min(t["objective"] for t in trials)
    assert set(trials[1]["knobs"]) == set(tune.OUR_SPACE)
    assert set(tune.DYNAMO_SPACE) == set(tune.DYNAMO_DEFAULTS)
    assert len(tune.DYNAMO_SPACE) == len(tune.OUR_SPACE)  # equal terms: five knobs each
    for t in trials:  # the tail term is the excess over each request's own floor
        assert 0 <= t["ttft_excess_p99_ms"] <= t["ttft_p99_ms"]
        assert t["objective"] == round(
            math.sqrt(max(t["ttft_p50_ms"], 1e-3) * max(t["ttft_excess_p99_ms"], 1e-3)), 2
        )


def test_excess_p99_is_ttft_less_each_requests_floor() -> None:
    # 100 requests whose TTFT is their floor plus i ms: the floors (up to 5 s) drop out,
    # the p99 is the routing delay's. A raw-p99 objective would see 5 s here.
    floors = [5000.0 if i % 2 else 10.0 for i in range(100)]
    recs = [Rec(1.0, 100, 10, first=1.0 + (f + i) / 1e3) for i, f in enumerate(floors)]
    recs.append(Rec(1.0, 100, 10))  # never started: not counted
    run = PolicyRun("x", recs, array("d"), [], [], 0.0, 64)
    assert tune.excess_p99_ms(run, floors + [0.0]) == pytest.approx(98.01, abs=0.02)
    # a TTFT under its floor (a hit the floor did not count) is no negative delay
    run2 = PolicyRun("y", [Rec(0.0, 1, 1, first=0.001)], array("d"), [], [], 0.0, 64)
    assert tune.excess_p99_ms(run2, [50.0]) == 0.0
    with pytest.raises(ConfigError):
        tune.excess_p99_ms(run2, [])


def test_report_writes_results_tables_and_the_readme(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{suite.BEGIN}\nSTALE-TABLES\n{suite.END}\n\ntail\n")
    ap = argparse.ArgumentParser()
    suite.add_arguments(ap)
    args = ap.parse_args(
        ["--trace", str(HEAD), "--quick", "--no-dynamo", "--workloads", "noreuse",
         "--workers", "4", "--gen-workers", "2", "--out-dir", str(tmp_path / "out"),
         "--readme", str(readme)]
    )  # fmt: skip
    assert suite.main(args) == 0
    res = json.loads((tmp_path / "out" / "bench-report.json").read_text())
    assert set(res["sample_trace"]["policies"]) == {"round_robin", "kv", "kv_tuned"}
    # The same arms on engines with a CPU tier: its blocks count in the fleet limit, and the
    # engines hit it (the head's prompts repeat beyond what 4 GPUs of the tiny run hold).
    so = res["sample_trace_offload"]
    assert set(so["policies"]) == {"round_robin", "kv", "kv_tuned"}
    assert so["cpu_blocks_per_worker"] > 0
    gpu_only, tiered = res["sample_trace"]["policies"]["kv"], so["policies"]["kv"]
    assert tiered["fleet_cache_limit_hit_rate"] >= gpu_only["fleet_cache_limit_hit_rate"]
    assert gpu_only["cpu_hit_rate"] == 0.0
    fig = res["generated"]["noreuse"]["loads"]["medium"]["policies"]["kv"]
    for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms", "goodput_req_s", "prefix_hit_rate"):
        assert isinstance(fig[k], int | float)
    assert res["generated"]["noreuse"]["physical_limit_hit_rate"] == 0.0
    text = readme.read_text()
    assert "STALE-TABLES" not in text and text.endswith("tail\n") and "| round_robin |" in text
    assert "**noreuse**" in text
    assert "**Sample trace, engines with a CPU tier**" in text


def _row(p50: float, p99: float, good: float, hit: float = 0.5, slo: float = 1.0) -> dict:
    return {
        "ttft_p50_ms": p50,
        "ttft_p99_ms": p99,
        "goodput_req_s": good,
        "hit_rate_of_limit": hit,
        "slo_attainment": slo,
    }


def test_the_verdict_is_computed_from_the_rows_and_names_every_miss() -> None:
    """The README's lead/trail table and targets come from the rows, not from a hand: ours
    trails where any figure is worse than Dynamo's better row (default or tuned)."""
    res = {
        "sample_trace": {
            "policies": {
                "round_robin": _row(300, 900, 5),
                "kv": _row(100, 800, 10, 0.9, 0.95),
                "dynamo_core": _row(120, 700, 9),
                "dynamo_core_tuned": _row(150, 900, 11, slo=0.97),
            }
        },
        "generated": {
            "chat": {
                "loads": {
                    "low": {"policies": {"kv": _row(10, 20, 5), "dynamo_core": _row(11, 21, 5)}}
                }
            }
        },
    }
    res["sample_trace_offload"] = {
        "policies": {"kv": _row(50, 600, 12, 0.87), "dynamo_core": _row(60, 650, 11)}
    }
    # seed by seed: ours ahead at p50 in both, at p99 in one, at goodput (a tie) in both
    chat = res["generated"]["chat"]["loads"]["low"]["policies"]
    chat["kv"]["per_seed"] = {"ttft_p50_ms": [9, 11], "ttft_p99_ms": [18, 22], "goodput_req_s": [5, 5]}
    chat["kv"]["load_imbalance"] = 1.3
    chat["dynamo_core"]["per_seed"] = {
        "ttft_p50_ms": [10, 12], "ttft_p99_ms": [21, 21], "goodput_req_s": [5, 5]
    }
    chat["dynamo_core"]["load_imbalance"] = 1.1
    text = "\n".join(render.verdict_markdown(res))
    assert "| leads | 0.50 | 2/2 · 1/2 · 2/2 | -9.2 ± 1.2 · -4.8 ± 13.5 · +0.0 ± 0.0 | 1.30 / 1.10 |" in text
    assert "| **trails** | 0.90 | - | - | - |" in text  # one run, no imbalance given
    assert "| sample trace, CPU tier | -16.7% | -7.7% | +9.1% |" in text
    assert "with a CPU tier on every engine: 0.87 of the limit (met)" in text
    assert "| sample trace | -16.7% | +14.3% | -9.1% | 95.0% / 100.0% | **trails** | 0.90 |" in text
    assert "| chat / low | -9.1% | -4.8% | +0.0% | 100.0% / 100.0% | leads |" in text
    assert "3.0x (target 2x, met)" in text
    assert "0.90 (target 0.85, met)" in text
    assert "whoever routes" not in text  # no limits given: no claim about them
    res["sample_trace"]["policies"]["kv"].update(
        hit_rate_of_limit=0.6, physical_limit_hit_rate=0.66, fleet_cache_limit_hit_rate=0.49
    )
    text = "\n".join(render.verdict_markdown(res))
    assert "0.60 (target 0.85, **not met**)" in text
    assert "0.561, above the fleet-cache limit 0.490: the fleet's caches cannot hold it" in text
    res["sample_trace"]["policies"]["kv"]["fleet_cache_limit_hit_rate"] = 0.6
    assert "whoever routes" not in "\n".join(render.verdict_markdown(res))
    assert "**not met** on sample trace" in text and "chat / low" not in text.split("not met")[-1]


def test_a_trail_inside_the_seeds_spread_is_marked_and_still_a_miss() -> None:
    """Seed by seed differences as mean ± deviation; a worse figure whose mean is no larger
    than its deviation is marked, and the row still trails (the target is still missed)."""
    ours = _row(101, 100, 5)
    peer = _row(100, 100, 5)
    ours["per_seed"] = {"ttft_p50_ms": [90, 113], "ttft_p99_ms": [100, 100], "goodput_req_s": [5, 5]}
    peer["per_seed"] = {"ttft_p50_ms": [100, 100], "ttft_p99_ms": [100, 100], "goodput_req_s": [5, 5]}
    res = {
        "sample_trace": {"policies": {"kv": _row(1, 1, 1), "dynamo_core": _row(1, 1, 1)}},
        "generated": {"chat": {"loads": {"low": {"policies": {"kv": ours, "dynamo_core": peer}}}}},
    }
    text = "\n".join(render.verdict_markdown(res))
    assert "| **trails** (within seed spread) | 0.50 | 1/2 · 2/2 · 2/2 | +1.5 ± 16.3 · +0.0 ± 0.0 · +0.0 ± 0.0 |" in text
    assert "**not met** on chat / low" in text
    ours["per_seed"]["ttft_p50_ms"] = [101, 101]  # worse in every seed: no spread to hide in
    text = "\n".join(render.verdict_markdown(res))
    assert "| **trails** | 0.50 | 0/2 · 2/2 · 2/2 | +1.0 ± 0.0 ·" in text


def test_mean_figures_keep_the_verdict_figures_per_seed() -> None:
    runs = [_row(10, 20, 5), _row(30, 40, 7)]
    m = suite._mean_figures(runs)
    assert m["ttft_p50_ms"] == 20 and m["seeds"] == 2
    assert m["per_seed"] == {
        "ttft_p50_ms": [10, 30], "ttft_p99_ms": [20, 40], "goodput_req_s": [5, 7]
    }
    assert "per_seed" not in suite._mean_figures(runs[:1])


def test_render_is_a_function_of_the_results_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: the route-cost table's "load average at the end" was read when the Markdown was
    rendered, so re-rendering a results JSON later printed that moment's load. Now the run
    records its host and rendering reads nothing live."""
    results = Path(__file__).parents[2] / "docs" / "bench" / "bench-report.json"
    res = json.loads(results.read_text())
    rc = res["route_cost"]
    rc["host"] = {"cpus": 2, "load_avg_1m_end": 3.26}

    def no(*_: object) -> None:
        raise AssertionError("rendering read the live host")

    monkeypatch.setattr("os.getloadavg", no)
    monkeypatch.setattr("os.cpu_count", no)
    md = render.markdown(res)
    assert "2 CPUs, load average 3.3 at the end" in md
    assert md == render.markdown(res)
    del rc["host"]  # an older results file: said so, not guessed
    assert "host not recorded" in render.markdown(res)
