"""The receiving side's security decision, as a pure function:
(policies, request facts) -> Verdict naming the policy and rule that decided.

Order, as Istio documents it: the mTLS mode first (STRICT refuses a caller
without a mesh identity), then AUDIT policies are noted (they never change the
outcome), then DENY, then ALLOW (if any ALLOW policy applies to the workload,
the request must match one of its rules), then the mesh-wide default (allow, or
deny with MeshConfig spec.defaultDeny).

L4 and L7: facts.http is None for a TCP connection. A rule that needs HTTP
attributes (methods, paths, hosts, request.headers[...]) cannot be decided at
L4: it never matches for ALLOW (so a TCP caller is not let in by an HTTP-only
rule) and always matches for DENY and AUDIT (so it fails closed). The L7 path
calls evaluate() again with the HTTP attributes for each request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nodeagent.meshview.snapshot import LocalWorkload, Snapshot
from nodemesh.security import (
    ACTION_ALLOW,
    ACTION_AUDIT,
    ACTION_DENY,
    MTLS_DISABLE,
    MTLS_PERMISSIVE,
    MTLS_STRICT,
    MTLS_UNSET,
    AuthorizationPolicy,
    AuthzRule,
    Condition,
    Operation,
    PeerAuthentication,
    SecurityPolicies,
    Source,
    selects,
)

if TYPE_CHECKING:
    from .relay import Session


@dataclass(frozen=True)
class HttpFacts:
    method: str
    path: str  # without the query string
    host: str
    headers: tuple[tuple[str, str], ...] = ()  # lower-case names

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(frozen=True)
class RequestFacts:
    """What the receiving proxy knows about one connection or request."""

    namespace: str  # the destination workload's
    labels: tuple[tuple[str, str], ...]  # the destination workload's
    port: int  # the destination (target) port
    source_principal: str = ""  # SPIFFE ID from the verified client certificate; "" = plaintext
    source_ip: str = ""
    workload: str = ""  # "<namespace>/<name>", for messages only
    http: HttpFacts | None = None

    @property
    def mtls(self) -> bool:
        return bool(self.source_principal)

    @property
    def source_namespace(self) -> str:
        parts = _strip(self.source_principal).split("/")
        return parts[2] if len(parts) == 5 and parts[1] == "ns" else ""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    # stable code: allowed_by_policy | no_policy | denied_by_policy | no_allow_match | default_deny | mtls_required
    reason: str
    policy: str = ""  # "<Kind>/<namespace>/<name>" that decided, "" if none
    rule: int | None = None  # index in spec.rules of the deciding policy
    mtls_mode: str = MTLS_PERMISSIVE
    mtls_policy: str = ""  # the PeerAuthentication that set the mode ("" = mesh default)
    plaintext: bool = False  # accepted without mTLS (PERMISSIVE/DISABLE): counted
    audited: tuple[str, ...] = ()  # "AuthorizationPolicy/<ns>/<name>#<rule>" of matching AUDIT rules
    message: str = ""

    def log_fields(self) -> dict[str, object]:
        """What the access log records about the decision."""
        out: dict[str, object] = {"authz": "allow" if self.allowed else "deny", "authz_reason": self.reason,
                                  "mtls_mode": self.mtls_mode}
        if self.policy:
            out["authz_policy"] = self.policy
        if self.rule is not None:
            out["authz_rule"] = self.rule
        if self.audited:
            out["authz_audit"] = list(self.audited)
        if self.plaintext:
            out["plaintext_accepted"] = True
        return out


# ---------------------------------------------------------------- mTLS mode


def _pa_name(pa: PeerAuthentication) -> str:
    return f"PeerAuthentication/{pa.namespace}/{pa.name}"


def mtls_mode(policies: SecurityPolicies, namespace: str, labels: Mapping[str, str],
              port: int) -> tuple[str, str]:
    """(mode, deciding PeerAuthentication) for a workload's port. Most specific
    wins: a selecting policy in the workload's namespace (its port-level mode,
    then its mode), then the namespace's policy without selector, then the
    root namespace's, then MeshConfig. UNSET defers to the next level."""
    root = policies.mesh.root_namespace
    # Several policies at one level is a config mistake; take them by name so
    # every node decides alike.
    levels: list[list[PeerAuthentication]] = [[], [], []]
    for pa in sorted(policies.peer_authentications, key=lambda p: (p.namespace, p.name)):
        if pa.namespace == namespace and pa.selector and selects(pa.selector, labels):
            levels[0].append(pa)
        elif pa.namespace == namespace and not pa.selector:
            levels[1].append(pa)
        elif pa.namespace == root and not pa.selector:
            levels[2].append(pa)
    for level in levels:
        for pa in level:
            port_mode = dict(pa.port_modes).get(port)
            if port_mode:
                return port_mode, _pa_name(pa)
            if pa.mode != MTLS_UNSET:
                return pa.mode, _pa_name(pa)
    return policies.mesh.mtls_mode, ""


