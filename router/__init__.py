"""The KV-aware router sidecar: index (``indexer``), cost function (``scorer``), predicted
load (``sequences``), the ZMQ process (``server``) and the client gateways use (``client``)."""
