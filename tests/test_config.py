from __future__ import annotations

import pytest

from dynamo_ext.config import RouterConfig, load_config
from dynamo_ext.errors import ConfigError


def test_file_then_env_then_flags(tmp_path) -> None:
    f = tmp_path / "router.yaml"
    f.write_text(
        "block_size: 128\nscorer:\n  overlap_weight: 2.0\n  mode: dynamo\n"
        "workers:\n  - worker_id: w0\n    kv_events_endpoint: tcp://127.0.0.1:5557\n"
    )
    env = {"DYNAMO_EXT_ROUTER__SCORER__OVERLAP_WEIGHT": "3.5", "DYNAMO_EXT_ROUTER__BIND": "x"}
    cfg = load_config(
        RouterConfig, f, {"bind": "tcp://127.0.0.1:7000", "block_size": None}, environ=env
    )
    assert cfg.block_size == 128  # None flags do not override
    assert cfg.scorer.overlap_weight == 3.5 and cfg.scorer.mode == "dynamo"
    assert cfg.bind == "tcp://127.0.0.1:7000"
    assert cfg.workers[0].kv_events_endpoint == "tcp://127.0.0.1:5557"


def test_toml_file(tmp_path) -> None:
    f = tmp_path / "router.toml"
    f.write_text('hash_mode = "tokens"\n[scorer]\ntemperature = 0.5\n')
    cfg = load_config(RouterConfig, f, environ={})
    assert cfg.hash_mode == "tokens" and cfg.scorer.temperature == 0.5


@pytest.mark.parametrize(
    "data, field",
    [
        ({"block_size": "big"}, "block_size"),
        ({"block_size": 0}, "block_size"),
        ({"scorer": {"overlap_weight": -1}}, "overlap_weight"),
        ({"scorer": {"tier_costs": {"CPU": 2}}}, "tier_costs"),
        ({"scorer": {"mode": "fastest"}}, "scorer.mode"),
        ({"nonsense": 1}, "nonsense"),
        ({"workers": [{"worker_id": "a"}, {"worker_id": "a"}]}, "workers"),
    ],
)
def test_bad_values_name_the_field(data, field) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(RouterConfig, None, data, environ={})
    assert field in str(exc.value)


def test_unreadable_or_invalid_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(RouterConfig, tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid"):
        load_config(RouterConfig, bad, environ={})
