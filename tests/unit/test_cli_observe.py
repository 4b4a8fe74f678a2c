"""The observation side without a mesh: explain (pure), the admin endpoint over
a fake agent, the CLI's views, the mesh view's graph and the control plane's
push-latency metric."""

from __future__ import annotations

import asyncio
import json
import types
import urllib.request
from typing import Any

import pytest

from controlplane.metrics import ControlPlaneMetrics
from controlplane.web import MeshTelemetry
from nodeagent.meshview.explain import ExplainError, explain
from nodeagent.meshview.snapshot import Endpoint, LocalWorkload, MeshSettings, Service, ServicePort, Snapshot, Workload
from nodeagent.observe import meshmetrics
from nodeagent.supervision.admin import AdminServer, summarize
from nodeagent.supervision.settings import ProxySettings
from nodemesh.cli import observecmds
from nodemesh.prom import Registry, parse, select

WEB = "spiffe://td/ns/default/sa/web"


def snapshot() -> Snapshot:
    eps = (Endpoint("10.0.0.2", 8080, "default/web-2", WEB, "n2", "10.0.0.2"),
           Endpoint("10.0.0.1", 8080, "default/web-1", WEB, "n1", "10.0.0.1"))
    svc = Service("web", "default", "240.240.0.1", (ServicePort(80, 8080, "http", "http", "c-web", eps),))
    wls = tuple(Workload(n, "default", "web", node, ip, (8080,), WEB, ip)
                for n, node, ip in (("web-1", "n1", "10.0.0.1"), ("web-2", "n2", "10.0.0.2")))
    client = LocalWorkload("client", "default", "client", "10.0.0.1", (), uid=3001)
    return Snapshot("v7", "n1", MeshSettings(trust_domain="td"), services=(svc,), workloads=wls,
                    local_workloads=(client,))


SETTINGS = ProxySettings(node_name="n1", node_address="10.0.0.1", excluded_cidrs=("10.9.0.1/32",))


def test_explain_service_by_name_lists_candidates_and_paths() -> None:
    x = explain(snapshot(), SETTINGS, "client", "web",
                {"10.0.0.2:8080": {"ewma_ms": 2.0, "outstanding": 1, "measured": True}})
    assert x["destination"] == {"input": "web", "read_as": "service default/web → VIP 240.240.0.1:80",
                                "ip": "240.240.0.1", "port": 80}
    assert x["capture"]["captured"] and "uid 3001" in x["capture"]["rule"]
    assert (x["plan"]["kind"], x["plan"]["service"], x["plan"]["cluster"]) == ("service", "default/web", "c-web")
    by = {c["address"]: c for c in x["candidates"]}
    assert by["10.0.0.2:8080"]["cost"] == 4.0 and "HBONE" in by["10.0.0.2:8080"]["path"]
    assert by["10.0.0.1:8080"]["path"].startswith("same node")
    assert "lowest cost now: 10.0.0.2:8080" in x["choice"]
    assert "client" in observecmds.human_explain(x)


def test_explain_errors_name_the_argument() -> None:
    with pytest.raises(ExplainError, match="from-workload 'nope' is not a workload declared on node n1"):
        explain(snapshot(), SETTINGS, "nope", "web")
    with pytest.raises(ExplainError, match="neither ip:port nor a known service"):
        explain(snapshot(), SETTINGS, "client", "db")
    x = explain(snapshot(), SETTINGS, "client", "10.9.0.1:443")
    assert not x["capture"]["captured"] and x["plan"]["kind"] == "passthrough"


class FakePool:
    def __init__(self) -> None:
        self.asked = 0

    async def stats(self, request: Any, timeout: float = 2.0) -> list[dict[str, Any]]:
        self.asked += 1
        out = []
        for i in range(2):  # two workers, each with one connection of its own
            r = Registry()
            lab = meshmetrics.MeshLabels(source_workload="client", destination_service="web.default.svc.mesh")
            r.counter("istio_tcp_connections_closed_total", "", meshmetrics.TCP_LABELS).inc(lab.as_dict())
            out.append({"metrics": r.collect(), "balancer": [{"address": "10.0.0.2:8080", "ewma_ms": 1.0 + i,
                                                              "outstanding": 1, "measured": True}],
                        "recent": [{"seq": 1, "end_unix": 100.0 + i, "direction": "outbound"}],
                        # Only the second worker has ejected 10.0.0.2 (each sees its own outcomes).
                        "l7": [{"cluster": "c-web", "ejected": ["10.0.0.2:8080"] if i else [], "breaker_open": False,
                                "breaker_overflows": i, "ejections": i, "retry_budget_refused": 0}]})
        return out

    def alive(self) -> bool:
        return True

    def up(self) -> int:
        return 2


def fake_agent() -> Any:
    cfg = types.SimpleNamespace(node=types.SimpleNamespace(name="n1"),
                                capture=types.SimpleNamespace(mode="iptables", failure_policy="open"))
    return types.SimpleNamespace(
        config=cfg, settings=SETTINGS, snapshot=snapshot(), certs=None, pool=FakePool(), ads=None, registry=None,
        capture=None, capture_installed=True, capture_error="", phase="running", status=lambda: {"node": "n1"})


