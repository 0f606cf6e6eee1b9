"""dynamo-ext: a KV-cache-aware, disaggregated serving layer over stock vLLM and SGLang.

``dynamo_ext`` holds what every part shares and no engine knows: the wire protocol, block
hashing, configuration and errors. ``dynamo_ext.router`` is the router sidecar,
``dynamo_ext.plugins.vllm`` / ``dynamo_ext.plugins.sglang`` the engine plugins, and
``dynamo_ext.benchmarks`` the benchmarks behind ``dynamo-ext bench``.
"""

__version__ = "0.1.0"
