"""Observability end to end: known traffic through the real mesh, then exact
metric values and labels on both reporters, access log fields, one trace
joining both node proxies' spans, and `nodemesh explain` agreeing with what
the proxy then did."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nodeagent.observe.meshmetrics import parse, select
from nodemesh.lab.harness import Lab, LabWorkload
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID, WEB_UID

pytestmark = pytest.mark.netns

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
WEB = "spiffe://cluster.local/ns/default/sa/web"
RAW = "spiffe://cluster.local/ns/default/sa/raw"


OBS_CONFIG = """\
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: raw, namespace: default}
spec:
  selector: {app: raw}
  ports: [{name: tcp, port: 90, targetPort: 9000, protocol: tcp}]
---
apiVersion: nodemesh.io/v1alpha1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /retry}}]
    backendRefs: [{name: web, port: 80}]
    retry: {attempts: 2, backoff: 1ms, retryOn: [5xx]}
  - backendRefs: [{name: web, port: 80}]
---
apiVersion: nodemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {name: web}
spec:
  targetRef: {name: web}
  healthChecks:
  - {port: 80, interval: 200ms, timeout: 150ms, unhealthyThreshold: 2, healthyThreshold: 1, http: {path: /healthz}}
"""
RAW_UID = 2002


@pytest.fixture
def traced(lab: Lab) -> Iterator[Lab]:
    """The conftest `mesh` layout (HTTP service web -> web-2 on node 2), a TCP service
    raw -> raw-2 on node 2, each agent tracing to a local JSONL file."""
    orig = lab.agent_config

    def with_tracing(k: int, *args: Any, **kw: Any) -> dict[str, Any]:
        cfg = orig(k, *args, **kw)
        cfg["proxy"]["tracing"] = str(lab.workdir / f"trace-{k}.jsonl")
        cfg["proxy"]["traceSampling"] = 1.0  # every trace: the default keeps 1%
        # Inbound capture by REDIRECT: this test is about telemetry, not the TPROXY path.
        cfg.setdefault("capture", {})["inbound"] = "redirect"
        return cfg

    lab.agent_config = with_tracing  # type: ignore[method-assign]
    lab.start_controlplane()
    lab.apply(BASE_CONFIG + OBS_CONFIG)
    lab.add_workload(LabWorkload("web-2", node=2, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    lab.add_workload(LabWorkload("raw-2", node=2, uid=RAW_UID, ports=(9000,), service_account="raw",
                                 labels={"app": "raw"}))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client",
                                 labels={"app": "client"}))
    lab.start_app("web-2")
    lab.start_app("raw-2")
    lab.start_agent(1)
    lab.start_agent(2)
    # Discovery is eventually consistent: wait until node 1 knows both endpoints on node 2.
    lab.wait_for(lambda: all(w in admin(lab, 1, "/clusters") for w in ("default/web-2", "default/raw-2")), 10,
                 "node-1 to learn web-2's and raw-2's endpoints", lambda: lab.log("agent-1"))
    yield lab


def admin(lab: Lab, k: int, path: str) -> str:
    res = lab.ns_exec(lab.node_ns(k), ["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:15000{path}"])
    return res.stdout


def series(lab: Lab, k: int, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
    return select(parse(admin(lab, k, "/metrics")), name, **match)


def total(lab: Lab, k: int, name: str, **match: str) -> float:
    return sum(v for _, v in series(lab, k, name, **match))


def spans(lab: Lab, k: int) -> list[dict[str, Any]]:
    path = lab.workdir / f"trace-{k}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def attrs(span: dict[str, Any]) -> dict[str, Any]:
    return {a["key"]: next(iter(a["value"].values())) for a in span["attributes"]}


def labels_for(dst: str, svc: str, principal: str, protocol: str) -> dict[str, str]:
    return {
        "source_workload": "client", "source_workload_namespace": "default", "source_principal": CLIENT,
        "destination_workload": dst, "destination_workload_namespace": "default",
        "destination_principal": principal, "destination_service": f"{svc}.default.svc.mesh",
        "destination_service_name": svc, "destination_service_namespace": "default",
        "request_protocol": protocol, "response_flags": "-", "connection_security_policy": "mutual_tls",
    }


def test_http_requests_exact_on_both_reporters_and_app_trace_continued(traced: Lab) -> None:
    lab = traced
    vip = lab.service_vip("web")
    sizes: list[tuple[int, int, int]] = []  # (code, request body bytes, response body bytes)
    for i, status in enumerate((200, 503, 200, 503, 200)):
        body = "x" * (10 * (i + 1))
        q = f"?status={status}" if status != 200 else ""
        res = lab.curl(1, f"http://{vip}/obs-{i}{q}", uid=CLIENT_UID,
                       extra=["--data-binary", body, "-o", "/dev/null", "-w", "%{http_code} %{size_download}"])
        assert res.returncode == 0, res.stderr
        code, down = res.stdout.split()
        sizes.append((int(code), len(body), int(down)))
    assert [c for c, _, _ in sizes] == [200, 503, 200, 503, 200]

    def requests(k: int, reporter: str) -> float:
        return total(lab, k, "istio_requests_total", reporter=reporter, destination_workload="web-2")

    lab.wait_for(lambda: requests(1, "source") == 5 and requests(2, "destination") == 5, 10,
                 "5 requests on both reporters", lambda: admin(lab, 2, "/metrics")[-3000:])
    want = labels_for("web-2", "web", WEB, "http")
    for k, reporter in ((1, "source"), (2, "destination")):
        got = series(lab, k, "istio_requests_total", reporter=reporter, destination_workload="web-2")
        assert sorted((d["response_code"], v) for d, v in got) == [("200", 3.0), ("503", 2.0)], got
        for d, _ in got:
            assert d == {"reporter": reporter, **want, "response_code": d["response_code"],
                         "grpc_response_status": ""}, d
        # Body sizes, exactly: what curl sent and what it received.
        m = {"reporter": reporter, "destination_workload": "web-2"}
        assert total(lab, k, "istio_request_bytes_count", **m) == 5
        assert total(lab, k, "istio_request_bytes_sum", **m) == sum(b for _, b, _ in sizes)
        assert total(lab, k, "istio_response_bytes_sum", **m) == sum(r for _, _, r in sizes) > 0
        assert total(lab, k, "istio_request_duration_milliseconds_count", **m) == 5
        # Istio's split: HTTP traffic is reported as requests, never also as TCP connections.
        assert series(lab, k, "istio_tcp_connections_opened_total", destination_workload="web-2") == []
    # One access log line per request on each side, with the fields.
    out_req = [e for e in lab.access_log(1) if e.get("direction") == "outbound" and "method" in e]
    in_req = [e for e in lab.access_log(2) if e.get("direction") == "inbound" and "method" in e]
    assert len(out_req) == 5 and len(in_req) == 5
    for log_ in (out_req, in_req):
        assert sorted(e["response_code"] for e in log_) == [200, 200, 200, 503, 503]
        assert sum(e["bytes_sent"] for e in log_) == sum(b for _, b, _ in sizes)
        assert sum(e["bytes_received"] for e in log_) == sum(r for _, _, r in sizes)
    for e in out_req:
        assert e["reporter"] == "source" and e["destination_service"] == "web.default.svc.mesh"
        assert e["attempts"] == 1 and e["route"] and e["dst_identity"] == WEB and e["source_principal"] == CLIENT
        assert e["endpoint"].endswith(":8080") and len(e["trace_id"]) == 32 and e["end"] >= e["start"]
        assert e["response_flags"] == "-" and e["error_reason"] == ""
    assert {e["trace_id"] for e in out_req} == {e["trace_id"] for e in in_req}, "one trace ID per hop pair"

    # The application's own trace is continued: both proxies' spans under its trace ID.
    tid, app_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    res = lab.curl(1, f"http://{vip}/traced", uid=CLIENT_UID,
                   extra=["-H", f"traceparent: 00-{tid}-{app_span}-01", "-H", "tracestate: app=1"])
    assert res.returncode == 0, res.stderr
    lab.wait_for(lambda: any(s["traceId"] == tid for s in spans(lab, 2))
                 and any(s["traceId"] == tid for s in spans(lab, 1)),
                 5, "spans of the app's trace on both nodes")
    src = [s for s in spans(lab, 1) if s["traceId"] == tid]
    dst = [s for s in spans(lab, 2) if s["traceId"] == tid]
    assert len(src) == 1 and src[0]["kind"] == 3 and src[0]["parentSpanId"] == app_span, src
    assert len(dst) == 1 and dst[0]["kind"] == 2 and dst[0]["parentSpanId"] == src[0]["spanId"], dst
    for s, node in ((src[0], "node-1"), (dst[0], "node-2")):
        a = attrs(s)
        assert a["nodemesh.node"] == node and a["source.principal"] == CLIENT
        assert a["destination.workload"] == "default/web-2" and a["http.request.method"] == "GET"
        assert int(a["http.response.status_code"]) == 200
    assert {e["trace_id"] for e in lab.access_log(1) if e.get("path") == "/traced"} == {tid}
    assert {e["trace_id"] for e in lab.access_log(2) if e.get("path") == "/traced"} == {tid}

    # A retry (route /retry: 2 attempts on 5xx) is counted as one.
    res = lab.curl(1, f"http://{vip}/retry?status=503", uid=CLIENT_UID, extra=["-o", "/dev/null", "-w", "%{http_code}"])
    assert res.stdout == "503"
    lab.wait_for(lambda: total(lab, 1, "nodemesh_retries_total") == 1, 5, "the retry counter")
    assert series(lab, 1, "nodemesh_retries_total") == [
        ({"destination_service": "web.default.svc.mesh", "reason": "503"}, 1.0)]
    line = [e for e in lab.access_log(1) if e.get("path") == "/retry?status=503"]
    assert len(line) == 1 and line[0]["attempts"] == 2 and line[0]["route"]
    # Both tries reached the workload: two requests on the destination side.
    lab.wait_for(lambda: total(lab, 2, "istio_requests_total", response_code="503") == 4, 5, "2 more 503s on node 2")


def test_tcp_metrics_access_log_and_trace(traced: Lab) -> None:
    lab = traced
    vip = lab.service_vip("raw")
    for i in range(3):
        res = lab.curl(1, f"http://{vip}:90/obs-{i}", uid=CLIENT_UID)
        assert res.returncode == 0, res.stderr

    def closed(k: int, reporter: str) -> float:
        return total(lab, k, "istio_tcp_connections_closed_total", reporter=reporter, destination_workload="raw-2")

    lab.wait_for(lambda: closed(1, "source") == 3 and closed(2, "destination") == 3, 10,
                 "3 closed connections on both reporters", lambda: admin(lab, 1, "/metrics")[-3000:])
    want = labels_for("raw-2", "raw", RAW, "tcp")
    for k, reporter in ((1, "source"), (2, "destination")):
        for name in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"):
            got = series(lab, k, name, reporter=reporter, destination_workload="raw-2")
            assert len(got) == 1, f"{name} on node {k}: {got}"
            labels, value = got[0]
            assert value == 3, f"{name} {reporter}"
            assert labels == {"reporter": reporter, **want}
    # A TCP port has no requests.
    assert series(lab, 1, "istio_requests_total", destination_workload="raw-2") == []
    # Bytes: the metric equals the access log's sum, on each side.
    out_log = [e for e in lab.access_log(1)
               if e.get("direction") == "outbound" and e.get("dst_workload") == "default/raw-2"]
    in_log = [e for e in lab.access_log(2) if e.get("direction") == "inbound" and e.get("via") == "hbone"
              and e.get("dst_workload") == "default/raw-2"]
    assert len(out_log) == 3 and len(in_log) == 3
    for k, log_, reporter in ((1, out_log, "source"), (2, in_log, "destination")):
        m = {"reporter": reporter, "destination_workload": "raw-2"}
        assert total(lab, k, "istio_tcp_sent_bytes_total", **m) == sum(e["bytes_sent"] for e in log_) > 0
        assert total(lab, k, "istio_tcp_received_bytes_total", **m) == sum(e["bytes_received"] for e in log_) > 0
    for e in out_log:
        assert e["reporter"] == "source" and e["destination_service"] == "raw.default.svc.mesh"
        assert e["response_flags"] == "-" and e["error_reason"] == "" and e["attempts"] == 1
        assert e["endpoint"].endswith(":9000") and e["dst_identity"] == RAW
        assert len(e["trace_id"]) == 32 and e["end"] >= e["start"]
    # Each connection's trace crosses to node 2 in the HBONE CONNECT: the inbound span
    # (node 2) is a child of the outbound one (node 1), and both log lines share the ID.
    assert {e["trace_id"] for e in out_log} == {e["trace_id"] for e in in_log}
    lab.wait_for(lambda: len(spans(lab, 1)) >= 3 and len(spans(lab, 2)) >= 3, 5, "spans from both nodes")
    inbound = {s["traceId"]: s for s in spans(lab, 2) if s["kind"] == 2}
    outbound = {s["traceId"]: s for s in spans(lab, 1) if s["kind"] == 3 and s["traceId"] in inbound}
    assert set(outbound) == set(inbound) == {e["trace_id"] for e in out_log}
    for tid, s in inbound.items():
        assert s["parentSpanId"] == outbound[tid]["spanId"]
        a = attrs(s)
        assert a["source.principal"] == CLIENT and a["destination.workload"] == "default/raw-2"
    # The node view of the same facts.
    summary = json.loads(admin(lab, 1, "/summary"))
    edge = next(e for e in summary["edges"] if e["reporter"] == "source"
                and e["destination_service_key"] == "default/raw")
    assert edge["source"] == "default/client"
    assert edge["tcp_closed"] == 3 and edge["success_rate"] == 1.0 and edge["mtls"] == ["mutual_tls"]
    # nodemesh's own families on the agents: xDS link, capture, certificates, health checks.
    for k in (1, 2):
        assert total(lab, k, "nodemesh_xds_connected") == 1
        assert series(lab, k, "nodemesh_capture_installed") == [({"mode": "iptables"}, 1.0)]
        assert series(lab, k, "nodemesh_capture_proxy_state") == [({"state": "serving"}, 1.0)]
        assert total(lab, k, "nodemesh_capture_proxy_down_windows_total") == 0
    expiry = {d["identity"]: v for d, v in series(lab, 2, "nodemesh_cert_expiry_timestamp_seconds")}
    assert set(expiry) == {WEB, RAW} and all(v > time.time() + 3600 for v in expiry.values())
    # web-2's health check runs on node 2 every 200 ms and passes.
    lab.wait_for(lambda: total(lab, 2, "nodemesh_health_checks_total", result="pass") >= 2, 5, "health check results")
    assert series(lab, 2, "nodemesh_endpoint_healthy") == [
        ({"destination_service": "web.default.svc.mesh", "workload": "default/web-2"}, 1.0)]
    assert total(lab, 2, "nodemesh_health_checks_total", result="fail") == 0
    # The control plane: both proxies connected, no NACK, push latency observed per type.
    cp_metrics = parse(lab.ns_exec(lab.hub, ["curl", "-sS", "--max-time", "5", "http://127.0.0.1:15014/metrics"]).stdout)
    assert select(cp_metrics, "nodemesh_controlplane_xds_streams") == [({}, 2.0)]
    assert select(cp_metrics, "nodemesh_controlplane_xds_nacks_total") == []
    pushes = {d["type"]: v for d, v in select(cp_metrics, "nodemesh_controlplane_push_latency_seconds_count")}
    assert pushes.get("Cluster", 0) >= 2 and pushes.get("ClusterLoadAssignment", 0) >= 2, pushes


def test_explain_agrees_with_the_proxy(traced: Lab) -> None:
    lab = traced
    # Two replicas, one per path (same node, HBONE), so agreeing is not a foregone conclusion:
    # whichever endpoint the proxy picks must be one explain listed, reached the way explain said.
    lab.add_workload(LabWorkload("web-1", node=1, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    lab.start_app("web-1")
    lab.reload_agent(1)
    lab.wait_for(lambda: "default/web-1" in admin(lab, 1, "/clusters"), 10, "node-1 to learn web-1's endpoint",
                 lambda: lab.log("agent-1"))
    res = lab.ns_exec(lab.node_ns(1), [sys.executable, "-m", "nodemesh", "explain", "client", "web", "-o", "json"])
    x = json.loads(res.stdout)
    vip = lab.service_vip("web")
    assert x["destination"]["ip"] == vip and x["destination"]["port"] == 80
    assert x["capture"]["captured"] is True and f"uid {CLIENT_UID}" in x["capture"]["rule"]
    assert x["plan"]["kind"] == "service" and x["plan"]["service"] == "default/web"
    by_workload = {c["workload"]: c for c in x["candidates"]}
    assert set(by_workload) == {"default/web-1", "default/web-2"}, x["candidates"]
    assert by_workload["default/web-2"]["address"] == f"{lab.node_ip(2)}:8080"
    assert "HBONE" in by_workload["default/web-2"]["path"]
    assert by_workload["default/web-1"]["path"].startswith("same node")
    assert {c["identity"] for c in x["candidates"]} == {WEB}
    by_address = {c["address"]: c for c in x["candidates"]}
    # Now the proxy does it, several times: each connection goes to a listed endpoint, the listed way.
    before = len([e for e in lab.access_log(1) if e.get("direction") == "outbound"])
    for i in range(6):
        assert lab.curl(1, f"http://{vip}/explained/{i}", uid=CLIENT_UID).returncode == 0
    lab.wait_for(lambda: len([e for e in lab.access_log(1) if e.get("direction") == "outbound"]) >= before + 6, 5,
                 "six more outbound access log lines")
    for e in [e for e in lab.access_log(1) if e.get("direction") == "outbound"][before:]:
        cand = by_address.get(e["endpoint"])
        assert cand is not None, (e, x["candidates"])
        assert e["dst_workload"] == cand["workload"]
        assert e["via"] == ("same-node" if cand["path"].startswith("same node") else "hbone"), (e, cand)
    # The human forms and the other CLI views work against the live agent too.
    for argv in (["status"], ["services"], ["endpoints", "web"], ["routes"], ["explain", "client", "web"],
                 ["top", "--count", "1"], ["logs", "--tail", "5"], ["endpoints", "web", "-o", "yaml"]):
        # As root on the node: services, routes and logs read the agent's admin token.
        r = lab.ns_exec(lab.node_ns(1), ["env", f"NODEMESH_ADMIN_TOKEN_FILE={lab.workdir / 'agent-1' / 'admin.token'}",
                                         sys.executable, "-m", "nodemesh", *argv], check=False)
        assert r.returncode == 0, f"nodemesh {' '.join(argv)}: {r.stderr}"
    # Without it (any local process), other workloads' requests stay hidden.
    r = lab.ns_exec(lab.node_ns(1), [sys.executable, "-m", "nodemesh", "logs", "--tail", "5"], check=False)
    assert r.returncode != 0 and "admin token" in r.stderr, r.stderr
    assert "default/web-2" in lab.ns_exec(lab.node_ns(1), [sys.executable, "-m", "nodemesh", "endpoints", "web"]).stdout
    # A refused connection is explained and counted with its response flag.
    bad = lab.ns_exec(lab.node_ns(1), [sys.executable, "-m", "nodemesh", "explain", "nosuch", "web"], check=False)
    assert bad.returncode == 1 and "not a workload declared on node node-1" in bad.stderr


GRPC_CONFIG = """\
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: echo}
spec: {selector: {app: echo}, ports: [{port: 50051, targetPort: 50051, protocol: grpc}]}
"""
ECHO = "spiffe://cluster.local/ns/default/sa/echo"
GRPC_CALLS = r"""
import json, sys, grpc
ident = (lambda b: b, lambda b: b)
out = []
with grpc.insecure_channel(sys.argv[1]) as ch:
    unary, stream = ch.unary_unary("/test.Echo/Unary", *ident), ch.unary_stream("/test.Echo/Stream", *ident)
    for req in (b"a", b"bb", b"notfound"):
        try:
            out.append(["OK", unary(req, timeout=5).decode()])
        except grpc.RpcError as e:
            out.append([e.code().name, e.details()])
    out.append(["OK", [m.decode() for m in stream(b"3", timeout=5)]])
