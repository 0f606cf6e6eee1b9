"""The frontend's door (dynamo_ext.frontend.auth) on real processes: ``dynamo-ext frontend``
over HTTPS with an API keys file, talking CURVE to a ``dynamo-ext router`` with keys. No
engine: a request that gets through the door is answered 503 ``no_worker`` by the router
(the fleet is empty), which shows it went all the way to the router over CURVE.

401 without a key or with a wrong one, 403 for a model the key may not use, 429 with
``Retry-After`` past a key's request or token rate, a key added to the file is accepted
after the file changes, and the frontend keeps serving throughout.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from dynamo_ext import security as S
from dynamo_ext.frontend.auth import Bucket
from dynamo_ext.testing import RouterProc, free_port

MODEL = "tiny-door"


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def _write_keys(path: Path, keys: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"keys": keys}))
    tmp.replace(path)


KEYS = [
    {"key": "sk-all", "name": "all", "tenant": "acme"},
    {"key": "sk-other-model", "name": "narrow", "models": ["some-other-model"]},
    {"key": "sk-slow", "name": "slow", "requests_per_minute": 2},
    {"key": "sk-few-tokens", "name": "few", "tokens_per_minute": 100},
    {"key": "sk-plain", "name": "no tenant"},
]


@pytest.fixture(scope="module")
def door(tiny_model: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("door")
    for name in ("router", "fe", "w0"):
        S.generate_keys(tmp, name)
    router = RouterProc(
        tmp,
        {
            "security": {
                "secret_key_file": str(tmp / "router.key"),
                "allow": [
                    {"key": str(tmp / "fe.key.pub"), "role": "frontend"},
                    {"key": str(tmp / "w0.key.pub"), "role": "worker"},
                ],
            }
        },
    ).start()
    cert, key = _self_signed(tmp)
    keys_file = tmp / "keys.yaml"
    _write_keys(keys_file, KEYS)
    port = free_port()
    cfg = {
        "model": str(tiny_model),
        "served_model_name": MODEL,
        "port": port,
        "router": router.endpoint,
        "security": {
            "api_keys_file": str(keys_file),
            "ssl_certfile": str(cert),
            "ssl_keyfile": str(key),
            "router": {
                "secret_key_file": str(tmp / "fe.key"),
                "server_public_key": str(tmp / "router.key.pub"),
            },
        },
    }
    (tmp / "fe.yaml").write_text(yaml.safe_dump(cfg))
    log = tmp / "frontend.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynamo_ext.cli",
            "frontend",
            "--config",
            str(tmp / "fe.yaml"),
        ],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"https://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=cert), timeout=10)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "frontend did not start"
            try:
                # 503 until a worker is up: the frontend answers, which is all we wait for
                if client.get("/health").status_code in (200, 503):
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield client, keys_file, router, tmp
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
        router.stop()


def ask(client: httpx.Client, key: str | None, model: str = MODEL, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    payload = {"model": model, "prompt": "hello there", "max_tokens": 4, **body}
    return client.post("/v1/completions", json=payload, headers=headers)


def test_no_key_or_wrong_key_is_401(door) -> None:
    client, _, _, _ = door
    for key in (None, "sk-nope", "sk-all-but-longer"):
        r = ask(client, key)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    r = client.post("/v1/completions", json={}, headers={"Authorization": "Basic sk-all"})
    assert r.status_code == 401
    assert client.get("/health").status_code in (200, 503)  # probes stay open (no 401)


def test_valid_key_reaches_the_router_over_curve(door) -> None:
    client, _, router, _ = door
    r = ask(client, "sk-all")
    assert r.status_code == 503, r.text  # through the door, to the router: no worker
    assert r.json()["error"]["code"] == "no_worker"
    models = client.get("/v1/models", headers={"Authorization": "Bearer sk-all"})
    assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL
    assert 'dynamo_ext_router_auth_rejected_total{reason="role"} 0.0' in router.scrape()


def test_model_not_allowed_is_403(door) -> None:
    client, _, _, _ = door
    r = ask(client, "sk-other-model")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    assert ask(client, "sk-other-model", model="some-other-model").status_code == 404


def test_request_rate_limit_is_429_with_retry_after(door) -> None:
    client, _, _, _ = door
    codes = [ask(client, "sk-slow").status_code for _ in range(3)]
    assert codes[:2] == [503, 503]
    r = ask(client, "sk-slow")
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit"
    assert 1 <= int(r.headers["retry-after"]) <= 30
    assert ask(client, "sk-all").status_code == 503  # other keys are not slowed


def test_token_limit_is_429_and_counts_prompt_and_max_tokens(door) -> None:
    client, _, _, _ = door
    assert ask(client, "sk-few-tokens", max_tokens=40).status_code == 503  # ~43 of 100
    assert ask(client, "sk-few-tokens", max_tokens=40).status_code == 503  # ~86
    r = ask(client, "sk-few-tokens", max_tokens=40)
    assert r.status_code == 429 and r.json()["error"]["code"] == "token_limit"
    assert int(r.headers["retry-after"]) >= 1


def test_keys_file_is_reloaded_when_it_changes(door) -> None:
    client, keys_file, _, _ = door
    assert ask(client, "sk-new").status_code == 401
    _write_keys(keys_file, [*KEYS, {"key_sha256": _sha("sk-new"), "name": "new"}])
    deadline = time.monotonic() + 10
    while ask(client, "sk-new").status_code == 401:
        assert time.monotonic() < deadline, "new key never accepted"
        time.sleep(0.3)
    assert ask(client, "sk-new").status_code == 503
    _write_keys(keys_file, KEYS)  # revoked
    deadline = time.monotonic() + 10
    while ask(client, "sk-new").status_code != 401:
        assert time.monotonic() < deadline, "revoked key still accepted"
        time.sleep(0.3)


class _FakeWorker:
    """An HTTP server answering /v1/completions as vLLM streams it; keeps every body."""

    def __init__(self) -> None:
        import http.server
        import json as _json
        import threading

        bodies: list[dict] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers["Content-Length"])
                body = _json.loads(self.rfile.read(n))
                bodies.append(body)
                chunk = {"choices": [{"text": "ok", "token_ids": [7], "finish_reason": "length"}]}
                if body.get("stream"):
                    out = f"data: {_json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
                    kind = "text/event-stream"
                else:  # vLLM answers a request that is not streamed with one JSON object
                    out = _json.dumps(chunk).encode()
                    kind = "application/json"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.bodies = bodies
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_served_requests_carry_the_tenants_cache_salt(door) -> None:
    """With a worker registered: 200, streaming and not; the worker's request carries the
    key's tenant as cache_salt, a key without a tenant sends none, a client's own is dropped."""
    import asyncio

    from dynamo_ext.protocol import WorkerRegistration
    from dynamo_ext.router.client import RouterClient

    client, _, router, tmp = door
    worker = _FakeWorker()
    w0 = S.load_curve(
        S.CurveConfig(
            secret_key_file=str(tmp / "w0.key"), server_public_key=str(tmp / "router.key.pub")
        )
    )

    async def registry(reg: bool) -> None:
        async with RouterClient(router.endpoint, curve=w0) as c:
            if reg:
                await c.register(WorkerRegistration("fake", http_endpoint=worker.url))
            else:
                await c.deregister("fake")

    asyncio.run(registry(True))
    try:
        r = ask(client, "sk-all")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "ok"
        with client.stream(
            "POST",
            "/v1/completions",
            json={"model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": True},
            headers={"Authorization": "Bearer sk-all"},
        ) as s:
            assert s.status_code == 200
            assert "[DONE]" in "".join(s.iter_text())
        assert ask(client, "sk-plain", cache_salt="tenant:acme").status_code == 200
        salts = [b.get("cache_salt") for b in worker.bodies]
        assert salts == ["tenant:acme", "tenant:acme", None]
    finally:
        asyncio.run(registry(False))
        worker.close()


def _sha(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


def test_bucket_refills_continuously() -> None:
    b = Bucket(rate=1.0, capacity=2.0)
    assert b.take(1, 0.0) == 0 and b.take(1, 0.0) == 0
    assert b.take(1, 0.0) == pytest.approx(1.0)
    assert b.take(1, 0.5) == pytest.approx(0.5)
    assert b.take(1, 1.5) == 0
    assert b.take(5, 10.0) == 0  # larger than the bucket: waits for a full one, then passes
