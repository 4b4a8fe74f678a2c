"""Build the xDS snapshot from config and registry: a pure function following
the contract in nodemesh.xdsnames (the agent consumes exactly this)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.protobuf.message import Message

from controlplane.nodes import RegisteredNode, RegisteredWorkload
from controlplane.policies import policy_resources
from controlplane.xds import build_routes as xds_routes
from controlplane.xds import listeners as xds_listeners
from controlplane.xds import subsets
from controlplane.xds.build_healthchecks import apply_health_checks
from controlplane.xds.cache import XdsSnapshot
from controlplane.xds.subsets import VersionSplit
from nodemesh import model, xdsnames
from nodemesh.identity import Identity
from nodemesh.revocation import RevocationList
from nodemesh.v1 import mesh_pb2

CONNECT_TIMEOUT_S = 5
# Envoy must be told to speak HTTP/2 upstream for these; gRPC clients ignore the option.
_H2_PROTOCOLS = ("http2", "grpc")
_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True)
class ServiceEntry:
    """A service with the VIP it has (fixed by the user or allocated)."""

    service: model.ServiceSpec
    vip: str


def _pack(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    # Pack() serializes non-deterministically (map order); repack so equal content
    # gives equal bytes and therefore equal versions.
    a.value = msg.SerializeToString(deterministic=True)
    return a


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def _cluster(entry: ServiceEntry, port: model.ServicePortSpec, dns_domain: str) -> cluster_pb2.Cluster:
    svc = entry.service
    c = cluster_pb2.Cluster(
        name=xdsnames.cluster_name(svc.name, svc.namespace, port.port, dns_domain),
        type=cluster_pb2.Cluster.EDS,
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        connect_timeout=duration_pb2.Duration(seconds=CONNECT_TIMEOUT_S),
    )
    c.eds_cluster_config.eds_config.ads.SetInParent()
    c.eds_cluster_config.eds_config.resource_api_version = config_source_pb2.V3
    c.metadata.filter_metadata[xdsnames.METADATA_KEY].CopyFrom(_struct({
        "service": svc.name, "namespace": svc.namespace, "vip": entry.vip,
        "port": port.port, "target_port": port.target_port, "protocol": port.protocol,
        "port_name": port.name,
    }))
    if port.protocol in _H2_PROTOCOLS:
        opts = http_protocol_options_pb2.HttpProtocolOptions()
        opts.explicit_http_config.http2_protocol_options.SetInParent()
        c.typed_extension_protocol_options[_HTTP_OPTIONS_KEY].CopyFrom(_pack(opts))
    return c


def _load_assignment(cluster: str, port: model.ServicePortSpec, backends: Sequence[
        tuple[RegisteredNode, RegisteredWorkload]], trust_domain: str) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster)
    by_node: dict[str, list[tuple[RegisteredNode, RegisteredWorkload]]] = {}
    for node, wl in backends:
        by_node.setdefault(node.name, []).append((node, wl))
    for node_name in sorted(by_node):
        members = sorted(by_node[node_name], key=lambda nw: (nw[1].namespace, nw[1].name))
        node = members[0][0]
        loc = cla.endpoints.add()
        loc.locality.zone = node.zone
        loc.locality.sub_zone = node.name
        # gRPC silently drops a locality without a weight.
        loc.load_balancing_weight.value = len(members)
        for _, wl in members:
            lb = loc.lb_endpoints.add()
            sa = lb.endpoint.address.socket_address
            sa.address = wl.ip
            sa.port_value = port.target_port
            sa.protocol = address_pb2.SocketAddress.TCP
            # Active health checks run by the endpoint's own node (nodeagent/observe/healthprober.py).
            lb.health_status = (health_check_pb2.UNHEALTHY if (wl.key, port.target_port) in node.unhealthy
                                else health_check_pb2.HEALTHY)
            lb.load_balancing_weight.value = 1
            lb.metadata.filter_metadata[xdsnames.METADATA_KEY].CopyFrom(_struct({
                "workload": wl.key,
                "identity": Identity(trust_domain, wl.namespace, wl.service_account).uri,
                "node": node.name, "node_address": node.address, "hbone_port": node.hbone_port,
            }))
    return cla


class _Memo:
    """Packed resources of the previous build, by what they were built from: a
    rebuild after one node changed packs that node's resources again, not the
    mesh's (at 1,000 nodes a full rebuild took over a second of the event loop).
    Two generations: what this build used survives into the next one."""

    def __init__(self) -> None:
        self.prev: dict[Any, any_pb2.Any] = {}
        self.cur: dict[Any, any_pb2.Any] = {}

    def get(self, key: Any, make: Any) -> any_pb2.Any:
        a = self.cur.get(key)
        if a is None:
            a = self.prev.get(key)
            if a is None:
                a = _pack(make())
            self.cur[key] = a
        return a

    def rotate(self) -> None:
        self.prev, self.cur = self.cur, {}


_memo = _Memo()


def _member_key(node: RegisteredNode, wl: RegisteredWorkload, port: int) -> tuple[Any, ...]:
    return (node.name, node.address, node.hbone_port, node.zone, wl.namespace, wl.name, wl.service_account, wl.ip,
            (wl.key, port) in node.unhealthy)


def _add_slices(assignments: dict[str, any_pb2.Any], cluster: str, port: model.ServicePortSpec,
                backends: Sequence[tuple[RegisteredNode, RegisteredWorkload]], trust_domain: str) -> None:
    """One slice per node with backends (nodemesh.xdsnames SLICE_MARK): what node
    agents subscribe to, so a change on one node sends that node's slice only."""
    by_node: dict[str, list[tuple[RegisteredNode, RegisteredWorkload]]] = {}
    for n, w in backends:
        by_node.setdefault(n.name, []).append((n, w))
    for node_name, members in by_node.items():
        key = ("slice", cluster, port.target_port, trust_domain,
               tuple(_member_key(n, w, port.target_port) for n, w in members))
        assignments[xdsnames.slice_name(cluster, node_name)] = _memo.get(
            key, lambda members=members: _load_assignment(cluster, port, members, trust_domain))


