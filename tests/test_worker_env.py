"""Worker environment variables: the ``DYNAMO_EXT_WORKER_*`` names, and the names before the
rename still read, with a deprecation warning, by both engines' plugins."""

from __future__ import annotations

import logging

import pytest

from dynamo_ext import worker_env as we
from dynamo_ext.plugins.sglang.config import split_argv
from dynamo_ext.plugins.vllm.config import load_worker_config


def test_every_worker_variable_has_the_worker_prefix() -> None:
    for new, old in we.RENAMED.items():
        assert new.startswith(we.PREFIX) and not old.startswith(we.PREFIX)
        assert not new.startswith("DYNAMO_EXT_ROUTER")  # the router's own config prefix


def test_new_name_wins_and_empty_is_unset() -> None:
    env = {"DYNAMO_EXT_WORKER_ROUTER": "tcp://new:1", "DYNAMO_EXT_ROUTER": "tcp://old:1"}
    assert we.worker_env(env, "DYNAMO_EXT_WORKER_ROUTER") == "tcp://new:1"
    assert we.worker_env({"DYNAMO_EXT_WORKER_ROUTER": ""}, "DYNAMO_EXT_WORKER_ROUTER") is None
    assert we.worker_env({}, "DYNAMO_EXT_WORKER_ID") is None


def test_old_name_works_with_a_deprecation_warning(caplog: pytest.LogCaptureFixture) -> None:
    we._warned.discard("DYNAMO_EXT_HOST")
    with caplog.at_level(logging.WARNING, logger=we.__name__):
        with pytest.warns(DeprecationWarning, match="DYNAMO_EXT_HOST is deprecated"):
            assert we.worker_env({"DYNAMO_EXT_HOST": "h"}, "DYNAMO_EXT_WORKER_HOST") == "h"
    assert "use DYNAMO_EXT_WORKER_HOST" in caplog.text


def test_vllm_plugin_reads_old_and_new_names() -> None:
    new = load_worker_config(None, {"DYNAMO_EXT_WORKER_ROUTER": "tcp://r:5600"})
    assert new.router == "tcp://r:5600"
    with pytest.warns(DeprecationWarning):
        old = load_worker_config(
            None, {"DYNAMO_EXT_ROUTER": "tcp://r:5600", "DYNAMO_EXT_METRICS_PERIOD": "0.2"}
        )
    assert old.router == "tcp://r:5600" and old.metrics_period_s == 0.2


def test_sglang_launcher_reads_old_and_new_names() -> None:
    cfg, _ = split_argv([], {"DYNAMO_EXT_WORKER_BLOCK_SIZE": "32"})
    assert cfg.block_size == 32
    with pytest.warns(DeprecationWarning):
        cfg, _ = split_argv([], {"DYNAMO_EXT_ROUTER": "tcp://r:5600", "DYNAMO_EXT_BLOCK_SIZE": "8"})
    assert cfg.router == "tcp://r:5600" and cfg.block_size == 8
