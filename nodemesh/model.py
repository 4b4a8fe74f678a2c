"""The declarative config model: YAML documents shaped like Kubernetes objects,
parsed and validated into frozen dataclasses. The one place validation lives."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from nodemesh import rolloutspec as _rollouts
from nodemesh import routespec as _routes
from nodemesh.fieldcheck import FieldChecker, Problem, type_name
from nodemesh.hbonespec import DEFAULT_HBONE, HBONE_SPEC_FIELDS, HboneSettings, parse_hbone
from nodemesh.httpedge import DEFAULT_LIMITS, SPEC_FIELDS, HttpLimits, parse_limits
from nodemesh.identity import IdentityError, check_trust_domain

API_VERSION = "nodemesh.io/v1alpha1"
DEFAULT_NAMESPACE = "default"
MESH_CONFIG_NAME = "mesh"

KIND_SERVICE = "Service"
KIND_MESH_CONFIG = "MeshConfig"
KIND_PEER_AUTHENTICATION = "PeerAuthentication"  # parsed in nodemesh.security
KIND_AUTHORIZATION_POLICY = "AuthorizationPolicy"  # parsed in nodemesh.security
KINDS = (KIND_SERVICE, KIND_MESH_CONFIG, KIND_PEER_AUTHENTICATION, KIND_AUTHORIZATION_POLICY,
         *_routes.ROUTE_KINDS,  # L7 kinds: parsed in nodemesh.routespec
         _rollouts.KIND_ROLLOUT)  # parsed in nodemesh.rolloutspec
CLUSTER_SCOPED = frozenset({KIND_MESH_CONFIG})

PROTOCOLS = ("tcp", "http", "http2", "grpc", "auto")
OUTBOUND_POLICIES = ("ALLOW_ANY", "REGISTRY_ONLY")
DEFAULT_VIP_RANGE = "240.240.0.0/16"  # class E: never routed, so a VIP never collides with a real host

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Label keys and values as in Kubernetes: optional DNS prefix, then a name of [A-Za-z0-9._-].

_KIND_ALIASES = {
    "service": KIND_SERVICE,
    "services": KIND_SERVICE,
    "svc": KIND_SERVICE,
    "meshconfig": KIND_MESH_CONFIG,
    "meshconfigs": KIND_MESH_CONFIG,
    "mesh": KIND_MESH_CONFIG,
    "peerauthentication": KIND_PEER_AUTHENTICATION,
    "peerauthentications": KIND_PEER_AUTHENTICATION,
    "pa": KIND_PEER_AUTHENTICATION,
    "authorizationpolicy": KIND_AUTHORIZATION_POLICY,
    "authorizationpolicies": KIND_AUTHORIZATION_POLICY,
    "authz": KIND_AUTHORIZATION_POLICY,
    **_routes.ALIASES,
    **_rollouts.ALIASES,
}



class ValidationError(ValueError):
    """One or more documents are invalid. `problems` lists every (path, reason)."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(f"{p}: {r}" for p, r in self.problems))


