"""Ports for test and local-fleet processes that bind a port chosen before they start.

Production sockets bind port 0 and read the bound port back; only processes we cannot ask
(a vLLM engine binding its KV event PUB a minute after start) get a port from here.
"""

from __future__ import annotations

import socket

_PORT_LO, _PORT_HI = 20000, 32000
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now, below the kernel's ephemeral range (32768+).

    Ports handed out here are bound much later (a vLLM engine binds its KV event socket a
    minute after start); a port from the ephemeral range can meanwhile be taken by any
    outgoing connection or by the engines' own port-0 sockets. Below that range, and never
    handing out the same port twice in one process, such collisions become rare.
    """
    import random

    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(_PORT_LO, _PORT_HI)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError("no free port found in 20000-32000")
