"""Security config kinds: PeerAuthentication (mTLS modes) and AuthorizationPolicy
(ALLOW / DENY / AUDIT), parsed and validated into frozen dataclasses with the
field path of every problem, the way nodemesh.model does for the other kinds.

Shapes follow Istio's security.istio.io/v1 resources closely, so that an
operator who knows those can read these; differences are listed in
docs/security.md. The same parser runs on the control plane (apply) and on the
agent (the xDS Policy resource carries the canonical spec as JSON), so both
sides agree on what a policy means.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nodemesh.fieldcheck import FieldChecker
from nodemesh.hbonespec import DEFAULT_HBONE, HboneSettings, parse_hbone
from nodemesh.httpedge import DEFAULT_LIMITS, HttpLimits, parse_limits

KIND_PEER_AUTHENTICATION = "PeerAuthentication"
KIND_AUTHORIZATION_POLICY = "AuthorizationPolicy"
# Not a config kind: the mesh-wide security settings (from MeshConfig) as the
# control plane sends them to agents beside the policies.
KIND_MESH_SECURITY = "MeshSecurity"

MTLS_UNSET = "UNSET"
MTLS_STRICT = "STRICT"
MTLS_PERMISSIVE = "PERMISSIVE"
MTLS_DISABLE = "DISABLE"
MTLS_MODES = (MTLS_UNSET, MTLS_STRICT, MTLS_PERMISSIVE, MTLS_DISABLE)
MESH_MTLS_MODES = (MTLS_STRICT, MTLS_PERMISSIVE, MTLS_DISABLE)

ACTION_ALLOW = "ALLOW"
ACTION_DENY = "DENY"
ACTION_AUDIT = "AUDIT"
ACTIONS = (ACTION_ALLOW, ACTION_DENY, ACTION_AUDIT)

DEFAULT_ROOT_NAMESPACE = "nodemesh-system"
# Istio's default: both plaintext and mTLS accepted, so that adopting the mesh
# breaks no caller. STRICT is one MeshConfig field away (docs/security.md).
DEFAULT_MESH_MTLS = MTLS_PERMISSIVE

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
# Condition keys understood in `when`; request.headers[...] is HTTP-only.
CONDITION_KEYS = ("source.ip", "source.namespace", "source.principal", "destination.port")
_HEADER_KEY = re.compile(r"^request\.headers\[([!#$%&'*+\-.^_`|~0-9A-Za-z]+)\]$")
_WILDCARD_TEXT = re.compile(r"^\*?[^*]*\*?$")

Labels = tuple[tuple[str, str], ...]


class PolicySpecError(ValueError):
    """A policy that does not parse; `problems` lists every (path, reason)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{p}: {r}" for p, r in self.problems))


# ---------------------------------------------------------------- objects


def selects(selector: Labels, labels: Mapping[str, str]) -> bool:
    """An empty selector selects every workload (of the policy's scope)."""
    return all(labels.get(k) == v for k, v in selector)


class _ScopedPolicy:
    """What PeerAuthentication and AuthorizationPolicy share: a name in a
    namespace (the key) and a workload selector."""

    name: str
    namespace: str
    selector: Labels

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def _selector_spec(self) -> dict[str, Any]:
        return {"selector": {"matchLabels": dict(self.selector)}} if self.selector else {}


@dataclass(frozen=True)
class PeerAuthentication(_ScopedPolicy):
    name: str
    namespace: str
    selector: Labels = ()
    mode: str = MTLS_UNSET
    port_modes: tuple[tuple[int, str], ...] = ()  # (target port, mode), sorted
    labels: Labels = ()

    kind = KIND_PEER_AUTHENTICATION

    def spec(self) -> dict[str, Any]:
        spec = self._selector_spec()
        spec["mtls"] = {"mode": self.mode}
        if self.port_modes:
            # JSON object keys are strings; the parser accepts both.
            spec["portLevelMtls"] = {str(p): {"mode": m} for p, m in self.port_modes}
        return spec