def _workload(node: RegisteredNode, wl: RegisteredWorkload, trust_domain: str) -> mesh_pb2.Workload:
    return mesh_pb2.Workload(
        name=wl.name, namespace=wl.namespace, service_account=wl.service_account, node=node.name,
        ip=wl.ip, ports=list(wl.ports), labels=dict(wl.labels),
        identity=Identity(trust_domain, wl.namespace, wl.service_account).uri,
        node_address=node.address, hbone_port=node.hbone_port, zone=node.zone)


def build_snapshot(mesh: model.MeshConfig, services: Sequence[ServiceEntry],
                   nodes: Sequence[RegisteredNode], trust_bundle: Sequence[str],
                   policies: Sequence[Any] = (), *, l7: Any = None,
                   splits: Sequence[VersionSplit] = (), previous: XdsSnapshot | None = None,
                   revocations: RevocationList | None = None) -> XdsSnapshot:
    """Every resource a node agent needs, each type versioned by its content.
    `l7`: (routes, destination policies) from controlplane.xds.build_routes.load();
    `splits`: what Rollouts ask (controlplane/rollout/state.py splits());
    `previous`: the snapshot in force, whose unchanged resources are carried over
    with their versions and encodings (only what changed is hashed again);
    `revocations`: nodes whose SVIDs every node refuses (nodemesh/revocation.py)."""
    l7_routes, l7_policies = l7 if l7 is not None else ((), ())
    wanted = subsets.needed_subsets([e.service for e in services], l7_routes, splits)
    clusters: dict[str, any_pb2.Any] = {}
    assignments: dict[str, any_pb2.Any] = {}
    workloads: dict[str, any_pb2.Any] = {}
    all_workloads = [(n, w) for n in sorted(nodes, key=lambda n: n.name) for w in n.workloads]
    _memo.rotate()
    for node, wl in all_workloads:
        workloads[xdsnames.workload_resource_name(node.name, wl.namespace, wl.name)] = _memo.get(
            ("wl", node.name, node.address, node.hbone_port, node.zone, wl, mesh.trust_domain),
            lambda node=node, wl=wl: _workload(node, wl, mesh.trust_domain))
    # Workloads by (namespace, label, value): a service is matched against the
    # workloads carrying its selector's first label, not against the whole mesh
    # (at 1,000 nodes that was 40,000 matches per rebuild). Order stays the nodes'.
    by_label: dict[tuple[str, str, str], list[tuple[RegisteredNode, RegisteredWorkload]]] = {}
    by_namespace: dict[str, list[tuple[RegisteredNode, RegisteredWorkload]]] = {}
    for node, wl in all_workloads:
        by_namespace.setdefault(wl.namespace, []).append((node, wl))
        for k, v in wl.labels:
            by_label.setdefault((wl.namespace, k, v), []).append((node, wl))
    for entry in sorted(services, key=lambda e: e.service.key):
        svc = entry.service
        split = subsets.split_for(splits, svc)
        candidates = (by_label.get((svc.namespace, *svc.selector[0]), []) if svc.selector
                      else by_namespace.get(svc.namespace, []))
        # A retired version's workloads are withdrawn from every cluster of the service.
        selected = [(n, w) for n, w in candidates if svc.selects(w.namespace, w.label_map)
                    and not (split is not None and split.excludes(w.label_map))]
        for port in svc.ports:
            c = _cluster(entry, port, mesh.dns_domain)
            l7_policy = xds_routes.policy_for(l7_policies, svc)
            if l7_policy is not None or port.protocol in xds_routes.L7_PROTOCOLS:
                xds_routes.apply_policy(c, l7_policy)
                apply_health_checks(c, l7_policy, port.port)
            clusters[c.name] = _pack(c)
            backends = [(n, w) for n, w in selected if w.serves(port.target_port)]
            assignments[c.name] = _memo.get(
                ("cla", c.name, port.target_port, mesh.trust_domain,
                 tuple(_member_key(n, w, port.target_port) for n, w in backends)),
                lambda c=c, port=port, backends=backends: _load_assignment(c.name, port, backends,
                                                                            mesh.trust_domain))
            _add_slices(assignments, c.name, port, backends, mesh.trust_domain)
            for subset in sorted(wanted.get(svc.key, ())):
                sc = subsets.subset_cluster(c, svc, port, subset, mesh.dns_domain)
                clusters[sc.name] = _pack(sc)
                members = [(n, w) for n, w in backends if subsets.matches(subset, w.label_map)]
                assignments[sc.name] = _pack(_load_assignment(sc.name, port, members, mesh.trust_domain))
                _add_slices(assignments, sc.name, port, members, mesh.trust_domain)
    mesh_pb = mesh_pb2.MeshConfig(
        trust_domain=mesh.trust_domain, outbound_policy=mesh.outbound_policy, vip_cidr=mesh.vip_range,
        trust_bundle=list(trust_bundle), dns_domain=mesh.dns_domain,
        revoked_nodes=[mesh_pb2.RevokedNode(node=e.node, epoch=e.epoch, revoked_unix=e.revoked_unix,
                                            revoked_by=e.revoked_by, until_unix=e.until_unix)
                       for e in (revocations.entries if revocations is not None else ())])
    snap = XdsSnapshot.from_resources({
        xdsnames.CLUSTER: clusters,
        xdsnames.ENDPOINT: assignments,
        xdsnames.WORKLOAD: workloads,
        xdsnames.MESH_CONFIG: {xdsnames.MESH_CONFIG_NAME: _pack(mesh_pb)},
        xdsnames.ROUTE: {n: _pack(r) for n, r in xds_routes.route_configurations(
            mesh, [e.service for e in services], l7_routes, splits).items()},
        # API listeners for proxyless gRPC clients (agents do not subscribe to LDS).
        xdsnames.LISTENER: {n: _pack(x) for n, x in xds_listeners.api_listeners(
            mesh, [e.service for e in services]).items()},
        # Security policies (issue 5): always at least MeshSecurity//mesh.
        xdsnames.POLICY: {n: _pack(p) for n, p in policy_resources(mesh, policies).items()},
    }, previous)
    snap.consistent()
    return snap

