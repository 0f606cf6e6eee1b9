"""The simulator: vLLM engines in virtual time, as a fleet over real sockets, and trace replay.

One responsibility a module:

* ``model``: one engine (``MockerCore``), its config (``MockerConfig``) and step time
  (``TimingModel``); pure, no sockets, no clock.
* ``fleet``: many cores behind real sockets (KV PUB + replay, metrics, registration,
  OpenAI HTTP): the one fake worker of tests, the router demo and live replays.
* ``trace``: Mooncake traces and the prompts they stand for; ``workloads``: generated ones.
* ``replay``: ``dynamo-ext bench replay``, policies in virtual time or live.
* ``peers``: Dynamo's own code in the loop (its simulator, its ``SelectionService``).
* ``report``: figures, table and plot of a replay.
* ``cli`` / ``__main__``: ``dynamo-ext mocker`` / ``python -m dynamo_ext.sim``.
"""
