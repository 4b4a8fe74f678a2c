"""The Prometheus registry (nodemesh.prom), the mesh families and the labels the
proxy's telemetry derives from a connection's facts."""

from __future__ import annotations

import dataclasses
import pickle
from typing import TYPE_CHECKING, Any, cast

import pytest

from nodeagent.meshview.snapshot import Endpoint, MeshSettings, Service, ServicePort, Snapshot, Workload
from nodeagent.observe import meshmetrics, tracing
from nodeagent.observe.telemetry import mesh_labels, parse_baggage, response_flags
from nodeagent.proxy.relay import Session
from nodemesh.prom import MetricError, Registry, merge, parse, render, select

if TYPE_CHECKING:
    from nodeagent.proxy.proxy import NodeProxy
    from nodeagent.proxy.relay import TcpEnd


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
    def worker(n: int) -> list[meshmetrics.FamilyData]:
        r = Registry()
        r.counter("c_total", "", ("k",)).inc({"k": "v"}, n)
        r.gauge("g_max", "", merge="max").set(None, n)
        r.histogram("h", "", buckets=(1,)).observe(None, n)
        crossed: list[meshmetrics.FamilyData] = pickle.loads(pickle.dumps(r.collect()))  # noqa: S301 - our own bytes
        return crossed  # as they cross the control channel

    merged = {f.name: f for f in merge([worker(1), worker(2)])}
    assert merged["c_total"].series[("v",)] == 3
    assert merged["g_max"].series[()] == 2
    assert merged["h"].series[()] == ((1, 1), 3.0, 2)


