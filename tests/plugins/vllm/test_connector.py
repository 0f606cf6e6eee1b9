"""``DynamoExtConnector`` in real vLLM servers: prefill/decode disaggregation over NIXL.

One prefill (``kv_producer``) and one decode (``kv_consumer``) server with our connector,
named by ``kv_connector`` alone (the plugin's ``vllm.general_plugins`` entry point registers
it). Covers: the plugin constructs our class on both sides of each engine; a prompt prefilled
on P and decoded on D gives the tokens (and logprobs) of the same request computed on one
instance, and D's own counters show it read every prompt token over the connector and
computed none; D serves a plain request by prefilling locally (conditional disaggregation);
bad connector config stops vLLM at start with an error naming the field; latency of P->D vs
one instance. The reference "aggregated" run is a plain request (no ``kv_transfer_params``)
with its own ``cache_salt`` on P: a connector instance serves it exactly as an instance
without one (P's counters prove it computed the whole prompt), and no third server is needed.

At most two vLLM servers run at a time: the bad-config servers first (they exit on their
own), then P and D, which are stopped when this module ends.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dynamo_ext.errors import ConfigError
from dynamo_ext.plugins.vllm.config import validate_connector_config
from dynamo_ext.plugins.vllm.disagg import (
    DisaggError,
    decode_params,
    decode_request,
    prefill_request,
    why_not_disaggregable,
)
from dynamo_ext.plugins.vllm.launcher import EngineStartError, VllmServer, log_tail
from dynamo_ext.testing import free_port
from dynamo_ext.testing.tiny_model import english_like_text

MAX_TOKENS = 16
# english_like_text gives ~1.1 tokens a word: prompts of ~310, ~500 and ~690 tokens.
PROMPT_WORDS = ((280, 101), (450, 102), (620, 103))


def kv_transfer_args(kv_role: str, extra: dict[str, Any] | None = None) -> list[str]:
    cfg: dict[str, Any] = {
        "kv_connector": "DynamoExtConnector",
        "kv_role": kv_role,
        "kv_buffer_device": "cpu",
    }
    if extra is not None:
        cfg["kv_connector_extra_config"] = extra
    return ["--kv-transfer-config", json.dumps(cfg)]


def post(url: str, body: dict[str, Any], timeout: float = 180.0) -> dict[str, Any]:
    r = httpx.post(url + "/v1/completions", json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def counters(url: str) -> dict[str, float]:
    """The vLLM counters that tell where prompt tokens came from, and NIXL's transfers."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        for key, prefix in (
            ("local_compute", "vllm:prompt_tokens_by_source_total{"),
            ("external", "vllm:prompt_tokens_by_source_total{"),
            ("local_cache_hit", "vllm:prompt_tokens_by_source_total{"),
            ("nixl_bytes", "vllm:nixl_bytes_transferred_sum{"),
            ("nixl_xfers", "vllm:nixl_xfer_time_seconds_count{"),
            ("nixl_failed", "vllm:nixl_num_failed_transfers_total{"),
            ("ext_hits", "vllm:external_prefix_cache_hits_total{"),
        ):
            if not name.startswith(prefix):
                continue
            if prefix.startswith("vllm:prompt_tokens_by_source"):
                source = {"external": "external_kv_transfer"}.get(key, key)
                if f'source="{source}"' not in name:
                    continue
            out[key] = out.get(key, 0.0) + float(value)
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def request(prompt: str, **kw: Any) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "logprobs": 3,
        **kw,
    }


def first_logprobs(out: dict[str, Any]) -> dict[str, float]:
    top: dict[str, float] = out["choices"][0]["logprobs"]["top_logprobs"][0]
    return top


def assert_same_generation(got: dict[str, Any], ref: dict[str, Any]) -> None:
    g, r = got["choices"][0], ref["choices"][0]
    assert g["token_ids"] == r["token_ids"]
    assert g["text"] == r["text"]
    # Logprobs of every step agree too (the tiny random model repeats tokens a lot, so
    # token ids alone would be a weak check).
    for gs, rs in zip(g["logprobs"]["top_logprobs"], r["logprobs"]["top_logprobs"], strict=True):
        assert gs.keys() == rs.keys()
        for tok, lp in gs.items():
            assert math.isclose(lp, rs[tok], abs_tol=1e-4), (tok, lp, rs[tok])


def wait_exit(server: VllmServer, timeout: float = 300.0) -> tuple[int, str]:
    """Wait for a server that must fail to start; return its exit code and whole log."""
    assert server.proc is not None
    try:
        server.wait_ready(timeout)
    except EngineStartError:
        pass
    else:
        raise AssertionError(f"server started despite bad config:\n{log_tail(server.log_path)}")
    rc = server.proc.returncode
    server.stop()
    return (rc if rc is not None else -1), server.log_path.read_text(errors="replace")


# --- pure helpers (no engine) -----------------------------------------------------------


