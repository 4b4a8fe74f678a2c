"""The one place where xDS protobufs become the agent's frozen types.

Resources of one type arrive as a whole (state of the world); each is checked on
its own and every bad one yields "<name>: <reason>". A type's batch is accepted
whole or not at all, so the previous good set of that type stays in force when
one resource is bad (the NACK carries the reasons). Once every type has been
received, the accepted sets are joined into a Snapshot, which checks itself.
Every converted value is one of the frozen types named in `Converted`, and the
accepted sets are kept per type (`Resources`), so their users are type-checked.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NoReturn, TypeVar

from cryptography import x509
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import any_pb2, struct_pb2
from google.protobuf.message import DecodeError, Message

from nodeagent.meshview.l7snapshot import ClusterPolicy, RouteTable
from nodeagent.meshview.snapshot import (
    OUTBOUND_ALLOW_ANY,
    OUTBOUND_REGISTRY_ONLY,
    Endpoint,
    LocalWorkload,
    MeshSettings,
    Service,
    ServicePort,
    Snapshot,
    SnapshotError,
    Workload,
)
from nodeagent.xds import l7convert
from nodemesh import routespec, security, xdsnames
from nodemesh.fieldcheck import FieldChecker
from nodemesh.identity import Identity, IdentityError, check_dns_label
from nodemesh.revocation import RevocationError, RevocationList, RevokedNode
from nodemesh.v1 import mesh_pb2

PROTOCOLS = ("tcp", "http", "http2", "grpc")


class ResourceError(ValueError):
    """One resource is invalid; the message becomes part of the NACK."""

    resource = ""  # its name, once known


# Intermediate, still per-resource, forms of Cluster and ClusterLoadAssignment:
# they only become Services once both types are known.
@dataclass(frozen=True)
class ClusterInfo:
    name: str
    service: str
    namespace: str
    vip: str
    port: int
    target_port: int
    protocol: str
    port_name: str
    policy: ClusterPolicy | None = None  # L7 traffic policy
    subset: str = ""  # a version subset of the service port ("version=v2"), "" = the whole port


@dataclass(frozen=True)
class AssignmentInfo:
    cluster: str
    endpoints: tuple[Endpoint, ...]


# A Policy resource is one of these (nodemesh/security.py).
PolicyResource = security.MeshSecurity | security.PeerAuthentication | security.AuthorizationPolicy
# What one resource of any subscribed type converts to.
Converted = MeshSettings | Workload | ClusterInfo | AssignmentInfo | PolicyResource | RouteTable


# ------------------------------------------------------------------ field checks


def _ip(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ResourceError(f"{what} {value!r} is not an IP address") from None


def _port(value: float, what: str) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ResourceError(f"{what} {value!r} is not an integer")
        value = int(value)
    if not 1 <= value <= 65535:
        raise ResourceError(f"{what} {value} is not a port (1-65535)")
    return value


def _label(value: str, what: str) -> str:
    try:
        return check_dns_label(value, what)
    except IdentityError as e:
        raise ResourceError(str(e)) from None


def _identity(value: str, what: str) -> str:
    try:
        return Identity.parse(value).uri
    except IdentityError as e:
        raise ResourceError(f"{what}: {e}") from None


def _nack(path: str, reason: str) -> NoReturn:
    raise ResourceError(f"{path}: {reason}")


class _Meta:
    """A resource's nodemesh metadata (filter_metadata[METADATA_KEY]), read through
    the shared field validator (nodemesh/fieldcheck.py): the first bad field NACKs."""

    def __init__(self, struct_map: Mapping[str, struct_pb2.Struct], what: str) -> None:
        if xdsnames.METADATA_KEY not in struct_map:
            raise ResourceError(f"{what} has no metadata.filter_metadata[{xdsnames.METADATA_KEY!r}]")
        self.values: dict[str, object] = {}
        for k, v in struct_map[xdsnames.METADATA_KEY].fields.items():
            kind = v.WhichOneof("kind")
            self.values[k] = getattr(v, kind) if kind else None
        self.check = FieldChecker(f"{what} metadata", fail=_nack)

    def has(self, key: str) -> bool:
        return self.values.get(key) is not None

    def text(self, key: str, required: bool = True) -> str:
        return self.check.text(self.values.get(key), key, required=required)

    def number(self, key: str) -> float:
        v = self.values.get(key)
        if v is None:
            self.check.add(key, "required")
        return self.check.number(v, key, -math.inf, math.inf, 0.0)


# ------------------------------------------------------------------ per-resource conversion


def convert_mesh_config(msg: mesh_pb2.MeshConfig) -> MeshSettings:
    trust_domain = msg.trust_domain or "cluster.local"
    try:
        Identity(trust_domain, "x", "x")
    except IdentityError as e:
        raise ResourceError(str(e)) from None
    policy = msg.outbound_policy or OUTBOUND_ALLOW_ANY
    if policy not in (OUTBOUND_ALLOW_ANY, OUTBOUND_REGISTRY_ONLY):
        raise ResourceError(
            f"outbound_policy {policy!r} must be {OUTBOUND_ALLOW_ANY} or {OUTBOUND_REGISTRY_ONLY}"
        )
    if msg.vip_cidr:
        try:
            ipaddress.ip_network(msg.vip_cidr)
        except ValueError:
            raise ResourceError(f"vip_cidr {msg.vip_cidr!r} is not a CIDR") from None
    for i, pem in enumerate(msg.trust_bundle):
        try:
            x509.load_pem_x509_certificates(pem.encode())
        except ValueError as e:
            raise ResourceError(f"trust_bundle[{i}] is not a PEM certificate: {e}") from None
    dns_domain = msg.dns_domain or MeshSettings.dns_domain
    try:
        revocations = RevocationList.of(
            RevokedNode(node=r.node, epoch=r.epoch, revoked_unix=r.revoked_unix, revoked_by=r.revoked_by,
                        until_unix=r.until_unix) for r in msg.revoked_nodes)
    except RevocationError as e:
        raise ResourceError(str(e)) from None
    return MeshSettings(
        trust_domain=trust_domain,
        outbound_policy=policy,
        dns_domain=dns_domain,
        vip_cidr=msg.vip_cidr,
        trust_bundle=tuple(msg.trust_bundle),
        revocations=revocations,
    )


def convert_workload(name: str, msg: mesh_pb2.Workload) -> Workload:
    _label(msg.name, "workload name")
    _label(msg.namespace, "namespace")
    if not msg.node:
        raise ResourceError("node is empty")
    expected = xdsnames.workload_resource_name(msg.node, msg.namespace, msg.name)
    if name != expected:
        raise ResourceError(f"resource name should be {expected!r} for this workload")
    ident = _identity(msg.identity, "identity")
    return Workload(
        name=msg.name,
        namespace=msg.namespace,
        service_account=_label(msg.service_account or "default", "service account"),
        node=msg.node,
        ip=_ip(msg.ip, "ip"),
        ports=tuple(_port(p, "port") for p in msg.ports),
        identity=ident,
        node_address=_ip(msg.node_address, "node_address"),
        hbone_port=_port(msg.hbone_port, "hbone_port") if msg.hbone_port else xdsnames.HBONE_PORT,
        zone=msg.zone,
        labels=tuple(sorted(msg.labels.items())),
    )


def convert_cluster(msg: cluster_pb2.Cluster) -> ClusterInfo:
    if msg.type != cluster_pb2.Cluster.EDS:
        raise ResourceError(
            f"type is {cluster_pb2.Cluster.DiscoveryType.Name(msg.type)}, nodemesh clusters are EDS"
        )
    meta = _Meta(msg.metadata.filter_metadata, "cluster")
    service = _label(meta.text("service"), "service")
    namespace = _label(meta.text("namespace"), "namespace")
    vip = meta.text("vip", required=False)
    if vip:
        vip = _ip(vip, "vip")
    port = _port(meta.number("port"), "port")
    target = _port(meta.number("target_port"), "target_port")
    protocol = (meta.text("protocol", required=False) or "tcp").lower()
    if protocol not in PROTOCOLS:
        raise ResourceError(f"protocol {protocol!r} must be one of {', '.join(PROTOCOLS)}")
    subset = meta.text("subset", required=False)
    if subset:
        try:
            subset = routespec.subset_name(routespec.parse_subset_name(subset))
        except ValueError as e:
            raise ResourceError(str(e)) from None
    prefix = f"outbound|{port}|{subset}|{service}.{namespace}.svc."
    if not msg.name.startswith(prefix):
        raise ResourceError(f"name does not match its metadata (expected {prefix}<dns domain>)")
    return ClusterInfo(
        name=msg.name,
        service=service,
        namespace=namespace,
        vip=vip,
        port=port,
        target_port=target,
        protocol=protocol,
        port_name=meta.text("port_name", required=False),
        policy=_l7_policy(msg),
        subset=subset,
    )


def _l7_policy(msg: cluster_pb2.Cluster) -> ClusterPolicy:
    try:
        return l7convert.cluster_policy(msg)
    except l7convert.L7ResourceError as e:
        raise ResourceError(str(e)) from None


_HEALTHY = (health_check_pb2.HEALTHY, health_check_pb2.UNKNOWN)


def convert_assignment(msg: endpoint_pb2.ClusterLoadAssignment) -> AssignmentInfo:
    endpoints: list[Endpoint] = []
    for li, locality in enumerate(msg.endpoints):
        for ei, lb in enumerate(locality.lb_endpoints):
            what = f"endpoints[{li}].lb_endpoints[{ei}]"
            sa = lb.endpoint.address.socket_address
            if not lb.endpoint.address.HasField("socket_address"):
                raise ResourceError(f"{what} has no socket_address")
            meta = _Meta(lb.metadata.filter_metadata, what)
            workload = meta.text("workload")
            if workload.count("/") != 1:
                raise ResourceError(f"{what} workload {workload!r} is not <namespace>/<name>")
            endpoints.append(Endpoint(
                ip=_ip(sa.address, f"{what} address"),
                port=_port(sa.port_value, f"{what} port"),
                workload=workload,
                identity=_identity(meta.text("identity"), f"{what} identity"),
                node=meta.text("node"),
                node_address=_ip(meta.text("node_address"), f"{what} node_address"),
                hbone_port=(_port(meta.number("hbone_port"), f"{what} hbone_port")
                            if meta.has("hbone_port") else xdsnames.HBONE_PORT),
                zone=locality.locality.zone,
                healthy=lb.health_status in _HEALTHY,
            ))
    return AssignmentInfo(cluster=msg.cluster_name, endpoints=tuple(endpoints))


def convert_policy(name: str, msg: mesh_pb2.Policy) -> PolicyResource:
    """A Policy resource: MeshSecurity settings or a PeerAuthentication /
    AuthorizationPolicy, validated by the same parser the config API uses."""
    if msg.kind == security.KIND_MESH_SECURITY:
        if name != xdsnames.MESH_SECURITY_RESOURCE:
            raise ResourceError(f"MeshSecurity must be named {xdsnames.MESH_SECURITY_RESOURCE!r}")
        try:
            return security.MeshSecurity.from_json(msg.spec_json)
        except security.PolicySpecError as e:
            raise ResourceError(str(e)) from None
    if msg.kind not in (security.KIND_PEER_AUTHENTICATION, security.KIND_AUTHORIZATION_POLICY):
        raise ResourceError(f"kind {msg.kind!r} must be PeerAuthentication, AuthorizationPolicy or MeshSecurity")
    expected = xdsnames.policy_resource_name(msg.kind, msg.namespace, msg.name)
    if name != expected:
        raise ResourceError(f"resource name should be {expected!r} for this policy")
    try:
        return security.policy_from_json(msg.kind, msg.namespace, msg.name, msg.spec_json)
    except security.PolicySpecError as e:
        raise ResourceError(str(e)) from None


def security_from(policies: Mapping[str, PolicyResource]) -> security.SecurityPolicies:
    mesh = policies.get(xdsnames.MESH_SECURITY_RESOURCE)
    if not isinstance(mesh, security.MeshSecurity):  # convert_policy names only MeshSecurity so
        mesh = security.MeshSecurity()
    return security.SecurityPolicies(
        mesh=mesh,
        peer_authentications=tuple(p for _, p in sorted(policies.items())
                                   if isinstance(p, security.PeerAuthentication)),
        authorization_policies=tuple(p for _, p in sorted(policies.items())
                                     if isinstance(p, security.AuthorizationPolicy)),
    )


# ------------------------------------------------------------------ per-type batches


T = TypeVar("T")

# The message each subscribed type carries.
MESSAGES: dict[str, type[Message]] = {
    xdsnames.MESH_CONFIG: mesh_pb2.MeshConfig,
    xdsnames.WORKLOAD: mesh_pb2.Workload,
    xdsnames.CLUSTER: cluster_pb2.Cluster,
    xdsnames.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    xdsnames.POLICY: mesh_pb2.Policy,
    xdsnames.ROUTE: route_pb2.RouteConfiguration,
}


def _unpack(resource: any_pb2.Any, type_url: str) -> Message:
    if resource.type_url != type_url:
        raise ResourceError(f"has type {resource.type_url!r} in a {type_url} response")
    message = MESSAGES[type_url]
    msg = message()
    try:
        msg.ParseFromString(resource.value)
    except DecodeError as e:
        raise ResourceError(f"does not decode as {message.DESCRIPTOR.full_name}: {e}") from None
    return msg


def default_name(msg: Message) -> str:
    """The name a resource goes by when its response does not say (state of the world)."""
    if isinstance(msg, mesh_pb2.MeshConfig):
        return xdsnames.MESH_CONFIG_NAME
    if isinstance(msg, mesh_pb2.Workload):
        return xdsnames.workload_resource_name(msg.node, msg.namespace, msg.name)
    if isinstance(msg, mesh_pb2.Policy):
        return xdsnames.policy_resource_name(msg.kind, msg.namespace, msg.name)
    if isinstance(msg, cluster_pb2.Cluster | route_pb2.RouteConfiguration):
        return str(msg.name)
    if isinstance(msg, endpoint_pb2.ClusterLoadAssignment):
        return str(msg.cluster_name)
    return ""


@dataclass(frozen=True)
class NamedResource:
    """A resource as received: its name (from the Resource wrapper or the
    message itself) and the Any it came in."""

    name: str
    resource: any_pb2.Any


def _convert_one(type_url: str, r: NamedResource) -> tuple[str, Converted]:
    """One resource of a subscribed type -> (its name, its frozen value). A
    ResourceError names the resource as far as it is known (`.resource`)."""
    name = r.name
    converted: Converted
    try:
        msg = _unpack(r.resource, type_url)
        name = r.name or default_name(msg)
        if not name:
            raise ResourceError("has no name")
        if isinstance(msg, mesh_pb2.MeshConfig):
            if name != xdsnames.MESH_CONFIG_NAME:
                raise ResourceError(f"MeshConfig must be named {xdsnames.MESH_CONFIG_NAME!r}")
            converted = convert_mesh_config(msg)
        elif isinstance(msg, mesh_pb2.Workload):
            converted = convert_workload(name, msg)
        elif isinstance(msg, cluster_pb2.Cluster):
            converted = convert_cluster(msg)
        elif isinstance(msg, mesh_pb2.Policy):
            converted = convert_policy(name, msg)
        elif isinstance(msg, route_pb2.RouteConfiguration):
            try:
                converted = l7convert.convert_route_configuration(msg)
            except l7convert.L7ResourceError as e:
                raise ResourceError(str(e)) from None
        elif isinstance(msg, endpoint_pb2.ClusterLoadAssignment):
            converted = convert_assignment(msg)
            if xdsnames.is_slice(name) and name[:name.index(xdsnames.SLICE_MARK)] != converted.cluster:
                raise ResourceError(f"an endpoint slice of cluster {converted.cluster!r} under another "
                                    "cluster's name")
        else:
            raise ResourceError(f"a {type(msg).__name__} is not a resource nodemesh converts")
    except ResourceError as e:
        e.resource = name
        raise
    return name, converted


def convert_batch(type_url: str, resources: Sequence[NamedResource],
                  whole_set: bool = True) -> tuple[dict[str, Converted], tuple[str, ...]]:
    """Convert every resource of one response. Returns (name -> converted, errors).
    `whole_set`: the response is the type's whole set (state of the world), so the
    resources every set must hold are checked here; a Delta response carries only
    changes, and XdsState checks the merged set instead (required_errors)."""
    if type_url not in MESSAGES:
        return {}, (f"type {type_url} is not one nodemesh subscribes to",)
    out: dict[str, Converted] = {}
    errors: list[str] = []
    for i, r in enumerate(resources):
        try:
            name, converted = _convert_one(type_url, r)
            if name in out:
                raise ResourceError("appears twice in one response")
            out[name] = converted
        except ResourceError as e:
            errors.append(f"{e.resource or f'#{i}'}: {e}")
    if whole_set and not errors:
        errors += required_errors(type_url, out)
    return out, tuple(errors)


def required_errors(type_url: str, whole: Mapping[str, object]) -> list[str]:
    """What a type's whole set must hold for the agent to work."""
    if type_url == xdsnames.POLICY and xdsnames.MESH_SECURITY_RESOURCE not in whole:
        return [(f"{xdsnames.MESH_SECURITY_RESOURCE}: the response holds no mesh security settings; "
                "the agent needs them (mTLS mode, default deny)")]
    if type_url == xdsnames.MESH_CONFIG and xdsnames.MESH_CONFIG_NAME not in whole:
        return [(f"{xdsnames.MESH_CONFIG_NAME}: the response holds no MeshConfig named "
                f"{xdsnames.MESH_CONFIG_NAME!r}; the agent needs it (trust domain)")]
    return []


