"""The mesh view's memory stays bounded however long agents report and however
many come and go, nodes that leave are forgotten (with the control plane's
per-node metric state), and its answers come from the aggregates."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
import types
from typing import Any

import pytest

from controlplane.metrics import ControlPlaneMetrics
from controlplane.noderegistry import NodeRegistry
from controlplane.web import HISTORY_BUCKETS, MAX_EDGES_PER_NODE, MAX_GRAPH_EDGES, MeshTelemetry
from nodemesh.v1 import mesh_pb2


def summary(node: int, n: int, edges: int = 20, churn: str = "") -> dict[str, Any]:
    """Node `node`'s cumulative summary after `n` heartbeats: every edge grows by 10
    requests (1 failing) per heartbeat. `churn` renames the callers (pods that come and go)."""
    return {"edges": [
        {"reporter": "source" if i % 2 == 0 else "destination", "source": f"default/client-{node}{churn}",
         "destination_service_key": f"default/svc-{i}", "destination_service": f"svc-{i}.default.svc",
         "destination_workload": f"default/svc-{i}-{node}", "requests": 10 * n, "errors": n,
         "tcp_opened": 0, "tcp_closed": 0, "tcp_failed": 0, "bytes_sent": 100 * n, "bytes_received": 50 * n,
         "p99_ms": 12.5, "mtls": ["mutual_tls"]} for i in range(edges)]}


def test_memory_stays_bounded_under_many_heartbeats_nodes_and_churn() -> None:
    now = [1_000_000.0]
    t = MeshTelemetry(clock=lambda: now[0])
    nodes, edges = 10, 10

    def beat(rounds: int, start: int, churn_every: int = 0) -> None:
        for r in range(start, start + rounds):
            now[0] += 2.0
            for k in range(nodes):
                churn = f"-{r // churn_every}" if churn_every else ""
                t.add(f"node-{k}", summary(k, r, edges, churn))

    beat(HISTORY_BUCKETS + 30, 1)  # past the whole history ring: everything is allocated
    tracemalloc.start()
    try:
        # Traced: what was allocated since start and is still alive. The first phase
        # replaces every per-node sample; after that, it must not grow.
        beat(50, HISTORY_BUCKETS + 31)
        before, _ = tracemalloc.get_traced_memory()
        beat(150, HISTORY_BUCKETS + 81)  # another 5 minutes of 2 s heartbeats from 10 nodes
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The old view kept 600 parsed summaries per node and grew with every heartbeat;
    # now the state after 1,500 more heartbeats is the same size.
    assert after - before < 128 * 1024, f"grew by {after - before} bytes"
    size = t.size()
    assert size["nodes"] == nodes and size["samples"] == nodes * edges and size["edges"] == nodes * edges
    assert size["series"] == edges
    assert size["recent"] <= size["edges"] * 7
    # Rates are right: 5 requests/s per edge (10 per 2 s heartbeat), 1 in 10 failing.
    (edge,) = [e for e in t.edges("default/svc-0") if e["source"] == "default/client-3"]
    assert edge["request_rate"] == 5.0 and edge["error_rate"] == 0.5 and edge["success_rate"] == 0.9
    series = t.service_series("default/svc-0")
    assert len(series) <= HISTORY_BUCKETS
    assert all(abs(p["request_rate"] - 5.0 * nodes) < 1e-6 for p in series[1:-1]), series

    # Callers that come and go (new pod names every 10 heartbeats): their old edges go
    # with the summaries that no longer list them, so the edge count stays put.
    beat(50, 2000, churn_every=10)
    size = t.size()
    assert size["edges"] == nodes * edges and size["samples"] == nodes * edges, size


def test_a_summary_with_too_many_edges_is_capped() -> None:
    t = MeshTelemetry(clock=lambda: 1000.0)
    t.add("n1", summary(1, 1, edges=MAX_EDGES_PER_NODE + 500))
    assert t.size()["samples"] == MAX_EDGES_PER_NODE


def test_the_graph_shows_the_busiest_edges_up_to_its_limit() -> None:
    now = [1000.0]
    t = MeshTelemetry(clock=lambda: now[0])
    nodes = MAX_GRAPH_EDGES // 10 + 5  # 10 edges each: past the limit
    for n in (1, 2):
        now[0] += 2
        for k in range(nodes):
            s = summary(k, n, edges=10)
            if k == nodes - 1:
                for e in s["edges"]:
                    e["requests"] *= 100  # the busiest node, listed last
            t.add(f"node-{k}", s)
    g = t.graph()
    assert len(g["edges"]) == MAX_GRAPH_EDGES and g["edges_total"] == nodes * 10
    assert sum(1 for e in g["edges"] if e["caller"] == f"default/client-{nodes - 1}") == 10


@pytest.mark.parametrize("field,value", [("requests", "lots"), ("requests", float("nan")),
                                         ("errors", float("inf")), ("tcp_opened", -5), ("p99_ms", True),
                                         ("mtls", [{"x": 1}]), ("mtls", "mutual_tls")])
def test_malformed_summaries_are_refused_and_the_view_keeps_serving(field: str, value: Any) -> None:
    """A hostile node's summary (JSON admits NaN and Infinity) is dropped, never poisons the view."""
    t = MeshTelemetry(clock=lambda: 1000.0)
    t.add("good", summary(2, 1, edges=1))
    bad = summary(1, 1, edges=1)
    bad["edges"][0][field] = value
    t.ingest("n1", json.dumps(bad))
    assert t.size()["nodes"] == 1
    json.dumps(t.graph(), allow_nan=False)  # what the page gets stays valid JSON