# ---------------------------------------------------------------- matching


def _strip(principal: str) -> str:
    return principal.removeprefix("spiffe://")


def _wild(pattern: str, value: str, fold: bool = False) -> bool:
    if fold:
        pattern, value = pattern.lower(), value.lower()
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return pattern == value


def _any_wild(patterns: Sequence[str], value: str, fold: bool = False) -> bool:
    return any(_wild(p, value, fold) for p in patterns)


def _in_blocks(blocks: Sequence[str], ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    for b in blocks:
        try:
            if addr in ipaddress.ip_network(b, strict=False):
                return True
        except ValueError:
            continue
    return False


def _principal_match(patterns: Sequence[str], principal: str) -> bool:
    # A plaintext caller has no principal: it matches no principal pattern, not even '*'
    # (Istio: principals: ["*"] means "any authenticated caller").
    return bool(principal) and _any_wild([_strip(p) for p in patterns], _strip(principal))


def _source_match(s: Source, f: RequestFacts) -> bool:
    if s.principals and not _principal_match(s.principals, f.source_principal):
        return False
    if s.not_principals and _principal_match(s.not_principals, f.source_principal):
        return False
    ns = f.source_namespace
    if s.namespaces and not (ns and _any_wild(s.namespaces, ns)):
        return False
    if s.not_namespaces and ns and _any_wild(s.not_namespaces, ns):
        return False
    if s.ip_blocks and not _in_blocks(s.ip_blocks, f.source_ip):
        return False
    return not (s.not_ip_blocks and _in_blocks(s.not_ip_blocks, f.source_ip))


def _operation_match(o: Operation, f: RequestFacts) -> bool:
    """Assumes HTTP facts are present when the operation needs them."""
    if o.ports and f.port not in o.ports:
        return False
    if o.not_ports and f.port in o.not_ports:
        return False
    h = f.http
    if h is None:
        return True
    if o.methods and not ("*" in o.methods or h.method.upper() in o.methods):
        return False
    if o.not_methods and ("*" in o.not_methods or h.method.upper() in o.not_methods):
        return False
    if o.paths and not _any_wild(o.paths, h.path):
        return False
    if o.not_paths and _any_wild(o.not_paths, h.path):
        return False
    host = h.host.rsplit(":", 1)[0] if h.host.count(":") == 1 else h.host
    if o.hosts and not (_any_wild(o.hosts, h.host, True) or _any_wild(o.hosts, host, True)):
        return False
    return not (o.not_hosts and (_any_wild(o.not_hosts, h.host, True) or _any_wild(o.not_hosts, host, True)))


def _condition_value(c: Condition, f: RequestFacts) -> str | None:
    if c.header:
        return f.http.header(c.header) if f.http is not None else None
    return {"source.ip": f.source_ip, "source.namespace": f.source_namespace,
            "source.principal": _strip(f.source_principal), "destination.port": str(f.port)}.get(c.key)


def _condition_match(c: Condition, f: RequestFacts) -> bool:
    value = _condition_value(c, f)
    if c.key == "source.ip":
        ok = not c.values or _in_blocks(c.values, f.source_ip)
        return ok and not (c.not_values and _in_blocks(c.not_values, f.source_ip))
    if value is None:
        return False  # e.g. the header is absent: a positive condition cannot hold
    if c.key == "source.principal":
        return ((not c.values or _principal_match(c.values, f.source_principal))
                and not (c.not_values and _principal_match(c.not_values, f.source_principal)))
    return (not c.values or _any_wild(c.values, value)) and not (c.not_values and _any_wild(c.not_values, value))


def rule_matches(rule: AuthzRule, f: RequestFacts, action: str) -> bool:
    """Whether `rule` matches; an HTTP-only rule at L4 matches only for DENY and
    AUDIT (fail closed), never for ALLOW."""
    if f.http is None and rule.http_only:
        if action == ACTION_ALLOW:
            return False
        # Decide on the L4 parts alone: drop the HTTP-only fields.
        rule = AuthzRule(rule.sources,
                    tuple(Operation(ports=o.ports, not_ports=o.not_ports) for o in rule.operations),
                    tuple(c for c in rule.conditions if not c.header))
    if rule.sources and not any(_source_match(s, f) for s in rule.sources):
        return False
    if rule.operations and not any(_operation_match(o, f) for o in rule.operations):
        return False
    return all(_condition_match(c, f) for c in rule.conditions)


def applicable(policies: SecurityPolicies, namespace: str, labels: Mapping[str, str]) -> list[AuthorizationPolicy]:
    """Policies in the workload's namespace or the root namespace whose selector selects it."""
    root = policies.mesh.root_namespace
    return [p for p in sorted(policies.authorization_policies, key=lambda p: (p.namespace, p.name))
            if p.namespace in (namespace, root) and selects(p.selector, labels)]


def _first_match(p: AuthorizationPolicy, f: RequestFacts) -> int | None:
    for i, r in enumerate(p.rules):
        if rule_matches(r, f, p.action):
            return i
    return None


def _ap_name(p: AuthorizationPolicy) -> str:
    return f"AuthorizationPolicy/{p.namespace}/{p.name}"


def evaluate(policies: SecurityPolicies, facts: RequestFacts) -> Verdict:
    """The decision for one connection (L4) or request (L7). Pure."""
    labels = dict(facts.labels)
    mode, mode_policy = mtls_mode(policies, facts.namespace, labels, facts.port)
    where = facts.workload or facts.namespace
    if not facts.mtls and mode == MTLS_STRICT:
        return Verdict(False, "mtls_required", mode_policy or "MeshConfig/mesh", None, mode, mode_policy,
                       message=f"{where} port {facts.port} is STRICT: only mTLS from mesh identities is "
                               f"accepted and this caller ({facts.source_ip or 'unknown'}) sent plaintext")
    plaintext = not facts.mtls and mode in (MTLS_PERMISSIVE, MTLS_DISABLE)
    pols = applicable(policies, facts.namespace, labels)
    audited = tuple(f"{_ap_name(p)}#{i}" for p in pols if p.action == ACTION_AUDIT
                    for i in [_first_match(p, facts)] if i is not None)

    def verdict(allowed: bool, reason: str, policy: str, rule: int | None, message: str) -> Verdict:
        return Verdict(allowed, reason, policy, rule, mode, mode_policy, plaintext, audited, message)

    for p in pols:
        if p.action == ACTION_DENY:
            i = _first_match(p, facts)
            if i is not None:
                return verdict(False, "denied_by_policy", _ap_name(p), i,
                               f"{_ap_name(p)} rule {i} denies this caller")
    allows = [p for p in pols if p.action == ACTION_ALLOW]
    for p in allows:
        i = _first_match(p, facts)
        if i is not None:
            return verdict(True, "allowed_by_policy", _ap_name(p), i, f"{_ap_name(p)} rule {i} allows this caller")
    if allows:
        names = ", ".join(_ap_name(p) for p in allows)
        return verdict(False, "no_allow_match", names, None,
                       f"ALLOW policies apply to {where} ({names}) and none of their rules matches this caller")
    if policies.mesh.default_deny:
        return verdict(False, "default_deny", "MeshConfig/mesh", None,
                       f"no ALLOW policy applies to {where} and MeshConfig spec.defaultDeny is true")
    return verdict(True, "no_policy", "", None, "no policy applies; allowed by default")


# ---------------------------------------------------------------- the proxy's side


class AuthzStats:
    """Per-process counts of decisions, for the metrics endpoint (issue 6):
    (reason, mtls_mode) -> count, and plaintext connections accepted."""

    def __init__(self) -> None:
        self.decisions: dict[tuple[str, str], int] = {}
        self.plaintext_accepted = 0

    def record(self, v: Verdict) -> None:
        key = (v.reason, v.mtls_mode)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        if v.allowed and v.plaintext:
            self.plaintext_accepted += 1


STATS = AuthzStats()


def inbound_facts(workload: LocalWorkload, port: int, source_principal: str, source_ip: str,
                  http: HttpFacts | None = None) -> RequestFacts:
    return RequestFacts(namespace=workload.namespace, labels=workload.labels, port=port,
                        source_principal=source_principal, source_ip=source_ip, workload=workload.key, http=http)


def enforce(snapshot: Snapshot, workload: LocalWorkload, port: int, source_principal: str, source_ip: str,
            session: Session | None = None) -> Verdict:
    """Decide an inbound connection at L4, note the decision in the access log,
    and raise InboundRefused (HTTP 403 on a CONNECT) if it is denied."""
    from .inbound import InboundRefused

    v = evaluate(snapshot.security, inbound_facts(workload, port, source_principal, source_ip))
    STATS.record(v)
    if session is not None:
        session.set(**v.log_fields())
    if not v.allowed:
        hint = ("use the mesh (mTLS) to reach this workload, or set PERMISSIVE for it"
                if v.reason == "mtls_required" else
                f"check `nodemesh authz check --to {workload.key}` and the policy named")
        raise InboundRefused(403, v.reason, v.message, hint=hint)
    return v