def _only(values: Mapping[str, Converted], kind: type[T], type_url: str) -> dict[str, T]:
    out: dict[str, T] = {}
    for name, v in values.items():
        if not isinstance(v, kind):
            raise TypeError(f"{name}: a {type(v).__name__} among the {type_url} resources")
        out[name] = v
    return out


def _policies(values: Mapping[str, Converted]) -> dict[str, PolicyResource]:
    out: dict[str, PolicyResource] = {}
    for name, v in values.items():
        if not isinstance(v, security.MeshSecurity | security.PeerAuthentication | security.AuthorizationPolicy):
            raise TypeError(f"{name}: a {type(v).__name__} among the {xdsnames.POLICY} resources")
        out[name] = v
    return out


@dataclass(frozen=True)
class Resources:
    """The accepted resources of every type, by name, each type its own value
    type. Immutable: a type's new set makes a new Resources (`with_set`)."""

    mesh: Mapping[str, MeshSettings] = field(default_factory=dict)
    workloads: Mapping[str, Workload] = field(default_factory=dict)
    clusters: Mapping[str, ClusterInfo] = field(default_factory=dict)
    assignments: Mapping[str, AssignmentInfo] = field(default_factory=dict)  # whole ones and slices
    policies: Mapping[str, PolicyResource] = field(default_factory=dict)
    routes: Mapping[str, RouteTable] = field(default_factory=dict)

    def of(self, type_url: str) -> Mapping[str, Converted]:
        """One type's set, whatever the type (for what works on names alone)."""
        sets: dict[str, Mapping[str, Converted]] = {
            xdsnames.MESH_CONFIG: self.mesh, xdsnames.WORKLOAD: self.workloads, xdsnames.CLUSTER: self.clusters,
            xdsnames.ENDPOINT: self.assignments, xdsnames.POLICY: self.policies, xdsnames.ROUTE: self.routes}
        return sets[type_url]

    def with_set(self, type_url: str, values: Mapping[str, Converted]) -> Resources:
        """This with `type_url`'s set replaced by `values` (as convert_batch made
        them; a value of another type is a bug and raises TypeError)."""
        if type_url == xdsnames.MESH_CONFIG:
            return replace(self, mesh=_only(values, MeshSettings, type_url))
        if type_url == xdsnames.WORKLOAD:
            return replace(self, workloads=_only(values, Workload, type_url))
        if type_url == xdsnames.CLUSTER:
            return replace(self, clusters=_only(values, ClusterInfo, type_url))
        if type_url == xdsnames.ENDPOINT:
            return replace(self, assignments=_only(values, AssignmentInfo, type_url))
        if type_url == xdsnames.POLICY:
            return replace(self, policies=_policies(values))
        if type_url == xdsnames.ROUTE:
            return replace(self, routes=_only(values, RouteTable, type_url))
        raise ValueError(f"type {type_url} is not one nodemesh subscribes to")