def test_admin_endpoint_merges_workers_and_serves_views() -> None:
    async def run() -> dict[str, Any]:
        admin = AdminServer(fake_agent(), port=0)
        await admin.start()
        base = f"http://127.0.0.1:{admin.port}"

        def get(path: str, token: str | None = None) -> tuple[int, str]:
            req = urllib.request.Request(base + path)
            if token is not None or path in ("/config_dump", "/recent?since=100.5"):
                req.add_header("Authorization", f"Bearer {admin.token if token is None else token}")
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        res = {}
        for path in ("/metrics", "/ready", "/clusters", "/config_dump", "/explain?from=client&to=web",
                     "/explain?from=x&to=web", "/recent?since=100.5", "/nope"):
            res[path] = await asyncio.to_thread(get, path)
        # Other workloads' request targets and the node's config: the admin token only.
        res["anon /recent"] = await asyncio.to_thread(get, "/recent?since=0", "")
        res["wrong /config_dump"] = await asyncio.to_thread(get, "/config_dump", "x" * 43)
        await admin.close()
        return res

    res = asyncio.run(run())
    samples = parse(res["/metrics"][1])
    assert select(samples, "istio_tcp_connections_closed_total", source_workload="client")[0][1] == 2
    assert select(samples, "nodemesh_capture_installed", mode="iptables")[0][1] == 1
    assert res["/ready"][0] == 200
    cl = json.loads(res["/clusters"][1])["clusters"][0]
    ep = cl["endpoints"][0]
    assert (ep["address"], ep["ewma_ms"], ep["outstanding"]) == ("10.0.0.2:8080", 2.0, 2)
    assert [(e["address"], e["outlier_ejected"]) for e in cl["endpoints"]] == [
        ("10.0.0.2:8080", True), ("10.0.0.1:8080", False)]
    assert cl["l7"] == {"breaker_open": False, "breaker_overflows": 1, "ejections": 1, "retry_budget_refused": 0}
    assert json.loads(res["/config_dump"][1])["services"][0]["vip"] == "240.240.0.1"
    assert json.loads(res["/explain?from=client&to=web"][1])["plan"]["kind"] == "service"
    assert res["/explain?from=x&to=web"][0] == 400 and "not a workload" in res["/explain?from=x&to=web"][1]
    assert [r["end_unix"] for r in json.loads(res["/recent?since=100.5"][1])["records"]] == [101.0]
    assert res["/nope"][0] == 404
    assert res["anon /recent"][0] == 403 and "admin token" in res["anon /recent"][1]
    assert res["wrong /config_dump"][0] == 403


def test_summarize_and_top_rates() -> None:
    r = Registry()
    lab = meshmetrics.MeshLabels(source_workload="client", source_workload_namespace="default",
                             destination_service="web.default.svc.mesh", destination_service_name="web",
                             destination_service_namespace="default", connection_security_policy="mutual_tls")
    req = {**lab.as_dict(), "response_code": "200", "grpc_response_status": ""}
    r.counter("istio_requests_total", "", meshmetrics.REQUEST_LABELS).inc(req, 9)
    r.counter("istio_requests_total", "", meshmetrics.REQUEST_LABELS).inc({**req, "response_code": "503"}, 1)
    h = r.histogram("istio_request_duration_milliseconds", "", meshmetrics.REQUEST_LABELS,
                    buckets=meshmetrics.DURATION_BUCKETS_MS)
    for _ in range(100):
        h.observe(req, 7)
    # A TCP series on the same edge (TCP families have no response_code label).
    r.counter("istio_tcp_connections_closed_total", "", meshmetrics.TCP_LABELS).inc(lab.as_dict(), 2)
    s1 = summarize(r.collect())
    (e,) = s1["edges"]
    assert (e["source"], e["destination_service_key"], e["requests"], e["success_rate"]) == \
        ("default/client", "default/web", 10, 0.9)
    assert e["tcp_closed"] == 2 and e["tcp_failed"] == 0
    assert 5 < e["p99_ms"] <= 10 and e["mtls"] == ["mutual_tls"]
    s0 = json.loads(json.dumps(s1))
    s0["time_unix"] -= 2
    s0["edges"][0]["requests"] = 4
    rows = observecmds.top_rows(s0, s1)
    assert rows[0]["request_rate"] == 3.0
    assert "3.00/s" in observecmds.human_top(rows)