def canonical_kind(kind: str) -> str:
    """'svc', 'services', 'Service' -> 'Service'. Raises ValidationError for an unknown kind."""
    if kind in KINDS:
        return kind
    found = _KIND_ALIASES.get(kind.lower())
    if found is None:
        raise ValidationError([("kind", f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")])
    return found


# ---------------------------------------------------------------- objects


@dataclass(frozen=True)
class ServicePortSpec:
    port: int
    target_port: int
    protocol: str = "tcp"
    name: str = ""


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    namespace: str
    ports: tuple[ServicePortSpec, ...]
    selector: tuple[tuple[str, str], ...]  # sorted (key, value) pairs
    vip: str = ""  # a fixed VIP asked for by the user; "" = allocate one
    labels: tuple[tuple[str, str], ...] = ()

    kind = KIND_SERVICE

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, namespace: str, labels: Mapping[str, str]) -> bool:
        """Whether a workload with these labels in this namespace backs the service."""
        return namespace == self.namespace and all(labels.get(k) == v for k, v in self.selector)

    def spec(self) -> dict[str, Any]:
        """The canonical spec (defaults filled in), as stored and returned by the API."""
        ports: list[dict[str, Any]] = []
        for p in self.ports:
            d: dict[str, Any] = {"port": p.port, "targetPort": p.target_port, "protocol": p.protocol}
            if p.name:
                d["name"] = p.name
            ports.append(d)
        spec: dict[str, Any] = {"ports": ports, "selector": dict(self.selector)}
        if self.vip:
            spec["vip"] = self.vip
        return spec


@dataclass(frozen=True)
class MeshConfig:
    trust_domain: str = "cluster.local"
    vip_range: str = DEFAULT_VIP_RANGE
    outbound_policy: str = "ALLOW_ANY"
    dns_domain: str = "mesh"
    labels: tuple[tuple[str, str], ...] = ()
    # Security (issue 5; see nodemesh.security and docs/security.md). Only
    # written to spec() when not the default, so older specs stay unchanged.
    mtls_mode: str = "PERMISSIVE"
    default_deny: bool = False
    root_namespace: str = "nodemesh-system"
    # node name (or "*") -> service accounts ("<ns>/<sa>", "<ns>/*") it may register; empty: any
    node_service_accounts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # HTTP edge limits of every L7 listener (spec.http; nodemesh/httpedge.py).
    http_limits: HttpLimits = DEFAULT_LIMITS
    # Limits of the HBONE connections between node proxies (spec.hbone; nodemesh/hbonespec.py).
    hbone_limits: HboneSettings = DEFAULT_HBONE
    # Which identities may run on which nodes (nodemesh.bindings; default deny). Holds the
    # spec.identityBindings entries and, after them, those nodeServiceAccounts implies.
    identity_bindings: tuple[Any, ...] = ()

    kind = KIND_MESH_CONFIG
    name = MESH_CONFIG_NAME
    namespace = ""

    @property
    def key(self) -> str:
        return self.name

    @property
    def vip_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.vip_range)

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "trustDomain": self.trust_domain,
            "vipRange": self.vip_range,
            "outboundPolicy": self.outbound_policy,
            "dnsDomain": self.dns_domain,
        }
        from nodemesh import security

        spec.update(security.mesh_spec_extra(self))
        if self.http_limits != DEFAULT_LIMITS:
            spec["http"] = self.http_limits.to_spec()
        if self.hbone_limits != DEFAULT_HBONE:
            spec["hbone"] = self.hbone_limits.to_spec()
        return spec


Object = Any  # ServiceSpec | MeshConfig | nodemesh.security kinds


@dataclass(frozen=True)
class Document:
    """One parsed document: the object plus what identifies it in the store."""

    kind: str
    namespace: str
    name: str
    obj: Object
    labels: tuple[tuple[str, str], ...] = field(default=())

    @property
    def ref(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)


# ---------------------------------------------------------------- validation helpers


# ---------------------------------------------------------------- per-kind parsers


def _parse_service(c: FieldChecker, name: str, namespace: str, labels: tuple[tuple[str, str], ...],
                   spec_raw: Any) -> ServiceSpec | None:
    spec = c.mapping(spec_raw, "spec", ("ports", "selector", "vip"))
    if spec is None:
        return None
    if spec_raw is None:
        c.add("spec", "required")
        return None
    ports: list[ServicePortSpec] = []
    raw_ports = spec.get("ports")
    if not isinstance(raw_ports, list) or not raw_ports:
        c.add("spec.ports", "required; must be a non-empty list of ports")
        raw_ports = []
    seen_ports: dict[int, int] = {}
    seen_names: dict[str, int] = {}
    for i, rp in enumerate(raw_ports):
        path = f"spec.ports[{i}]"
        m = c.mapping(rp, path, ("name", "port", "targetPort", "protocol"))
        if m is None:
            continue
        if "port" not in m:
            c.add(f"{path}.port", "required")
            port = 0
        else:
            port = c.port(m.get("port"), f"{path}.port")
        target = c.port(m["targetPort"], f"{path}.targetPort") if "targetPort" in m else port
        proto = c.text(m.get("protocol", "tcp"), f"{path}.protocol")
        if proto and proto not in PROTOCOLS:
            c.add(f"{path}.protocol", f"must be one of {', '.join(PROTOCOLS)}, got {proto!r}")
        pname = c.text(m.get("name"), f"{path}.name")
        if pname and not _LABEL.match(pname):
            c.add(f"{path}.name", "must be a DNS label (lower case letters, digits and '-', at most 63)")
        if port:
            if port in seen_ports:
                c.add(f"{path}.port", f"duplicate port {port} (also spec.ports[{seen_ports[port]}])")
            seen_ports.setdefault(port, i)
        if pname:
            if pname in seen_names:
                c.add(f"{path}.name", f"duplicate port name {pname!r} (also spec.ports[{seen_names[pname]}])")
            seen_names.setdefault(pname, i)
        ports.append(ServicePortSpec(port=port, target_port=target, protocol=proto or "tcp", name=pname))
    selector = c.labels(spec.get("selector"), "spec.selector", allow_empty=False)
    vip = c.text(spec.get("vip"), "spec.vip")
    if vip:
        try:
            addr = ipaddress.ip_address(vip)
            if addr.version != 4:
                c.add("spec.vip", "must be an IPv4 address")
        except ValueError:
            c.add("spec.vip", f"{vip!r} is not an IP address")
    if c.problems:
        return None
    return ServiceSpec(name=name, namespace=namespace, ports=tuple(ports), selector=selector, vip=vip,
                   labels=labels)


