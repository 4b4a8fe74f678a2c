"""The ADS client against an in-process fake ADS server: wildcard subscription,
ACK/NACK, snapshot only once complete, last good snapshot kept across reconnects.
Also the registry session against a fake Registry."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import Message

from nodeagent import cpchannel
from nodeagent.cpchannel import backoff_delay
from nodeagent.cpregistration import RegistrySession
from nodeagent.meshview.snapshot import Snapshot
from nodeagent.xds.client import AdsClient
from nodemesh import xdsnames
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc
from tests.unit.test_xds_convert import LOCAL, assignment, cluster, mesh_config, mesh_security, pack, workload


class FakeAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        self.streams = 0
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()

    async def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        self.streams += 1
        self.outbox = asyncio.Queue()
        outbox = self.outbox

        async def reader() -> None:
            async for req in request_iterator:
                await self.requests.put(req)

        task = asyncio.get_running_loop().create_task(reader())
        try:
            while True:
                item = await outbox.get()
                if item == "abort":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "control plane going away")
                yield item
        finally:
            task.cancel()

    async def next_request(self) -> discovery_pb2.DiscoveryRequest:
        return await asyncio.wait_for(self.requests.get(), 5)

# These fakes serve plaintext TCP; the agent itself always presents a node certificate (nodeagent/cpchannel.py).
cpchannel.allow_plaintext_tcp()


def response(type_url: str, version: str, nonce: str, *msgs: Message) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=version, nonce=nonce,
                                           resources=[pack(m) for m in msgs])


async def start_server(servicer: Any, add: Any, port: int = 0) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_ack_nack_and_reconnect() -> None:
    async def main() -> None:
        fake = FakeAds()
        server, target = await start_server(fake, ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server)
        snaps: list[Snapshot] = []
        conn: list[bool] = []
        client = AdsClient(target, "node-1", LOCAL, snaps.append, on_connection=conn.append,
                           backoff_initial_s=0.05, backoff_cap_s=0.1, protocol="sotw")
        task = asyncio.get_running_loop().create_task(client.run())
        try:
            # Wildcard subscription to every agent type, node id = node name.
            initial = [await fake.next_request() for _ in xdsnames.AGENT_TYPES]
            assert [r.type_url for r in initial] == list(xdsnames.AGENT_TYPES)
            assert all(not r.resource_names and not r.version_info and not r.response_nonce for r in initial)
            assert initial[0].node.id == "node-1"
            assert initial[0].node.metadata["agent_version"]

            good = [
                response(xdsnames.POLICY, "1", "n0", mesh_security()),
                response(xdsnames.ROUTE, "1", "r0"),
                response(xdsnames.MESH_CONFIG, "1", "n1", mesh_config()),
                response(xdsnames.WORKLOAD, "1", "n2", workload()),
                response(xdsnames.CLUSTER, "1", "n3", cluster()),
                response(xdsnames.ENDPOINT, "1", "n4", assignment()),
            ]
            for i, resp in enumerate(good):
                fake.outbox.put_nowait(resp)
                ack = await fake.next_request()
                assert (ack.type_url, ack.version_info, ack.response_nonce) == (resp.type_url, "1", resp.nonce)
                assert not ack.HasField("error_detail")
                # The proxy never sees a half-known mesh.
                assert len(snaps) == (1 if i == len(good) - 1 else 0)
            assert snaps[0].services[0].key == "default/web" and conn == [True]

            # A bad Cluster: NACK with the last accepted version, this nonce and the reason.
            fake.outbox.put_nowait(response(xdsnames.CLUSTER, "2", "n5", cluster("api", port=0)))
            nack = await fake.next_request()
            assert (nack.type_url, nack.version_info, nack.response_nonce) == (xdsnames.CLUSTER, "1", "n5")
            assert "outbound|0||api.default.svc.mesh" in nack.error_detail.message
            assert "port 0" in nack.error_detail.message
            assert len(snaps) == 1 and client.snapshot is snaps[0]

            # Stream failure: the last good snapshot stays; the client reconnects and
            # tells the server which versions it holds.
            fake.outbox.put_nowait("abort")
            again = [await fake.next_request() for _ in xdsnames.AGENT_TYPES]
            assert fake.streams == 2
            assert [r.version_info for r in again] == ["1"] * len(xdsnames.AGENT_TYPES)
            assert client.snapshot is snaps[0] and False in conn

            fake.outbox.put_nowait(response(xdsnames.WORKLOAD, "2", "m1"))
            ack = await fake.next_request()
            assert (ack.version_info, ack.response_nonce) == ("2", "m1")
            assert len(snaps) == 2 and snaps[1].workloads == ()
            assert client.connected
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(None)

    asyncio.run(main())


def _mesh_snapshot(web_ip: str = "10.0.0.3", *, extra: bool = False, bad: bool = False) -> Any:
    from controlplane.xds.cache import XdsSnapshot

    clusters = [cluster()] + ([cluster("api", port=0 if bad else 81)] if extra else [])
    assignments = [assignment(ip=web_ip)] + ([assignment("api", port=0 if bad else 81)] if extra else [])
    return XdsSnapshot.from_resources({
        xdsnames.MESH_CONFIG: {"mesh": pack(mesh_config())},
        # node-3's workload backs no service: a Delta agent never subscribes to it.
        xdsnames.WORKLOAD: {"node-2/default/web-2": pack(workload(ip=web_ip)),
                            "node-3/default/batch": pack(workload("batch", node="node-3", ip="10.0.0.9"))},
        xdsnames.CLUSTER: {c.name: pack(c) for c in clusters},
        # Whole assignments (Envoy, gRPC, SotW agents) and per-node slices (Delta agents).
        xdsnames.ENDPOINT: {**{a.cluster_name: pack(a) for a in assignments},
                            **{xdsnames.slice_name(a.cluster_name, "node-2"): pack(a) for a in assignments}},
        xdsnames.POLICY: {"MeshSecurity//mesh": pack(mesh_security())},
        xdsnames.ROUTE: {},
    })


def test_delta_is_the_default_and_sends_only_changes_to_the_real_servicer() -> None:
    """The agent's Delta client against the control plane's own ADS servicer and
    cache over gRPC: the first snapshot, then a change that carries one resource,
    a NACKed change that leaves the snapshot alone, and a reconnect that sends
    nothing already held."""
    from controlplane.xds.cache import SnapshotCache
    from controlplane.xds.server import AdsServicer, add_to_server

    async def main() -> None:
        cache = SnapshotCache()
        cache.set_default(_mesh_snapshot())
        ads = AdsServicer(cache)
        server, target = await start_server(ads, add_to_server)
        snaps: list[Snapshot] = []
        client = AdsClient(target, "node-1", LOCAL, snaps.append, backoff_initial_s=0.05, backoff_cap_s=0.1)
        assert client.protocol == "delta"
        task = asyncio.get_running_loop().create_task(client.run())

        async def until(pred: Any) -> None:
            for _ in range(500):
                if pred():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"condition not reached: {ads.stats} {client.last_error} {client.state.versions}")

        try:
            await until(lambda: snaps and ads.stats.acks >= len(xdsnames.AGENT_TYPES)
                        and "node-2/default/web-2" in client.state.resources.workloads
                        and all(r["state"] == "synced" for r in ads.sync.rows()))
            assert ads.stats.delta_streams_opened == 1 and ads.stats.nacks == 0
            assert snaps[-1].services[0].ports[0].endpoints[0].ip == "10.0.0.3"
            # Workloads scoped to the node: those behind its endpoints (and its own), not the mesh's.
            assert set(client.state.resources.workloads) == {"node-2/default/web-2"}
            sent = sum(r["bytes_sent"] for r in ads.sync.rows())
            responses = ads.stats.responses

            # One endpoint moves: one Workload and one ClusterLoadAssignment travel, nothing else.
            cache.set_default(_mesh_snapshot("10.0.0.4"))
            await until(lambda: snaps[-1].services[0].ports[0].endpoints[0].ip == "10.0.0.4")
            await until(lambda: all(r["state"] == "synced" for r in ads.sync.rows()))
            assert ads.stats.responses - responses == 2
            assert sum(r["bytes_sent"] for r in ads.sync.rows()) - sent < 1500

            # A bad new cluster: NACKed with the reason, the snapshot in force stays.
            n_snaps = len(snaps)
            cache.set_default(_mesh_snapshot("10.0.0.4", extra=True, bad=True))
            await until(lambda: ads.stats.nacks == 1)
            assert "port 0" in ads.stats.last_nack
            assert [s.key for s in snaps[-1].services] == ["default/web"] and len(snaps) >= n_snaps
            assert {r["type"]: r["state"] for r in ads.sync.rows()}["Cluster"] == "nacked"

            # Reconnect: the held versions go back, so nothing already held is sent again.
            # Back to the snapshot the client kept: nothing to send, since the server booked
            # the client as holding its last ACKed clusters, not the rejected one.
            acks, responses = ads.stats.acks, ads.stats.responses
            cache.set_default(_mesh_snapshot("10.0.0.4"))
            await asyncio.sleep(0.3)
            assert (ads.stats.acks, ads.stats.responses) == (acks, responses)
            n_snaps, responses = len(snaps), ads.stats.responses
            await server.stop(None)
            server, _ = await start_server(ads, add_to_server, port=int(target.rsplit(":", 1)[1]))
            await until(lambda: ads.stats.delta_streams_opened == 2 and ads.stats.streams_active == 1)
            await asyncio.sleep(0.3)
            # Only the empty Route type is answered again (held: nothing; exists: nothing), and
            # Workload, once, to say that this node's own workload (subscribed by name) does not exist.
            rows = {r["type"]: r for r in ads.sync.rows()}
            assert ads.stats.responses - responses == 2 and rows["RouteConfiguration"]["responses"] == 1
            assert rows["Workload"]["responses"] == 1
            assert sum(r["responses"] for r in rows.values()) == 2 and ads.stats.nacks == 1
            assert client.snapshot is snaps[-1]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(None)

    asyncio.run(main())


def test_scoped_discovery_receives_only_the_declared_services_endpoints() -> None:
    from controlplane.xds.cache import SnapshotCache
    from controlplane.xds.server import AdsServicer, add_to_server

    async def main() -> None:
        cache = SnapshotCache()
        cache.set_default(_mesh_snapshot(extra=True))
        ads = AdsServicer(cache)
        server, target = await start_server(ads, add_to_server)
        snaps: list[Snapshot] = []
        client = AdsClient(target, "node-1", LOCAL, snaps.append, depends_on=["default/web"])
        task = asyncio.get_running_loop().create_task(client.run())
        try:
            for _ in range(1000):  # settled: the declared service's endpoints and the workload behind them
                if (snaps and any(s.ports[0].endpoints for s in snaps[-1].services)
                        and "node-2/default/web-2" in client.state.resources.workloads
                        and all(r["state"] == "synced" for r in ads.sync.rows())):
                    break
                await asyncio.sleep(0.01)
            by_svc = {s.key: s.ports[0].endpoints for s in snaps[-1].services}
            # Both services are known (CDS); only the declared one has endpoints.
            assert set(by_svc) == {"default/web", "default/api"}
            assert by_svc["default/web"] and by_svc["default/api"] == ()
            held = set(client.state.resources.assignments)
            assert held == {xdsnames.slice_name(xdsnames.cluster_name("web", "default", 80, "mesh"), "node-2")}
            # api's endpoints move: nothing reaches this node.
            responses = ads.stats.responses
            snap2 = _mesh_snapshot(extra=True)
            api = xdsnames.cluster_name("api", "default", 81, "mesh")
            eds = dict(snap2.get(xdsnames.ENDPOINT).resources)
            eds[xdsnames.slice_name(api, "node-2")] = pack(assignment("api", port=81, ip="10.0.0.77"))
            eds[api] = eds[xdsnames.slice_name(api, "node-2")]
            from controlplane.xds.cache import XdsSnapshot

            cache.set_default(XdsSnapshot.from_resources({
                **{t: dict(snap2.get(t).resources) for t in snap2.types}, xdsnames.ENDPOINT: eds}))
            await asyncio.sleep(0.3)
            assert ads.stats.responses == responses
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(None)

    asyncio.run(main())


def test_reconnects_while_control_plane_is_down() -> None:
    async def main() -> None:
        # Nothing listens on this port at first; the client keeps trying.
        probe = grpc.aio.server()
        port = probe.add_insecure_port("127.0.0.1:0")
        await probe.start()
        await probe.stop(None)
        target = f"127.0.0.1:{port}"
        client = AdsClient(target, "node-1", (), lambda s: None, backoff_initial_s=0.05, backoff_cap_s=0.1,
                           protocol="sotw")
        task = asyncio.get_running_loop().create_task(client.run())
        await asyncio.sleep(0.3)
        assert not client.connected and client.last_error
        fake = FakeAds()
        server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(fake, server)
        server.add_insecure_port(target)
        await server.start()
        try:
            first = await fake.next_request()
            assert first.node.id == "node-1"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(None)

    asyncio.run(main())


def test_backoff_grows_and_is_capped_with_jitter() -> None:
    delays = [backoff_delay(i, 0.2, 5.0, rand=lambda: 1.0) for i in range(8)]
    assert delays[:3] == [0.2, 0.4, 0.8] and max(delays) == 5.0
    assert backoff_delay(10, 0.2, 5.0, rand=lambda: 0.0) == 2.5


class FakeRegistry(mesh_pb2_grpc.RegistryServicer):
    def __init__(self) -> None:
        self.reports: asyncio.Queue[mesh_pb2.NodeReport] = asyncio.Queue()

    async def Session(self, request_iterator: Any, context: Any) -> AsyncIterator[mesh_pb2.LeaseGrant]:
        async for report in request_iterator:
            await self.reports.put(report)
            if report.HasField("register"):
                yield mesh_pb2.LeaseGrant(node_name=report.register.node_name, lease_seconds=1)


def test_registry_registers_heartbeats_and_reregisters() -> None:
    async def main() -> None:
        fake = FakeRegistry()
        server, target = await start_server(fake, mesh_pb2_grpc.add_RegistryServicer_to_server)
        reg = mesh_pb2.NodeRegistration(node_name="node-1", addresses=["10.0.0.2"], hbone_port=15008)
        session = RegistrySession(target, reg)
        task = asyncio.get_running_loop().create_task(session.run())
        try:
            first = await asyncio.wait_for(fake.reports.get(), 5)
            assert first.register.node_name == "node-1"
            beat = await asyncio.wait_for(fake.reports.get(), 5)  # at lease/3 = 0.33 s
            assert beat.HasField("heartbeat") and session.connected
            reg2 = mesh_pb2.NodeRegistration(node_name="node-1", addresses=["10.0.0.2"],
                                             workloads=[mesh_pb2.WorkloadRegistration(name="web")])
            session.update(reg2)
            while True:
                r = await asyncio.wait_for(fake.reports.get(), 5)
                if r.HasField("register"):
                    break
            assert r.register.workloads[0].name == "web"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(None)

    asyncio.run(main())


def test_one_reconnect_loop_backs_off_and_starts_over_after_progress() -> None:
    """cpchannel.keep_connected (the registry session's and the xDS client's loop):
    each end is reported with its reason, the delay doubles while sessions get
    nowhere and starts over after one that did; a refused RPC reaches on_rpc_error."""
    outcomes: list[object] = [OSError("refused"), OSError("refused"), True,
                              grpc.aio.AioRpcError(grpc.StatusCode.PERMISSION_DENIED, grpc.aio.Metadata(),
                                                   grpc.aio.Metadata(), "node not allowed")]
    ended: list[tuple[str, float]] = []
    refused: list[str] = []

    async def session() -> bool:
        if not outcomes:
            raise asyncio.CancelledError
        o = outcomes.pop(0)
        if isinstance(o, BaseException):
            raise o
        return bool(o)

    async def sleep(_: float) -> None:
        return None

    async def main() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await cpchannel.keep_connected(session, lambda r, d: ended.append((r, d)), what="test",
                                           on_rpc_error=lambda e: refused.append(str(e.details())),
                                           backoff_initial_s=1.0, backoff_cap_s=100.0, sleep=sleep)

    asyncio.run(main())
    assert [r for r, _ in ended] == ["refused", "refused", "the control plane closed the stream",
                                     "PERMISSION_DENIED: node not allowed"]
    # Attempts 0, 1, then 0 again after the session that progressed (jitter: 50-100 %).
    assert 0.5 <= ended[0][1] <= 1.0 and 1.0 <= ended[1][1] <= 2.0 and 0.5 <= ended[2][1] <= 1.0
    assert 1.0 <= ended[3][1] <= 2.0 and refused == ["node not allowed"]


def test_workload_subscription_follows_the_endpoints_held() -> None:
    """Pure: the Workload names a Delta agent subscribes to are its own and those
    behind the endpoint slices it holds; a slice that goes takes its workload's
    subscription (and the held copy) with it."""
    from nodeagent.xds.convert import NamedResource

    client = AdsClient("127.0.0.1:1", "node-1", LOCAL, lambda s: None)
    own = xdsnames.workload_resource_name("node-1", "default", "client")
    first = client.initial_delta_requests()
    wl_req = next(r for r in first if r.type_url == xdsnames.WORKLOAD)
    assert list(wl_req.resource_names_subscribe) == [own]  # by name, never "*"
    web = xdsnames.slice_name(xdsnames.cluster_name("web", "default", 80, "mesh"), "node-2")
    api = xdsnames.slice_name(xdsnames.cluster_name("api", "default", 81, "mesh"), "node-3")
    client.state.apply_delta(xdsnames.ENDPOINT, "v1", [
        NamedResource(web, pack(assignment())),
        NamedResource(api, pack(assignment("api", 81, "10.0.0.9", workload="default/api-1", node="node-3")))],
        [], {web: "1", api: "1"})
    req = client.workload_subscription_update()
    assert req is not None and not req.resource_names_unsubscribe
    assert sorted(req.resource_names_subscribe) == ["node-2/default/web-2", "node-3/default/api-1"]
    client.state.apply_delta(xdsnames.WORKLOAD, "w1", [
        NamedResource("node-3/default/api-1", pack(workload("api-1", node="node-3", ip="10.0.0.9")))],
        [], {"node-3/default/api-1": "1"})
    assert client.workload_subscription_update() is None  # nothing new
    # api's slice goes: its workload is unsubscribed and dropped locally (the server sends no removal).
    client.state.apply_delta(xdsnames.ENDPOINT, "v2", [], [api], {})
    req = client.workload_subscription_update()
    assert req is not None and list(req.resource_names_unsubscribe) == ["node-3/default/api-1"]
    assert "node-3/default/api-1" not in client.state.resources.workloads
