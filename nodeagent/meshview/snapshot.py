"""The node proxy's view of the mesh: one immutable, versioned snapshot.

Built once from xDS resources (nodeagent.xds.convert) or from a local config
file, checked for consistency, then swapped whole. A connection reads the
current snapshot once and keeps using that object. Proxy code imports only
these types, never protobufs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from nodeagent.meshview.l7snapshot import ClusterPolicy, RouteTable
from nodemesh.revocation import RevocationList
from nodemesh.security import SecurityPolicies

OUTBOUND_ALLOW_ANY = "ALLOW_ANY"
OUTBOUND_REGISTRY_ONLY = "REGISTRY_ONLY"


@dataclass(frozen=True)
class MeshSettings:
    trust_domain: str = "cluster.local"
    outbound_policy: str = OUTBOUND_ALLOW_ANY
    dns_domain: str = "mesh"
    vip_cidr: str = ""
    trust_bundle: tuple[str, ...] = ()  # PEM roots
    # Revoked nodes whose SVIDs this node refuses at HBONE, both ways (nodemesh/revocation.py).
    revocations: RevocationList = field(default_factory=RevocationList)


@dataclass(frozen=True)
class Workload:
    """A registered workload anywhere in the mesh."""

    name: str
    namespace: str
    service_account: str
    node: str
    ip: str
    ports: tuple[int, ...]
    identity: str  # SPIFFE URI
    node_address: str  # where its node's HBONE listener is reached
    hbone_port: int = 15008
    zone: str = ""
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Endpoint:
    """One backend of a service port: a workload's ip and target port."""

    ip: str
    port: int
    workload: str  # "<namespace>/<name>"
    identity: str  # the SPIFFE ID the endpoint's node proxy must present for it
    node: str
    node_address: str
    hbone_port: int = 15008
    zone: str = ""
    healthy: bool = True


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int
    protocol: str = "tcp"
    name: str = ""
    cluster: str = ""  # the xDS cluster name carrying this port's endpoints
    endpoints: tuple[Endpoint, ...] = ()
    routes: RouteTable | None = None  # L7 route table (HTTP-ish ports), from RouteConfiguration
    policy: ClusterPolicy | None = None  # L7 traffic policy, from the Cluster
    # Version subsets of this port (routes and Rollouts name them as clusters): each
    # a ServicePort of its own cluster holding only its version's endpoints.
    subsets: tuple[ServicePort, ...] = ()

    def cluster_port(self, cluster: str) -> ServicePort | None:
        """This port or one of its subsets, by cluster name."""
        if cluster == self.cluster:
            return self
        return next((s for s in self.subsets if s.cluster == cluster), None)


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    vip: str
    ports: tuple[ServicePort, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class LocalWorkload:
    """A workload declared in this node's agent config: how to recognise its
    processes (uid or cgroup) and which ports it serves. Not from xDS."""

    name: str
    namespace: str
    service_account: str
    ip: str
    ports: tuple[int, ...]
    uid: int | None = None
    cgroup: str | None = None  # cgroup v2 path relative to the cgroup root
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class SnapshotError(ValueError):
    """A snapshot that is not consistent; it is never published."""


@dataclass(frozen=True)
class Snapshot:
    version: str
    node: str
    mesh: MeshSettings
    services: tuple[Service, ...] = ()
    workloads: tuple[Workload, ...] = ()
    local_workloads: tuple[LocalWorkload, ...] = ()
    # PeerAuthentication / AuthorizationPolicy and mesh-wide security settings (issue 5).
    security: SecurityPolicies = field(default_factory=SecurityPolicies)
    # Indexes, derived in __post_init__; not part of equality.
    by_vip: Mapping[tuple[str, int], tuple[Service, ServicePort]] = field(
        default_factory=dict, compare=False, repr=False
    )
    by_workload_addr: Mapping[tuple[str, int], Workload] = field(
        default_factory=dict, compare=False, repr=False
    )
    local_by_uid: Mapping[int, LocalWorkload] = field(default_factory=dict, compare=False, repr=False)
    local_by_cgroup: Mapping[str, LocalWorkload] = field(
        default_factory=dict, compare=False, repr=False
    )
    local_by_port: Mapping[int, LocalWorkload] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        by_vip: dict[tuple[str, int], tuple[Service, ServicePort]] = {}
        for svc in self.services:
            if not svc.vip:
                continue
            for sp in svc.ports:
                key = (svc.vip, sp.port)
                if key in by_vip:
                    other = by_vip[key][0]
                    raise SnapshotError(
                        f"services {other.key} and {svc.key} both claim {svc.vip}:{sp.port}"
                    )
                by_vip[key] = (svc, sp)
        by_addr: dict[tuple[str, int], Workload] = {}
        for wl in self.workloads:
            for p in wl.ports:
                by_addr[(wl.ip, p)] = wl
        by_uid: dict[int, LocalWorkload] = {}
        by_cg: dict[str, LocalWorkload] = {}
        by_port: dict[int, LocalWorkload] = {}
        for lw in self.local_workloads:
            if lw.uid is not None:
                if lw.uid in by_uid:
                    raise SnapshotError(
                        f"local workloads {by_uid[lw.uid].key} and {lw.key} share uid {lw.uid}"
                    )
                by_uid[lw.uid] = lw
            if lw.cgroup:
                by_cg[lw.cgroup.strip("/")] = lw
            for p in lw.ports:
                if p in by_port:
                    raise SnapshotError(
                        f"local workloads {by_port[p].key} and {lw.key} both serve port {p}"
                    )
                by_port[p] = lw
        object.__setattr__(self, "by_vip", by_vip)
        object.__setattr__(self, "by_workload_addr", by_addr)
        object.__setattr__(self, "local_by_uid", by_uid)
        object.__setattr__(self, "local_by_cgroup", by_cg)
        object.__setattr__(self, "local_by_port", by_port)

    def identity_of(self, wl: LocalWorkload) -> str:
        return f"spiffe://{self.mesh.trust_domain}/ns/{wl.namespace}/sa/{wl.service_account}"
