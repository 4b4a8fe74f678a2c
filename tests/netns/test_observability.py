"""Observability end to end: known traffic through the real mesh, then exact
metric values and labels on both reporters, access log fields, one trace
joining both node proxies' spans, and `nodemesh explain` agreeing with what
the proxy then did."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from nodeagent.metrics import parse, select
from nodemesh.lab import Lab, LabWorkload
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID, WEB_UID

pytestmark = pytest.mark.netns

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
WEB = "spiffe://cluster.local/ns/default/sa/web"


@pytest.fixture
def traced(lab: Lab) -> Iterator[Lab]:
    """The conftest `mesh` layout, with each agent tracing to a local JSONL file."""
    orig = lab.agent_config

    def with_tracing(k: int, *args: Any, **kw: Any) -> dict[str, Any]:
        cfg = orig(k, *args, **kw)
        cfg["proxy"]["tracing"] = str(lab.workdir / f"trace-{k}.jsonl")
        # Inbound capture by REDIRECT: this test is about telemetry, not the TPROXY path.
        cfg.setdefault("capture", {})["inbound"] = "redirect"
        return cfg

    lab.agent_config = with_tracing  # type: ignore[method-assign]
    lab.start_controlplane()
    lab.apply(BASE_CONFIG)
    lab.add_workload(LabWorkload("web-2", node=2, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client",
                                 labels={"app": "client"}))
    lab.start_app("web-2")
    lab.start_agent(1)
    lab.start_agent(2)
    # Discovery is eventually consistent: wait until node 1 knows web's endpoint on node 2.
    lab.wait_for(lambda: "default/web-2" in admin(lab, 1, "/clusters"), 10, "node-1 to learn web-2's endpoint",
                 lambda: lab.log("agent-1"))
    yield lab


def admin(lab: Lab, k: int, path: str) -> str:
    res = lab.ns_exec(lab.node_ns(k), ["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:15000{path}"])
    return res.stdout


def tcp_series(lab: Lab, k: int, name: str, reporter: str) -> list[tuple[dict[str, str], float]]:
    return select(parse(admin(lab, k, "/metrics")), name, reporter=reporter, destination_workload="web-2")


def test_tcp_metrics_access_log_and_trace(traced: Lab) -> None:
    lab = traced
    vip = lab.service_vip("web")
    for i in range(3):
        res = lab.curl(1, f"http://{vip}/obs-{i}", uid=CLIENT_UID)
        assert res.returncode == 0, res.stderr

    def closed(k: int, reporter: str) -> float:
        return sum(v for _, v in tcp_series(lab, k, "istio_tcp_connections_closed_total", reporter))

    lab.wait_for(lambda: closed(1, "source") == 3 and closed(2, "destination") == 3, 10,
                 "3 closed connections on both reporters", lambda: admin(lab, 1, "/metrics")[-3000:])
    want = {
        "source_workload": "client", "source_workload_namespace": "default", "source_principal": CLIENT,
        "destination_workload": "web-2", "destination_workload_namespace": "default",
        "destination_principal": WEB, "destination_service": "web.default.svc.mesh",
        "destination_service_name": "web", "destination_service_namespace": "default",
        "request_protocol": "tcp", "response_flags": "-", "connection_security_policy": "mutual_tls",
    }
    for k, reporter in ((1, "source"), (2, "destination")):
        for name in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"):
            series = tcp_series(lab, k, name, reporter)
            assert len(series) == 1, f"{name} on node {k}: {series}"
            labels, value = series[0]
            assert value == 3, f"{name} {reporter}"
            assert labels == {"reporter": reporter, **want}
    # The port is declared http: the outbound proxy also counts each request (nodeagent/proxy/http).
    reqs = select(parse(admin(lab, 1, "/metrics")), "istio_requests_total", reporter="source")
    assert [(d["response_code"], d["request_protocol"], d["destination_workload"], v) for d, v in reqs] == \
        [("200", "http", "web-2", 3.0)]
    # Bytes: the metric equals the access log's sum, on each side.
    out_log = [e for e in lab.access_log(1) if e.get("direction") == "outbound" and "method" not in e]
    in_log = [e for e in lab.access_log(2) if e.get("direction") == "inbound" and e.get("via") == "hbone"]
    assert len(out_log) == 3 and len(in_log) == 3
    sent = sum(v for _, v in tcp_series(lab, 1, "istio_tcp_sent_bytes_total", "source"))
    received = sum(v for _, v in tcp_series(lab, 1, "istio_tcp_received_bytes_total", "source"))
    assert sent == sum(e["bytes_sent"] for e in out_log) > 0
    assert received == sum(e["bytes_received"] for e in out_log) > 0
    # Access log fields (issue 6), beside the original ones.
    for e in out_log:
        assert e["reporter"] == "source" and e["destination_service"] == "web.default.svc.mesh"
        assert e["response_flags"] == "-" and e["error_reason"] == "" and e["attempts"] == 1
        assert e["endpoint"].endswith(":8080") and e["dst_identity"] == WEB
        assert len(e["trace_id"]) == 32 and e["end"] >= e["start"]
    # Each request's trace crosses to node 2 in the HBONE CONNECT: one trace ID, both access logs.
    out_req = [e for e in lab.access_log(1) if e.get("direction") == "outbound" and "method" in e]
    assert len(out_req) == 3 and all(e["response_code"] == 200 for e in out_req)
    assert {e["trace_id"] for e in out_req} == {e["trace_id"] for e in in_log}, "one trace ID per hop pair"
    # Traces: each connection's inbound span (node 2) is a child of its outbound span (node 1).
    def spans(k: int) -> list[dict[str, Any]]:
        path = lab.workdir / f"trace-{k}.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    lab.wait_for(lambda: len(spans(1)) >= 6 and len(spans(2)) >= 3, 5, "spans from both nodes")
    inbound = {s["traceId"]: s for s in spans(2) if s["kind"] == 2}
    outbound = {s["traceId"]: s for s in spans(1) if s["kind"] == 3 and s["traceId"] in inbound}
    assert set(outbound) == set(inbound) == {e["trace_id"] for e in out_req}
    for tid, s in inbound.items():
        assert s["parentSpanId"] == outbound[tid]["spanId"]
        attrs = {a["key"]: next(iter(a["value"].values())) for a in s["attributes"]}
        assert attrs["source.principal"] == CLIENT and attrs["destination.workload"] == "default/web-2"
    # The node view of the same facts.
    summary = json.loads(admin(lab, 1, "/summary"))
    edge = next(e for e in summary["edges"] if e["reporter"] == "source")
    assert edge["source"] == "default/client" and edge["destination_service_key"] == "default/web"
    assert edge["tcp_closed"] == 3 and edge["success_rate"] == 1.0 and edge["mtls"] == ["mutual_tls"]


def test_explain_agrees_with_the_proxy(traced: Lab) -> None:
    lab = traced
    res = lab.ns_exec(lab.node_ns(1), [sys.executable, "-m", "nodemesh", "explain", "client", "web", "-o", "json"])
    x = json.loads(res.stdout)
    vip = lab.service_vip("web")
    assert x["destination"]["ip"] == vip and x["destination"]["port"] == 80
    assert x["capture"]["captured"] is True and f"uid {CLIENT_UID}" in x["capture"]["rule"]
    assert x["plan"]["kind"] == "service" and x["plan"]["service"] == "default/web"
    assert [c["address"] for c in x["candidates"]] == [f"{lab.node_ip(2)}:8080"] or \
        [c["workload"] for c in x["candidates"]] == ["default/web-2"]
    cand = x["candidates"][0]
    assert cand["identity"] == WEB and "HBONE" in cand["path"]
    # Now the proxy does it: the same endpoint, the same path.
    assert lab.curl(1, f"http://{vip}/explained", uid=CLIENT_UID).returncode == 0
    lab.wait_for(lambda: any(e.get("direction") == "outbound" for e in lab.access_log(1)), 5, "an access log line")
    e = [e for e in lab.access_log(1) if e.get("direction") == "outbound"][-1]
    assert e["endpoint"] == cand["address"] and e["via"] == "hbone" and e["dst_workload"] == cand["workload"]
    # The human forms and the other CLI views work against the live agent too.
    for argv in (["status"], ["services"], ["endpoints", "web"], ["routes"], ["explain", "client", "web"],
                 ["top", "--count", "1"], ["logs", "--tail", "5"], ["endpoints", "web", "-o", "yaml"]):
        r = lab.ns_exec(lab.node_ns(1), [sys.executable, "-m", "nodemesh", *argv], check=False)
        assert r.returncode == 0, f"nodemesh {' '.join(argv)}: {r.stderr}"
    assert "default/web-2" in lab.ns_exec(lab.node_ns(1), [sys.executable, "-m", "nodemesh", "endpoints", "web"]).stdout
    # A refused connection is explained and counted with its response flag.
    bad = lab.ns_exec(lab.node_ns(1), [sys.executable, "-m", "nodemesh", "explain", "nosuch", "web"], check=False)
    assert bad.returncode == 1 and "not a workload declared on node node-1" in bad.stderr
