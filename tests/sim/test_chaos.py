"""The chaos harness in its CI-bounded form (issue 12, item 7): 26 s of routed load on a
four-worker mocker fleet and the real router process, every fault kind about twice in
seeded rounds, a checkpoint every 6 s, then the invariants (about 35 s in all, under 50 s
when nothing converges). Each assertion carries the evidence the report gives for it; the
whole report is written beside the router's logs.

The invariants are the router's promises, not the harness's tolerance: a router that keeps
a dead worker's blocks, loses a batch for good, leaves an index short after a replay that
timed out, lets a malformed frame kill a task, hangs a caller or leaks sockets fails here.
The same run, longer: ``dynamo-ext bench chaos --duration 120``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from dynamo_ext.protocol import control_decoder, kv_batch_decoder, metrics_decoder
from dynamo_ext.sim.chaos import (
    FAULT_KINDS,
    ChaosConfig,
    nested_kv_batch,
    nested_route_request,
    nested_worker_metrics,
    run_chaos,
)

CI = ChaosConfig(
    duration_s=26.0,
    seed=12,
    workers=4,
    clients=3,
    checkpoint_every_s=6.0,
    settle_s=7.0,
    fault_every_s=0.8,
    curve=True,  # CURVE on every router socket, so impostors are part of the mix
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp: Path = tmp_path_factory.mktemp("chaos")
    res = asyncio.run(run_chaos(CI, tmp))
    # The whole report and the router's logs stay beside each other for a failure.
    (tmp / "report.json").write_text(json.dumps(res, indent=1))
    res["report_path"] = str(tmp / "report.json")
    return res


def test_nested_frames_overflow_a_decoder_without_depth_bound() -> None:
    """The nested faults stay lethal to a bare decoder (else they would test nothing)."""
    with pytest.raises(RecursionError):
        control_decoder.decode(nested_route_request())
    with pytest.raises(RecursionError):
        kv_batch_decoder.decode(nested_kv_batch())
    with pytest.raises(RecursionError):
        metrics_decoder.decode(nested_worker_metrics("w0"))


def _evidence(report: dict, *keys: str) -> str:
    return json.dumps({k: report[k] for k in keys}, indent=1, default=str)


def test_every_fault_kind_was_injected(report: dict) -> None:
    assert report["harness_errors"] == 0
    missing = [k for k in FAULT_KINDS if not report["faults"].get(k)]
    # Faults come in rounds of every kind, one a second or so.
    assert not missing, f"never injected: {missing}; drawn: {report['faults']}"
    assert report["requests"]["total"] > 100


def test_index_equals_union_of_true_caches(report: dict) -> None:
    bad = [c for c in report["checkpoints"] if not c["converged"]]
    assert not bad, (
        "index != true caches after faults healed:\n"
        + json.dumps(
            [
                {
                    k: c[k]
                    for k in ("t", "count_details", "probe_details", "dead_listed", "converge_s")
                }
                for c in bad
            ],
            indent=1,
        )
        + f"\nfull report and router logs: {report['report_path']}"
    )


def test_no_phantom_blocks_under_load(report: dict) -> None:
    """At any instant, not only after quiescence: no block indexed for a worker that the
    worker could never have held."""
    assert report["phantom_checks"] > 0
    assert not report["phantom_blocks"], _evidence(report, "phantom_blocks", "faults")


def test_no_request_hung(report: dict) -> None:
    assert report["requests"].get("hang", 0) == 0, _evidence(report, "requests", "faults")


def test_requests_answered_while_router_up(report: dict) -> None:
    """Outside the outages we cause, a route gets a reply: a route or a clear error."""
    assert report["requests"]["unanswered_while_router_up"] == 0, _evidence(
        report, "requests", "router"
    )


def test_no_worker_only_when_none_live(report: dict) -> None:
    """``no_worker`` is an answer only when no live worker has been up for a while."""
    assert report["requests"]["no_worker_while_live"] == 0, _evidence(
        report, "requests", "checkpoints"
    )


def test_no_route_to_long_dead_worker(report: dict) -> None:
    """A worker dead for longer than worker_timeout_s (+1 s) is never chosen."""
    assert report["requests"]["routed_to_long_dead"] == 0, _evidence(report, "requests")


def test_impostors_refused(report: dict) -> None:
    """Another worker's key, an unlisted key or none cannot register a worker's id with
    endpoints of its own nor report it failed."""
    assert not report["impostors_accepted"], _evidence(report, "impostors_accepted")


def test_malformed_control_messages_answered(report: dict) -> None:
    """Each malformed control message with a correlation id gets an error reply (a frame
    over max_message_bytes excepted: ZMQ drops its sender)."""
    assert report["invariants"]["malformed_control_answered"], _evidence(
        report, "control_malformed_replies", "malformed_sent"
    )


def test_router_memory_and_sockets_bounded(report: dict) -> None:
    assert not report["router"]["bound_violations"], json.dumps(report["router"], indent=1)


def test_router_process_never_exited(report: dict) -> None:
    assert report["router"]["unexpected_exits"] == 0, report["router"]["log_error_lines"]