def test_validate_connector_config_names_the_field() -> None:
    cfg = validate_connector_config("kv_consumer", {"worker_id": "d0"}, env={})
    assert (cfg.role, cfg.worker_id) == ("decode", "d0")
    assert validate_connector_config("kv_producer", None, env={}).role == "prefill"
    assert validate_connector_config("kv_both", {"role": "decode"}, env={}).role == "decode"
    # vLLM's NIXL keys pass through untouched
    validate_connector_config("kv_consumer", {"kv_lease_duration": 30, "backends": ["UCX"]}, {})
    bad = [
        ("kv_prefill", {}, "kv_role"),
        (None, {}, "kv_role"),
        ("kv_producer", {"role": "decode"}, "kv_connector_extra_config.role"),
        ("kv_consumer", {"role": "prefill"}, "kv_connector_extra_config.role"),
        ("kv_consumer", {"role": "leader"}, "kv_connector_extra_config.role"),
        ("kv_consumer", {"router": "not-an-endpoint"}, "kv_connector_extra_config.router"),
        ("kv_consumer", {"routr": "tcp://h:1"}, "kv_connector_extra_config.routr"),
        ("kv_consumer", {"metrics_period_s": "x"}, "kv_connector_extra_config.metrics_period_s"),
        ("kv_consumer", {"offload": {"kv_connector": "LMCacheConnectorV1"}}, "offload"),
        ("kv_consumer", ["router"], "kv_connector_extra_config"),
    ]
    for kv_role, extra, field in bad:
        with pytest.raises(ConfigError) as ei:
            validate_connector_config(kv_role, extra, env={})  # type: ignore[arg-type]
        assert ei.value.field.endswith(field), (kv_role, extra, ei.value)


def test_disagg_request_bodies() -> None:
    body = {
        "model": "m",
        "prompt": [1, 5, 9],
        "max_tokens": 40,
        "min_tokens": 4,
        "temperature": 0.5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    p = prefill_request(body)
    assert p == {
        "model": "m",
        "prompt": [1, 5, 9],
        "max_tokens": 1,
        "temperature": 0.5,
        "stream": False,
        "kv_transfer_params": {"do_remote_decode": True},
    }
    assert body["max_tokens"] == 40  # the caller's dict is untouched
    params = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": "e",
        "remote_request_id": "r",
        "remote_block_ids": [[3, 4]],
        "remote_host": "h",
        "remote_port": 5600,
        "tp_size": 1,
    }
    d = decode_request(body, {"choices": [], "kv_transfer_params": params})
    assert d == {**body, "kv_transfer_params": params}
    assert d["kv_transfer_params"] is not params
    with pytest.raises(DisaggError):
        decode_params({"choices": []})
    with pytest.raises(DisaggError):
        decode_params({"kv_transfer_params": {**params, "do_remote_prefill": False}})
    with pytest.raises(DisaggError, match="remote_host"):
        decode_params({"kv_transfer_params": {**params, "remote_host": None}})
    assert why_not_disaggregable({"prompt": "hi"}) is None
    for b in (
        {"prompt": ["a", "b"]},
        {"prompt": ""},
        {"prompt": "hi", "n": 2},
        {"prompt": "hi", "echo": True},
        {"prompt": "hi", "kv_transfer_params": {"do_remote_decode": True}},
    ):
        assert why_not_disaggregable(b) is not None
        with pytest.raises(DisaggError):
            prefill_request(b)


# --- bad config stops vLLM at start ---------------------------------------------------------


@pytest.fixture(scope="module")
def bad_starts(start_vllm) -> dict[str, tuple[int, str]]:
    """Two servers with bad connector config, started together; both must exit."""
    servers = {
        "kv_role": start_vllm(kv_transfer_args("kv_prefill"), wait=False),
        "router": start_vllm(
            kv_transfer_args("kv_consumer", {"router": "not-an-endpoint"}), wait=False
        ),
    }
    return {k: wait_exit(s) for k, s in servers.items()}


@pytest.mark.engine
def test_unknown_kv_role_fails_start(bad_starts) -> None:
    rc, log = bad_starts["kv_role"]
    assert rc != 0
    # vLLM validates kv_role when it parses --kv-transfer-config, before any engine starts
    assert "kv_role" in log and "kv_prefill" in log
    assert "'kv_producer', 'kv_both' or 'kv_consumer'" in log


@pytest.mark.engine
def test_malformed_extra_config_fails_start(bad_starts) -> None:
    rc, log = bad_starts["router"]
    assert rc != 0
    assert (
        "ConfigError: invalid config field 'kv_connector_extra_config.router': must be a ZMQ "
        "endpoint like tcp://host:port, got 'not-an-endpoint'"
    ) in log
    assert "Application startup complete" not in log


# --- one prefill + one decode instance ----------------------------------------------------


@pytest.fixture(scope="module")
def pd(start_vllm, bad_starts) -> Iterator[dict[str, VllmServer]]:
    # ``bad_starts`` first: never more than two vLLM servers at once.
    servers = {
        "P": start_vllm(
            kv_transfer_args("kv_producer", {"worker_id": "p0"}),
            {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())},
            wait=False,
        ),
        "D": start_vllm(
            kv_transfer_args("kv_consumer", {"worker_id": "d0"}),
            {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())},
            wait=False,
        ),
    }
    for s in servers.values():
        s.wait_ready()
    yield servers
    for s in servers.values():
        s.stop()