@dataclass(frozen=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()

    @property
    def http_only(self) -> bool:
        return bool(self.methods or self.not_methods or self.paths or self.not_paths
                    or self.hosts or self.not_hosts)


@dataclass(frozen=True)
class Condition:
    key: str  # one of CONDITION_KEYS or request.headers[<name>]
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    @property
    def header(self) -> str:
        """The header name (lower case) for request.headers[...], else ""."""
        m = _HEADER_KEY.match(self.key)
        return m.group(1).lower() if m else ""


@dataclass(frozen=True)
class AuthzRule:
    sources: tuple[Source, ...] = ()  # `from`: any of them; none = any source
    operations: tuple[Operation, ...] = ()  # `to`: any of them; none = any operation
    conditions: tuple[Condition, ...] = ()  # `when`: all of them

    @property
    def http_only(self) -> bool:
        """Whether the rule needs HTTP attributes to be decided."""
        return any(o.http_only for o in self.operations) or any(c.header for c in self.conditions)


@dataclass(frozen=True)
class AuthorizationPolicy(_ScopedPolicy):
    name: str
    namespace: str
    selector: Labels = ()
    action: str = ACTION_ALLOW
    rules: tuple[AuthzRule, ...] = ()
    labels: Labels = ()

    kind = KIND_AUTHORIZATION_POLICY

    def spec(self) -> dict[str, Any]:
        spec = self._selector_spec()
        spec["action"] = self.action
        spec["rules"] = [_rule_spec(r) for r in self.rules]
        return spec


def _nonempty(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) for k, v in d.items() if v}


def _rule_spec(r: AuthzRule) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if r.sources:
        out["from"] = [{"source": _nonempty({
            "principals": s.principals, "notPrincipals": s.not_principals,
            "namespaces": s.namespaces, "notNamespaces": s.not_namespaces,
            "ipBlocks": s.ip_blocks, "notIpBlocks": s.not_ip_blocks})} for s in r.sources]
    if r.operations:
        out["to"] = [{"operation": _nonempty({
            "ports": o.ports, "notPorts": o.not_ports, "methods": o.methods, "notMethods": o.not_methods,
            "paths": o.paths, "notPaths": o.not_paths, "hosts": o.hosts, "notHosts": o.not_hosts})}
            for o in r.operations]
    if r.conditions:
        out["when"] = [{"key": c.key, **_nonempty({"values": c.values, "notValues": c.not_values})}
                       for c in r.conditions]
    return out


