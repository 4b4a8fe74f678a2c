"""The xDS snapshot cache (queues only, no gRPC) and the snapshot builder."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import any_pb2

from controlplane.nodes import RegisteredNode, RegisteredWorkload
from controlplane.xds.build import ServiceEntry, build_snapshot
from controlplane.xds.cache import EMPTY_VERSION, InconsistentSnapshotError, SnapshotCache, XdsSnapshot
from nodemesh import model, xdsnames
from nodemesh.v1 import mesh_pb2

T = xdsnames.WORKLOAD


def wl_any(name: str, ip: str = "10.0.0.1") -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(mesh_pb2.Workload(name=name, ip=ip))
    return a


def snap(**workloads: str) -> XdsSnapshot:
    return XdsSnapshot.from_resources({T: {n: wl_any(n, ip) for n, ip in workloads.items()}})


# ---------------------------------------------------------------- cache


def test_watch_answers_at_once_when_versions_differ() -> None:
    c = SnapshotCache()
    s = snap(a="10.0.0.1", b="10.0.0.2")
    c.set_snapshot("n1", s)
    q, _ = c.create_watch("n1", T, [], "")
    r = q.get_nowait()
    assert r.version == s.version(T) and r.names == ("a", "b") and c.watch_count() == 0
    # Named subscription: only those names.
    q, _ = c.create_watch("n1", T, ["b", "missing"], "old")
    assert q.get_nowait().names == ("b",)


def test_watch_waits_for_a_change_of_its_type() -> None:
    c = SnapshotCache()
    s1 = snap(a="10.0.0.1")
    c.set_snapshot("n1", s1)
    q, _ = c.create_watch("n1", T, [], s1.version(T))
    assert q.empty() and c.watch_count() == 1
    c.set_snapshot("n1", snap(a="10.0.0.1"))  # same content, same version: still waiting
    assert q.empty()
    q_other, _ = c.create_watch("n2", T, [], "")  # another node, no snapshot yet
    c.set_snapshot("n1", snap(a="10.0.0.9"))
    r = q.get_nowait()
    assert r.version != s1.version(T) and r.names == ("a",)
    assert q_other.empty()
    c.set_default(snap(z="10.0.0.3"))  # n2 has no snapshot of its own
    assert q_other.get_nowait().names == ("z",)


def test_cancel_drops_the_watch_and_types_are_independent() -> None:
    c = SnapshotCache()
    s1 = snap(a="10.0.0.1")
    c.set_default(s1)
    q, cancel = c.create_watch("n1", T, [], s1.version(T))
    q2, _ = c.create_watch("n1", xdsnames.CLUSTER, [], EMPTY_VERSION)
    cancel()
    c.set_default(snap(a="10.0.0.2"))
    assert q.empty() and q2.empty()  # cancelled; and the cluster type did not change


def test_watch_is_answered_through_the_queue_in_a_loop() -> None:
    async def main() -> str:
        c = SnapshotCache()
        q, _ = c.create_watch("n1", T, [], "")
        asyncio.get_running_loop().call_later(0.01, c.set_default, snap(a="10.0.0.1"))
        r = await asyncio.wait_for(q.get(), 1)
        return r.names[0]

    assert asyncio.run(main()) == "a"


def test_inconsistent_snapshot_is_refused() -> None:
    c = SnapshotCache()
    cl = any_pb2.Any()
    cl.Pack(cluster_pb2.Cluster(name="x"))
    with pytest.raises(InconsistentSnapshotError):
        c.set_default(XdsSnapshot.from_resources({xdsnames.CLUSTER: {"x": cl}}))
    assert c.snapshot_for("n1") is None


# ---------------------------------------------------------------- build


def service(name: str = "web", ns: str = "shop", target: int = 8080, protocol: str = "http") -> model.ServiceSpec:
    return model.ServiceSpec(name=name, namespace=ns, ports=(model.ServicePortSpec(80, target, protocol, "http"),),
                         selector=(("app", name),))


def node(name: str, addr: str, zone: str, *wls: RegisteredWorkload) -> RegisteredNode:
    return RegisteredNode(name=name, addresses=(addr,), zone=zone, workloads=tuple(wls))


def wl(name: str, ip: str, ns: str = "shop", app: str = "web", ports: tuple[int, ...] = (8080,)) -> RegisteredWorkload:
    return RegisteredWorkload(name=name, namespace=ns, service_account=app, ip=ip, ports=ports,
                              labels=(("app", app),))


NODES = [
    node("node-b", "10.0.0.2", "z2", wl("web-2", "10.2.0.5"), wl("web-3", "10.2.0.6", ports=())),
    node("node-a", "10.0.0.1", "z1", wl("web-1", "10.1.0.5"), wl("db-1", "10.1.0.6", app="db"),
         wl("web-x", "10.1.0.7", ns="other"), wl("web-9", "10.1.0.8", ports=(9999,))),
]


def unpack(s: XdsSnapshot, type_url: str, cls: Any) -> dict[str, Any]:
    return {n: cls.FromString(a.value) for n, a in s.get(type_url).resources.items()}


def test_build_follows_the_contract() -> None:
    s = build_snapshot(model.MeshConfig(), [ServiceEntry(service(), "240.240.0.7")], NODES, ["ROOT"])
    name = "outbound|80||web.shop.svc.mesh"
    clusters = unpack(s, xdsnames.CLUSTER, cluster_pb2.Cluster)
    assert list(clusters) == [name]
    c = clusters[name]
    assert isinstance(c, cluster_pb2.Cluster)
    assert c.type == cluster_pb2.Cluster.EDS and c.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert c.eds_cluster_config.eds_config.HasField("ads")
    md = dict(c.metadata.filter_metadata["nodemesh"])
    assert md == {"service": "web", "namespace": "shop", "vip": "240.240.0.7", "port": 80.0,
                  "target_port": 8080.0, "protocol": "http", "port_name": "http"}

    cla = unpack(s, xdsnames.ENDPOINT, endpoint_pb2.ClusterLoadAssignment)[name]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    got = [(loc.locality.zone, loc.locality.sub_zone, loc.load_balancing_weight.value,
            [(e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
             for e in loc.lb_endpoints]) for loc in cla.endpoints]
    # Same namespace, selector match, serves 8080 (or lists no ports): web-1, web-2, web-3.
    assert got == [("z1", "node-a", 1, [("10.1.0.5", 8080)]),
                   ("z2", "node-b", 2, [("10.2.0.5", 8080), ("10.2.0.6", 8080)])]
    ep = cla.endpoints[0].lb_endpoints[0]
    assert ep.health_status == 1 and ep.load_balancing_weight.value == 1  # HEALTHY
    assert dict(ep.metadata.filter_metadata["nodemesh"]) == {
        "workload": "shop/web-1", "identity": "spiffe://cluster.local/ns/shop/sa/web",
        "node": "node-a", "node_address": "10.0.0.1", "hbone_port": 15008.0}

    workloads = unpack(s, xdsnames.WORKLOAD, mesh_pb2.Workload)
    assert sorted(workloads) == ["node-a/other/web-x", "node-a/shop/db-1", "node-a/shop/web-1",
                                 "node-a/shop/web-9", "node-b/shop/web-2", "node-b/shop/web-3"]
    w = workloads["node-b/shop/web-2"]
    assert isinstance(w, mesh_pb2.Workload)
    assert (w.node, w.node_address, w.hbone_port, w.zone, w.identity) == (
        "node-b", "10.0.0.2", 15008, "z2", "spiffe://cluster.local/ns/shop/sa/web")
    mesh = unpack(s, xdsnames.MESH_CONFIG, mesh_pb2.MeshConfig)["mesh"]
    assert isinstance(mesh, mesh_pb2.MeshConfig)
    assert (mesh.trust_domain, mesh.vip_cidr, list(mesh.trust_bundle), mesh.dns_domain) == (
        "cluster.local", "240.240.0.0/16", ["ROOT"], "mesh")


def test_grpc_ports_get_http2_protocol_options_and_empty_services_get_empty_assignments() -> None:
    s = build_snapshot(model.MeshConfig(), [ServiceEntry(service("api", protocol="grpc"), "")], NODES, [])
    c = unpack(s, xdsnames.CLUSTER, cluster_pb2.Cluster)["outbound|80||api.shop.svc.mesh"]
    assert isinstance(c, cluster_pb2.Cluster)
    assert "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" in c.typed_extension_protocol_options
    cla = unpack(s, xdsnames.ENDPOINT, endpoint_pb2.ClusterLoadAssignment)["outbound|80||api.shop.svc.mesh"]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment) and list(cla.endpoints) == []


def test_versions_are_stable_and_per_type() -> None:
    entries = [ServiceEntry(service(), "240.240.0.7")]
    s1 = build_snapshot(model.MeshConfig(), entries, NODES, ["ROOT"])
    s2 = build_snapshot(model.MeshConfig(), entries, list(reversed(NODES)), ["ROOT"])
    assert {t: s1.version(t) for t in s1.types} == {t: s2.version(t) for t in s2.types}
    # A new node with no matching workload changes workloads only, not clusters or endpoints.
    s3 = build_snapshot(model.MeshConfig(), entries,
                        NODES + [node("node-c", "10.0.0.3", "", wl("db-2", "10.3.0.1", app="db"))], ["ROOT"])
    assert s3.version(xdsnames.CLUSTER) == s1.version(xdsnames.CLUSTER)
    assert s3.version(xdsnames.ENDPOINT) == s1.version(xdsnames.ENDPOINT)
    assert s3.version(xdsnames.WORKLOAD) != s1.version(xdsnames.WORKLOAD)
