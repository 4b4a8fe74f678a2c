"""plan_outbound: the routing decision, by the dozen, without sockets."""

from __future__ import annotations

from nodeagent.meshview.snapshot import (
    OUTBOUND_REGISTRY_ONLY,
    Endpoint,
    LocalWorkload,
    MeshSettings,
    Service,
    ServicePort,
    Snapshot,
    Workload,
)
from nodeagent.proxy.plan import is_same_node, plan_outbound

TD = "cluster.local"
SRC = LocalWorkload("client", "default", "client", "10.0.1.1", (), uid=1000)


def ep(ip: str, port: int, node: str, healthy: bool = True) -> Endpoint:
    return Endpoint(ip, port, f"default/{ip}", f"spiffe://{TD}/ns/default/sa/web", node, f"192.168.0.{node[-1]}",
                    healthy=healthy)


def snap(policy: str = "ALLOW_ANY") -> Snapshot:
    web = Service("web", "default", "10.96.0.10", (
        ServicePort(80, 8080, endpoints=(ep("10.0.1.5", 8080, "n1"), ep("10.0.2.5", 8080, "n2"),
                                         ep("10.0.2.6", 8080, "n2", healthy=False))),
        ServicePort(443, 8443, endpoints=(ep("10.0.2.5", 8443, "n2"),)),
    ))
    dead = Service("dead", "default", "10.96.0.11",
                   (ServicePort(80, 80, endpoints=(ep("10.0.2.9", 80, "n2", False),)),))
    empty = Service("empty", "default", "10.96.0.12", (ServicePort(80, 80),))
    headless = Service("headless", "default", "", (ServicePort(80, 80, endpoints=(ep("10.0.2.5", 80, "n2"),)),))
    db = Workload("db", "data", "db", "n2", "10.0.2.7", (5432,), f"spiffe://{TD}/ns/data/sa/db", "192.168.0.2")
    return Snapshot("v1", "n1", MeshSettings(trust_domain=TD, outbound_policy=policy),
                    services=(web, dead, empty, headless), workloads=(db,), local_workloads=(SRC,))


def test_service_vip_gives_healthy_endpoints_only() -> None:
    p = plan_outbound(snap(), SRC, "10.96.0.10", 80)
    assert p.kind == "service" and p.service == "default/web" and p.service_port == 80
    assert [(e.ip, e.port) for e in p.endpoints] == [("10.0.1.5", 8080), ("10.0.2.5", 8080)]


def test_second_service_port_has_its_own_endpoints() -> None:
    p = plan_outbound(snap(), SRC, "10.96.0.10", 443)
    assert p.kind == "service" and [(e.ip, e.port) for e in p.endpoints] == [("10.0.2.5", 8443)]


def test_vip_on_unknown_port_is_not_the_service() -> None:
    p = plan_outbound(snap(), SRC, "10.96.0.10", 8080)
    assert p.kind == "passthrough"


def test_service_without_healthy_endpoints_denied() -> None:
    p = plan_outbound(snap(), SRC, "10.96.0.11", 80)
    assert p.kind == "deny" and p.reason == "no_healthy_endpoint" and p.service == "default/dead"
    assert "none healthy" in p.detail


def test_service_without_endpoints_denied() -> None:
    p = plan_outbound(snap(), SRC, "10.96.0.12", 80)
    assert p.kind == "deny" and p.reason == "no_healthy_endpoint"


def test_workload_address_is_one_endpoint() -> None:
    p = plan_outbound(snap(), SRC, "10.0.2.7", 5432)
    assert p.kind == "workload"
    (e,) = p.endpoints
    assert (e.ip, e.port, e.workload, e.identity, e.node, e.node_address) == (
        "10.0.2.7", 5432, "data/db", f"spiffe://{TD}/ns/data/sa/db", "n2", "192.168.0.2")


def test_workload_ip_on_undeclared_port_passes_through() -> None:
    assert plan_outbound(snap(), SRC, "10.0.2.7", 22).kind == "passthrough"


def test_unknown_destination_allow_any_passthrough() -> None:
    p = plan_outbound(snap(), SRC, "93.184.216.34", 443)
    assert p.kind == "passthrough" and p.reason == "allow_any" and not p.endpoints


def test_unknown_destination_registry_only_denied() -> None:
    p = plan_outbound(snap(OUTBOUND_REGISTRY_ONLY), SRC, "93.184.216.34", 443)
    assert p.kind == "deny" and p.reason == "policy_denied"
    assert "REGISTRY_ONLY" in p.detail and "default/client" in p.detail


def test_registry_only_still_routes_services() -> None:
    assert plan_outbound(snap(OUTBOUND_REGISTRY_ONLY), SRC, "10.96.0.10", 80).kind == "service"


def test_unknown_policy_fails_closed() -> None:
    p = plan_outbound(snap("SOMETIMES"), SRC, "1.1.1.1", 53)
    assert p.kind == "deny" and "unknown outbound policy" in p.detail


def test_excluded_cidr_passes_through_even_for_vip() -> None:
    p = plan_outbound(snap(OUTBOUND_REGISTRY_ONLY), SRC, "10.96.0.10", 80, excluded_cidrs=("10.96.0.0/24",))
    assert p.kind == "passthrough" and p.reason == "excluded"


def test_same_node() -> None:
    p = plan_outbound(snap(), SRC, "10.96.0.10", 80)
    assert [is_same_node(e, "n1") for e in p.endpoints] == [True, False]


def test_plan_is_pure_and_hashable() -> None:
    s = snap()
    assert plan_outbound(s, SRC, "10.96.0.10", 80) == plan_outbound(s, SRC, "10.96.0.10", 80)
    hash(plan_outbound(s, SRC, "10.96.0.10", 80))