def test_nodes_that_leave_are_forgotten_with_their_metrics() -> None:
    now = [1000.0]
    t = MeshTelemetry(clock=lambda: now[0])
    metrics = ControlPlaneMetrics(clock=lambda: now[0])
    reg = NodeRegistry(None, lease_seconds=10, clock=lambda: now[0])
    reg.on_departure(t.forget)
    reg.on_departure(metrics.forget_node)
    for k in (1, 2):
        reg.register(mesh_pb2.NodeRegistration(node_name=f"node-{k}", addresses=[f"10.0.0.{k}"]))
    for n in range(1, 4):
        now[0] += 2
        t.add("node-1", summary(1, n))
        t.add("node-2", summary(2, n))
        reg.renew("node-2")
    metrics.published(types.SimpleNamespace(types={"t.Cluster": types.SimpleNamespace(version="v1")}))
    for node in ("node-1", "node-2"):
        metrics.acked(node, "t.Cluster", 0.01)
        metrics.nacked(node, "t.Cluster")
    assert t.reporting() == ["node-1", "node-2"]

    now[0] += 5  # node-1's lease (renewed last at 1000) runs out; node-2's does not
    assert asyncio.run(reg.expire()) == ["node-1"]
    assert t.reporting() == ["node-2"] and "node-1" not in t.nodes
    assert all("node-1" not in e["nodes"] for e in t.edges())
    assert not any(e["source"] == "default/client-1" for e in t.edges())
    assert [labels for labels in metrics.nacks.collect().series] == [("node-2", "Cluster")]
    # The service history node-1 contributed stays (it is aggregated, not per node).
    assert t.service_series("default/svc-0")

    # A node that stops reporting without leaving is dropped once stale.
    now[0] += 120
    t.sweep()
    assert t.size()["nodes"] == 0 and t.size()["edges"] == 0


def test_a_node_of_another_replica_that_leaves_is_forgotten() -> None:
    t = MeshTelemetry(clock=lambda: 1000.0)
    reg = NodeRegistry(None, lease_seconds=10, clock=lambda: 1000.0)
    reg.on_departure(t.forget)
    from controlplane.nodes import node_from_proto

    node = node_from_proto(mesh_pb2.NodeRegistration(node_name="far", addresses=["10.0.0.9"]))
    reg.set_remote("far", node)
    t.add("far", summary(9, 1))
    reg.set_remote("far", None)
    assert t.size()["nodes"] == 0


def test_series_spread_heartbeats_over_their_interval() -> None:
    """Agents heartbeat every lease/3 (5 s by default): a delta covers several 2 s
    buckets, and each gets its share, not one bucket the whole count."""
    now = [1000.0]
    t = MeshTelemetry(clock=lambda: now[0])
    for n in range(6):
        t.add("n1", summary(1, n * 5, edges=1))  # 10 requests/s, reported every 5 s
        now[0] += 5
    now[0] -= 5
    points = t.service_series("default/svc-0")
    assert [p["t"] for p in points] == list(range(1000, 1026, 2))
    assert all(abs(p["request_rate"] - 10.0) < 1e-6 for p in points), points
