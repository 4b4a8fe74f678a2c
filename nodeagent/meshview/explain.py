"""`nodemesh explain`: what the node proxy would do with a connection from a
local workload to an address or service name, from the same pure functions the
proxy runs (capture decision, plan_outbound, the balancer's cost, the
destination's authorization). Pure: (snapshot, settings, balancer state) -> dict.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

from nodeagent.meshview.snapshot import LocalWorkload, Service, Snapshot
from nodeagent.proxy.plan import is_same_node, plan_outbound
from nodeagent.supervision.settings import ProxySettings


class ExplainError(ValueError):
    """The question cannot be answered; the message says which argument and why."""


def find_local(snapshot: Snapshot, name: str) -> LocalWorkload:
    for lw in snapshot.local_workloads:
        if name in (lw.key, lw.name):
            return lw
    known = ", ".join(lw.key for lw in snapshot.local_workloads) or "none"
    raise ExplainError(f"from-workload {name!r} is not a workload declared on node {snapshot.node} "
                       f"(local workloads: {known})")


def _service_by_name(snapshot: Snapshot, name: str) -> Service | None:
    """'web', 'web.default', 'default/web', 'web.default.svc.<domain>'."""
    if "/" in name:
        ns, n = name.split("/", 1)
        cands = [s for s in snapshot.services if s.name == n and s.namespace == ns]
    else:
        parts = name.split(".")
        if len(parts) >= 2:
            cands = [s for s in snapshot.services if s.name == parts[0] and s.namespace == parts[1]]
        else:
            cands = [s for s in snapshot.services if s.name == name]
    if len(cands) > 1:
        raise ExplainError(f"service name {name!r} is ambiguous: {', '.join(s.key for s in cands)}; "
                           "give it as <namespace>/<name>")
    return cands[0] if cands else None


def resolve_target(snapshot: Snapshot, to: str) -> tuple[str, int, str]:
    """`to` -> (ip, port, how it was read)."""
    host, sep, port_s = to.rpartition(":")
    if not sep or not port_s.isdigit():
        host, port_s = to, ""
    port = int(port_s) if port_s else 0
    try:
        ipaddress.ip_address(host)
        if not port:
            raise ExplainError(f"to {to!r}: an address needs a port (ip:port)")
        return host, port, f"address {host}:{port}"
    except ValueError:
        pass
    svc = _service_by_name(snapshot, host)
    if svc is None:
        raise ExplainError(f"to {to!r} is neither ip:port nor a known service "
                           f"(services: {', '.join(s.key for s in snapshot.services) or 'none'})")
    if not svc.vip:
        raise ExplainError(f"service {svc.key} has no VIP yet: has the control plane allocated one?")
    if not port:
        if not svc.ports:
            raise ExplainError(f"service {svc.key} declares no ports")
        port = svc.ports[0].port
    return svc.vip, port, f"service {svc.key} → VIP {svc.vip}:{port}"


def capture_decision(settings: ProxySettings, source: LocalWorkload, ip: str) -> dict[str, Any]:
    """Mirrors the capture rules' order (nodeagent/capture): the proxy's own
    traffic, loopback and excluded ranges return early; the workload's owner match redirects."""
    owner = f"uid {source.uid}" if source.uid is not None else f"cgroup {source.cgroup}"
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return {"captured": False, "rule": f"{ip} is not an IP address"}
    if addr.is_loopback:
        return {"captured": False, "rule": "loopback destination: RETURN (never captured)"}
    for c in settings.excluded_cidrs:
        try:
            if addr in ipaddress.ip_network(c, strict=False):
                return {"captured": False, "rule": f"{ip} is in excluded range {c}: RETURN"}
        except ValueError:
            continue
    return {"captured": True,
            "rule": f"nat OUTPUT -> NODEMESH_OUTPUT: owner {owner} ({source.key}) -> REDIRECT to "
                    f"127.0.0.1:{settings.outbound_port}"}


