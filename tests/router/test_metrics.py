"""router.metrics: the router's lock-free hot-path metrics against prometheus_client's own
classes, the same exposition for the same observations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from dynamo_ext.config import RouterConfig
from dynamo_ext.protocol import RouteRequest, WorkerDeregistration, WorkerRegistration
from dynamo_ext.router.metrics import PlainHistogram
from dynamo_ext.router.service import RouterService

BOUNDS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1)


def _samples(reg: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in reg.collect()
        for s in m.samples
        if not s.name.endswith("_created")
    }


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(BOUNDS), st.floats(0, 1.0)), max_size=50))
def test_plain_histogram_exports_what_prometheus_histogram_does(xs: list[float]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = PlainHistogram("t_seconds", "doc", BOUNDS)
    ours.register(h)
    ref = Histogram("t_seconds", "doc", buckets=BOUNDS, registry=theirs)
    for x in xs:  # values on a bound go in that bound's bucket (le: less or equal)
        h.observe(x)
        ref.observe(x)
    a, b = _samples(ours), _samples(theirs)
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]) <= 1e-9 * max(1.0, abs(b[k])), k


def test_decision_counts_per_worker_and_gone_with_the_worker() -> None:
    s = RouterService(RouterConfig(block_size=4, metrics_port=None, hash_mode="tokens"))
    for w in ("a", "b"):
        s.register(WorkerRegistration(w, block_size=4))
    for i in range(5):
        s.route(RouteRequest(request_id=f"r{i}", token_ids=list(range(16)), exclude_workers=["b"]))
    page = generate_latest(s.metrics.registry).decode()
    assert 'dynamo_ext_router_decisions_total{role="aggregated",worker="a"} 5.0' in page
    assert 'worker="b"' not in page.split("dynamo_ext_router_decisions_total", 1)[1].split("# HELP")[0]
    assert "dynamo_ext_router_decision_seconds_count 5.0" in page
    s.dispatch(WorkerDeregistration("a"))
    page = generate_latest(s.metrics.registry).decode()
    assert 'dynamo_ext_router_decisions_total{role="aggregated",worker="a"}' not in page
