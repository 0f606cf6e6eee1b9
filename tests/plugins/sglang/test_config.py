"""The launcher's options and the SGLang command line it builds.

Where SGLang imports (``scripts/install.sh`` installs it ``--no-deps``), the built command
line is parsed by SGLang 0.5.23's own ``ServerArgs`` parser and the KV events config by its
``KVEventsConfig``: flag names and values are SGLang's, not our guess of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from dynamo_ext.errors import ConfigError
from dynamo_ext.plugins.sglang import launch_server
from dynamo_ext.plugins.sglang.config import (
    HICACHE_CLASS,
    HICACHE_MODULE,
    build_sglang_argv,
    split_argv,
)
from dynamo_ext.plugins.sglang.metrics import (
    CACHED_TOKENS,
    HOST_USED_TOKENS,
    MAX_TOKENS,
    PROMPT_TOKENS,
    RUNNING,
    TOKEN_USAGE,
    WAITING,
    MetricsParseError,
    parse_samples,
    worker_metrics,
)

FIXTURES = Path(__file__).parent / "fixtures"
BASE = ["--model-path", "/models/m", "--port", "31000", "--host", "0.0.0.0"]


def plan_for(argv: list[str], env: dict[str, str] | None = None):
    cfg, rest = split_argv(argv, env or {})
    return cfg, build_sglang_argv(cfg, rest)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_aggregated_worker_args() -> None:
    cfg, plan = plan_for(
        [
            *BASE,
            "--dynamo-ext-router",
            "tcp://r:5600",
            "--dynamo-ext-worker-id",
            "sg0",
            "--dynamo-ext-advertise-host",
            "h1",
        ]
    )
    assert cfg.router == "tcp://r:5600"
    assert plan.argv[: len(BASE)] == BASE  # SGLang's own args untouched, ours removed
    assert not any(a.startswith("--dynamo-ext") for a in plan.argv)
    kv = json.loads(flag(plan.argv, "--kv-events-config"))
    assert kv["publisher"] == "zmq" and kv["bind"] is True and kv["topic"] == "kv"
    assert plan.kv_endpoint == kv["endpoint"] and plan.kv_replay_endpoint == kv["replay_endpoint"]
    assert "--enable-metrics" in plan.argv
    assert flag(plan.argv, "--page-size") == "16" and plan.page_size == 16
    assert "--disaggregation-mode" not in plan.argv
    assert plan.role == "both" and plan.bootstrap_port is None
    assert plan.http_endpoint == "http://h1:31000"  # wildcard --host: advertised host
    assert plan.worker_id == "sg0" and plan.model == "/models/m"


def test_prefill_and_decode_roles() -> None:
    _, p = plan_for([*BASE, "--dynamo-ext-role", "prefill", "--dynamo-ext-block-size", "64"])
    assert flag(p.argv, "--disaggregation-mode") == "prefill"
    assert flag(p.argv, "--disaggregation-transfer-backend") == "nixl"
    assert flag(p.argv, "--disaggregation-bootstrap-port") == "8998" and p.bootstrap_port == 8998
    assert flag(p.argv, "--page-size") == "64"
    # the role can come from SGLang's own flag, and a given bootstrap port is kept
    _, d = plan_for(
        [*BASE, "--disaggregation-mode", "decode", "--disaggregation-bootstrap-port", "9100"],
        {"DYNAMO_EXT_WORKER_BLOCK_SIZE": "16"},
    )
    assert d.role == "decode" and d.bootstrap_port == 9100
    assert d.argv.count("--disaggregation-mode") == 1
    assert flag(d.argv, "--disaggregation-transfer-backend") == "nixl"


def test_user_kv_events_config_is_kept() -> None:
    mine = {
        "publisher": "zmq",
        "endpoint": "tcp://*:6000",
        "replay_endpoint": "tcp://*:6001",
        "topic": "t",
    }
    _, p = plan_for([*BASE, "--kv-events-config", json.dumps(mine), "--page-size", "16"])
    assert p.argv.count("--kv-events-config") == 1
    assert (
        p.kv_endpoint == "tcp://127.0.0.1:6000" and p.kv_replay_endpoint == "tcp://127.0.0.1:6001"
    )
    assert p.kv_topic == "t" and p.argv.count("--page-size") == 1


def test_pool_root_plugs_the_hicache_adapter(tmp_path: Path) -> None:
    _, p = plan_for([*BASE, "--dynamo-ext-pool-root", str(tmp_path)])
    assert flag(p.argv, "--hicache-storage-backend") == "dynamic"
    assert "--enable-hierarchical-cache" in p.argv
    extra = json.loads(flag(p.argv, "--hicache-storage-backend-extra-config"))
    # SGLang's StorageBackendFactory._create_dynamic_backend requires these three keys
    assert extra["module_path"] == HICACHE_MODULE and extra["class_name"] == HICACHE_CLASS
    assert extra["backend_name"] and extra["pool_root"] == str(tmp_path)


@pytest.mark.parametrize(
    ("argv", "env", "field"),
    [
        (["--dynamo-ext-role", "prefill", "--disaggregation-mode", "decode"], {}, "role"),
        (["--page-size", "1"], {}, "block_size"),
        (["--dp-size", "2"], {}, "dp_size"),
        ([], {"DYNAMO_EXT_WORKER_ROUTER": "http://r:5600"}, "router"),
        (["--dynamo-ext-block-size", "x"], {}, "block_size"),
        (["--dynamo-ext-rooter", "tcp://r:1"], {}, "dynamo-ext-rooter"),
        (["--kv-events-config", "{nope"], {}, "kv_events_config"),
        (["--dynamo-ext-pool-root", "/p", "--hicache-storage-backend", "file"], {}, "pool_root"),
    ],
)
def test_bad_options_name_the_field(argv: list[str], env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        plan_for([*BASE, *argv], env)
    assert e.value.field == field


def test_launcher_refuses_bad_config_before_starting_sglang(monkeypatch, caplog) -> None:
    monkeypatch.setenv("DYNAMO_EXT_SGLANG_CMD", "false")
    assert launch_server.main([*BASE, "--dp-size", "4"]) == 2
    assert "dp_size" in caplog.text


def test_sglang_parser_accepts_the_built_args(tmp_path: Path) -> None:
    sa = pytest.importorskip("sglang.srt.server_args", reason="SGLang not installed")
    kv_mod = pytest.importorskip("sglang.srt.disaggregation.kv_events")
    _, p = plan_for([*BASE, "--dynamo-ext-role", "decode", "--dynamo-ext-pool-root", str(tmp_path)])
    parser = argparse.ArgumentParser()
    sa.ServerArgs.add_cli_args(parser)
    a = parser.parse_args(p.argv)
    assert a.disaggregation_mode == "decode"
    assert a.disaggregation_transfer_backend == "nixl"
    assert a.disaggregation_bootstrap_port == 8998
    assert a.enable_metrics is True and a.page_size == 16 and a.port == 31000
    assert a.hicache_storage_backend == "dynamic" and a.enable_hierarchical_cache is True
    kv = kv_mod.KVEventsConfig.from_cli(a.kv_events_config)
    assert kv.publisher == "zmq" and kv.bind is True and kv.format == "default"
    assert kv.endpoint == p.kv_endpoint and kv.replay_endpoint == p.kv_replay_endpoint


# ---------------------------------------------------------------------------- metrics
def test_metrics_from_recorded_sglang_text() -> None:
    text = (FIXTURES / "sglang_0.5.23_metrics.txt").read_text()
    m = worker_metrics(text, "sg0", "decode", page_size=16, heartbeat=7)
    assert (m.worker_id, m.role, m.heartbeat) == ("sg0", "decode", 7)
    assert m.running == 3 and m.waiting == 3  # queue 2 + decode prealloc 1
    assert m.kv_total_blocks == 256 and m.kv_used_blocks == 64  # 4096 tokens, usage 0.25
    assert m.offload_blocks == {"CPU": 40}
    assert m.prefix_cache_queries == 1000 and m.prefix_cache_hits == 400  # summed series


def test_metrics_garbage_and_absent_names() -> None:
    with pytest.raises(MetricsParseError):
        parse_samples('sglang:num_running_reqs{model_name="x" 3\n')
    m = worker_metrics("# nothing here\n", "sg0", "both", 16, 1)
    assert (m.running, m.waiting, m.kv_total_blocks, m.offload_blocks) == (0, 0, 0, {})


def test_metric_names_exist_in_sglang_source() -> None:
    """The names we read are defined in SGLang's collector (read as text: importing it
    needs torchvision, which this platform's install removes)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or spec.origin is None:
        pytest.skip("SGLang not installed")
    src = (Path(spec.origin).parent / "srt/observability/metrics_collector.py").read_text()
    for name in (
        RUNNING,
        *WAITING,
        TOKEN_USAGE,
        MAX_TOKENS,
        HOST_USED_TOKENS,
        PROMPT_TOKENS,
        CACHED_TOKENS,
    ):
        assert f'name="{name}"' in src, name


def test_launcher_help_lists_every_option_and_starts_nothing(capsys) -> None:
    from dynamo_ext.plugins.sglang.config import _OPTIONS
    from dynamo_ext.plugins.sglang.launch_server import main

    assert main(["--dynamo-ext-help", "--model-path", "M"]) == 0
    out = capsys.readouterr().out
    for opt, (_, var, _) in _OPTIONS.items():
        assert f"--dynamo-ext-{opt}" in out and var in out