def _plain(v: Any) -> Any:
    if is_dataclass(v) and not isinstance(v, type):
        return {k: _plain(x) for k, x in asdict(v).items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _authz(snapshot: Snapshot, ep_workload: str, port: int, principal: str) -> dict[str, Any]:
    """The destination node's verdict for this caller, when the policies are in the snapshot."""
    try:
        from nodeagent.proxy import authz
    except ImportError:
        return {"verdict": "unknown", "why": "authorization is not part of this build"}
    policies = getattr(snapshot, "security", None)
    wl = next((w for w in snapshot.workloads if w.key == ep_workload), None)
    if policies is None or wl is None:
        return {"verdict": "unknown", "why": "destination workload not in the snapshot"}
    try:
        facts = authz.RequestFacts(namespace=wl.namespace, labels=wl.labels, port=port,
                                   source_principal=principal, workload=wl.key)
        v = authz.evaluate(policies, facts)
    except Exception as e:  # noqa: BLE001 - another engineer's module; explain what failed
        return {"verdict": "unknown", "why": f"cannot evaluate authorization: {e}"}
    return {"verdict": "allow" if v.allowed else "deny", "why": v.reason, "policy": v.policy,
            "mtls_mode": v.mtls_mode, "note": "connection-level (L4) facts only; HTTP rules are checked per request"}


def explain(snapshot: Snapshot, settings: ProxySettings, source_name: str, to: str,
            balancer: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    source = find_local(snapshot, source_name)
    ip, port, read_as = resolve_target(snapshot, to)
    principal = snapshot.identity_of(source)
    plan = plan_outbound(snapshot, source, ip, port, excluded_cidrs=settings.excluded_cidrs)
    out: dict[str, Any] = {
        "node": snapshot.node, "snapshot_version": snapshot.version,
        "source": {"workload": source.key, "identity": principal},
        "destination": {"input": to, "read_as": read_as, "ip": ip, "port": port},
        "capture": capture_decision(settings, source, ip),
        "plan": {"kind": plan.kind, "reason": plan.reason, "detail": plan.detail, "service": plan.service,
                 "service_port": plan.service_port},
    }
    sp = None
    if plan.service:
        hit = snapshot.by_vip.get((ip, port))
        if hit is not None:
            sp = hit[1]
            out["plan"]["protocol"] = sp.protocol
            out["plan"]["cluster"] = sp.cluster
    routes = getattr(sp, "routes", None) if sp is not None else None
    out["routes"] = [{"name": r.name, "match": _plain(r.match),
                      "backends": [f"{c.cluster} (weight {c.weight})" for c in r.clusters]}
                     for r in getattr(routes, "routes", ())] if routes is not None else []
    policy = getattr(sp, "policy", None) if sp is not None else None
    out["policies"] = _plain(policy) if policy is not None else {}
    bal = balancer or {}
    cands: list[dict[str, Any]] = []
    for ep in plan.endpoints:
        addr = f"{ep.ip}:{ep.port}"
        b = bal.get(addr, {})
        ewma = b.get("ewma_ms") if b.get("measured") else None
        outstanding = int(b.get("outstanding", 0))
        same = is_same_node(ep, settings.node_name)
        cands.append({
            "address": addr, "workload": ep.workload, "identity": ep.identity, "node": ep.node,
            "healthy": ep.healthy, "ewma_ms": ewma, "outstanding": outstanding,
            "cost": round((ewma if ewma is not None else 0.0) * (outstanding + 1), 3) if ewma is not None else None,
            "path": "same node: inbound checks in process, no TLS" if same else
                    f"HBONE: mTLS HTTP/2 CONNECT to {ep.node_address}:{ep.hbone_port}, peer must present {ep.identity}",
            "authorization": _authz(snapshot, ep.workload, ep.port, principal),
        })
    out["candidates"] = cands
    if len(cands) > 1:
        measured = [c for c in cands if c["cost"] is not None]
        best = min(measured, key=lambda c: float(c["cost"]))["address"] if measured else None
        out["choice"] = ("power of two choices: two random candidates, the lower peak-EWMA × (outstanding+1) wins"
                         + (f"; lowest cost now: {best}" if best else "; none measured yet, so any may be picked"))
    elif len(cands) == 1:
        out["choice"] = f"the only candidate: {cands[0]['address']}"
    else:
        out["choice"] = {"passthrough": f"no mesh endpoint: plain TCP to {ip}:{port}",
                         "deny": f"refused ({plan.reason})"}.get(plan.kind, "")
    return out
