"""xDS resources -> Snapshot: good batches build it, a bad resource is named and
rejected, and the previous good resources of that type stay in force."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from nodeagent.meshview.snapshot import LocalWorkload, MeshSettings, Workload
from nodeagent.xds.convert import AssignmentInfo, ClusterInfo, NamedResource, XdsState, convert_batch
from nodemesh import xdsnames
from nodemesh.security import MeshSecurity
from nodemesh.v1 import mesh_pb2

WEB_ID = "spiffe://cluster.local/ns/default/sa/web"
LOCAL = (LocalWorkload("client", "default", "client", "10.0.0.2", (), uid=2003),)


def pack(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def named(msg: Message) -> list[NamedResource]:
    return [NamedResource("", pack(msg))]


def mesh_config(**kw: Any) -> mesh_pb2.MeshConfig:
    base: dict[str, Any] = {"trust_domain": "cluster.local", "outbound_policy": "ALLOW_ANY",
                            "vip_cidr": "10.96.0.0/16", "dns_domain": "mesh"}
    base.update(kw)
    return mesh_pb2.MeshConfig(**base)


def workload(name: str = "web-2", ip: str = "10.0.0.3", **kw: Any) -> mesh_pb2.Workload:
    base: dict[str, Any] = {"name": name, "namespace": "default", "service_account": "web", "node": "node-2", "ip": ip,
                            "ports": [8080],
                "labels": {"app": "web"}, "identity": WEB_ID, "node_address": "10.0.0.3", "hbone_port": 15008,
                "zone": "z1"}
    base.update(kw)
    return mesh_pb2.Workload(**base)


def cluster(service: str = "web", port: int = 80, vip: str = "10.96.0.10", **meta: Any) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=xdsnames.cluster_name(service, "default", port, "mesh"),
                            type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    md = {"service": service, "namespace": "default", "vip": vip, "port": port, "target_port": 8080, "protocol": "http",
              "port_name": "http"}
    md.update(meta)
    c.metadata.filter_metadata[xdsnames.METADATA_KEY].update(md)
    return c


def assignment(service: str = "web", port: int = 80, ip: str = "10.0.0.3",
               **meta: Any) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=xdsnames.cluster_name(service, "default", port, "mesh"))
    loc = cla.endpoints.add()
    loc.locality.zone = "z1"
    loc.locality.sub_zone = "node-2"
    loc.load_balancing_weight.value = 1
    lb = loc.lb_endpoints.add()
    lb.endpoint.address.socket_address.address = ip
    lb.endpoint.address.socket_address.port_value = 8080
    lb.health_status = health_check_pb2.HEALTHY
    lb.load_balancing_weight.value = 1
    md = {"workload": "default/web-2", "identity": WEB_ID, "node": "node-2", "node_address": "10.0.0.3",
              "hbone_port": 15008}
    md.update(meta)
    lb.metadata.filter_metadata[xdsnames.METADATA_KEY].update(md)
    return cla


def mesh_security() -> mesh_pb2.Policy:
    return mesh_pb2.Policy(kind="MeshSecurity", name="mesh", spec_json="{}")


def full_state() -> XdsState:
    st = XdsState(node="node-1", local_workloads=LOCAL)
    assert st.apply(xdsnames.POLICY, "1", named(mesh_security())).accepted
    assert st.apply(xdsnames.ROUTE, "1", []).accepted  # no L7 routes
    assert st.apply(xdsnames.MESH_CONFIG, "1", named(mesh_config())).accepted
    assert st.apply(xdsnames.WORKLOAD, "1", named(workload())).accepted
    assert st.apply(xdsnames.CLUSTER, "1", named(cluster())).accepted
    res = st.apply(xdsnames.ENDPOINT, "1", named(assignment()))
    assert res.accepted and res.snapshot is not None
    return st


def test_good_resources_build_a_snapshot() -> None:
    snap = full_state().snapshot
    assert snap is not None
    assert snap.node == "node-1" and snap.mesh.trust_domain == "cluster.local"
    assert snap.version == "mesh=1,wl=1,cds=1,eds=1,pol=1,rds=1"
    (svc,) = snap.services
    assert (svc.key, svc.vip) == ("default/web", "10.96.0.10")
    (sp,) = svc.ports
    assert (sp.port, sp.target_port, sp.protocol, sp.name) == (80, 8080, "http", "http")
    (ep,) = sp.endpoints
    assert (ep.ip, ep.port, ep.workload, ep.identity, ep.node, ep.node_address, ep.hbone_port, ep.zone,
            ep.healthy) == ("10.0.0.3", 8080, "default/web-2", WEB_ID, "node-2", "10.0.0.3", 15008, "z1", True)
    assert snap.by_vip[("10.96.0.10", 80)][0] is svc
    assert snap.by_workload_addr[("10.0.0.3", 8080)].identity == WEB_ID
    assert snap.local_workloads == LOCAL
    assert snap.identity_of(LOCAL[0]) == "spiffe://cluster.local/ns/default/sa/client"


def test_no_snapshot_until_every_type_arrived() -> None:
    st = XdsState(node="node-1")
    r1 = st.apply(xdsnames.MESH_CONFIG, "1", named(mesh_config()))
    r2 = st.apply(xdsnames.CLUSTER, "1", named(cluster()))
    r3 = st.apply(xdsnames.WORKLOAD, "1", [])
    assert st.apply(xdsnames.POLICY, "1", named(mesh_security())).snapshot is None
    assert st.apply(xdsnames.ROUTE, "1", []).snapshot is None
    assert r1.accepted and r2.accepted and r3.accepted
    assert r1.snapshot is r2.snapshot is r3.snapshot is None
    r4 = st.apply(xdsnames.ENDPOINT, "1", [])
    assert r4.snapshot is not None and r4.snapshot.services[0].ports[0].endpoints == ()


def test_bad_resource_is_named_and_previous_set_stays() -> None:
    st = full_state()
    before = st.snapshot
    bad = [NamedResource("", pack(cluster("web"))),
           NamedResource("", pack(cluster("api", port=99999)))]
    res = st.apply(xdsnames.CLUSTER, "2", bad)
    assert not res.accepted and res.snapshot is None
    (err,) = res.errors
    assert err.startswith("outbound|99999||api.default.svc.mesh:") and "port 99999" in err
    assert st.versions[xdsnames.CLUSTER] == "1"
    assert st.snapshot is before


def test_each_bad_field_is_reported() -> None:
    cases: list[tuple[str, Message, str]] = [
        (xdsnames.WORKLOAD, workload(ip="not-an-ip"), "ip 'not-an-ip' is not an IP address"),
        (xdsnames.WORKLOAD, workload(identity="https://x"), "identity"),
        (xdsnames.MESH_CONFIG, mesh_config(outbound_policy="SOMETIMES"), "outbound_policy"),
        (xdsnames.MESH_CONFIG, mesh_config(trust_bundle=["garbage"]), "trust_bundle[0]"),
        (xdsnames.CLUSTER, cluster(protocol="smtp"), "protocol 'smtp'"),
        (xdsnames.CLUSTER, cluster(vip="1.2.3"), "vip '1.2.3'"),
        (xdsnames.ENDPOINT, assignment(identity="spiffe://x/bad"), "identity"),
        (xdsnames.ENDPOINT, assignment(ip="300.0.0.1"), "address"),
    ]
    for type_url, msg, needle in cases:
        _, errors = convert_batch(type_url, named(msg))
        assert len(errors) == 1 and needle in errors[0], (type_url, errors)


def test_wrong_type_and_undecodable_resources() -> None:
    _, errors = convert_batch(xdsnames.CLUSTER, named(workload()))
    assert "has type" in errors[0]
    garbage = any_pb2.Any(type_url=xdsnames.CLUSTER, value=b"\xff\xff\xff")
    _, errors = convert_batch(xdsnames.CLUSTER, [NamedResource("c1", garbage)])
    assert errors[0].startswith("c1: does not decode")


def test_cluster_missing_metadata_and_non_eds() -> None:
    c = cluster()
    del c.metadata.filter_metadata[xdsnames.METADATA_KEY]
    _, errors = convert_batch(xdsnames.CLUSTER, named(c))
    assert "no metadata.filter_metadata['nodemesh']" in errors[0]
    c = cluster()
    c.type = cluster_pb2.Cluster.STATIC
    _, errors = convert_batch(xdsnames.CLUSTER, named(c))
    assert "nodemesh clusters are EDS" in errors[0]


def test_mesh_config_is_required() -> None:
    _, errors = convert_batch(xdsnames.MESH_CONFIG, [])
    assert "no MeshConfig named 'mesh'" in errors[0]


def test_snapshot_inconsistency_nacks_and_rolls_back() -> None:
    st = full_state()
    before = st.snapshot
    # Two services claiming one VIP:port is a consistency error, not a per-resource one.
    res = st.apply(xdsnames.CLUSTER, "2", named(cluster("web")) + named(cluster("api", vip="10.96.0.10")))
    assert not res.accepted and "both claim 10.96.0.10:80" in res.errors[0]
    assert st.snapshot is before and st.versions[xdsnames.CLUSTER] == "1"
    # The next good batch is accepted from the rolled-back state.
    res = st.apply(xdsnames.CLUSTER, "3", named(cluster("web")) + named(cluster("api", vip="10.96.0.11")))
    assert res.accepted and res.snapshot is not None and len(res.snapshot.services) == 2


def test_dns_domain_mismatch_is_a_snapshot_error() -> None:
    st = full_state()
    res = st.apply(xdsnames.MESH_CONFIG, "2", named(mesh_config(dns_domain="other")))
    assert not res.accepted and "dns domain 'other'" in res.errors[0]
    assert st.snapshot is not None and st.snapshot.mesh.dns_domain == "mesh"


def test_deleted_resources_leave_the_snapshot() -> None:
    st = full_state()
    res = st.apply(xdsnames.WORKLOAD, "2", [])
    assert res.snapshot is not None and res.snapshot.workloads == ()


def test_local_workloads_swap_rebuilds() -> None:
    st = full_state()
    new = LOCAL + (LocalWorkload("web-1", "default", "web", "10.0.0.2", (8080,), uid=2001),)
    snap = st.set_local_workloads(new)
    assert snap is not None and snap.local_workloads == new and snap.version.endswith(",local=1")


def test_accepted_sets_are_kept_per_type_as_their_frozen_types() -> None:
    """The edge hands on typed values (mypy --strict checks their users); a set
    of one type cannot hold another type's values, and an unnamed resource that
    fails is named from its message (state of the world sends no names)."""
    st = full_state()
    r = st.resources
    assert isinstance(r.mesh["mesh"], MeshSettings) and isinstance(r.policies["MeshSecurity//mesh"], MeshSecurity)
    assert all(isinstance(c, ClusterInfo) for c in r.clusters.values()) and r.clusters
    assert all(isinstance(a, AssignmentInfo) for a in r.assignments.values()) and r.assignments
    assert all(isinstance(w, Workload) for w in r.workloads.values()) and r.workloads
    with pytest.raises(TypeError, match="a Workload among the .*Cluster resources"):
        r.with_set(xdsnames.CLUSTER, dict(r.workloads))
    c = cluster()
    c.type = cluster_pb2.Cluster.STATIC
    _, errors = convert_batch(xdsnames.CLUSTER, named(c))
    assert errors == ("outbound|80||web.default.svc.mesh: type is STATIC, nodemesh clusters are EDS",)
