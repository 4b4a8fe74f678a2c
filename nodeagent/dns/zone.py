"""Which DNS questions the mesh answers, and with what: a pure function of the
snapshot and the question.

Names recognised (case-insensitive, `D` = MeshConfig dnsDomain):

| name                         | mesh service found      | not found                     |
|------------------------------|-------------------------|-------------------------------|
| `<svc>.<ns>.svc.D`           | A = VIP (AAAA etc.: NODATA) | NXDOMAIN (we own `svc.D`) |
| `<ns>.svc.D`, `svc.D`        | NODATA (empty non-terminal)  | NXDOMAIN for unknown ns  |
| `<svc>.<ns>.svc`             | A = VIP                 | forwarded                     |
| `<svc>.<ns>`                 | A = VIP                 | forwarded                     |
| `<svc>`                      | A = VIP in the caller's namespace | forwarded            |
| anything else                | forwarded to the node's upstream resolvers unchanged    |

A bare `<svc>` needs the caller's namespace. The DNS layer does not know the
caller yet, so it uses the namespace of this node's local workloads when they
all share one; when they span several, bare names are forwarded (no guessing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from nodeagent.dns.message import (
    CLASS_ANY,
    CLASS_IN,
    TYPE_A,
    TYPE_ANY,
    Name,
    Question,
    name_key,
)
from nodeagent.meshview.snapshot import Snapshot

# The TTL of answers. VIPs are stable for a service's lifetime; a short TTL
# still lets a deleted service disappear from caches soon.
ANSWER_TTL = 30
NEGATIVE_TTL = 5

Kind = Literal["answer", "nodata", "nxdomain", "forward"]


@dataclass(frozen=True)
class DnsDecision:
    """What to do with one question. `zone` is set when the answer is
    authoritative for the mesh zone (its SOA goes in negative answers)."""

    kind: Kind
    addresses: tuple[str, ...] = ()
    service: str = ""  # "<namespace>/<name>" of the matched service
    zone: Name | None = None
    reason: str = ""


@dataclass(frozen=True)
class MeshZone:
    """The names the mesh serves, indexed once per snapshot."""

    domain: Name  # lower-cased labels of dnsDomain, e.g. (b"mesh",)
    vips: Mapping[tuple[bytes, bytes], str] = field(default_factory=dict)  # (ns, svc) -> VIP
    namespaces: frozenset[bytes] = frozenset()
    bare_namespace: bytes | None = None  # where a bare "<svc>" is looked up
    version: str = ""

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> MeshZone:
        domain = tuple(label.encode("ascii").lower() for label in snapshot.mesh.dns_domain.strip(".").split(".")
                       if label)
        vips: dict[tuple[bytes, bytes], str] = {}
        for svc in snapshot.services:
            if svc.vip:
                vips[(svc.namespace.encode().lower(), svc.name.encode().lower())] = svc.vip
        local_ns = {lw.namespace.encode().lower() for lw in snapshot.local_workloads}
        return cls(domain=domain, vips=vips, namespaces=frozenset(ns for ns, _ in vips),
                   bare_namespace=next(iter(local_ns)) if len(local_ns) == 1 else None,
                   version=snapshot.version)


def decide(zone: MeshZone, question: Question, caller_namespace: str | None = None) -> DnsDecision:
    """The mesh's answer to one question, or "forward" for names it does not own."""
    if question.qclass not in (CLASS_IN, CLASS_ANY):
        return DnsDecision("forward", reason="class is not IN")
    labels = name_key(question.name)
    dlen = len(zone.domain)
    if zone.domain and len(labels) > dlen and labels[-dlen:] == zone.domain:
        rest = labels[:-dlen]
        if rest[-1] == b"svc":
            return _in_zone(zone, question, rest[:-1])
        # Other names under the mesh domain may be the operator's own: not ours.
        return DnsDecision("forward", reason="under the mesh domain but not svc.<domain>")
    if len(labels) == 3 and labels[2] == b"svc":
        return _short(zone, question, labels[1], labels[0], "<svc>.<ns>.svc")
    if len(labels) == 2:
        return _short(zone, question, labels[1], labels[0], "<svc>.<ns>")
    if len(labels) == 1:
        ns = caller_namespace.encode().lower() if caller_namespace else zone.bare_namespace
        if ns is None:
            return DnsDecision("forward", reason="bare name, and the caller's namespace is unknown")
        return _short(zone, question, ns, labels[0], "<svc>")
    return DnsDecision("forward", reason="not a mesh name")


def _svc_zone(zone: MeshZone) -> Name:
    return (b"svc",) + zone.domain


def _in_zone(zone: MeshZone, question: Question, rest: Name) -> DnsDecision:
    """Names under svc.<domain>: the mesh is authoritative, so a miss is NXDOMAIN."""
    soa = _svc_zone(zone)
    if not rest:
        return DnsDecision("nodata", zone=soa, reason="the svc zone apex")
    if len(rest) == 1:
        if rest[0] in zone.namespaces:
            return DnsDecision("nodata", zone=soa, reason="a namespace (empty non-terminal)")
        return DnsDecision("nxdomain", zone=soa, reason=f"no services in namespace {rest[0].decode(errors='replace')}")
    if len(rest) == 2:
        name, ns = rest
        vip = zone.vips.get((ns, name))
        if vip is not None:
            return _found(question, ns, name, vip, soa)
    return DnsDecision("nxdomain", zone=soa, reason="no such service")


def _short(zone: MeshZone, question: Question, ns: bytes, name: bytes, form: str) -> DnsDecision:
    vip = zone.vips.get((ns, name))
    if vip is None:
        return DnsDecision("forward", reason=f"{form}: no mesh service {name.decode(errors='replace')} "
                                            f"in namespace {ns.decode(errors='replace')}")
    # Short names are not in the mesh zone; negative answers carry no SOA.
    return _found(question, ns, name, vip, None)


def _found(question: Question, ns: bytes, name: bytes, vip: str, soa: Name | None) -> DnsDecision:
    service = f"{ns.decode()}/{name.decode()}"
    if question.qtype in (TYPE_A, TYPE_ANY):
        return DnsDecision("answer", addresses=(vip,), service=service, zone=soa)
    # We are IPv4 only: AAAA (and every other type) has no data, but the name
    # exists, so NODATA rather than NXDOMAIN (which would hide the A record).
    return DnsDecision("nodata", service=service, zone=soa, reason="the mesh serves A records only")