def _parse_mesh_config(c: FieldChecker, name: str, labels: tuple[tuple[str, str], ...],
                       spec_raw: Any) -> MeshConfig | None:
    if name != MESH_CONFIG_NAME:
        c.add("metadata.name", f"there is one MeshConfig and it must be named {MESH_CONFIG_NAME!r}")
    spec = c.mapping(spec_raw, "spec", ("trustDomain", "vipRange", "outboundPolicy", "dnsDomain", "mtls",
                                        "defaultDeny", "rootNamespace", "nodeServiceAccounts", "http", "hbone",
                                        "identityBindings"))
    if spec is None:
        return None
    td = c.text(spec.get("trustDomain", "cluster.local"), "spec.trustDomain")
    if td:
        try:
            check_trust_domain(td)
        except IdentityError as e:
            c.add("spec.trustDomain", str(e))
    vip_range = c.text(spec.get("vipRange", DEFAULT_VIP_RANGE), "spec.vipRange")
    if vip_range:
        try:
            net = ipaddress.IPv4Network(vip_range)
            if net.prefixlen > 30:
                c.add("spec.vipRange", "must be a /30 or larger: the network and broadcast "
                      "addresses are never handed out")
        except ValueError as e:
            c.add("spec.vipRange", f"must be an IPv4 CIDR with no host bits set, like "
                  f"{DEFAULT_VIP_RANGE} ({e})")
    policy = c.text(spec.get("outboundPolicy", "ALLOW_ANY"), "spec.outboundPolicy")
    if policy and policy not in OUTBOUND_POLICIES:
        c.add("spec.outboundPolicy", f"must be one of {', '.join(OUTBOUND_POLICIES)}, got {policy!r}")
    dns = c.text(spec.get("dnsDomain", "mesh"), "spec.dnsDomain")
    if dns and not all(_LABEL.match(part) for part in dns.split(".")):
        c.add("spec.dnsDomain", "must be a DNS name made of DNS labels, like 'mesh' or 'mesh.local'")
    if not dns:
        c.add("spec.dnsDomain", "must not be empty")
    if c.problems:
        return None
    from nodemesh import security

    extra = security.parse_mesh_extra(c, spec)
    http = c.mapping(spec.get("http"), "spec.http", SPEC_FIELDS)
    if http:
        limits, problems = parse_limits({k: v for k, v in http.items() if k in SPEC_FIELDS})
        for path, reason in problems:
            c.add(path, reason)
        extra["http_limits"] = limits
    hb = c.mapping(spec.get("hbone"), "spec.hbone", HBONE_SPEC_FIELDS)
    if hb:
        hbone, problems = parse_hbone({k: v for k, v in hb.items() if k in HBONE_SPEC_FIELDS})
        for path, reason in problems:
            c.add(path, reason)
        extra["hbone_limits"] = hbone
    if c.problems:
        return None
    return MeshConfig(trust_domain=td, vip_range=vip_range, outbound_policy=policy, dns_domain=dns,
                      labels=labels, **extra)


# ---------------------------------------------------------------- entry points


