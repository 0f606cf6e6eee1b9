"""KvEventPublisher.publish_raw_many: the frames, sequence numbers and replay buffer of one
publish_raw per payload, on real ZMQ sockets."""

from __future__ import annotations

import time

import zmq

from dynamo_ext.protocol import REPLAY_END_SEQ, seq_bytes
from dynamo_ext.publisher import KvEventPublisher


def _recv_all(sock: zmq.Socket, n: int, timeout_s: float = 10.0) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        if sock.poll(100):
            out.append(sock.recv_multipart())
    return out


def test_publish_raw_many_sends_and_buffers_what_publish_raw_would() -> None:
    pub = KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", topic="kv")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub.endpoint)
    try:
        # PUB drops until the subscription lands: probe until one arrives
        while True:
            pub.publish_raw(b"probe")
            if sub.poll(50):
                break
        while sub.poll(50):
            sub.recv_multipart()
        first = pub.publish_raw(b"one")
        payloads = [bytes([i]) * (i + 1) for i in range(200)]
        assert pub.publish_raw_many([]) == -1
        last = pub.publish_raw_many(payloads)
        assert last == first + len(payloads)
        got = _recv_all(sub, 1 + len(payloads))
        assert got == [[b"kv", seq_bytes(first + i), p] for i, p in enumerate([b"one", *payloads])]
        # the replay socket answers from the same buffer
        assert pub.replay_endpoint is not None
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(pub.replay_endpoint)
        dealer.send_multipart((b"", seq_bytes(first + 1)))
        replayed = _recv_all(dealer, len(payloads) + 1)
        dealer.close(linger=0)
        assert [r[1:] for r in replayed[:-1]] == [
            [b"kv", seq_bytes(first + 1 + i), p] for i, p in enumerate(payloads)
        ]
        assert replayed[-1][2:] == [REPLAY_END_SEQ, b""]  # the end marker
    finally:
        sub.close(linger=0)
        ctx.term()
        pub.close()
