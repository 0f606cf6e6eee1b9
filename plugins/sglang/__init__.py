"""SGLang plugin: stock ``sglang.launch_server`` as a dynamo-ext worker, by launch arguments.

``launch_server`` starts SGLang with its own flags (``--kv-events-config``,
``--enable-metrics``, ``--disaggregation-mode``, ``--hicache-storage-backend dynamic``) and
runs a sidecar beside it; ``events`` translates SGLang's KV events to the vLLM schema the
router indexes, ``metrics`` reads SGLang's Prometheus ``/metrics`` as ``WorkerMetrics``,
``config`` holds the launcher's options. Nothing here imports SGLang: it is spoken to over
its sockets and HTTP only.
"""
