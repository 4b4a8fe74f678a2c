"""The outbound routing decision as a pure function: (snapshot, source workload,
original destination) -> OutboundPlan. Socket code only carries a plan out."""

from __future__ import annotations

import functools
import ipaddress
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from nodeagent.meshview.snapshot import (
    OUTBOUND_ALLOW_ANY,
    OUTBOUND_REGISTRY_ONLY,
    Endpoint,
    LocalWorkload,
    Snapshot,
    Workload,
)
from nodeagent.proxy.http.route_select import choose_cluster

PlanKind = Literal["service", "workload", "passthrough", "deny"]


@dataclass(frozen=True)
class OutboundPlan:
    kind: PlanKind
    dst_ip: str
    dst_port: int
    service: str = ""  # "<namespace>/<name>" when kind == "service"
    service_port: int = 0
    endpoints: tuple[Endpoint, ...] = ()  # candidates; the balancer picks one
    reason: str = ""  # stable code when kind == "deny", else why this kind was chosen
    detail: str = ""  # human sentence for logs and `nodemesh explain`


def endpoint_of_workload(wl: Workload, port: int) -> Endpoint:
    return Endpoint(
        ip=wl.ip,
        port=port,
        workload=wl.key,
        identity=wl.identity,
        node=wl.node,
        node_address=wl.node_address,
        hbone_port=wl.hbone_port,
        zone=wl.zone,
    )


def is_same_node(endpoint: Endpoint, node_name: str) -> bool:
    return endpoint.node == node_name


@functools.lru_cache(maxsize=64)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parsed once per distinct exclusion list, not on every connection."""
    out = []
    for c in cidrs:
        try:
            out.append(ipaddress.ip_network(c, strict=False))
        except ValueError:
            continue  # settings are validated elsewhere; a bad entry simply never matches
    return tuple(out)


def _excluded(dst_ip: str, cidrs: Iterable[str]) -> bool:
    nets = _networks(tuple(cidrs))
    if not nets:
        return False
    try:
        addr = ipaddress.ip_address(dst_ip)
    except ValueError:
        return False
    return any(addr in n for n in nets)


def plan_outbound(
    snapshot: Snapshot,
    source: LocalWorkload,
    dst_ip: str,
    dst_port: int,
    *,
    excluded_cidrs: Iterable[str] = (),
    rng: random.Random | None = None,
) -> OutboundPlan:
    """Decide what to do with a connection `source` opened to dst_ip:dst_port."""
    if _excluded(dst_ip, excluded_cidrs):
        return OutboundPlan(
            "passthrough", dst_ip, dst_port, reason="excluded",
            detail=f"{dst_ip} is in an excluded range (control plane): never proxied",
        )
    hit = snapshot.by_vip.get((dst_ip, dst_port))
    if hit is not None:
        svc, sp = hit
        split = ""
        if sp.protocol == "tcp" and sp.routes is not None and sp.routes.routes and sp.subsets:
            # A TCP port split between version subsets (a Rollout): weighted per connection.
            sub = sp.cluster_port(choose_cluster(sp.routes.routes[0], rng))
            if sub is not None and sub is not sp:
                sp, split = sub, f" (version subset {sub.cluster.split('|')[2]})"
        healthy = tuple(e for e in sp.endpoints if e.healthy)
        if not healthy:
            return OutboundPlan(
                "deny", dst_ip, dst_port, service=svc.key, service_port=sp.port,
                reason="no_healthy_endpoint",
                detail=f"service {svc.key} port {sp.port}{split} has {len(sp.endpoints)} endpoints, none healthy",
            )
        return OutboundPlan(
            "service", dst_ip, dst_port, service=svc.key, service_port=sp.port, endpoints=healthy,
            reason="service_vip",
            detail=f"{dst_ip}:{dst_port} is the VIP of service {svc.key}{split}",
        )
    wl = snapshot.by_workload_addr.get((dst_ip, dst_port))
    if wl is not None:
        return OutboundPlan(
            "workload", dst_ip, dst_port, endpoints=(endpoint_of_workload(wl, dst_port),),
            reason="workload_addr",
            detail=f"{dst_ip}:{dst_port} is served by workload {wl.key} on node {wl.node}",
        )
    policy = snapshot.mesh.outbound_policy
    if policy == OUTBOUND_REGISTRY_ONLY:
        return OutboundPlan(
            "deny", dst_ip, dst_port, reason="policy_denied",
            detail=f"{dst_ip}:{dst_port} is not a mesh service or workload and outbound policy is "
            f"REGISTRY_ONLY (source {source.key})",
        )
    if policy == OUTBOUND_ALLOW_ANY:
        return OutboundPlan(
            "passthrough", dst_ip, dst_port, reason="allow_any",
            detail=f"{dst_ip}:{dst_port} is outside the mesh; outbound policy ALLOW_ANY",
        )
    # An unknown policy value is a config bug: fail closed rather than leak traffic.
    return OutboundPlan(
        "deny", dst_ip, dst_port, reason="policy_denied",
        detail=f"unknown outbound policy {policy!r}: denying (expected ALLOW_ANY or REGISTRY_ONLY)",
    )