def build_snapshot(version: str, node: str, local_workloads: Sequence[LocalWorkload],
                   resources: Resources) -> Snapshot:
    """Join accepted resources of all types into a Snapshot (raises SnapshotError)."""
    mesh = resources.mesh[xdsnames.MESH_CONFIG_NAME]
    assignments: dict[str, AssignmentInfo] = {}
    sliced: dict[str, list[Endpoint]] = {}
    # A whole ClusterLoadAssignment (state of the world) or the cluster's slices (Delta).
    for name, la in sorted(resources.assignments.items()):
        if xdsnames.is_slice(name):
            sliced.setdefault(la.cluster, []).extend(la.endpoints)
        else:
            assignments[name] = la
    for cluster_name, eps in sliced.items():
        assignments.setdefault(cluster_name, AssignmentInfo(cluster_name, tuple(eps)))
    clusters = resources.clusters
    grouped: dict[tuple[str, str], list[ClusterInfo]] = {}
    subset_of: dict[str, list[ClusterInfo]] = {}  # parent cluster name -> its subset clusters
    for c in clusters.values():
        expected = xdsnames.cluster_name(c.service, c.namespace, c.port, mesh.dns_domain, c.subset)
        if c.name != expected:
            raise SnapshotError(f"cluster {c.name} does not match dns domain {mesh.dns_domain!r} "
                                f"(expected {expected})")
        if c.subset:
            subset_of.setdefault(xdsnames.cluster_name(c.service, c.namespace, c.port, mesh.dns_domain),
                                 []).append(c)
            continue
        grouped.setdefault((c.namespace, c.service), []).append(c)
    for parent, orphans in subset_of.items():
        if parent not in clusters:
            raise SnapshotError(f"subset cluster {orphans[0].name} has no cluster {parent} for its service port")
    labels_of = {w.key: dict(w.labels) for w in resources.workloads.values()}
    referenced: dict[str, set[str]] = {}  # port cluster -> subset clusters its routes name
    for table in resources.routes.values():
        for entry in table.routes:
            for name in [wc.cluster for wc in entry.clusters] + [m.cluster for m in entry.mirrors]:
                parts = name.split("|")
                if len(parts) == 4 and parts[2]:
                    referenced.setdefault("|".join((parts[0], parts[1], "", parts[3])), set()).add(name)
    services = []
    for (namespace, name), cs in sorted(grouped.items()):
        vips = {c.vip for c in cs}
        if len(vips) > 1:
            raise SnapshotError(f"service {namespace}/{name} has clusters with different VIPs {sorted(vips)}")
        ports = []
        for c in sorted(cs, key=lambda c: c.port):
            port_la = assignments.get(c.name)
            subs: dict[str, ServicePort] = {}
            parent_eps = port_la.endpoints if port_la else ()
            for sc in subset_of.get(c.name, ()):
                sla = assignments.get(sc.name)
                subs[sc.name] = ServicePort(
                    port=sc.port, target_port=sc.target_port, protocol=sc.protocol, name=sc.port_name,
                    cluster=sc.name, policy=sc.policy,
                    endpoints=sla.endpoints if sla else _subset_endpoints(parent_eps, sc.subset, labels_of))
            # Types arrive one at a time in any order: a route may name a subset cluster whose
            # Cluster or ClusterLoadAssignment has not arrived yet. Serve it meanwhile from the
            # port's own endpoints and the workloads' labels (the same selection the control
            # plane makes) rather than failing requests until the rest arrives.
            for ref in referenced.get(c.name, ()):
                if ref not in subs:
                    subs[ref] = ServicePort(port=c.port, target_port=c.target_port, protocol=c.protocol,
                                            name=c.port_name, cluster=ref, policy=c.policy,
                                            endpoints=_subset_endpoints(parent_eps, ref.split("|")[2], labels_of))
            ports.append(ServicePort(
                port=c.port, target_port=c.target_port, protocol=c.protocol, name=c.port_name,
                cluster=c.name, endpoints=parent_eps,
                routes=resources.routes.get(c.name), policy=c.policy,
                subsets=tuple(subs[k] for k in sorted(subs)),
            ))
        services.append(Service(name=name, namespace=namespace, vip=vips.pop(), ports=tuple(ports)))
    workloads = tuple(sorted(resources.workloads.values(), key=lambda w: (w.node, w.namespace, w.name)))
    return Snapshot(version=version, node=node, mesh=mesh, services=tuple(services),
                    workloads=workloads, local_workloads=tuple(local_workloads),
                    security=security_from(resources.policies))


