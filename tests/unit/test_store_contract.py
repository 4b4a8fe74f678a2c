"""The Store contract, run against SQLiteStore and EtcdStore alike (the etcd
case starts a real one-member etcd on loopback in a temporary directory, over
TLS with client certificates), and what only a shared store has: replicas that
plan VIPs concurrently, share registrations and health under etcd leases, elect
one leader, and share operators, audit and join tokens."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.api import ConfigServicer, current_services
from controlplane.audit import AuditLog
from controlplane.auth import RO, RW, Caller, Operators
from controlplane.etcd_client import (
    EtcdCerts,
    EtcdClient,
    EtcdError,
    EtcdTLS,
    make_etcd_certs,
    single_member_argv,
    wait_ready,
)
from controlplane.leader import Leadership
from controlplane.noderegistry import NodeRegistry
from controlplane.store import (
    ADDED,
    DELETED,
    MODIFIED,
    Delete,
    NodeRecord,
    Put,
    SQLiteStore,
    Store,
    StoreError,
)
from controlplane.store_etcd import EtcdJoinTokens, EtcdRecords, EtcdStore, TelemetryShare, share_registry
from controlplane.tokens import JoinTokens, TokenRefused
from nodemesh.v1 import mesh_pb2
from tests.conftest import require_tool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def etcd_certs(tmp_path_factory: pytest.TempPathFactory) -> EtcdCerts:
    return make_etcd_certs(str(tmp_path_factory.mktemp("etcd-pki")))


@pytest.fixture(scope="module")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory, etcd_certs: EtcdCerts) -> Iterator[str]:
    """A one-member etcd that only talks TLS to clients holding a certificate of its CA."""
    require_tool("etcd", "etcd-server")
    data = tmp_path_factory.mktemp("etcd")
    port, peer = _free_port(), _free_port()
    with open(data / "etcd.log", "wb") as log:
        proc = subprocess.Popen(single_member_argv(str(data / "data"), "127.0.0.1", port, peer, certs=etcd_certs),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    endpoint = f"https://127.0.0.1:{port}"
    try:
        try:
            wait_ready(endpoint, tls=etcd_certs.tls())
            TLS[:] = [etcd_certs.tls()]
        except EtcdError:
            pytest.fail(f"etcd did not start: {(data / 'etcd.log').read_text()[-2000:]}")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


TLS: list[EtcdTLS] = []  # the client side of etcd_certs, once etcd_endpoint started


def _store(endpoint: str, prefix: str, **kw: Any) -> EtcdStore:
    return EtcdStore([endpoint], prefix, tls=TLS[0], **kw)


def _etcd(endpoint: str, **kw: Any) -> EtcdStore:
    # A fresh prefix per test: one etcd serves the whole module.
    return _store(endpoint, f"/t-{uuid.uuid4().hex[:8]}", **kw)


@pytest.fixture(params=["sqlite", "etcd"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """A factory: the second call gives another handle on the same state (a restart, or another replica)."""
    opened: list[Store] = []
    if request.param == "sqlite":
        path = str(tmp_path / "db")

        def make() -> Store:
            opened.append(SQLiteStore(path))
            return opened[-1]
    else:
        endpoint = request.getfixturevalue("etcd_endpoint")
        prefix = f"/t-{uuid.uuid4().hex[:8]}"

        def make() -> Store:
            opened.append(_store(endpoint, prefix, node_lease_s=2))
            return opened[-1]
    yield make
    for s in opened:
        s.close()


def put(name: str, spec: dict[str, object] | None = None, ns: str = "default", kind: str = "Service") -> Put:
    return Put(kind, ns, name, json.dumps(spec or {"a": 1}))


# ---------------------------------------------------------------- the contract


def test_a_batch_is_one_revision_and_unchanged_writes_do_not_bump(make_store: Callable[[], Store]) -> None:
    s = make_store()
    r0 = s.revision()
    res = s.apply([put("a"), put("b")])
    rev = s.revision()
    assert rev > r0
    assert [(r.name, r.action, r.resource_version) for r in res] == [("a", "created", rev), ("b", "created", rev)]
    res = s.apply([put("a"), put("b", {"a": 2})])
    assert [r.action for r in res] == ["unchanged", "configured"]
    assert res[0].resource_version == rev and res[1].resource_version == s.revision() > rev
    rev2 = s.revision()
    assert s.apply([Put("Service", "default", "a", '{ "a" : 1 }')])[0].action == "unchanged"
    assert s.apply([Delete("Service", "default", "zzz")])[0].action == "not_found"
    assert s.revision() == rev2
    b = s.get("Service", "default", "b")
    assert b is not None and b.spec() == {"a": 2} and b.resource_version == rev2
    a = s.get("Service", "default", "a")
    assert a is not None and a.created_unix_ms <= b.updated_unix_ms


def test_a_failing_batch_and_a_dry_run_write_nothing(make_store: Callable[[], Store]) -> None:
    s = make_store()
    s.apply([put("a")])
    rev = s.revision()
    with pytest.raises(ValueError):
        s.apply([put("b"), Put("Service", "default", "c", "not json")])
    res = s.apply([put("d"), Delete("Service", "default", "a")], dry_run=True)
    assert [r.action for r in res] == ["created", "deleted"]
    assert s.get("Service", "default", "b") is None and s.get("Service", "default", "d") is None
    assert s.get("Service", "default", "a") is not None and s.revision() == rev


def test_a_ref_written_twice_in_a_batch_ends_as_the_last_write(make_store: Callable[[], Store]) -> None:
    s = make_store()
    res = s.apply([put("a"), Delete("Service", "default", "a"), put("b"), put("b", {"x": 1})])
    assert [r.action for r in res] == ["created", "deleted", "created", "configured"]
    assert s.get("Service", "default", "a") is None
    b = s.get("Service", "default", "b")
    assert b is not None and b.spec() == {"x": 1}


def test_list_sorts_and_filters(make_store: Callable[[], Store]) -> None:
    s = make_store()
    s.apply([put("x", ns="a-b"), put("y", ns="a"), put("mesh", kind="MeshConfig", ns=""), put("z", ns="a")])
    items, rev = s.list()
    assert [r.ref for r in items] == [("MeshConfig", "", "mesh"), ("Service", "a", "y"), ("Service", "a", "z"),
                                      ("Service", "a-b", "x")]
    assert rev == s.revision()
    assert [r.name for r in s.list("Service", "a")[0]] == ["y", "z"]
    assert [r.name for r in s.list(None, "a-b")[0]] == ["x"]


def test_state_survives_reopening(make_store: Callable[[], Store]) -> None:
    s = make_store()
    s.apply([put("a", {"k": "v"})])
    s.save_node(NodeRecord("node-1", b"\x01\x02", 123))
    s2 = make_store()
    a = s2.get("Service", "default", "a")
    assert a is not None and a.spec() == {"k": "v"}
    assert [(n.name, n.registration) for n in s2.load_nodes()] == [("node-1", b"\x01\x02")]
    s.delete_node("node-1")
    assert s2.load_nodes() == []


def test_watch_from_zero_then_live_and_from_a_revision(make_store: Callable[[], Store]) -> None:
    s = make_store()
    s.apply([put("a"), put("other", ns="kube")])
    rev_a = s.revision()

    async def main() -> None:
        it = s.watch("Service", "default").__aiter__()
        first = await asyncio.wait_for(it.__anext__(), 5)
        assert (first.type, first.resource.name) == (ADDED, "a")
        s.apply([put("a", {"a": 2}), put("skip", ns="kube")])
        s.apply([Delete("Service", "default", "a"), put("b")])
        seen = [await asyncio.wait_for(it.__anext__(), 5) for _ in range(3)]
        assert [(e.type, e.resource.name) for e in seen] == [(MODIFIED, "a"), (DELETED, "a"), (ADDED, "b")]
        assert seen[0].revision < seen[1].revision == seen[2].revision == s.revision()
        assert seen[1].resource.spec() == {"a": 2}  # a deletion carries what was deleted
        await it.aclose()  # type: ignore[attr-defined]
        # Resuming from a revision replays what followed it.
        it2 = s.watch("Service", "default", since_revision=rev_a).__aiter__()
        replay = [await asyncio.wait_for(it2.__anext__(), 5) for _ in range(3)]
        assert [(e.type, e.resource.name) for e in replay] == [(MODIFIED, "a"), (DELETED, "a"), (ADDED, "b")]
        await it2.aclose()  # type: ignore[attr-defined]
        with pytest.raises(StoreError, match="use a revision returned by List"):
            async for _ in s.watch(since_revision=s.revision() + 100):
                pass

    asyncio.run(main())


def test_a_watch_sees_writes_of_another_handle(make_store: Callable[[], Store]) -> None:
    """For etcd, another replica's writes; for SQLite, a restart's (the watch starts after it)."""
    a, b = make_store(), make_store()

    async def main() -> None:
        it = a.watch("Service", since_revision=a.revision()).__aiter__()
        pending = asyncio.ensure_future(it.__anext__())
        await asyncio.sleep(0.2)
        b.apply([put("from-b")])
        if isinstance(a, SQLiteStore):
            # In-process notification only: a SQLite store is one control plane's.
            pending.cancel()
            return
        ev = await asyncio.wait_for(pending, 5)
        assert (ev.type, ev.resource.name) == (ADDED, "from-b")
        await it.aclose()  # type: ignore[attr-defined]

    asyncio.run(main())


def test_planned_apply_allocates_distinct_vips(make_store: Callable[[], Store]) -> None:
    s = make_store()
    api = ConfigServicer(s)
    api.apply(_mesh_doc("240.240.0.0/28"))
    for i in range(5):
        api.apply(_svc_doc(f"s{i}"))
    vips = [e.vip for e in current_services(s)]
    assert len(vips) == 5 and len(set(vips)) == 5


# ---------------------------------------------------------------- several replicas (etcd)


def _mesh_doc(vip_range: str) -> str:
    return ("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
            f"spec: {{trustDomain: cluster.local, vipRange: '{vip_range}'}}\n")


def _svc_doc(name: str) -> str:
    return (f"apiVersion: nodemesh.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n"
            "spec:\n  selector: {app: x}\n  ports: [{name: http, port: 80, targetPort: 8080, protocol: http}]\n")


def test_concurrent_applies_on_two_replicas_never_share_a_vip(etcd_endpoint: str) -> None:
    prefix = f"/t-{uuid.uuid4().hex[:8]}"
    a, b = _store(etcd_endpoint, prefix), _store(etcd_endpoint, prefix)
    ConfigServicer(a).apply(_mesh_doc("240.240.0.0/28"))  # 14 addresses for 12 services: collisions likely
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(store: EtcdStore, names: list[str]) -> None:
        api = ConfigServicer(store)
        start.wait()
        try:
            for n in names:
                api.apply(_svc_doc(n))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(a, [f"a{i}" for i in range(6)])),
               threading.Thread(target=run, args=(b, [f"b{i}" for i in range(6)]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    a.catch_up()  # b's last writes may still be on their way to a's mirror
    entries = current_services(a)
    assert len(entries) == 12
    assert len({e.vip for e in entries}) == 12, sorted((e.vip, e.service.key) for e in entries)
    a.close()
    b.close()


def test_a_stale_plan_is_planned_again(etcd_endpoint: str) -> None:
    prefix = f"/t-{uuid.uuid4().hex[:8]}"
    a, b = _store(etcd_endpoint, prefix), _store(etcd_endpoint, prefix)
    runs = []

    def plan() -> list[Put]:
        runs.append(a.list("Service")[0])
        if len(runs) == 1:
            b.apply([put("sneaked-in")])  # another replica writes between our read and our write
        return [put("mine", {"seen": len(runs[-1])})]

    a.apply_planned(plan)
    assert len(runs) == 2
    mine = a.get("Service", "default", "mine")
    assert mine is not None and mine.spec() == {"seen": 1}  # planned from the state that includes b's write
    a.close()
    b.close()


def _reg(name: str, ip: str) -> mesh_pb2.NodeRegistration:
    return mesh_pb2.NodeRegistration(node_name=name, addresses=[ip], workloads=[mesh_pb2.WorkloadRegistration(
        name="w", namespace="default", service_account="sa", ip=ip, ports=[8080])])


async def _until(cond: Callable[[], bool], timeout: float = 8.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not met in {timeout} s"
        await asyncio.sleep(0.05)


def test_replicas_share_registrations_health_and_a_dead_replicas_nodes_expire(etcd_endpoint: str) -> None:
    prefix = f"/t-{uuid.uuid4().hex[:8]}"
    sa, sb = _store(etcd_endpoint, prefix, node_lease_s=2), _store(etcd_endpoint, prefix, node_lease_s=2)
    ra, rb = NodeRegistry(sa, 2), NodeRegistry(sb, 2)
    sb_closed = False

    async def main() -> None:
        nonlocal sb_closed
        share_registry(sa, ra)
        share_registry(sb, rb)
        ra.register(_reg("node-1", "10.0.0.1"))
        rb.register(_reg("node-2", "10.0.0.2"))
        both = ("node-1", "node-2")
        await _until(lambda: tuple(n.name for n in ra.nodes()) == both and tuple(n.name for n in rb.nodes()) == both)
        # Health reported through A is seen by B (and what B builds for its agents).
        report = mesh_pb2.HealthReport(endpoints=[mesh_pb2.EndpointHealth(workload="default/w", port=8080,
                                                                          healthy=False, detail="HTTP 503")])
        assert ra.set_health("node-1", report)
        await _until(lambda: rb.unhealthy("node-1") == {("default/w", 8080): "HTTP 503"}, what="health on B")
        assert {n.name: n.unhealthy for n in rb.nodes()}["node-1"] == frozenset({("default/w", 8080)})
        ra.set_health("node-1", mesh_pb2.HealthReport())
        await _until(lambda: rb.unhealthy("node-1") == {}, what="healthy again on B")
        # node-2's agent moves to replica A: B gives it up, and B (not the leader) expires nothing.
        ra.register(_reg("node-2", "10.0.0.2"))
        await _until(lambda: rb.lease("node-2") is None)
        assert await rb.expire() == []
        assert [r.name for r in await asyncio.to_thread(sa.load_nodes)] == ["node-1", "node-2"]
        # Replica B dies (closed without a word): nothing of A's goes.
        await asyncio.to_thread(sb.close)
        sb_closed = True
        sc = await asyncio.to_thread(_store, etcd_endpoint, prefix, node_lease_s=2)
        rc = NodeRegistry(sc, 2)
        share_registry(sc, rc)
        assert tuple(n.name for n in rc.nodes()) == both
        lead = Leadership()
        sc.start_election(lead)
        await _until(lead.is_leader, what="C to lead")
        expired: list[str] = []
        rc.on_expiry = lambda lapse: expired.append(f"{lapse.name} {lapse.cause}")
        # Replica A dies: its records outlive it. node-1's agent re-registers at C in time and is
        # kept throughout; node-2's does not, and the leader (C) expires it after its published
        # lease and half a lease more.
        await asyncio.to_thread(sa.close)
        t0 = time.monotonic()
        rc.register(_reg("node-1", "10.0.0.1"))
        while "node-2" in {n.name for n in rc.nodes()}:
            assert time.monotonic() - t0 < 2 * 1.5 + 2, "node-2 was not expired within a lease and a half"
            rc.renew("node-1")
            await rc.expire()
            assert "node-1" in {n.name for n in rc.nodes()}
            await asyncio.sleep(0.2)
        took = time.monotonic() - t0
        assert took >= 0.5, f"node-2 expired {took:.1f} s after its replica died: before its lease could lapse"
        assert expired == ["node-2 published"]
        assert [r.name for r in await asyncio.to_thread(sc.load_nodes)] == ["node-1"]
        await asyncio.to_thread(sc.close)

    try:
        asyncio.run(main())
    finally:
        sa.close()
        if not sb_closed:
            sb.close()


def _names(registry: NodeRegistry) -> list[str]:
    return [n.name for n in registry.nodes()]


def test_node_expiry_is_the_leaders_and_goes_through_the_store(make_store: Callable[[], Store]) -> None:
    """The same path on both stores: the leader (SQLite's one control plane always
    leads) expires a node whose lease lapsed, through the store, once; the node's
    record goes with it and the expiry is told why."""
    s = make_store()
    now = [1000.0]
    reg = NodeRegistry(s, lease_seconds=10, clock=lambda: now[0])
    told: list[tuple[str, str, str]] = []
    reg.on_expiry = lambda lapse: told.append((lapse.name, lapse.cause, lapse.reason))

    async def main() -> None:
        if isinstance(s, EtcdStore):
            share_registry(s, reg)
            lead = Leadership()
            s.start_election(lead)
            await _until(lead.is_leader, what="the replica to lead")
        reg.register(_reg("node-1", "10.0.0.1"))
        reg.register(_reg("node-2", "10.0.0.2"))
        await asyncio.to_thread(getattr(s, "flush", lambda: None))
        now[0] = 1006
        reg.renew("node-2")  # until 1016
        now[0] = 1010
        assert await reg.expire() == ["node-1"] and _names(reg) == ["node-2"]
        assert await reg.expire() == []  # once
        assert [(n, c) for n, c, _ in told] == [("node-1", "session")]
        assert "no heartbeat on its session with this replica for 10 s" in told[0][2]
        await asyncio.to_thread(getattr(s, "flush", lambda: None))
        assert [r.name for r in await asyncio.to_thread(s.load_nodes)] == ["node-2"]
        now[0] = 1016
        assert await reg.expire() == ["node-2"] and reg.nodes() == ()

    asyncio.run(main())


def test_liveness_is_published_at_a_bounded_rate(etcd_endpoint: str) -> None:
    """Every heartbeat renews the lease; only one that moved it by half a lease or
    more since the last publication is written to etcd."""
    s = _etcd(etcd_endpoint, node_lease_s=2)
    now = [1000.0]
    reg = NodeRegistry(s, lease_seconds=15, clock=lambda: now[0])
    writes: list[tuple[str, int]] = []
    real = s.publish_liveness

    def counted(name: str, until_unix_ms: int) -> None:
        writes.append((name, until_unix_ms))
        real(name, until_unix_ms)

    s.publish_liveness = counted  # type: ignore[method-assign]
    try:
        async def main() -> None:
            share_registry(s, reg)
            reg.register(_reg("node-1", "10.0.0.1"))
            for _ in range(30):  # heartbeats at a third of the lease, as agents send them
                now[0] += 5
                reg.renew("node-1")
            await asyncio.to_thread(s.flush)
            await asyncio.to_thread(s.catch_up)
            # 150 s of heartbeats: 30 renewals, 15 publications (every second heartbeat).
            assert len(writes) == 15 and writes[-1] == ("node-1", 1000_000 + 150_000 + 15_000)
            live = s.node_liveness()["node-1"]
            assert (live.until_unix_ms, live.replica) == (1165_000, s.replica_id)

        asyncio.run(main())
    finally:
        s.close()


def test_only_the_leader_expires_and_a_deposed_one_cannot(etcd_endpoint: str) -> None:
    prefix = f"/t-{uuid.uuid4().hex[:8]}"
    sa, sb = _store(etcd_endpoint, prefix, node_lease_s=2), _store(etcd_endpoint, prefix, node_lease_s=2)
    ra, rb = NodeRegistry(sa, 2), NodeRegistry(sb, 2)

    async def main() -> None:
        share_registry(sa, ra)
        share_registry(sb, rb)
        lead_a, lead_b = Leadership(), Leadership()
        sb.start_election(lead_b)
        await _until(lead_b.is_leader, what="B to lead")
        ra.register(_reg("node-1", "10.0.0.1"))
        ra.register(_reg("node-2", "10.0.0.2"))
        await _until(lambda: _names(rb) == ["node-1", "node-2"], what="A's nodes on B")
        t0 = time.monotonic()
        # node-2 heartbeats to A; node-1 stops. A holds node-1's session and sees its lease
        # lapse, but A does not lead: the store refuses it the expiry.
        while time.monotonic() - t0 < 2.2:
            ra.renew("node-2")
            await asyncio.sleep(0.3)
        assert [lapse.name for lapse in ra.lapsed()] == ["node-1"]
        assert await ra.expire() == [] and _names(ra) == ["node-1", "node-2"]
        # The leader expires node-1 (never node-2, which heartbeats), and every replica drops it.
        while "node-1" in _names(rb):
            assert time.monotonic() - t0 < 2 * 1.5 + 2, "the leader did not expire node-1"
            ra.renew("node-2")
            assert "node-2" not in await rb.expire()
            await asyncio.sleep(0.2)
        await _until(lambda: _names(ra) == ["node-2"], what="node-1 gone from A too")
        # An expiry decided on a publication that has been superseded is refused.
        seen = sb.node_liveness()["node-2"]
        sa.publish_liveness("node-2", seen.until_unix_ms + 1000)
        await asyncio.to_thread(sa.flush)
        assert not await sb.expire_node("node-2", seen)
        # B resigns and A leads. B, deposed without being told (its Leadership still says it
        # leads), cannot expire node-2 once it lapses; A can.
        await asyncio.to_thread(sb.resign)
        lead_b._apply(True, sb.replica_id)
        sa.start_election(lead_a)
        await _until(lead_a.is_leader, what="A to lead")
        await _until(lambda: [lapse.name for lapse in rb.lapsed()] == ["node-2"], timeout=6,
                     what="node-2's published lease to lapse on B")
        assert await rb.expire() == [] and _names(rb) == ["node-2"]
        assert await ra.expire() == ["node-2"]
        await _until(lambda: rb.nodes() == (), what="node-2 gone from B")

    try:
        asyncio.run(main())
    finally:
        sa.close()
        sb.close()


def test_one_leader_and_another_takes_over_within_a_lease(etcd_endpoint: str) -> None:
    prefix = f"/t-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        stores = [await asyncio.to_thread(_store, etcd_endpoint, prefix, node_lease_s=2) for _ in range(3)]
        leads = [Leadership() for _ in stores]
        runs: list[int] = []

        async def duty(i: int) -> None:
            runs.append(i)
            await asyncio.Event().wait()  # until cancelled

        duties = [asyncio.create_task(lead.run_while_leader("test duty", lambda i=i: duty(i)))  # type: ignore[misc]
                  for i, lead in enumerate(leads)]
        for s, lead in zip(stores, leads, strict=True):
            s.start_election(lead)
        await _until(lambda: sum(lead.is_leader() for lead in leads) == 1, what="one leader")
        first = next(i for i, lead in enumerate(leads) if lead.is_leader())
        await _until(lambda: runs == [first], what="the duty on the leader only")
        await asyncio.sleep(1.0)
        assert sum(lead.is_leader() for lead in leads) == 1 and runs == [first]
        # The leader dies without resigning: another leads within a lease TTL (2 s) of its last renewal.
        t0 = time.monotonic()
        await asyncio.to_thread(stores[first].close)
        leads[first]._apply(False, "")
        rest = [i for i in range(3) if i != first]
        await _until(lambda: sum(leads[i].is_leader() for i in rest) == 1, timeout=6, what="a new leader")
        took = time.monotonic() - t0
        # The TTL, plus etcd's lease-expiry check (every 0.5 s) and slack for a busy test machine.
        assert took < 2.0 + 2.5, f"takeover took {took:.1f} s"
        second = next(i for i in rest if leads[i].is_leader())
        await _until(lambda: runs == [first, second], what="the duty on the new leader")
        # A clean stop resigns: the last one leads at once, not a lease later.
        t0 = time.monotonic()
        await asyncio.to_thread(stores[second].resign)
        third = next(i for i in rest if i != second)
        await _until(lambda: leads[third].is_leader(), timeout=1.9, what="leadership after a resignation")
        for t in duties:
            t.cancel()
        for i in rest:
            await asyncio.to_thread(stores[i].close)

    asyncio.run(main())


def test_a_replica_started_after_the_election_waits_instead_of_campaigning_in_a_loop(etcd_endpoint: str) -> None:
    """The leader key is one key, not a directory: a replica that starts after the
    election mirrors it and waits for it to go, rather than taking it for gone and
    asking etcd again and again (it did, about a thousand times a second)."""
    prefix = f"/t-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        first = await asyncio.to_thread(_store, etcd_endpoint, prefix, node_lease_s=2)
        lead_first = Leadership()
        first.start_election(lead_first)
        await _until(lead_first.is_leader, what="the first replica leads")
        late = await asyncio.to_thread(_store, etcd_endpoint, prefix, node_lease_s=2)
        assert late.mirrored(late.key("leader")) is not None
        txns = 0
        real = late.client.txn

        async def counted(*args: Any, **kw: Any) -> Any:
            nonlocal txns
            txns += 1
            return await real(*args, **kw)

        late.client.txn = counted  # type: ignore[method-assign]
        lead_late = Leadership()
        late.start_election(lead_late)
        await asyncio.sleep(1.0)
        assert not lead_late.is_leader() and lead_late.holder == first.replica_id
        assert txns <= 2, f"{txns} campaign transactions in 1 s"
        for s in (first, late):
            await asyncio.to_thread(s.close)

    asyncio.run(main())


def test_telemetry_reaches_the_other_replicas_mesh_view(etcd_endpoint: str) -> None:
    prefix = f"/t-{uuid.uuid4().hex[:8]}"
    sa, sb = _store(etcd_endpoint, prefix, node_lease_s=2), _store(etcd_endpoint, prefix, node_lease_s=2)
    ra, rb = NodeRegistry(sa, 2), NodeRegistry(sb, 2)
    seen_a: list[tuple[str, str]] = []
    seen_b: list[tuple[str, str]] = []

    async def main() -> None:
        share_a = TelemetryShare(sa, ra, lambda n, t: seen_a.append((n, t)))
        TelemetryShare(sb, rb, lambda n, t: seen_b.append((n, t)))
        ra.register(_reg("node-1", "10.0.0.1"))
        share_a.offer("node-1", '{"edges": []}')
        share_a.offer("node-1", '{"edges": [1]}')  # within TELEMETRY_SHARE_S: local only
        await _until(lambda: seen_b == [("node-1", '{"edges": []}')], what="the summary on B")
        assert seen_a == [("node-1", '{"edges": []}'), ("node-1", '{"edges": [1]}')]  # A's own: not twice

    try:
        asyncio.run(main())
    finally:
        sa.close()
        sb.close()


def test_a_queued_write_that_cannot_reach_etcd_is_tried_again_in_order(etcd_endpoint: str) -> None:
    from controlplane.etcd_client import EtcdUnavailable

    s = _etcd(etcd_endpoint, node_lease_s=3)
    real_put = s.client.put
    failures = [2]  # etcd away for the first two tries of the first write

    async def flaky_put(key: bytes, value: bytes, lease: int = 0) -> int:
        if failures[0] > 0:
            failures[0] -= 1
            raise EtcdUnavailable("injected: etcd away")
        return await real_put(key, value, lease)

    s.client.put = flaky_put  # type: ignore[method-assign]
    try:
        s.save_health("node-1", {("default/w", 80): "first"})  # off the loop: waits until it lands
        s.save_health("node-1", {("default/w", 80): "second"})
        assert failures == [0]
        kv, _ = s.client.sync(s.client.get(s.key("health", "node-1")))
        assert kv is not None and b"second" in kv.value  # the retried write did not land after the later one
    finally:
        s.close()


def test_operators_audit_and_join_tokens_are_shared(etcd_endpoint: str) -> None:
    prefix = f"/t-{uuid.uuid4().hex[:8]}"
    a, b = _store(etcd_endpoint, prefix), _store(etcd_endpoint, prefix)
    ops_a, toks_a = a.security_tables()
    ops_b, toks_b = b.security_tables()
    assert isinstance(a.security_records(), EtcdRecords) and isinstance(toks_b, EtcdJoinTokens)
    assert ops_a.count() == 0
    token, cid, _ = ops_a.create_token("viewer", RO)
    b.catch_up()  # lookups read b's mirror: a's write may be a moment away
    assert ops_b.by_token(token) == Caller("operator", "viewer", RO, credential=cid)
    assert ops_b.by_token(token[:-2] + "xx").kind == "anonymous"
    new, _, _ = ops_b.create_token("viewer", RW)
    a.catch_up()
    assert ops_a.by_token(token).kind == "anonymous" and ops_a.by_token(new).role == RW
    assert ops_a.revoke("viewer") and not ops_b.revoke("viewer")
    b.catch_up()
    assert ops_b.by_token(new).kind == "anonymous"
    # One hash chain across replicas: appends from both link, and either verifies it.
    key = b"k" * 32
    audit_a, audit_b = AuditLog(a.security_records(), key, keep=2), AuditLog(b.security_records(), key, keep=2)
    audit_a.append("operator/admin", "Apply", "apply Service/default/web", "ok")
    audit_b.append("operator/admin", "Delete", "delete Service/default/web", "ok")
    assert [e.action for e in audit_a.entries()] == ["Delete", "Apply"]  # newest first
    assert audit_b.verify().ok and audit_b.verify().records == 2
    for i in range(4):
        audit_a.append("operator/admin", "Apply", f"n{i}", "ok")
    audit_a._prune_to(2)
    b.catch_up()
    assert [e.detail for e in audit_b.entries()] == ["n3", "n2"] and audit_b.verify().ok
    # A join token made on one replica is used on the other, once.
    jt, _ = toks_a.create("node-1", 600, "pin")
    with pytest.raises(TokenRefused, match="made for node 'node-1'"):
        toks_b.consume(jt, "node-2")
    toks_b.consume(jt, "node-1")
    with pytest.raises(TokenRefused, match="already used"):
        toks_a.consume(jt, "node-1")
    a.close()
    b.close()


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
def test_join_tokens_behave_alike(backend: str, request: pytest.FixtureRequest) -> None:
    now = [1000.0]
    if backend == "sqlite":
        import sqlite3

        tokens: JoinTokens = JoinTokens(sqlite3.connect(":memory:", isolation_level=None), lambda: now[0])
        ops: Operators = Operators(sqlite3.connect(":memory:", isolation_level=None), lambda: now[0])
    else:
        store = _etcd(request.getfixturevalue("etcd_endpoint"))
        ops, tokens = store.security_tables(lambda: now[0])
    tok, expires = tokens.create("node-1", 60, "pin")
    assert tok.startswith("nmjt1.pin.") and expires == 1060
    with pytest.raises(TokenRefused, match="not known"):
        tokens.consume(tok[:-3] + "zzz", "node-1")
    now[0] = 1061
    with pytest.raises(TokenRefused, match="expired"):
        tokens.consume(tok, "node-1")
    tok2, _ = tokens.create("node-1", 60, "pin")
    tokens.consume(tok2, "node-1")
    with pytest.raises(ValueError, match="ttl must be"):
        tokens.create("node-1", 0, "pin")
    assert ops.count() == 0
    cid = ops.register_cert("alice", RW, "abcd", 5000.0)
    assert ops.by_cert("alice", "abcd") == Caller("operator", "alice", RW, credential=cid) and ops.count() == 1
    if backend == "etcd":
        store.close()


def test_etcd_store_refuses_clearly_when_etcd_is_away() -> None:
    with pytest.raises(StoreError, match="cannot reach etcd .*check --etcd-endpoints"):
        EtcdStore([f"http://127.0.0.1:{_free_port()}"], "/x", timeout_s=0.5)
    with pytest.raises(StoreError, match="prefix"):
        EtcdStore(["http://127.0.0.1:1"], "nodemesh")
    with pytest.raises(ValueError, match="is https: give --etcd-ca, --etcd-cert and --etcd-key"):
        EtcdClient(["https://etcd:2379"])
    with pytest.raises(ValueError, match="plain HTTP to etcd is refused beyond loopback"):
        EtcdClient(["http://10.1.2.3:2379"])
    with pytest.raises(ValueError, match="several etcd endpoints must be IP addresses"):
        EtcdClient(["http://127.0.0.1:2379", "http://localhost:2380"])


def test_etcd_over_tls_refuses_who_has_no_certificate_of_its_ca(etcd_endpoint: str, etcd_certs: EtcdCerts,
                                                                tmp_path: Path) -> None:
    """The attacker: plaintext to the TLS port, a client certificate from another CA,
    and a server whose certificate is not from the CA we trust. Each is refused."""
    port = etcd_endpoint.rsplit(":", 1)[1]
    with pytest.raises(StoreError, match="cannot reach etcd"):
        EtcdStore([f"http://127.0.0.1:{port}"], "/x", timeout_s=2)
    other = make_etcd_certs(str(tmp_path / "other"))
    with pytest.raises(StoreError, match="cannot reach etcd|refused"):
        EtcdStore([etcd_endpoint], "/x", timeout_s=2,
                  tls=EtcdTLS(etcd_certs.ca, other.client_cert, other.client_key))
    with pytest.raises(StoreError, match="cannot reach etcd"):  # etcd's certificate is not from other.ca
        EtcdStore([etcd_endpoint], "/x", timeout_s=2, tls=other.tls())
    with pytest.raises(ValueError, match="cannot read the etcd client key"):
        EtcdClient([etcd_endpoint], tls=EtcdTLS(etcd_certs.ca, etcd_certs.client_cert, str(tmp_path / "nope")))
    # The right certificate works, and the name it is checked against can be given.
    s = EtcdStore([etcd_endpoint], "/x", timeout_s=2,
                  tls=EtcdTLS(etcd_certs.ca, etcd_certs.client_cert, etcd_certs.client_key, "localhost"))
    s.close()
    with pytest.raises(StoreError, match="cannot reach etcd"):  # a name the certificate does not carry
        EtcdStore([etcd_endpoint], "/x", timeout_s=2,
                  tls=EtcdTLS(etcd_certs.ca, etcd_certs.client_cert, etcd_certs.client_key, "etcd.evil"))


def test_serve_settings_refuse_etcd_without_a_shared_ca(tmp_path: Path) -> None:
    from controlplane.process import ControlPlaneSettings

    with pytest.raises(ValueError, match="needs the operator intermediate CA"):
        ControlPlaneSettings(state_dir=str(tmp_path), store="etcd", etcd_endpoints=("http://127.0.0.1:2379",))
    with pytest.raises(ValueError, match="needs --etcd-endpoints"):
        ControlPlaneSettings(state_dir=str(tmp_path), store="etcd", ca_cert="a", ca_key="b", ca_chain="c")
    with pytest.raises(ValueError, match="must be sqlite or etcd"):
        ControlPlaneSettings(state_dir=str(tmp_path), store="redis")


def test_agent_lists_replicas_for_failover() -> None:
    from nodeagent.config import ConfigError, parse_config

    base = {"node": {"name": "n1", "address": "10.0.0.11"}, "workloads": []}
    cfg = parse_config({**base, "controlPlane": {"address": "10.0.0.1:15010",
                                                 "addresses": ["10.0.0.2:15010", "10.0.0.3:15010"]}})
    assert cfg.control_plane.grpc_target == "ipv4:10.0.0.1:15010,10.0.0.2:15010,10.0.0.3:15010"
    assert cfg.control_plane_exclusions() == ("10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32")
    with pytest.raises(ConfigError, match=r"controlPlane.addresses\[0\].*IPv4:port"):
        parse_config({**base, "controlPlane": {"address": "10.0.0.1:15010", "addresses": ["cp-b:15010"]}})
    with pytest.raises(ConfigError, match=r"controlPlane.address.*IPv4:port"):
        parse_config({**base, "controlPlane": {"address": "cp:15010", "addresses": ["10.0.0.2:15010"]}})
