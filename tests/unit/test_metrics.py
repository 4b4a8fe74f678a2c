"""The Prometheus registry (nodemesh.prom), the mesh families and the labels the
proxy's telemetry derives from a connection's facts."""

from __future__ import annotations

import pickle

import pytest

from nodeagent import metrics
from nodeagent.snapshot import Endpoint, MeshSettings, Service, ServicePort, Snapshot, Workload
from nodeagent.telemetry import mesh_labels, parse_baggage, response_flags
from nodemesh.prom import MetricError, Registry, merge, parse, render, select


def test_counter_gauge_histogram_render_and_parse_round_trip() -> None:
    r = Registry()
    c = r.counter("x_total", "a counter", ("a",))
    g = r.gauge("y", "a gauge")
    h = r.histogram("z_ms", "a histogram", ("a",), buckets=(1, 10))
    c.inc({"a": 'q"uo\\te\n'}, 2)
    g.set(None, 5.5)
    for v in (0.5, 3, 50):
        h.observe({"a": "b"}, v)
    text = render(r.collect())
    assert '# TYPE z_ms histogram' in text
    assert 'z_ms_bucket{a="b",le="1"} 1' in text and 'z_ms_bucket{a="b",le="10"} 2' in text
    assert 'z_ms_bucket{a="b",le="+Inf"} 3' in text and 'z_ms_sum{a="b"} 53.5' in text
    samples = parse(text)
    assert select(samples, "x_total") == [({"a": 'q"uo\\te\n'}, 2.0)]
    assert select(samples, "y") == [({}, 5.5)]


def test_misuse_is_named() -> None:
    r = Registry()
    c = r.counter("x_total", "c", ("a",))
    with pytest.raises(MetricError, match=r"missing \['a'\], unexpected \['b'\]"):
        c.inc({"b": "1"})
    with pytest.raises(MetricError, match="cannot decrease"):
        c.inc({"a": "1"}, -1)
    with pytest.raises(MetricError, match="already defined as a counter"):
        r.gauge("x_total", "g", ("a",))
    with pytest.raises(MetricError, match="not a valid Prometheus name"):
        r.counter("bad-name", "")


def test_series_limit_bounds_cardinality() -> None:
    r = Registry()
    c = r.counter("x_total", "c", ("id",), max_series=3)
    for i in range(10):
        c.inc({"id": str(i)})
    assert len(c.collect().series) == 3
    assert r.dropped.value({"metric": "x_total"}) == 7


def test_merge_across_workers_adds_counters_and_histograms() -> None:
    def worker(n: int) -> list[metrics.FamilyData]:
        r = Registry()
        r.counter("c_total", "", ("k",)).inc({"k": "v"}, n)
        r.gauge("g_max", "", merge="max").set(None, n)
        r.histogram("h", "", buckets=(1,)).observe(None, n)
        return pickle.loads(pickle.dumps(r.collect()))  # as it crosses the control channel

    merged = {f.name: f for f in merge([worker(1), worker(2)])}
    assert merged["c_total"].series[("v",)] == 3
    assert merged["g_max"].series[()] == 2
    assert merged["h"].series[()] == ((1, 1), 3.0, 2)


def test_record_request_uses_istio_names_and_labels() -> None:
    metrics.REGISTRY.reset()
    labels = metrics.MeshLabels(source_workload="client", destination_service_name="web")
    metrics.record_request(labels, response_code=503, duration_ms=12.0, request_bytes=10, response_bytes=20,
                           grpc_response_status="14")
    s = parse(render(metrics.REGISTRY.collect()))
    (d, v), = select(s, "istio_requests_total")
    assert v == 1 and d["response_code"] == "503" and d["grpc_response_status"] == "14"
    assert d["request_protocol"] == "http" and d["source_workload"] == "client"
    assert set(d) == set(metrics.REQUEST_LABELS)
    assert select(s, "istio_request_duration_milliseconds_count")[0][1] == 1
    metrics.REGISTRY.reset()


def _snapshot() -> Snapshot:
    ep = Endpoint("10.0.0.2", 8080, "default/web-2", "spiffe://td/ns/default/sa/web", "n2", "10.0.0.2")
    svc = Service("web", "default", "240.240.0.1", (ServicePort(80, 8080, endpoints=(ep,)),))
    wl = Workload("client", "default", "client", "n1", "10.0.0.1", (), "spiffe://td/ns/default/sa/client", "10.0.0.1")
    return Snapshot("v1", "n2", MeshSettings(trust_domain="td", dns_domain="mesh"), services=(svc,), workloads=(wl,))


def test_outbound_labels_from_session_fields() -> None:
    f = {"direction": "outbound", "via": "hbone", "source_workload": "default/client",
         "source_principal": "spiffe://td/ns/default/sa/client", "dst_service": "default/web",
         "dst_workload": "default/web-2", "dst_identity": "spiffe://td/ns/default/sa/web"}
    lab = mesh_labels(f, _snapshot())
    assert lab == metrics.MeshLabels(
        reporter="source", source_workload="client", source_workload_namespace="default",
        source_principal="spiffe://td/ns/default/sa/client", destination_workload="web-2",
        destination_workload_namespace="default", destination_principal="spiffe://td/ns/default/sa/web",
        destination_service="web.default.svc.mesh", destination_service_name="web",
        destination_service_namespace="default", request_protocol="tcp", response_flags="-",
        connection_security_policy="mutual_tls")


def test_inbound_labels_trust_baggage_only_within_the_principal_namespace() -> None:
    base = {"direction": "inbound", "via": "hbone", "tls": True, "source_principal": "spiffe://td/ns/default/sa/client",
            "dst_workload": "default/web-2", "dst_addr": "10.0.0.2:8080", "dst_identity": "spiffe://td/ns/default/sa/web"}
    bag = "k8s.namespace.name=default,k8s.workload.name=client,service.name=default/web"
    ok = mesh_labels(base, _snapshot(), [("baggage", bag)])
    assert (ok.reporter, ok.source_workload, ok.destination_service_name) == ("destination", "client", "web")
    # A claim outside the verified identity's namespace is ignored; the principal's
    # unique workload in the snapshot is used instead.
    lie = mesh_labels(base, _snapshot(), [("baggage", "k8s.namespace.name=prod,k8s.workload.name=admin")])
    assert (lie.source_workload, lie.source_workload_namespace) == ("client", "default")
    # Without baggage the service comes from the workload's endpoint in the snapshot.
    assert mesh_labels(base, _snapshot()).destination_service == "web.default.svc.mesh"


def test_response_flags_and_passthrough() -> None:
    assert response_flags("no_healthy_endpoint") == "UH"
    assert response_flags("connect_timeout") == "UF"
    assert response_flags("policy_denied") == "NR"
    assert response_flags(None, "connection reset: x") == "UC"
    assert response_flags(None) == "-"
    lab = mesh_labels({"direction": "outbound", "via": "passthrough", "source_workload": "default/client"}, None)
    assert (lab.destination_service, lab.connection_security_policy) == ("PassthroughCluster", "none")
    assert parse_baggage([("Baggage", "a=1;prop, b = 2")]) == {"a": "1", "b": "2"}


def test_grafana_dashboard_uses_only_metrics_we_export() -> None:
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dash = json.loads((root / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\b(?:istio|nodemesh)_\w+", e)}
    defined = {f.name for f in metrics.REGISTRY.collect()}
    sources = (root / "nodeagent" / "admin.py").read_text() + (root / "controlplane" / "metrics.py").read_text()
    missing = {n for n in used if n not in defined and f'"{n}"' not in sources}
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"
