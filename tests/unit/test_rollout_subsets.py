"""Version subsets end to end without sockets: a Rollout's split and a route's
subset backendRef become subset Clusters, filtered ClusterLoadAssignments and
weighted routes (controlplane/xds/subsets.py); the agent converts them back
into service ports with subsets and routes per request, and per connection on
TCP (nodeagent/proxy/plan.py)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2

from controlplane.nodes import RegisteredNode, RegisteredWorkload
from controlplane.xds import build_routes as xr
from controlplane.xds.build import ServiceEntry, build_snapshot
from controlplane.xds.cache import XdsSnapshot
from controlplane.xds.subsets import VersionSplit
from nodeagent.meshview.snapshot import LocalWorkload
from nodeagent.proxy.plan import plan_outbound
from nodeagent.xds.convert import NamedResource, XdsState
from nodemesh import model, xdsnames

CONFIG = """\
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080, protocol: http}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: db}
spec: {selector: {app: db}, ports: [{port: 5432, protocol: tcp}]}
"""

ROUTE = """\
---
apiVersion: nodemesh.io/v1alpha1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{name: web}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: web, subset: {version: v2}}]
  - backendRefs: [{name: web}]
"""


def _wl(name: str, ip: str, app: str, version: str, port: int) -> RegisteredWorkload:
    return RegisteredWorkload(name, "default", app, ip, (port,), (("app", app), ("version", version)))


NODES = [
    RegisteredNode("n1", ("10.0.0.1",), workloads=(_wl("web-1", "10.1.0.1", "web", "v1", 8080),
                                                   _wl("db-1", "10.1.0.2", "db", "v1", 5432))),
    RegisteredNode("n2", ("10.0.0.2",), workloads=(_wl("web-2", "10.2.0.1", "web", "v2", 8080),
                                                   _wl("db-2", "10.2.0.2", "db", "v2", 5432))),
]
WEB = xdsnames.cluster_name("web", "default", 80, "mesh")
DB = xdsnames.cluster_name("db", "default", 5432, "mesh")


def _snap(splits: list[VersionSplit], with_route: bool = False, nodes: list[RegisteredNode] = NODES) -> XdsSnapshot:
    docs = model.parse_documents(CONFIG + (ROUTE if with_route else ""))
    svcs = [ServiceEntry(d.obj, f"240.240.0.{i + 1}") for i, d in enumerate(docs)
            if isinstance(d.obj, model.ServiceSpec)]
    rts = [xr.StoredRoute(d.obj) for d in docs if d.kind == "HTTPRoute"]
    return build_snapshot(model.MeshConfig(), svcs, nodes, [], l7=(rts, []), splits=splits)


def _unpack(s: XdsSnapshot, t: str, cls: Any) -> dict[str, Any]:
    return {n: cls.FromString(a.value) for n, a in s.get(t).resources.items()}


def _agent(s: XdsSnapshot):  # type: ignore[no-untyped-def]
    st = XdsState(node="n1", local_workloads=(LocalWorkload("client", "default", "client", "10.1.0.9", (), uid=1),))
    for t in xdsnames.AGENT_TYPES:
        res = [NamedResource(n, a) for n, a in s.get(t).resources.items()]
        result = st.apply(t, s.version(t), res)
        assert result.accepted, result.errors
    assert st.snapshot is not None
    return st.snapshot


def test_split_makes_subset_clusters_with_filtered_endpoints_and_weighted_routes() -> None:
    s = _snap([VersionSplit("default/web", "version", (("v1", 75), ("v2", 25)))])
    clusters = _unpack(s, xdsnames.CLUSTER, cluster_pb2.Cluster)
    v1, v2 = (xdsnames.cluster_name("web", "default", 80, "mesh", f"version={v}") for v in ("v1", "v2"))
    assert {WEB, v1, v2, DB} == set(clusters)
    c2 = clusters[v2]
    assert isinstance(c2, cluster_pb2.Cluster)
    assert dict(c2.metadata.filter_metadata["nodemesh"])["subset"] == "version=v2"
    cla = _unpack(s, xdsnames.ENDPOINT, endpoint_pb2.ClusterLoadAssignment)
    ips = {n: [e.endpoint.address.socket_address.address for loc in c.endpoints for e in loc.lb_endpoints]
           for n, c in cla.items()}
    assert ips[v1] == ["10.1.0.1"] and ips[v2] == ["10.2.0.1"] and sorted(ips[WEB]) == ["10.1.0.1", "10.2.0.1"]
    rc = _unpack(s, xdsnames.ROUTE, route_pb2.RouteConfiguration)[WEB]
    assert isinstance(rc, route_pb2.RouteConfiguration)
    got = [(c.name, c.weight.value) for c in rc.virtual_hosts[0].routes[0].route.weighted_clusters.clusters]
    assert got == [(v1, 75), (v2, 25)]
    # The db service has no rollout: no subsets, no TCP route.
    assert DB not in _unpack(s, xdsnames.ROUTE, route_pb2.RouteConfiguration)


def test_route_subset_backend_and_rollout_split_compose() -> None:
    s = _snap([VersionSplit("default/web", "version", (("v1", 90), ("v2", 10)))], with_route=True)
    rc = _unpack(s, xdsnames.ROUTE, route_pb2.RouteConfiguration)[WEB]
    assert isinstance(rc, route_pb2.RouteConfiguration)
    canary, rest = rc.virtual_hosts[0].routes
    assert canary.route.cluster.endswith("|version=v2|web.default.svc.mesh")  # explicit subset stays
    assert [c.weight.value for c in rest.route.weighted_clusters.clusters] == [90, 10]


def test_retired_version_is_withdrawn_everywhere() -> None:
    s = _snap([VersionSplit("default/web", "version", (("v1", 0), ("v2", 100)), retired=("v1",))])
    cla = _unpack(s, xdsnames.ENDPOINT, endpoint_pb2.ClusterLoadAssignment)
    for name, c in cla.items():
        if "web" in name:
            assert isinstance(c, endpoint_pb2.ClusterLoadAssignment)
            assert "10.1.0.1" not in [e.endpoint.address.socket_address.address for loc in c.endpoints
                                      for e in loc.lb_endpoints], name
    rc = _unpack(s, xdsnames.ROUTE, route_pb2.RouteConfiguration)[WEB]
    assert isinstance(rc, route_pb2.RouteConfiguration)
    assert rc.virtual_hosts[0].routes[0].route.cluster.endswith("|version=v2|web.default.svc.mesh")


def test_agent_routes_http_per_request_by_subset() -> None:
    snap = _agent(_snap([VersionSplit("default/web", "version", (("v1", 70), ("v2", 30)))]))
    from nodeagent.proxy.http import route_select
    from nodeagent.proxy.http.pipeline import L7Runtime

    svc = next(s for s in snap.services if s.name == "web")
    sp = svc.ports[0]
    assert [x.cluster.split("|")[2] for x in sp.subsets] == ["version=v1", "version=v2"]
    assert [e.workload for e in sp.subsets[1].endpoints] == ["default/web-2"]
    assert sp.routes is not None
    rng = random.Random(7)
    counts: Counter[str] = Counter(route_select.choose_cluster(sp.routes.routes[0], rng).split("|")[2]
                                   for _ in range(4000))
    assert abs(counts["version=v2"] / 4000 - 0.30) < 0.03
    rt = L7Runtime(proxy=None)  # type: ignore[arg-type]
    assert rt.port_of_cluster(snap, sp.subsets[1].cluster) is sp.subsets[1]


def test_agent_splits_tcp_per_connection() -> None:
    snap = _agent(_snap([VersionSplit("default/db", "version", (("v1", 20), ("v2", 80)))]))
    src = snap.local_workloads[0]
    rng = random.Random(3)
    seen: Counter[str] = Counter()
    for _ in range(2000):
        p = plan_outbound(snap, src, "240.240.0.2", 5432, rng=rng)
        assert p.kind == "service" and len(p.endpoints) == 1
        seen[p.endpoints[0].workload] += 1
    assert abs(seen["default/db-2"] / 2000 - 0.80) < 0.04
    assert "version subset version=" in p.detail


def test_agent_refuses_subset_cluster_without_parent() -> None:
    s = _snap([VersionSplit("default/web", "version", (("v1", 50), ("v2", 50)))])
    st = XdsState(node="n1")
    errors: tuple[str, ...] = ()
    for t in xdsnames.AGENT_TYPES:
        res = [NamedResource(n, a) for n, a in s.get(t).resources.items() if not (t == xdsnames.CLUSTER and n == WEB)]
        errors += st.apply(t, s.version(t), res).errors
    assert st.snapshot is None
    assert any("has no cluster outbound|80||web.default.svc.mesh" in e for e in errors), errors


def test_route_arriving_before_its_subset_clusters_is_served_from_the_port() -> None:
    """xDS types arrive one at a time in any order: routes naming subset clusters whose
    Cluster/ClusterLoadAssignment are not there yet must not fail requests meanwhile."""
    before = _snap([])
    after = _snap([VersionSplit("default/web", "version", (("v1", 50), ("v2", 50)))])
    st = XdsState(node="n1", local_workloads=(LocalWorkload("client", "default", "client", "10.1.0.9", (), uid=1),))
    for t in xdsnames.AGENT_TYPES:
        named = [NamedResource(n, a) for n, a in before.get(t).resources.items()]
        assert st.apply(t, before.version(t), named).accepted
    # The new routes first, then the clusters (no assignments yet): every subset has endpoints.
    for t in (xdsnames.ROUTE, xdsnames.CLUSTER):
        res = st.apply(t, after.version(t), [NamedResource(n, a) for n, a in after.get(t).resources.items()])
        assert res.accepted and res.snapshot is not None, res.errors
        sp = next(s for s in res.snapshot.services if s.name == "web").ports[0]
        assert {x.cluster.split("|")[2]: [e.workload for e in x.endpoints] for x in sp.subsets} == {
            "version=v1": ["default/web-1"], "version=v2": ["default/web-2"]}


def test_subsets_from_endpoint_slices_only() -> None:
    """Scoped discovery (Delta) carries endpoints as per-node slices: a subset cluster's
    endpoints come from its own slices, like the port's."""
    s = _snap([VersionSplit("default/web", "version", (("v1", 50), ("v2", 50)))])
    st = XdsState(node="n1", local_workloads=(LocalWorkload("client", "default", "client", "10.1.0.9", (), uid=1),))
    for t in xdsnames.AGENT_TYPES:
        res = [NamedResource(n, a) for n, a in s.get(t).resources.items()
               if t != xdsnames.ENDPOINT or xdsnames.is_slice(n)]
        assert st.apply(t, s.version(t), res).accepted
    assert st.snapshot is not None
    sp = next(x for x in st.snapshot.services if x.name == "web").ports[0]
    assert sorted(e.workload for e in sp.endpoints) == ["default/web-1", "default/web-2"]
    assert {x.cluster.split("|")[2]: [e.workload for e in x.endpoints] for x in sp.subsets} == {
        "version=v1": ["default/web-1"], "version=v2": ["default/web-2"]}