@dataclass(frozen=True)
class MeshSecurity:
    """Mesh-wide security settings (MeshConfig spec.mtls / defaultDeny / rootNamespace)."""

    mtls_mode: str = DEFAULT_MESH_MTLS
    default_deny: bool = False
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    # MeshConfig spec.http and spec.hbone ride along to the agents here (only when not the default).
    http: HttpLimits = DEFAULT_LIMITS
    hbone: HboneSettings = DEFAULT_HBONE

    def to_json(self) -> str:
        out: dict[str, Any] = {"mtlsMode": self.mtls_mode, "defaultDeny": self.default_deny,
                               "rootNamespace": self.root_namespace}
        if self.http != DEFAULT_LIMITS:
            out["http"] = self.http.to_spec()
        if self.hbone != DEFAULT_HBONE:
            out["hbone"] = self.hbone.to_spec()
        return json.dumps(out, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MeshSecurity:
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise PolicySpecError([("spec_json", f"not JSON: {e}")]) from None
        if not isinstance(raw, dict):
            raise PolicySpecError([("spec_json", "must be a JSON object")])
        problems: list[tuple[str, str]] = []
        unknown = set(raw) - {"mtlsMode", "defaultDeny", "rootNamespace", "http", "hbone"}
        if unknown:
            problems.append((f"spec_json.{min(unknown)}", "unknown field"))
        mode = raw.get("mtlsMode", DEFAULT_MESH_MTLS)
        if mode not in MESH_MTLS_MODES:
            problems.append(("spec_json.mtlsMode", f"must be one of {', '.join(MESH_MTLS_MODES)}, got {mode!r}"))
        deny = raw.get("defaultDeny", False)
        if not isinstance(deny, bool):
            problems.append(("spec_json.defaultDeny", "must be a boolean"))
        root = raw.get("rootNamespace", DEFAULT_ROOT_NAMESPACE)
        if not isinstance(root, str) or not root:
            problems.append(("spec_json.rootNamespace", "must be a non-empty string"))
        http = raw.get("http", {})
        limits = DEFAULT_LIMITS
        if not isinstance(http, dict):
            problems.append(("spec_json.http", "must be a JSON object"))
        elif http:
            limits, bad = parse_limits(http, "spec_json.http")
            problems.extend(bad)
        hb = raw.get("hbone", {})
        hbone = DEFAULT_HBONE
        if not isinstance(hb, dict):
            problems.append(("spec_json.hbone", "must be a JSON object"))
        elif hb:
            hbone, bad = parse_hbone(hb, "spec_json.hbone")
            problems.extend(bad)
        if problems:
            raise PolicySpecError(problems)
        return cls(str(mode), bool(deny), str(root), limits, hbone)


@dataclass(frozen=True)
class SecurityPolicies:
    """Everything the receiving proxy needs to decide a connection."""

    mesh: MeshSecurity = field(default_factory=MeshSecurity)
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()


# ---------------------------------------------------------------- parsing


def _principal_ok(value: str) -> str:
    """Principals are trust-domain/ns/<ns>/sa/<sa> (Istio style) or full SPIFFE
    IDs, with at most one '*' at the start or end (or '*' alone)."""
    if not value:
        return "must not be empty"
    if not _WILDCARD_TEXT.match(value) or value.count("*") > 1 and value != "*":
        return "may hold one '*', only at the start or the end (prefix or suffix match)"
    if any(c.isspace() for c in value):
        return "must not contain white space"
    return ""


def _strings(c: FieldChecker, raw: Any, path: str, check: Any = None) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        c.add(path, f"must be a list of strings, got {type(raw).__name__}")
        return ()
    out = []
    for i, v in enumerate(raw):
        if not isinstance(v, str):
            c.add(f"{path}[{i}]", f"must be a string, got {type(v).__name__}")
            continue
        problem = check(v) if check else ("must not be empty" if not v else "")
        if problem:
            c.add(f"{path}[{i}]", problem)
            continue
        out.append(v)
    return tuple(out)


def _cidr_ok(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"{value!r} is not an IP address or CIDR (e.g. 10.0.0.0/8)"
    return ""


def _method_ok(value: str) -> str:
    if value != "*" and value not in HTTP_METHODS:
        return f"must be an HTTP method in upper case ({', '.join(HTTP_METHODS)}) or '*', got {value!r}"
    return ""


def _path_ok(value: str) -> str:
    if not _WILDCARD_TEXT.match(value):
        return "may hold one '*', only at the start or the end"
    if value != "*" and not value.startswith(("/", "*")):
        return "must start with '/' (or '*' for a suffix match)"
    return ""


def _host_ok(value: str) -> str:
    if not value or not _WILDCARD_TEXT.match(value) or any(c.isspace() for c in value):
        return "must be a host name, optionally with one '*' at the start or the end"
    return ""


def _ports(c: FieldChecker, raw: Any, path: str) -> tuple[int, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        c.add(path, f"must be a list of ports, got {type(raw).__name__}")
        return ()
    out = []
    for i, v in enumerate(raw):
        # Istio writes ports as strings; accept both, refuse anything else.
        p = int(v) if isinstance(v, str) and v.isdigit() else v
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            c.add(f"{path}[{i}]", "must be a port number in 1..65535")
            continue
        out.append(p)
    return tuple(out)


def _selector(c: FieldChecker, raw: Any, path: str) -> Labels:
    m = c.mapping(raw, path, ("matchLabels",))
    if not m:
        return ()
    sel = c.labels(m.get("matchLabels"), f"{path}.matchLabels", allow_empty=False)
    return sel


def _list_of_maps(c: FieldChecker, raw: Any, path: str) -> list[tuple[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        c.add(path, f"must be a list, got {type(raw).__name__}")
        return []
    return [(f"{path}[{i}]", v) for i, v in enumerate(raw)]


_SOURCE_KEYS = ("principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks", "notIpBlocks")
_OPERATION_KEYS = ("ports", "notPorts", "methods", "notMethods", "paths", "notPaths", "hosts", "notHosts")


def _clause(c: FieldChecker, raw: Any, path: str, wrapper: str,
            keys: tuple[str, ...]) -> tuple[Mapping[str, Any], str] | None:
    """`{<wrapper>: {<keys>...}}` (a rule's `from` source or `to` operation):
    the inner mapping and its path, or None where it is not a mapping."""
    m = c.mapping(raw, path, (wrapper,))
    if m is None:
        return None
    inner_path = f"{path}.{wrapper}"
    inner = c.mapping(m.get(wrapper), inner_path, keys)
    if inner is None:
        return None
    if not inner:
        c.add(inner_path, f"required; a {wrapper} needs at least one of {', '.join(keys)}")
    return inner, inner_path


def _source(c: FieldChecker, raw: Any, path: str) -> Source | None:
    got = _clause(c, raw, path, "source", _SOURCE_KEYS)
    if got is None:
        return None
    s, spath = got

    def strings(key: str, check: Callable[[str], str]) -> tuple[str, ...]:
        return _strings(c, s.get(key), f"{spath}.{key}", check)

    return Source(strings("principals", _principal_ok), strings("notPrincipals", _principal_ok),
                  strings("namespaces", _principal_ok), strings("notNamespaces", _principal_ok),
                  strings("ipBlocks", _cidr_ok), strings("notIpBlocks", _cidr_ok))


def _operation(c: FieldChecker, raw: Any, path: str) -> Operation | None:
    got = _clause(c, raw, path, "operation", _OPERATION_KEYS)
    if got is None:
        return None
    o, opath = got

    def strings(key: str, check: Callable[[str], str]) -> tuple[str, ...]:
        return _strings(c, o.get(key), f"{opath}.{key}", check)

    return Operation(_ports(c, o.get("ports"), f"{opath}.ports"), _ports(c, o.get("notPorts"), f"{opath}.notPorts"),
                     strings("methods", _method_ok), strings("notMethods", _method_ok),
                     strings("paths", _path_ok), strings("notPaths", _path_ok),
                     strings("hosts", _host_ok), strings("notHosts", _host_ok))


def _condition(c: FieldChecker, raw: Any, path: str) -> Condition | None:
    m = c.mapping(raw, path, ("key", "values", "notValues"))
    if m is None:
        return None
    key = c.text(m.get("key"), f"{path}.key", required=True)
    if key and key not in CONDITION_KEYS and not _HEADER_KEY.match(key):
        c.add(f"{path}.key", f"must be one of {', '.join(CONDITION_KEYS)} or request.headers[<name>], "
              f"got {key!r}")
    values = _strings(c, m.get("values"), f"{path}.values", lambda v: "")
    not_values = _strings(c, m.get("notValues"), f"{path}.notValues", lambda v: "")
    if not values and not not_values:
        c.add(path, "needs values or notValues")
    if key in ("source.ip",):
        for i, v in enumerate(values):
            if _cidr_ok(v):
                c.add(f"{path}.values[{i}]", _cidr_ok(v))
    if key == "destination.port":
        for i, v in enumerate(values + not_values):
            if not v.isdigit() or not 1 <= int(v) <= 65535:
                c.add(f"{path}.values[{i}]", "must be a port number in 1..65535 (as a string)")
    return Condition(key, values, not_values)


def _rule(c: FieldChecker, raw: Any, path: str) -> AuthzRule | None:
    m = c.mapping(raw, path, ("from", "to", "when"))
    if m is None:
        return None
    sources = [s for p, v in _list_of_maps(c, m.get("from"), f"{path}.from") if (s := _source(c, v, p))]
    ops = [o for p, v in _list_of_maps(c, m.get("to"), f"{path}.to") if (o := _operation(c, v, p))]
    conds = [x for p, v in _list_of_maps(c, m.get("when"), f"{path}.when") if (x := _condition(c, v, p))]
    return AuthzRule(tuple(sources), tuple(ops), tuple(conds))


def parse_peer_authentication(c: FieldChecker, name: str, namespace: str, labels: Labels,
                              spec_raw: Any) -> PeerAuthentication | None:
    spec = c.mapping(spec_raw, "spec", ("selector", "mtls", "portLevelMtls"))
    if spec is None:
        return None
    selector = _selector(c, spec.get("selector"), "spec.selector")
    mode = MTLS_UNSET
    mtls = c.mapping(spec.get("mtls"), "spec.mtls", ("mode",))
    if mtls:
        mode = c.text(mtls.get("mode", MTLS_UNSET), "spec.mtls.mode")
        if mode not in MTLS_MODES:
            c.add("spec.mtls.mode", f"must be one of {', '.join(MTLS_MODES)}, got {mode!r}")
    port_modes: list[tuple[int, str]] = []
    plm = spec.get("portLevelMtls")
    if plm is not None:
        if not isinstance(plm, dict):
            c.add("spec.portLevelMtls", "must map a port number to {mode: ...}")
        else:
            for k, v in plm.items():
                ppath = f"spec.portLevelMtls.{k}"
                port = int(k) if isinstance(k, str) and k.isdigit() else k
                if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                    c.add(ppath, "the key must be a port number in 1..65535")
                    continue
                pm = c.mapping(v, ppath, ("mode",))
                if not pm:
                    c.add(ppath, "must be {mode: STRICT | PERMISSIVE | DISABLE}")
                    continue
                pmode = c.text(pm.get("mode"), f"{ppath}.mode", required=True)
                if pmode and pmode not in MESH_MTLS_MODES:
                    c.add(f"{ppath}.mode", f"must be one of {', '.join(MESH_MTLS_MODES)}, got {pmode!r}")
                    continue
                port_modes.append((port, pmode))
            if port_modes and not selector:
                # Istio's rule too: a port is a property of a workload, not of a namespace.
                c.add("spec.portLevelMtls", "needs spec.selector: port-level modes apply to selected workloads")
    if c.problems:
        return None
    return PeerAuthentication(name, namespace, selector, mode, tuple(sorted(port_modes)), labels)


def parse_authorization_policy(c: FieldChecker, name: str, namespace: str, labels: Labels,
                               spec_raw: Any) -> AuthorizationPolicy | None:
    spec = c.mapping(spec_raw, "spec", ("selector", "action", "rules"))
    if spec is None:
        return None
    selector = _selector(c, spec.get("selector"), "spec.selector")
    action = c.text(spec.get("action", ACTION_ALLOW), "spec.action")
    if action not in ACTIONS:
        c.add("spec.action", f"must be one of {', '.join(ACTIONS)}, got {action!r}")
    rules = [r for p, v in _list_of_maps(c, spec.get("rules"), "spec.rules") if (r := _rule(c, v, p))]
    if c.problems:
        return None
    return AuthorizationPolicy(name, namespace, selector, action, tuple(rules), labels)


def policy_from_json(kind: str, namespace: str, name: str, spec_json: str) -> PeerAuthentication | AuthorizationPolicy:
    """Rebuild a policy from its canonical JSON spec (the agent's side of the
    xDS Policy resource). Raises PolicySpecError naming the field."""
    from nodemesh import model

    try:
        spec = json.loads(spec_json)
    except ValueError as e:
        raise PolicySpecError([("spec_json", f"not JSON: {e}")]) from None
    doc = {"apiVersion": model.API_VERSION, "kind": kind,
           "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    try:
        obj = model.parse_document(doc)
    except model.ValidationError as e:
        raise PolicySpecError(list(e.problems)) from None
    if not isinstance(obj.obj, (PeerAuthentication, AuthorizationPolicy)):
        raise PolicySpecError([("kind", f"{kind} is not a security policy kind")])
    return obj.obj


# ---------------------------------------------------------------- MeshConfig fields


def mesh_spec_extra(mesh: Any) -> dict[str, Any]:
    """The security fields of a MeshConfig spec, only where not the default (so
    specs stored before these fields existed compare equal)."""
    out: dict[str, Any] = {}
    if mesh.mtls_mode != DEFAULT_MESH_MTLS:
        out["mtls"] = {"mode": mesh.mtls_mode}
    if mesh.default_deny:
        out["defaultDeny"] = True
    if mesh.root_namespace != DEFAULT_ROOT_NAMESPACE:
        out["rootNamespace"] = mesh.root_namespace
    if mesh.node_service_accounts:
        out["nodeServiceAccounts"] = {n: list(sas) for n, sas in mesh.node_service_accounts}
    explicit = [b.spec() for b in mesh.identity_bindings if not b.name.startswith("nodeServiceAccounts.")]
    if explicit:
        out["identityBindings"] = explicit
    return out


_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SA_PATTERN = re.compile(r"^(\*|[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)/(\*|[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)$")


def parse_mesh_extra(c: FieldChecker, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate MeshConfig's security fields; returns MeshConfig keyword arguments."""
    out: dict[str, Any] = {}
    mtls = c.mapping(spec.get("mtls"), "spec.mtls", ("mode",))
    if mtls:
        mode = c.text(mtls.get("mode", DEFAULT_MESH_MTLS), "spec.mtls.mode")
        if mode not in MESH_MTLS_MODES:
            c.add("spec.mtls.mode", f"must be one of {', '.join(MESH_MTLS_MODES)}, got {mode!r}")
        out["mtls_mode"] = mode
    deny = spec.get("defaultDeny", False)
    if not isinstance(deny, bool):
        c.add("spec.defaultDeny", "must be true or false")
    out["default_deny"] = bool(deny) if isinstance(deny, bool) else False
    root = c.text(spec.get("rootNamespace", DEFAULT_ROOT_NAMESPACE), "spec.rootNamespace")
    if root and not _NODE_NAME.match(root):
        c.add("spec.rootNamespace", "must be a DNS label (lower case letters, digits and '-')")
    out["root_namespace"] = root or DEFAULT_ROOT_NAMESPACE
    nsa = spec.get("nodeServiceAccounts")
    allow: list[tuple[str, tuple[str, ...]]] = []
    if nsa is not None:
        if not isinstance(nsa, dict):
            c.add("spec.nodeServiceAccounts", "must map a node name (or '*') to a list of "
                  "'<namespace>/<service account>' patterns")
        else:
            for node, sas in nsa.items():
                npath = f"spec.nodeServiceAccounts.{node}"
                if not isinstance(node, str) or not (node == "*" or _NODE_NAME.match(node)):
                    c.add(npath, "the key must be a node name or '*'")
                    continue
                items = _strings(c, sas, npath, lambda v: "" if _SA_PATTERN.match(v) else
                                 "must be '<namespace>/<service account>', either part may be '*'")
                allow.append((node, items))
    out["node_service_accounts"] = tuple(sorted(allow))
    from nodemesh.bindings import parse_bindings

    out["identity_bindings"] = parse_bindings(c, spec.get("identityBindings"), out["node_service_accounts"])
    return out


def node_may_register(mesh: Any, node: str, namespace: str, service_account: str,
                      node_labels: Mapping[str, str] | None = None) -> bool:
    """Whether an identity binding (nodemesh.bindings; spec.identityBindings or
    its nodeServiceAccounts shorthand) allows the service account on `node`.
    Nothing bound: refused (default deny)."""
    from nodemesh.bindings import identity_refused

    return not identity_refused(mesh, node, node_labels or {}, namespace, service_account)


def mesh_security_of(mesh: Any) -> MeshSecurity:
    return MeshSecurity(mesh.mtls_mode, mesh.default_deny, mesh.root_namespace,
                        getattr(mesh, "http_limits", DEFAULT_LIMITS), getattr(mesh, "hbone_limits", DEFAULT_HBONE))