def parse_document(doc: Any, index: int = 0) -> Document:
    """Validate one decoded YAML document. Raises ValidationError with every problem found."""
    c = FieldChecker(f"document {index}")
    if not isinstance(doc, dict):
        c.add("", f"must be a mapping with apiVersion, kind, metadata and spec, got {type_name(doc)}")
        raise ValidationError(c.problems)
    api_version = doc.get("apiVersion")
    kind_raw = doc.get("kind")
    meta = doc.get("metadata")
    kind = kind_raw if isinstance(kind_raw, str) and kind_raw in KINDS else ""
    name = meta.get("name") if isinstance(meta, dict) else None
    ns_raw = meta.get("namespace") if isinstance(meta, dict) else None
    cluster_scoped = kind in CLUSTER_SCOPED
    namespace = "" if cluster_scoped else (ns_raw if isinstance(ns_raw, str) and ns_raw else DEFAULT_NAMESPACE)
    if kind and isinstance(name, str) and name:
        # Name the object, as operators will grep for it.
        c.subject = f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"
    # status is accepted (and ignored) so that `get -o yaml` output applies again.
    c.mapping(doc, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    if api_version != API_VERSION:
        c.add("apiVersion", f"must be {API_VERSION!r}, got {api_version!r}")
    if not kind:
        c.add("kind", f"must be one of {', '.join(KINDS)}, got {kind_raw!r}")
    # annotations are accepted (and not stored) so kubectl-style files apply unchanged.
    m = c.mapping(meta, "metadata", ("name", "namespace", "labels", "annotations"))
    if meta is None:
        c.add("metadata", "required")
    name_s = c.text(name, "metadata.name", required=True) if m is not None else ""
    if name_s and not _LABEL.match(name_s):
        c.add("metadata.name", "must be a DNS label (lower case letters, digits and '-', at most 63)")
    if isinstance(ns_raw, str) and ns_raw and not cluster_scoped and not _LABEL.match(ns_raw):
        c.add("metadata.namespace", "must be a DNS label (lower case letters, digits and '-', at most 63)")
    elif ns_raw is not None and not isinstance(ns_raw, str):
        c.add("metadata.namespace", f"must be a string, got {type_name(ns_raw)}")
    labels = c.labels(m.get("labels") if m else None, "metadata.labels")
    obj: Object | None = None
    if kind == KIND_SERVICE:
        obj = _parse_service(c, name_s, namespace, labels, doc.get("spec"))
    elif kind == KIND_MESH_CONFIG:
        obj = _parse_mesh_config(c, name_s, labels, doc.get("spec"))
    elif kind in (KIND_PEER_AUTHENTICATION, KIND_AUTHORIZATION_POLICY):
        from nodemesh import security

        parse = (security.parse_peer_authentication if kind == KIND_PEER_AUTHENTICATION
                 else security.parse_authorization_policy)
        obj = parse(c, name_s, namespace, labels, doc.get("spec"))
    elif kind in _routes.ROUTE_KINDS and not c.problems:
        obj, more = _routes.parse(c.subject, kind, name_s, namespace, labels, doc.get("spec"))
        c.problems.extend(more)
    elif kind == _rollouts.KIND_ROLLOUT and not c.problems:
        obj, more = _rollouts.parse(c.subject, name_s, namespace, labels, doc.get("spec"))
        c.problems.extend(more)
    if c.problems or obj is None:
        raise ValidationError(c.problems or [(c.subject, "invalid document")])
    return Document(kind=kind, namespace=namespace, name=name_s, obj=obj, labels=labels)


def parse_documents(text: str) -> list[Document]:
    """Parse a multi-document YAML text. The batch is validated whole: any bad
    document raises ValidationError listing the problems of every document."""
    try:
        raw = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ValidationError([("yaml", f"not valid YAML: {e}")]) from e
    if not raw:
        raise ValidationError([("documents", "no documents found")])
    problems: list[Problem] = []
    docs: list[Document] = []
    seen: dict[tuple[str, str, str], int] = {}
    for i, d in enumerate(raw):
        try:
            doc = parse_document(d, i)
        except ValidationError as e:
            problems.extend(e.problems)
            continue
        if doc.ref in seen:
            problems.append((f"document {i}", (f"{doc.kind} {doc.namespace}/{doc.name} also appears in "
                             f"document {seen[doc.ref]}; each object may appear once per apply")))
        seen.setdefault(doc.ref, i)
        docs.append(doc)
    if problems:
        raise ValidationError(problems)
    return docs


def object_from_spec(kind: str, namespace: str, name: str, spec: Mapping[str, Any],
                     labels: Mapping[str, str] | None = None) -> Object:
    """Rebuild an object from a stored spec (as the store keeps it)."""
    doc = {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace or None, "labels": dict(labels or {})},
        "spec": dict(spec),
    }
    return parse_document(doc).obj


def check_services_against_mesh(services: Sequence[ServiceSpec], mesh: MeshConfig) -> list[Problem]:
    """Cross-object checks that need the MeshConfig: a fixed VIP must lie inside
    the VIP range and must not be the network or broadcast address."""
    net = mesh.vip_network
    problems: list[Problem] = []
    for s in services:
        if not s.vip:
            continue
        addr = ipaddress.IPv4Address(s.vip)
        if addr not in net:
            problems.append((f"Service {s.key}: spec.vip",
                             (f"{s.vip} is outside the mesh VIP range {mesh.vip_range} "
                              "(MeshConfig spec.vipRange); pick an address inside it or omit spec.vip")))
        elif addr in (net.network_address, net.broadcast_address):
            problems.append((f"Service {s.key}: spec.vip",
                             f"{s.vip} is the network or broadcast address of {mesh.vip_range}"))
    return problems


def to_yaml_document(kind: str, namespace: str, name: str, spec: Mapping[str, Any],
                     labels: Mapping[str, str] | None = None,
                     status: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The document shape `get -o yaml` prints."""
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    out: dict[str, Any] = {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": dict(spec)}
    if status:
        out["status"] = dict(status)
    return out