print(json.dumps(out))
"""


def test_grpc_requests_exact_on_the_destination(lab: Lab) -> None:
    """The receiving node follows HTTP/2 passively (nodeagent/observe/h2watch.py): each gRPC
    call is a reporter="destination" request with its grpc-status, a server span
    and an access log line; the tunnel is not also a TCP connection."""
    from tests.netns.test_grpc_l7 import SERVER

    orig = lab.agent_config

    def with_tracing(k: int, *args: Any, **kw: Any) -> dict[str, Any]:
        cfg = orig(k, *args, **kw)
        cfg["proxy"]["tracing"] = str(lab.workdir / f"trace-{k}.jsonl")
        cfg["proxy"]["traceSampling"] = 1.0  # every trace: the default keeps 1%
        return cfg

    lab.agent_config = with_tracing  # type: ignore[method-assign]
    lab.start_controlplane()
    lab.apply(BASE_CONFIG + GRPC_CONFIG)
    lab.add_workload(LabWorkload("echo-2", node=2, uid=2005, ports=(50051,), service_account="echo",
                                 labels={"app": "echo"}))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client",
                                 labels={"app": "client"}))
    lab.spawn("app-echo-2", lab.node_ns(2), [sys.executable, "-c", SERVER, "echo-2", "50051", "ok"], uid=2005)
    lab.wait_for(lambda: lab._listening(2, 50051), 15, "the gRPC server to listen", lambda: lab.log("app-echo-2"))
    lab.start_agent(1)
    lab.start_agent(2)
    lab.wait_for(lambda: "default/echo-2" in admin(lab, 1, "/clusters"), 10, "node-1 to learn echo-2",
                 lambda: lab.log("agent-1"))
    res = lab.ns_exec(lab.node_ns(1), [sys.executable, "-c", GRPC_CALLS, f"{lab.service_vip('echo')}:50051"],
                      uid=CLIENT_UID, check=False, timeout=30)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == [["OK", "echo-2"], ["OK", "echo-2"], ["NOT_FOUND", "no such thing"],
                   ["OK", ["echo-2-0", "echo-2-1", "echo-2-2"]]], out

    def requests(k: int, reporter: str) -> float:
        return total(lab, k, "istio_requests_total", reporter=reporter, destination_workload="echo-2")

    lab.wait_for(lambda: requests(1, "source") == 4 and requests(2, "destination") == 4, 10,
                 "4 gRPC requests on both reporters",
                 lambda: f"{lab.access_log(2)[-3:]}\n{lab.log('agent-2')[-1500:]}\n"
                 + "\n".join(x for k in (1, 2) for x in admin(lab, k, "/metrics").splitlines()
                             if x.startswith(("istio_requests_total", "istio_tcp_conn"))))
    want = labels_for("echo-2", "echo", ECHO, "grpc")
    got = series(lab, 2, "istio_requests_total", reporter="destination", destination_workload="echo-2")
    assert sorted((d["grpc_response_status"], d["response_code"], v) for d, v in got) == [
        ("0", "200", 3.0), ("5", "200", 1.0)], got
    for d, _ in got:
        assert d == {"reporter": "destination", **want, "response_code": "200",
                     "grpc_response_status": d["grpc_response_status"]}, d
    # Message bytes (5-byte gRPC frame header + payload) agree on both reporters.
    for name in ("istio_request_bytes_sum", "istio_response_bytes_sum", "istio_request_duration_milliseconds_count"):
        assert total(lab, 2, name, reporter="destination") == total(lab, 1, name, reporter="source"), name
    assert total(lab, 2, "istio_request_bytes_sum", reporter="destination") == (5 + 1) + (5 + 2) + (5 + 8) + (5 + 1)
    assert series(lab, 2, "istio_tcp_connections_opened_total", destination_workload="echo-2") == []
    # An access log line and a server span per call, in the source proxy's trace.
    in_req = [e for e in lab.access_log(2) if e.get("direction") == "inbound" and "method" in e]
    assert sorted(e["path"] for e in in_req) == ["/test.Echo/Stream"] + ["/test.Echo/Unary"] * 3, in_req
    assert all(e["method"] == "POST" and e["protocol"] == "grpc" for e in in_req), in_req
    out_req = [e for e in lab.access_log(1) if e.get("direction") == "outbound" and "method" in e]
    assert {e["trace_id"] for e in in_req} == {e["trace_id"] for e in out_req}, (in_req, out_req)
    lab.wait_for(lambda: sum(s["kind"] == 2 for s in spans(lab, 2)) >= 4, 5, "4 server spans on node 2")
    by_id = {s["spanId"]: s for s in spans(lab, 1)}
    for s in (s for s in spans(lab, 2) if s["kind"] == 2):
        assert s["parentSpanId"] in by_id and by_id[s["parentSpanId"]]["traceId"] == s["traceId"], s
