"""The node registry: validation, leases on an injected clock, restart
restore, and the Session servicer's stream rules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.noderegistry import NodeRegistry, RegistryServicer
from controlplane.nodes import RegistrationError, node_from_proto
from controlplane.store import NodeLiveness, SQLiteStore
from nodemesh.v1 import mesh_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reg(name: str = "node-a", workloads: int = 1, **kw: Any) -> mesh_pb2.NodeRegistration:
    wls = [mesh_pb2.WorkloadRegistration(name=f"w{i}", namespace="default", service_account="sa",
                                         ip=f"10.1.0.{i + 1}", ports=[8080], labels={"app": "w"})
           for i in range(workloads)]
    return mesh_pb2.NodeRegistration(node_name=name, addresses=kw.pop("addresses", ["10.0.0.1"]),
                                     workloads=wls, **kw)


@pytest.mark.parametrize("mutate, expect", [
    (lambda r: setattr(r, "node_name", "Node_A"), "node_name 'Node_A' is not a DNS label"),
    (lambda r: r.ClearField("addresses"), "addresses: at least one node address is required"),
    (lambda r: r.addresses.append("nope"), "addresses[1]: 'nope' is not an IP address"),
    (lambda r: setattr(r.workloads[0], "ip", "1.2.3"), "workloads[0].ip: '1.2.3' is not an IP address"),
    (lambda r: r.workloads[0].ports.append(0), "workloads[0].ports[1]: 0 is not a port"),
    (lambda r: setattr(r.workloads[0], "service_account", "SA!"), "workloads[0].service_account"),
    (lambda r: setattr(r.workloads[0], "name", ""), "workloads[0].name"),
    (lambda r: r.workloads.append(r.workloads[0]), "workloads[1].name: workload default/w0 is listed twice"),
    (lambda r: setattr(r, "hbone_port", 70000), "hbone_port: 70000 is not a port"),
])
def test_bad_registrations_are_refused_with_the_field(mutate: Any, expect: str) -> None:
    r = reg()
    mutate(r)
    with pytest.raises(RegistrationError) as e:
        node_from_proto(r)
    assert expect in str(e.value)


def test_defaults_and_sorting() -> None:
    n = node_from_proto(reg(workloads=2, zone="z1"))
    assert n.hbone_port == 15008 and n.address == "10.0.0.1" and n.zone == "z1"
    assert [w.name for w in n.workloads] == ["w0", "w1"]
    assert n.workloads[0].serves(8080) and not n.workloads[0].serves(9090)


def test_leases_renew_and_expire_on_the_clock() -> None:
    clock = Clock()
    r = NodeRegistry(lease_seconds=15, clock=clock)
    changes: list[int] = []
    r.subscribe(lambda: changes.append(r.version))
    lease = r.register(reg())
    assert lease.expires_unix == 1015 and changes == [1]
    r.register(reg())  # same content: no change event
    assert changes == [1]
    clock.now = 1010
    assert r.renew("node-a") is not None
    clock.now = 1020
    assert asyncio.run(r.expire()) == []  # renewed at 1010, so alive until 1025
    clock.now = 1025
    assert asyncio.run(r.expire()) == ["node-a"] and r.nodes() == () and changes == [1, 2]
    assert r.renew("node-a") is None


def test_reregistration_replaces_the_workload_set() -> None:
    r = NodeRegistry(clock=Clock())
    r.register(reg(workloads=2))
    r.register(reg(workloads=1))
    node = r.get("node-a")
    assert node is not None and [w.name for w in node.workloads] == ["w0"]


def test_restart_restores_registrations_with_a_fresh_grace(tmp_path: Path) -> None:
    clock = Clock()
    store = SQLiteStore(str(tmp_path / "db"))
    NodeRegistry(store, lease_seconds=15, clock=clock).register(reg())
    store.close()
    clock.now = 5000  # long after the old lease ran out
    store = SQLiteStore(str(tmp_path / "db"))
    r2 = NodeRegistry(store, lease_seconds=15, clock=clock)
    assert r2.restore() == 1
    lease = r2.lease("node-a")
    assert lease is not None and lease.expires_unix == 5015
    clock.now = 5016
    assert asyncio.run(r2.expire()) == ["node-a"]
    assert store.load_nodes() == []  # expiry is persisted too


class FakeContext:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise grpc.RpcError(details)

    def peer(self) -> str:
        return "ipv4:10.0.0.1:5555"


async def _run_session(registry: NodeRegistry, reports: list[mesh_pb2.NodeReport]) -> tuple[
        list[mesh_pb2.LeaseGrant], FakeContext]:
    async def it() -> AsyncIterator[mesh_pb2.NodeReport]:
        for r in reports:
            yield r

    ctx = FakeContext()
    grants = []
    try:
        async for g in RegistryServicer(registry).Session(it(), ctx):
            grants.append(g)
    except grpc.RpcError:
        pass
    return grants, ctx


def test_session_grants_leases_and_keeps_the_node_after_the_stream_ends() -> None:
    clock = Clock()
    r = NodeRegistry(lease_seconds=15, clock=clock)
    grants, ctx = asyncio.run(_run_session(r, [
        mesh_pb2.NodeReport(register=reg()),
        mesh_pb2.NodeReport(heartbeat=mesh_pb2.Heartbeat(sent_unix_ms=1))]))
    assert ctx.code is None
    assert [(g.node_name, g.lease_seconds, g.expires_unix_ms) for g in grants] == [
        ("node-a", 15, 1015000), ("node-a", 15, 1015000)]
    assert r.get("node-a") is not None  # stream over, lease still running


def test_session_refuses_heartbeat_first_and_bad_registration() -> None:
    r = NodeRegistry(clock=Clock())
    _, ctx = asyncio.run(_run_session(r, [mesh_pb2.NodeReport(heartbeat=mesh_pb2.Heartbeat())]))
    assert ctx.code == grpc.StatusCode.FAILED_PRECONDITION and "first message" in ctx.details
    _, ctx = asyncio.run(_run_session(r, [mesh_pb2.NodeReport(register=reg(name="BAD"))]))
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "node_name 'BAD'" in ctx.details


def test_heartbeat_after_expiry_asks_for_reregistration() -> None:
    clock = Clock()
    r = NodeRegistry(lease_seconds=15, clock=clock)

    async def main() -> FakeContext:
        async def it() -> AsyncIterator[mesh_pb2.NodeReport]:
            yield mesh_pb2.NodeReport(register=reg())
            clock.now += 60
            await r.expire()
            yield mesh_pb2.NodeReport(heartbeat=mesh_pb2.Heartbeat())

        ctx = FakeContext()
        try:
            async for _ in RegistryServicer(r).Session(it(), ctx):
                pass
        except grpc.RpcError:
            pass
        return ctx

    ctx = asyncio.run(main())
    assert ctx.code == grpc.StatusCode.NOT_FOUND and "re-register" in ctx.details


class PublishedStore(SQLiteStore):
    """A store that reports other replicas' published liveness, and an outage."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.published: dict[str, NodeLiveness] = {}
        self.view_since = 0.0
        self.expired: list[tuple[str, NodeLiveness | None]] = []

    def node_liveness(self) -> dict[str, NodeLiveness]:
        return dict(self.published)

    def liveness_view_since(self) -> float:
        return self.view_since

    async def expire_node(self, name: str, seen: NodeLiveness | None) -> bool:
        self.expired.append((name, seen))
        return True


def test_a_node_held_elsewhere_lapses_half_a_lease_after_its_published_lease_not_during_an_outage(
        tmp_path: Path) -> None:
    clock = Clock()
    store = PublishedStore(str(tmp_path / "db"))
    r = NodeRegistry(store, lease_seconds=10, clock=clock)
    r.set_remote("node-b", node_from_proto(reg("node-b")))
    store.published["node-b"] = NodeLiveness(1020_000, "replica-b", 7)  # its holder: lease until 1020
    clock.now = 1024.9
    assert r.lapsed() == []  # the publication may be up to half a lease (5 s) stale
    # The store was away until 1020: the holder may not have published since; a lease from then.
    store.view_since = 1020
    clock.now = 1025
    assert r.lapsed() == []
    clock.now = 1030
    [lapse] = r.lapsed()
    assert (lapse.name, lapse.cause, lapse.seen) == ("node-b", "published", store.published["node-b"])
    assert "replica replica-b last published its lease until" in lapse.reason
    assert asyncio.run(r.expire()) == ["node-b"] and r.nodes() == ()
    assert store.expired == [("node-b", store.published["node-b"])]  # the fence: what the decision read