@pytest.mark.engine
def test_plugin_constructs_our_connector(pd) -> None:
    for name, kv_role, role in (("P", "kv_producer", "prefill"), ("D", "kv_consumer", "decode")):
        s = pd[name]
        assert "kv_connector_module_path" not in " ".join(s.command())
        assert s.healthy()
        log = s.log_path.read_text(errors="replace")
        assert "Creating v1 connector with name: DynamoExtConnector" in log
        for side in ("scheduler", "worker"):
            assert f"DynamoExtConnector created ({side} side, pid " in log, (
                f"{name}: no {side}-side construction logged"
            )
        assert f"kv_role={kv_role}, worker role={role}" in log


@pytest.mark.engine
def test_disaggregated_equals_aggregated_without_recompute(pd) -> None:
    P, D = pd["P"].url, pd["D"].url
    seen_first: list[dict[str, float]] = []
    for words, seed in PROMPT_WORDS:
        body = request(english_like_text(words, seed=seed))

        # reference: the whole request on one instance, computed from scratch
        p0 = counters(P)
        ref = post(P, {**body, "cache_salt": f"reference-{seed}"})
        n = ref["usage"]["prompt_tokens"]
        assert 280 <= n <= 800
        assert delta(counters(P), p0)["local_compute"] == n

        d0 = counters(D)
        pre = post(P, prefill_request(body))
        assert pre["usage"]["completion_tokens"] == 1
        params = pre["kv_transfer_params"]
        assert params["do_remote_prefill"] is True and params["remote_num_tokens"] == n
        assert len(params["remote_block_ids"][0]) == math.ceil(n / 128)
        out = post(D, decode_request(body, pre))
        d = delta(counters(D), d0)

        assert out["usage"]["prompt_tokens"] == n
        assert_same_generation(out, ref)
        # D read every prompt token from P and computed none of them
        assert d["external"] == n, d
        assert d["local_compute"] == 0, d
        assert d["local_cache_hit"] == 0, d
        assert d["ext_hits"] == n, d
        assert d["nixl_xfers"] >= 1 and d["nixl_bytes"] > 0 and d["nixl_failed"] == 0, d
        seen_first.append(first_logprobs(out))
    # the logprob check can tell prompts apart: each prompt's first step differs
    assert len({json.dumps(x, sort_keys=True) for x in seen_first}) == len(seen_first)


@pytest.mark.engine
def test_decode_instance_prefills_plain_request_locally(pd) -> None:
    P, D = pd["P"].url, pd["D"].url
    body = request(english_like_text(400, seed=104))
    ref = post(P, {**body, "cache_salt": "reference-104"})
    d0 = counters(D)
    out = post(D, body)  # no kv_transfer_params: conditional disaggregation's local path
    d = delta(counters(D), d0)
    n = out["usage"]["prompt_tokens"]
    assert "kv_transfer_params" not in out or out["kv_transfer_params"] is None
    assert_same_generation(out, ref)
    assert d["local_compute"] == n and d["external"] == 0 and d["nixl_xfers"] == 0, d


@pytest.mark.engine
def test_latency_disaggregated_vs_aggregated(pd, capsys) -> None:
    """P->D (prefill request + decode request, back to back) vs the same request on one
    instance (D, prefilling locally); every run with fresh cache salts (no prefix hits).
    Reported, not asserted: the CPU is shared, so only the tokens are checked."""
    P, D = pd["P"].url, pd["D"].url
    prompt = english_like_text(450, seed=105)
    runs = 6  # the first one of each is a warm-up
    agg: list[float] = []
    pre_t: list[float] = []
    dec_t: list[float] = []
    for i in range(runs):
        body = request(prompt, cache_salt=f"agg-{i}")
        t0 = time.perf_counter()
        a = post(D, body)
        agg.append(time.perf_counter() - t0)

        body = request(prompt, cache_salt=f"pd-{i}")
        t0 = time.perf_counter()
        pre = post(P, prefill_request(body))
        t1 = time.perf_counter()
        out = post(D, decode_request(body, pre))
        t2 = time.perf_counter()
        pre_t.append(t1 - t0)
        dec_t.append(t2 - t1)
        assert out["choices"][0]["token_ids"] == a["choices"][0]["token_ids"]
    n = a["usage"]["prompt_tokens"]
    pd_t = [p + d for p, d in zip(pre_t, dec_t, strict=True)]

    def ms(xs: list[float]) -> str:
        xs = xs[1:]
        return f"median {statistics.median(xs) * 1000:.0f} ms, min {min(xs) * 1000:.0f} ms"

    with capsys.disabled():
        print(
            f"\n[latency] prompt {n} tokens, {MAX_TOKENS} output tokens, {runs - 1} runs after "
            f"warm-up\n  aggregated (one instance): {ms(agg)}\n  P->D total: {ms(pd_t)}"
            f"\n    prefill on P: {ms(pre_t)}\n    pull + decode on D: {ms(dec_t)}"
        )