def _subset_endpoints(endpoints: Sequence[Endpoint], subset: str,
                      labels_of: Mapping[str, Mapping[str, str]]) -> tuple[Endpoint, ...]:
    try:
        want = routespec.parse_subset_name(subset)
    except ValueError:
        return ()
    return tuple(e for e in endpoints if all(labels_of.get(e.workload, {}).get(k) == v for k, v in want))


# ------------------------------------------------------------------ state across responses


@dataclass(frozen=True)
class ApplyResult:
    accepted: bool
    errors: tuple[str, ...] = ()
    snapshot: Snapshot | None = None  # set when accepted and every type is known

    @property
    def error_detail(self) -> str:
        return "; ".join(self.errors)


@dataclass
class XdsState:
    """Accepted resources per type and their versions; pure (no I/O), so the
    ADS client and tests drive it alike."""

    node: str
    local_workloads: tuple[LocalWorkload, ...] = ()
    types: tuple[str, ...] = xdsnames.AGENT_TYPES
    resources: Resources = field(default_factory=Resources)
    versions: dict[str, str] = field(default_factory=dict)
    snapshot: Snapshot | None = None
    local_generation: int = 0  # bumped when the agent's own workload list changes
    # Delta: the version of each resource held (name -> version), sent back as
    # initial_resource_versions after a reconnect so nothing held is sent again.
    resource_versions: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(t in self.versions for t in self.types)

    def snapshot_version(self) -> str:
        short = {xdsnames.MESH_CONFIG: "mesh", xdsnames.WORKLOAD: "wl",
                 xdsnames.CLUSTER: "cds", xdsnames.ENDPOINT: "eds", xdsnames.POLICY: "pol",
                 xdsnames.ROUTE: "rds"}
        version = ",".join(f"{short.get(t, t)}={self.versions.get(t, '')}" for t in self.types)
        return f"{version},local={self.local_generation}" if self.local_generation else version

    def set_local_workloads(self, local_workloads: Sequence[LocalWorkload]) -> Snapshot | None:
        """Swap the agent's own workloads (config reload); returns the rebuilt
        snapshot, or None while not every type is known. Raises SnapshotError and
        keeps the previous workloads if the result is inconsistent."""
        previous = (self.local_workloads, self.local_generation)
        self.local_workloads = tuple(local_workloads)
        self.local_generation += 1
        if not self.complete:
            return None
        try:
            self.snapshot = build_snapshot(self.snapshot_version(), self.node, self.local_workloads,
                                           self.resources)
        except SnapshotError:
            self.local_workloads, self.local_generation = previous
            raise
        return self.snapshot

    def apply(self, type_url: str, version: str, resources: Sequence[NamedResource]) -> ApplyResult:
        """A state-of-the-world response: `resources` is the type's whole set."""
        converted, errors = convert_batch(type_url, resources)
        if errors:
            return ApplyResult(False, errors)
        return self._install(type_url, version, converted)

    def apply_delta(self, type_url: str, system_version: str, resources: Sequence[NamedResource],
                    removed: Sequence[str], resource_versions: Mapping[str, str]) -> ApplyResult:
        """A Delta response: `resources` changed or are new (every one named),
        `removed` are gone. Only the changed resources are converted; the merged
        set must still hold what every set must. All or nothing, as apply()."""
        if any(not r.name for r in resources):
            return ApplyResult(False, ("a Delta resource without a name",))
        converted, errors = convert_batch(type_url, resources, whole_set=False)
        if errors:
            return ApplyResult(False, errors)
        merged = dict(self.resources.of(type_url))
        merged.update(converted)
        for n in removed:
            merged.pop(n, None)
        missing = required_errors(type_url, merged)
        if missing:
            return ApplyResult(False, tuple(missing))
        result = self._install(type_url, system_version, merged)
        if result.accepted:
            held = self.resource_versions.setdefault(type_url, {})
            held.update(resource_versions)
            for n in removed:
                held.pop(n, None)
        return result

    def _install(self, type_url: str, version: str, converted: Mapping[str, Converted]) -> ApplyResult:
        prev_resources = self.resources
        prev_version = self.versions.get(type_url)
        self.resources = self.resources.with_set(type_url, converted)
        self.versions[type_url] = version
        if not self.complete:
            return ApplyResult(True)
        try:
            snap = build_snapshot(self.snapshot_version(), self.node, self.local_workloads, self.resources)
        except SnapshotError as e:
            # Roll this type back: the snapshot in force stays what it was.
            self.resources = prev_resources
            if prev_version is None:
                del self.versions[type_url]
            else:
                self.versions[type_url] = prev_version
            return ApplyResult(False, (f"snapshot: {e}",))
        self.snapshot = snap
        return ApplyResult(True, (), snap)
