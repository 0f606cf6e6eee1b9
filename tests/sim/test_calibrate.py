"""The fitted step-time model (``sim.calibrate``, ``sim.model.LinearTiming``) and the
simulator check (``benchmarks/simcheck_bench.py``): the fit recovers known coefficients,
the fitted preset loads by name and reproduces its samples within the fit's error, and the
sim/real ratios come from both sides (a real 2-worker vLLM fleet, marked ``engine``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import msgspec
import pytest

from dynamo_ext.errors import ConfigError, DynamoExtError
from dynamo_ext.sim.calibrate import (
    DECODE_GRID,
    PREFILL_LENS,
    CalibrationError,
    StepSample,
    fit_samples,
    profile,
)
from dynamo_ext.sim.model import (
    FITTED_PROFILE_PATH,
    H100_PRESET,
    VLLM_CPU_FITTED,
    LinearTiming,
    MockerConfig,
    MockerCore,
    SimRequest,
    TimingModel,
    timing_preset,
)

TRUE = {
    "overhead_s": 0.004,
    "per_token_s": 2.5e-5,
    "per_pair_s": 4e-9,
    "per_ctx_s": 1.5e-7,
    "request_s": 0.003,
}

# the sample trace's head, in the repo: CI has no ../shared
HEAD = Path(__file__).parent / "fixtures" / "mooncake_synthetic_head200.jsonl"


def _synthetic(noise: float, seed: int = 0) -> list[StepSample]:
    rng = random.Random(seed)
    out = []
    for n in PREFILL_LENS:
        pairs = n * (n + 1) / 2
        t = TRUE["overhead_s"] + TRUE["request_s"] + TRUE["per_token_s"] * n
        t += TRUE["per_pair_s"] * pairs
        out.append(StepSample("ttft", n, pairs, 0.0, t * (1 + rng.gauss(0, noise))))
    for b, c in DECODE_GRID:
        ctx = b * (c + 12.0)
        t = TRUE["overhead_s"] + TRUE["per_token_s"] * b + TRUE["per_ctx_s"] * ctx
        out.append(StepSample("decode", b, 0.0, ctx, t * (1 + rng.gauss(0, noise))))
    return out


def test_fit_recovers_known_coefficients() -> None:
    exact = fit_samples(_synthetic(0.0))
    for k, v in TRUE.items():
        assert exact.coef[k] == pytest.approx(v, rel=1e-6), k
    assert exact.max_rel_error < 1e-9
    noisy = fit_samples(_synthetic(0.01, seed=3))
    for k in ("overhead_s", "per_token_s", "per_ctx_s", "request_s"):
        assert noisy.coef[k] == pytest.approx(TRUE[k], rel=0.15), k
    assert 0 < noisy.median_rel_error < 0.03


def test_fit_never_goes_negative() -> None:
    # A decode cost that falls with context would fit a negative slope; NNLS pins it at 0.
    samples = [StepSample("decode", 1, 0.0, c, 0.01 - 1e-6 * c) for c in (100, 500, 1000, 2000)]
    samples += [StepSample("prefill", n, n * (n + 1) / 2, 0.0, 0.01 + 1e-5 * n) for n in (64, 512)]
    samples += [StepSample("ttft", 256, 256 * 257 / 2, 0.0, 0.02)]
    f = fit_samples(samples)
    assert all(v >= 0 for v in f.coef.values())
    assert f.coef["per_ctx_s"] == 0.0
    with pytest.raises(CalibrationError):
        fit_samples(samples[:2])


def test_linear_timing_drives_the_core() -> None:
    t = profile(fit_samples(_synthetic(0.0)), name="test-fit")
    assert isinstance(t, TimingModel) and t.kv_bytes_per_token == 2 * 4 * 4 * 64 * 4
    assert t.step_seconds(100, 5050.0, 0) == pytest.approx(
        TRUE["overhead_s"] + 100 * TRUE["per_token_s"] + 5050 * TRUE["per_pair_s"]
    )
    cfg = MockerConfig(block_size=128, num_gpu_blocks=64, max_num_batched_tokens=2048, timing=t)
    core = MockerCore(cfg)
    r = SimRequest("a", list(range(1, 301)), 2, 0.0)
    assert core.add_request(r, 0.0)
    core.advance(0.0)
    first = core.next_time()
    assert first == pytest.approx(t.step_seconds(300, 300 * 301 / 2, 0))
    with pytest.raises(ConfigError):
        LinearTiming(overhead_s=-1.0)
    with pytest.raises(ConfigError):
        LinearTiming()  # a step of no time


def test_presets_by_name() -> None:
    assert timing_preset(H100_PRESET) == TimingModel()
    with pytest.raises(ConfigError):
        timing_preset("a100-guess")
    fitted = timing_preset(VLLM_CPU_FITTED)
    assert isinstance(fitted, LinearTiming) and fitted.name == VLLM_CPU_FITTED
    # The stored profile reproduces its own samples within the error it reports.
    doc = json.loads(FITTED_PROFILE_PATH.read_text())
    assert doc["command"].startswith("python -m dynamo_ext.sim.calibrate")
    assert msgspec.convert(doc["timing"], LinearTiming) == fitted
    rels = []
    for s in doc["samples"]:
        pred = fitted.step_seconds(s["tokens"], s["pairs"], s["ctx"])
        rel = (pred - s["seconds"]) / s["seconds"]
        assert rel == pytest.approx(s["fit_rel_residual"], abs=2e-3)
        rels.append(abs(rel))
    rels.sort()
    mid = len(rels) // 2
    median = rels[mid] if len(rels) % 2 else (rels[mid - 1] + rels[mid]) / 2
    assert median == pytest.approx(doc["fit"]["median_rel_error"], abs=1e-3)
    assert rels[-1] <= doc["fit"]["max_rel_error"] + 1e-3


def test_simcheck_sim_side_and_ratios() -> None:
    from dynamo_ext.benchmarks import simcheck_bench as sc

    rows = sc.derive_trace(HEAD, 12, 5.0, 8)
    assert len(rows) == 12 and rows[0].arrival_ms == 0 and rows[-1].arrival_ms == 5000
    assert all(r.input_length <= sc.MAX_INPUT and r.output_length <= 8 for r in rows)
    toks = [sc.prompt_tokens(r) for r in rows]
    assert all(len(t) == r.input_length for t, r in zip(toks, rows, strict=True))
    # Rows of one prefix group share their first block of tokens.
    firsts = [r.hash_ids[0] for r in rows]
    i, j = next((a, b) for a in range(12) for b in range(a + 1, 12) if firsts[a] == firsts[b])
    assert toks[i][:128] == toks[j][:128]
    out = sc.sim_vs_real(rows, ["round_robin", "kv"], Path("/nonexistent"), real=False)
    for mode in ("round_robin", "kv"):
        sim = out[mode]["sim"]
        assert sim["ttft_p50_ms"] > 0 and sim["itl_p50_ms"] > 0
        plus = out[mode]["sim_plus_request"]
        assert plus["ttft_p50_ms"] > sim["ttft_p50_ms"]
        assert plus["itl_p50_ms"] == sim["itl_p50_ms"]
    assert out["kv"]["sim"]["prefix_hit_rate"] >= out["round_robin"]["sim"]["prefix_hit_rate"]
    r = sc.ratios({"ttft_p50_ms": 3.0, "itl_p50_ms": 1.0}, {"ttft_p50_ms": 2.0, "itl_p50_ms": 0})
    assert r["ttft_p50_ms"] == 1.5 and r["itl_p50_ms"] is None


@pytest.mark.engine
def test_simcheck_against_a_real_fleet(tmp_path: Path) -> None:
    from dynamo_ext.benchmarks import simcheck_bench as sc

    rows = sc.derive_trace(HEAD, 6, 3.0, 4)
    try:
        out = sc.sim_vs_real(rows, ["round_robin"], tmp_path, real=True)["round_robin"]
    except DynamoExtError as exc:  # pragma: no cover - a fleet that failed to start
        pytest.fail(f"fleet: {exc}")
    real, sim, ratio = out["real"], out["sim"], out["ratios_sim_over_real"]
    assert real["requests"] == 6 and real["ttft_p50_ms"] > 0 and real["itl_p50_ms"] > 0
    assert real["prefix_hit_rate"] is not None  # the engines' own counters moved
    for k in sc.FIGS:
        assert ratio[k] == pytest.approx(sim[k] / real[k], rel=1e-2), k
    # the engines' own step clock, read from their histograms, beside the simulated step
    assert real["engine_itl_mean_ms"] > 0
    assert out["engine_itl_over_sim_itl"] == pytest.approx(
        real["engine_itl_mean_ms"] / sim["itl_mean_ms"], rel=1e-2
    )
