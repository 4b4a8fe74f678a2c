"""Routes and policies through the standard xDS types: the control plane's
RouteConfiguration/Cluster, converted back by the agent, then routed."""

from __future__ import annotations

import random

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2

from controlplane.xds import build_routes as xr
from controlplane.xds.build import ServiceEntry, build_snapshot
from nodeagent.proxy.http import route_select
from nodeagent.xds import l7convert
from nodemesh import model, xdsnames
from tests.unit.test_routes_model import ROUTE

SERVICES = """\
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080, protocol: http}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: db}
spec: {selector: {app: db}, ports: [{port: 5432, protocol: tcp}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {name: web}
spec:
  targetRef: {name: web}
  circuitBreaker: {maxRequests: 7}
  outlierDetection: {consecutive5xx: 2}
"""


def _build() -> tuple[dict[str, route_pb2.RouteConfiguration], dict[str, cluster_pb2.Cluster]]:
    docs = model.parse_documents(SERVICES + "---\n" + ROUTE)
    svcs = [d.obj for d in docs if isinstance(d.obj, model.ServiceSpec)]
    rts = [xr.StoredRoute(d.obj) for d in docs if d.kind == "HTTPRoute"]
    pols = [d.obj for d in docs if d.kind == "DestinationPolicy"]
    snap = build_snapshot(model.MeshConfig(), [ServiceEntry(s, "") for s in svcs], [], [], l7=(rts, pols))
    rcs = {}
    for n, a in snap.get(xdsnames.ROUTE).resources.items():
        m = route_pb2.RouteConfiguration()
        a.Unpack(m)
        rcs[n] = m
    cls = {}
    for n, a in snap.get(xdsnames.CLUSTER).resources.items():
        c = cluster_pb2.Cluster()
        a.Unpack(c)
        cls[n] = c
    return rcs, cls


def test_route_configuration_per_http_port_only() -> None:
    rcs, cls = _build()
    web = xdsnames.cluster_name("web", "default", 80, "mesh")
    assert list(rcs) == [web]  # the tcp port of db has no RouteConfiguration
    vh = rcs[web].virtual_hosts[0]
    # Precedence: the /api prefix with a header match comes before the catch-all.
    assert vh.routes[0].match.path_separated_prefix == "/api"
    split = vh.routes[1].route
    assert [(c.name.split("|")[3], c.weight.value) for c in split.weighted_clusters.clusters] == [
        ("web-v1.default.svc.mesh", 90), ("web-v2.default.svc.mesh", 10)]
    assert split.retry_policy.num_retries.value == 2 and split.timeout.seconds == 2
    assert xr.FAULT_FILTER in vh.routes[1].typed_per_filter_config
    c = cls[web]
    assert c.circuit_breakers.thresholds[0].max_requests.value == 7
    assert c.outlier_detection.consecutive_5xx.value == 2


def test_agent_converts_and_routes() -> None:
    rcs, cls = _build()
    web = xdsnames.cluster_name("web", "default", 80, "mesh")
    table = l7convert.convert_route_configuration(rcs[web])
    pol = l7convert.cluster_policy(cls[web])
    assert pol.circuit_breaker.max_requests == 7 and pol.outlier is not None
    canary = route_select.RequestView("GET", "/api/x", (("x-canary", "yes"),))
    e = route_select.select_route(table, canary)
    assert e is not None and e.clusters[0].cluster.endswith("web-v2.default.svc.mesh")
    other = route_select.select_route(table, route_select.RequestView("GET", "/apix"))
    assert other is not None and other.retry is not None and other.retry.attempts == 3
    assert other.mirrors[0].percent == 5.0 and other.fault is not None and other.fault.abort_status == 503
    rng = random.Random(1)
    picks = [route_select.choose_cluster(other, rng) for _ in range(2000)]
    share = sum(1 for p in picks if "web-v2" in p) / len(picks)
    assert 0.07 < share < 0.13