def test_mesh_telemetry_graph_edges_and_rates() -> None:
    now = [1000.0]
    t = MeshTelemetry(clock=lambda: now[0])

    def summary(n: int) -> str:
        return json.dumps({"edges": [
            {"reporter": "source", "source": "default/client", "destination_service_key": "default/web",
             "destination_workload": "default/web-2", "destination_service": "web.default.svc.mesh",
             "tcp_opened": n, "tcp_closed": n, "tcp_failed": 0, "requests": 0, "mtls": ["mutual_tls"]}]})

    t.ingest("n1", summary(1))
    now[0] += 4
    t.ingest("n1", summary(9))
    t.ingest("n2", "{not json")  # dropped, with a log line
    g = t.graph(["default/web"], ["default/client"])
    (edge,) = g["edges"]
    assert (edge["source"], edge["target"], edge["caller"]) == ("wl:default/client", "svc:default/web",
                                                                "default/client")
    assert edge["connection_rate"] == 2.0 and edge["success_rate"] == 1.0
    assert {n["id"] for n in g["nodes"]} == {"wl:default/client", "svc:default/web"}
    series = t.service_series("default/web")
    assert series and series[-1]["connection_rate"] == 2.0
    assert set(t.nodes) == {"n1"}


def test_push_latency_is_timed_from_the_send_to_the_ack() -> None:
    from controlplane.xds.sync import NACKED, STALE, SYNCED, SyncTracker

    now = [10.0]
    m = ControlPlaneMetrics(clock=lambda: now[0])
    tracker = SyncTracker(clock=lambda: now[0])
    tracker.observer = m
    m.changed()
    now[0] = 10.2
    m.published(types.SimpleNamespace(types={}))
    # The node connects long after the version was built: its first ACK is timed
    # from the response sent to it, not from the build (the old, wrong metric).
    now[0] = 50.0
    tracker.opened(1, "delta")
    tracker.sent(1, "t.Cluster", "v2", "1", 1200)
    assert tracker.rows()[0]["state"] == STALE and tracker.clients[1].queue_depth == 1
    now[0] = 50.03
    assert tracker.answered(1, "t.Cluster", "1", None)
    assert not tracker.answered(1, "t.Cluster", "1", None)  # a repeat is not a second push
    _counts, total, n = m.push_latency.value({"type": "Cluster"})
    assert n == 1 and total == pytest.approx(0.03)
    assert tracker.rows()[0]["state"] == SYNCED and tracker.clients[1].queue_depth == 0
    assert m.push_bytes.value({"type": "Cluster"})[2] == 1 and m.bytes_sent.value({"type": "Cluster"}) == 1200
    tracker.sent(1, "t.Cluster", "v3", "2", 10)
    tracker.answered(1, "t.Cluster", "2", "cluster x: bad lb_policy")
    row = tracker.rows()[0]
    assert row["state"] == NACKED and row["nack_reason"] == "cluster x: bad lb_policy"
    assert tracker.summary() == {SYNCED: 0, STALE: 0, NACKED: 1}
    tracker.closed(1)
    assert tracker.rows() == []


def test_tables_and_completion() -> None:
    from nodemesh.cli import build_parser, output

    out = output.table(("A", "LONGER"), [("x", None), ("yy", 3)])
    assert out.splitlines() == ["A   LONGER", "x   -", "yy  3"]

    script = observecmds.bash_completion(build_parser())
    assert "complete -F _nodemesh nodemesh" in script and '"") words="' in script and "explain" in script


def test_one_output_layer_renders_every_format_and_errors_say_what_to_check(
        capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    import yaml

    from nodemesh.cli import output

    doc = {"b": 1, "a": [1, 2]}
    assert json.loads(output.render(doc, "json")) == doc
    assert yaml.safe_load(output.render(doc, "yaml")) == doc
    assert output.render(doc, "table", lambda d: f"{len(d)} keys") == "2 keys\n"

    def fails(_args: argparse.Namespace) -> int:
        raise output.CommandError("no such thing", "`nodemesh get` lists what exists", code=2)

    assert output.run(fails, argparse.Namespace()) == 2
    assert capsys.readouterr().err == "error: no such thing\n  check: `nodemesh get` lists what exists\n"


def test_every_command_line_in_the_reference_parses() -> None:
    """docs/reference.md's CLI table: each `nodemesh VERB [SUBVERB] ... --flag` names a verb,
    sub-verb and flags the parser has (a renamed or dropped one fails here, not in a user's shell)."""
    import argparse
    import re
    from pathlib import Path

    from nodemesh.cli import build_parser

    def subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                return dict(a.choices)
        return {}

    root = subcommands(build_parser())
    rows = [line for line in (Path(__file__).resolve().parents[2] / "docs" / "reference.md").read_text().splitlines()
            if line.startswith("| `nodemesh ")]
    assert len(rows) > 15
    checked = 0
    for row in rows:
        cell = row.split("` |")[0]
        for command in re.findall(r"`(nodemesh [^`]+)`", cell + "`"):
            words = command.replace("\\|", "|").split()[1:]
            parser = root.get(words[0])
            assert parser is not None, f"{command}: no verb {words[0]!r}"
            subs = subcommands(parser)
            if subs and len(words) > 1 and not words[1].startswith(("-", "[")) and words[1].lower() == words[1]:
                for name in words[1].split("|"):
                    assert name in subs, f"{command}: no {words[0]} {name!r}"
                parser = subs[words[1].split("|")[0]]
            for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", " ".join(words[1:])):
                assert flag in parser._option_string_actions, f"{command}: no flag {flag}"
            checked += 1
    assert checked >= len(rows)