def test_record_request_uses_istio_names_and_labels() -> None:
    meshmetrics.REGISTRY.reset()
    labels = meshmetrics.MeshLabels(source_workload="client", destination_service_name="web")
    meshmetrics.record_request(labels, response_code=503, duration_ms=12.0, request_bytes=10, response_bytes=20,
                           grpc_response_status="14")
    s = parse(render(meshmetrics.REGISTRY.collect()))
    (d, v), = select(s, "istio_requests_total")
    assert v == 1 and d["response_code"] == "503" and d["grpc_response_status"] == "14"
    assert d["request_protocol"] == "http" and d["source_workload"] == "client"
    assert set(d) == set(meshmetrics.REQUEST_LABELS)
    assert select(s, "istio_request_duration_milliseconds_count")[0][1] == 1
    meshmetrics.REGISTRY.reset()


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
    assert lab == meshmetrics.MeshLabels(
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
    # A plaintext caller has no verified identity: its baggage names nothing (it could
    # otherwise pick any source_workload label, and fill the series cap with made-up ones).
    plain = {**base, "via": "plaintext", "tls": False, "source_principal": ""}
    for claim in ("k8s.namespace.name=,k8s.workload.name=evil", "k8s.namespace.name=default,k8s.workload.name=evil",
                  "service.name=default/other"):
        labels = mesh_labels(plain, _snapshot(), [("baggage", claim)])
        assert (labels.source_workload, labels.source_workload_namespace) == ("unknown", "unknown"), claim
        assert labels.destination_service == "web.default.svc.mesh", claim


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
    defined = {f.name for f in [*meshmetrics.REGISTRY.collect(), *meshmetrics.AGENT_REGISTRY.collect()]}
    sources = ((root / "nodeagent" / "supervision" / "admin.py").read_text()
               + (root / "controlplane" / "metrics.py").read_text())
    missing = {n for n in used if n not in defined and f'"{n}"' not in sources}
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"


def test_set_total_mirrors_a_cumulative_count() -> None:
    r = Registry()
    c = r.counter("k_total", "kernel count", ("reason",))
    c.set_total({"reason": "fail_open"}, 7)
    c.set_total({"reason": "fail_open"}, 9)
    assert c.value({"reason": "fail_open"}) == 9
    with pytest.raises(MetricError, match="only for counters|is for counters"):
        r.gauge("g", "").set_total(None, 1)
    with pytest.raises(MetricError, match="negative"):
        c.set_total({"reason": "x"}, -1)


def test_resilience_feeds_use_bounded_service_labels() -> None:
    meshmetrics.REGISTRY.reset()
    cl = "outbound|80||web.default.svc.mesh"
    assert meshmetrics.service_of_cluster(cl) == "web.default.svc.mesh"
    assert meshmetrics.outcome_reason(503, None) == "503"
    assert meshmetrics.outcome_reason(404, None) == "4xx"
    assert meshmetrics.outcome_reason(200, 14) == "grpc_14"
    assert meshmetrics.outcome_reason(0, None, connect_failure=True) == "connect_failure"
    meshmetrics.retry(cl, "503")
    meshmetrics.retry_stopped(cl, "budget")
    meshmetrics.retry_stopped(cl, "deadline")
    meshmetrics.breaker_overflow(cl, "max_requests")
    meshmetrics.outlier_ejected(cl, "503")
    s = parse(render(meshmetrics.REGISTRY.collect()))
    svc = {"destination_service": "web.default.svc.mesh"}
    assert select(s, "nodemesh_retries_total") == [({**svc, "reason": "503"}, 1.0)]
    assert select(s, "nodemesh_retry_budget_exhausted_total") == [(svc, 1.0)]
    assert sorted(d["reason"] for d, _ in select(s, "nodemesh_retries_stopped_total")) == ["budget", "deadline"]
    assert select(s, "nodemesh_circuit_breaker_overflows_total") == [({**svc, "limit": "max_requests"}, 1.0)]
    assert select(s, "nodemesh_outlier_ejections_total") == [({**svc, "reason": "503"}, 1.0)]
    meshmetrics.REGISTRY.reset()


class _Settings:
    tracing = ""
    trace_sampling = 1.0
    access_log_sampling = 1.0
    node_name = "n2"


class _FakeProxy:
    """What ProxyTelemetry and the sessions need of a NodeProxy."""

    def __init__(self, snapshot: Snapshot) -> None:
        from nodeagent.observe.telemetry import ProxyTelemetry
        from nodeagent.proxy.accesslog import AccessLog

        self.settings = _Settings()
        self.snapshot = snapshot
        self.access_log = AccessLog("off")
        self.lines = self.access_log.capture()
        self.telemetry = ProxyTelemetry(self)  # type: ignore[arg-type]
        self.l7: Any = None  # an L7Runtime when a test needs one

    def new_session(self, direction: str, **fields: object) -> Session:
        session = Session(self.access_log, direction, node=self.settings.node_name, **fields)
        session.observer = self.telemetry
        self.telemetry.begin(session)
        return session


def _http_snapshot() -> Snapshot:
    ep = Endpoint("10.0.0.2", 8080, "default/web-2", "spiffe://td/ns/default/sa/web", "n2", "10.0.0.2")
    svc = Service("web", "default", "240.240.0.1", (ServicePort(80, 8080, protocol="http", endpoints=(ep,)),))
    wl = Workload("client", "default", "client", "n1", "10.0.0.1", (), "spiffe://td/ns/default/sa/client", "10.0.0.1")
    return Snapshot("v1", "n2", MeshSettings(trust_domain="td", dns_domain="mesh"), services=(svc,), workloads=(wl,))


class _End:
    """A stand-in for the workload's TcpEnd: telemetry only sets its tap."""

    tap: Any = None


def test_destination_side_reports_http_requests_not_tcp() -> None:
    """An inbound tunnel to an HTTP port: each request observed on the workload end
    becomes a reporter=destination request (with its body sizes, a span child of the
    request's traceparent and a log line), and the tunnel is not also a TCP connection."""
    from nodeagent.meshview.snapshot import LocalWorkload
    from nodeagent.proxy.inbound import InboundTarget

    meshmetrics.REGISTRY.reset()
    proxy = _FakeProxy(_http_snapshot())
    conn = proxy.new_session("inbound", src="10.0.0.1:5000", source_principal="spiffe://td/ns/default/sa/client",
                             dst_addr="10.0.0.2:8080", dst_identity="spiffe://td/ns/default/sa/web", via="hbone",
                             tls=True)
    conn.peer_headers = (("baggage", "k8s.namespace.name=default,k8s.workload.name=client,service.name=default/web"),)
    conn.set(dst_workload="default/web-2")
    end = _End()
    lw = LocalWorkload("web-2", "default", "web", "10.0.0.2", (8080,), uid=2001)
    target = InboundTarget(lw, "spiffe://td/ns/default/sa/web", "10.0.0.2", 8080)
    proxy.telemetry.workload_end(conn, cast("TcpEnd", end), target)
    watch = end.tap
    assert watch is not None
    conn.connected()
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    watch.request(f"POST /a HTTP/1.1\r\nhost: x\r\ntraceparent: {tp}\r\ncontent-length: 4\r\n\r\nabcd".encode())
    watch.response(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 6\r\n\r\nnope!\n")
    watch.request(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n")
    watch.response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    conn.finish()
    s = parse(render(meshmetrics.REGISTRY.collect()))
    reqs = select(s, "istio_requests_total", reporter="destination")
    assert sorted((d["response_code"], v) for d, v in reqs) == [("200", 1.0), ("503", 1.0)]
    d = reqs[0][0]
    assert (d["source_workload"], d["destination_workload"], d["destination_service"], d["request_protocol"],
            d["connection_security_policy"]) == ("client", "web-2", "web.default.svc.mesh", "http", "mutual_tls")
    assert select(s, "istio_request_bytes_sum", reporter="destination", response_code="503")[0][1] == 4
    assert select(s, "istio_response_bytes_sum", reporter="destination", response_code="503")[0][1] == 6
    assert select(s, "istio_response_bytes_sum", reporter="destination", response_code="200")[0][1] == 2
    assert select(s, "istio_tcp_connections_opened_total") == []
    assert select(s, "istio_tcp_connections_closed_total") == []
    lines = [r for r in proxy.lines if "method" in r]
    assert [(r["method"], r["response_code"], r["bytes_sent"], r["bytes_received"]) for r in lines] == \
        [("POST", 503, 4, 6), ("GET", 200, 0, 2)]
    assert lines[0]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    meshmetrics.REGISTRY.reset()


def test_destination_side_falls_back_to_tcp_when_not_http() -> None:
    from nodeagent.meshview.snapshot import LocalWorkload
    from nodeagent.proxy.inbound import InboundTarget

    meshmetrics.REGISTRY.reset()
    proxy = _FakeProxy(_http_snapshot())
    conn = proxy.new_session("inbound", source_principal="spiffe://td/ns/default/sa/client",
                             dst_addr="10.0.0.2:8080", via="hbone", tls=True, dst_workload="default/web-2")
    end = _End()
    lw = LocalWorkload("web-2", "default", "web", "10.0.0.2", (8080,), uid=2001)
    target = InboundTarget(lw, "spiffe://td/ns/default/sa/web", "10.0.0.2", 8080)
    proxy.telemetry.workload_end(conn, cast("TcpEnd", end), target)
    conn.connected()
    end.tap.request(b"\x16\x03\x01 not http at all\r\n\r\n")
    assert end.tap.stopped
    conn.finish()
    s = parse(render(meshmetrics.REGISTRY.collect()))
    assert select(s, "istio_requests_total") == []
    assert [v for _, v in select(s, "istio_tcp_connections_closed_total", reporter="destination")] == [1.0]
    meshmetrics.REGISTRY.reset()


def test_outbound_l7_connection_is_not_also_a_tcp_connection() -> None:
    meshmetrics.REGISTRY.reset()
    proxy = _FakeProxy(_http_snapshot())
    conn = proxy.new_session("outbound", source_workload="default/client", dst_service="default/web")
    conn.set(protocol="http")  # the L7 stack took it over
    conn.finish()
    tcp = proxy.new_session("outbound", source_workload="default/client", dst_service="default/web")
    tcp.set(protocol="tcp", detect="timeout")  # auto-detection fell back to TCP
    tcp.finish()
    s = parse(render(meshmetrics.REGISTRY.collect()))
    assert [v for _, v in select(s, "istio_tcp_connections_closed_total")] == [1.0]
    meshmetrics.REGISTRY.reset()


def test_l7_state_sets_scrape_time_gauges_and_admin_sees_ejections() -> None:
    from nodeagent.meshview.l7snapshot import DEFAULT_POLICY
    from nodeagent.observe.telemetry import l7_state
    from nodeagent.proxy.http.pipeline import L7Runtime
    from nodeagent.proxy.http.retry import Outcome
    from nodemesh.routespec import OutlierDetection

    meshmetrics.REGISTRY.reset()
    proxy = _FakeProxy(_http_snapshot())
    t = [100.0]
    rt = L7Runtime(cast("NodeProxy", proxy))
    proxy.l7 = rt
    rt.clock = lambda: t[0]
    policy = dataclasses.replace(DEFAULT_POLICY, outlier=OutlierDetection(consecutive_5xx=2, base_ejection_s=30))
    sp = ServicePort(80, 8080, protocol="http", cluster="outbound|80||web.default.svc.mesh", policy=policy)
    dest = rt.destination(sp)
    ep = _http_snapshot().services[0].ports[0].endpoints[0]
    assert dest.outlier is not None
    dest.outlier._clock = lambda: t[0]
    assert not dest.record(ep, Outcome(status=503), 0.01, 2)
    assert dest.record(ep, Outcome(status=503), 0.01, 2)
    state = l7_state(proxy)  # type: ignore[arg-type]
    assert state[0]["ejected"] == ["10.0.0.2:8080"] and state[0]["ejections"] == 1
    s = parse(render(meshmetrics.REGISTRY.collect()))
    assert select(s, "nodemesh_outlier_ejected") == [
        ({"destination_service": "web.default.svc.mesh", "endpoint": "10.0.0.2:8080"}, 1.0)]
    assert select(s, "nodemesh_circuit_breaker_open") == [({"destination_service": "web.default.svc.mesh"}, 0.0)]
    t[0] += 31  # the ejection ends by the clock: the next scrape says so
    assert l7_state(proxy)[0]["ejected"] == []  # type: ignore[arg-type]
    assert select(parse(render(meshmetrics.REGISTRY.collect())), "nodemesh_outlier_ejected") == []
    meshmetrics.REGISTRY.reset()


def _span_of(session: Session) -> tracing.Span:
    assert session.telemetry is not None and session.telemetry.span is not None
    return session.telemetry.span


def test_request_headers_continue_w3c_and_b3_traces() -> None:
    proxy = _FakeProxy(_http_snapshot())
    tel = proxy.telemetry
    s = proxy.new_session("outbound", method="GET")
    out = dict(tel.request_headers(s, [("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                                       ("tracestate", "app=1")]))
    span = _span_of(s)
    assert (span.trace_id, span.parent_span_id) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    assert out["traceparent"] == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{span.span_id}-01"
    assert out["tracestate"] == "app=1"
    b = proxy.new_session("outbound", method="GET")
    out = dict(tel.request_headers(b, [("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", "00f067aa0ba902b7"),
                                       ("x-b3-sampled", "1")]))
    span = _span_of(b)
    assert span.trace_id == "0000000000000000a3ce929d0e0e4736" and span.parent_span_id == "00f067aa0ba902b7"
    assert out["x-b3-spanid"] == span.span_id and out["traceparent"].startswith("00-0000000000000000a3ce")
    fresh = proxy.new_session("outbound", method="GET")
    # A request's span waits for its headers (no allocation before the caller's trace is known).
    assert fresh.telemetry is not None and fresh.telemetry.span is None
    out = dict(tel.request_headers(fresh, [("host", "web")]))
    root = _span_of(fresh)  # no caller trace: this hop roots one (sampled: traceSampling is 1.0 here)
    assert root.parent_span_id == "" and out["traceparent"] == f"00-{root.trace_id}-{root.span_id}-01"


def test_exposition_reads_the_same_in_prometheus_client() -> None:
    """Our text format against prometheus-client's own parser (the oracle):
    every sample, label escaping and histogram bucket as we meant it."""
    from prometheus_client.parser import text_string_to_metric_families

    r = Registry()
    c = r.counter("t_requests_total", "Requests.", ("path", "code"))
    c.inc({"path": 'a"b\\c\nd', "code": "200"}, 3)
    c.inc({"path": "/", "code": "503"})
    r.gauge("t_open", "Open now.").set(None, 7)
    h = r.histogram("t_latency_ms", "Latency.", ("svc",), buckets=(1, 10, 100))
    for v in (0.5, 5, 50, 500):
        h.observe({"svc": "web"}, v)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(render(r.collect())) for s in fam.samples}
    assert got[("t_requests_total", (("code", "200"), ("path", 'a"b\\c\nd')))] == 3
    assert got[("t_requests_total", (("code", "503"), ("path", "/")))] == 1
    assert got[("t_open", ())] == 7
    cumulative = [got[("t_latency_ms_bucket", (("le", le), ("svc", "web")))] for le in ("1", "10", "100", "+Inf")]
    assert cumulative == [1, 2, 3, 4]
    assert got[("t_latency_ms_sum", (("svc", "web"),))] == 555.5 and got[("t_latency_ms_count", (("svc", "web"),))] == 4
