"""Delta (incremental) xDS: the cache's per-resource diff with queues alone, the
pure subscription rules, then the DeltaAggregatedResources servicer through an
in-process grpc.aio server and client."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from controlplane.xds.cache import (
    NOT_FOUND,
    UNCERTAIN,
    DeltaSubscription,
    SnapshotCache,
    XdsSnapshot,
    resource_version,
)
from controlplane.xds.delta import apply_subscription
from controlplane.xds.server import AdsServicer, add_to_server
from nodemesh import xdsnames
from nodemesh.v1 import mesh_pb2

T = xdsnames.WORKLOAD
WILD = DeltaSubscription(wildcard=True)


def wl_any(name: str, ip: str) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(mesh_pb2.Workload(name=name, ip=ip))
    return a


def snap(**workloads: str) -> XdsSnapshot:
    return XdsSnapshot.from_resources({T: {n: wl_any(n, ip) for n, ip in workloads.items()}})


def named(*names: str) -> DeltaSubscription:
    return DeltaSubscription(False, frozenset(names))


# ---------------------------------------------------------------- cache


def test_resource_versions_are_stable_and_per_resource() -> None:
    s1, s2 = snap(a="10.0.0.1", b="10.0.0.2"), snap(a="10.0.0.1", b="10.0.0.9")
    v1, v2 = s1.get(T).resource_versions, s2.get(T).resource_versions
    assert v1["a"] == v2["a"] == resource_version(wl_any("a", "10.0.0.1"))
    assert v1["b"] != v2["b"]


def test_wildcard_watch_sends_everything_then_only_changes_and_removals() -> None:
    c = SnapshotCache()
    c.set_default(snap(a="10.0.0.1", b="10.0.0.2"))
    q, _ = c.create_delta_watch("n1", T, WILD, {})
    r = q.get_nowait()
    assert [x.name for x in r.resources] == ["a", "b"] and r.removed == () and c.watch_count() == 0
    assert r.system_version == c.snapshot_for("n1").version(T)  # type: ignore[union-attr]
    known = r.known
    assert dict(known) == {x.name: x.version for x in r.resources}

    q, _ = c.create_delta_watch("n1", T, WILD, known)
    assert q.empty() and c.watch_count() == 1
    c.set_default(snap(a="10.0.0.1", b="10.0.0.2"))  # same content: still waiting
    assert q.empty()
    c.set_default(snap(a="10.0.0.1", b="10.0.0.9", c="10.0.0.3"))
    r = q.get_nowait()
    assert [x.name for x in r.resources] == ["b", "c"] and r.removed == ()
    q, _ = c.create_delta_watch("n1", T, WILD, r.known)
    c.set_default(snap(b="10.0.0.9", c="10.0.0.3"))
    r = q.get_nowait()
    assert r.resources == () and r.removed == ("a",) and set(r.known) == {"b", "c"}


def test_named_watch_reports_a_missing_name_once_then_its_creation() -> None:
    c = SnapshotCache()
    c.set_default(snap(a="10.0.0.1", other="10.0.0.7"))
    q, _ = c.create_delta_watch("n1", T, named("a", "ghost"), {})
    r = q.get_nowait()
    assert [x.name for x in r.resources] == ["a"] and r.removed == ("ghost",)
    assert r.known["ghost"] == NOT_FOUND
    q, _ = c.create_delta_watch("n1", T, named("a", "ghost"), r.known)
    c.set_default(snap(a="10.0.0.1", other="10.0.0.8"))  # not subscribed; ghost already reported
    assert q.empty()
    c.set_default(snap(a="10.0.0.1", ghost="10.0.0.5"))
    r = q.get_nowait()
    assert [x.name for x in r.resources] == ["ghost"] and r.removed == ()


def test_uncertain_copy_is_resolved_either_way_and_cancel_drops_the_watch() -> None:
    c = SnapshotCache()
    c.set_default(snap(a="10.0.0.1"))
    v = c.snapshot_for("n1").get(T).resource_versions["a"]  # type: ignore[union-attr]
    r = c.create_delta_watch("n1", T, WILD, {"a": UNCERTAIN, "x": UNCERTAIN})[0].get_nowait()
    assert [x.name for x in r.resources] == ["a"] and r.removed == ("x",) and dict(r.known) == {"a": v}
    q, cancel = c.create_delta_watch("n1", T, WILD, {"a": v})
    cancel()
    c.set_default(snap(a="10.0.0.2"))
    assert q.empty() and c.watch_count() == 0


def test_delta_watch_waits_for_a_first_snapshot_in_a_loop() -> None:
    async def main() -> list[str]:
        c = SnapshotCache()
        q, _ = c.create_delta_watch("n1", T, named("a"), {})
        asyncio.get_running_loop().call_later(0.01, c.set_snapshot, "n1", snap(a="10.0.0.1"))
        r = await asyncio.wait_for(q.get(), 1)
        return [x.name for x in r.resources]

    assert asyncio.run(main()) == ["a"]


# ---------------------------------------------------------------- subscription rules


def dreq(sub: tuple[str, ...] = (), unsub: tuple[str, ...] = (), initial: dict[str, str] | None = None,
         nonce: str = "", error: str = "", type_url: str = T) -> discovery_pb2.DeltaDiscoveryRequest:
    r = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=list(sub),
                                            resource_names_unsubscribe=list(unsub),
                                            initial_resource_versions=initial or {}, response_nonce=nonce)
    r.node.id = "delta-node"
    if error:
        r.error_detail.code = 3
        r.error_detail.message = error
    return r


def test_subscription_rules_follow_the_spec() -> None:
    empty = DeltaSubscription()
    # Legacy wildcard: an empty first request; explicit "*" too.
    assert apply_subscription(empty, {}, dreq(), True)[0] == WILD
    assert apply_subscription(empty, {}, dreq(("*",)), True)[0] == WILD
    # Adding a name keeps the wildcard; an empty later request is not a wildcard.
    sub, _ = apply_subscription(WILD, {}, dreq(("A",)), False)
    assert sub == DeltaSubscription(True, frozenset({"A"}))
    assert apply_subscription(named("A"), {}, dreq(), False)[0] == named("A")
    # Unsubscribing a name the wildcard may cover: the next answer must settle it.
    sub, held = apply_subscription(sub, {"A": "v1", "B": "v2"}, dreq(unsub=("A",)), False)
    assert sub == WILD and held == {"A": UNCERTAIN, "B": "v2"}
    # Unsubscribing "*" keeps named subscriptions and forgets the rest.
    sub, held = apply_subscription(DeltaSubscription(True, frozenset({"A"})), {"A": "v1", "B": "v2"},
                                   dreq(unsub=("*",)), False)
    assert sub == named("A") and held == {"A": "v1"}
    # Re-subscribing a held name forces a resend; phantom unsubscriptions are ignored.
    sub, held = apply_subscription(named("A"), {"A": "v1"}, dreq(("A",), ("zzz",)), False)
    assert sub == named("A") and held == {}
    # The first request's initial_resource_versions is what the client holds.
    sub, held = apply_subscription(empty, {}, dreq(("A", "B"), initial={"A": "v1", "C": "v3", "D": ""}), True)
    assert sub == named("A", "B") and held == {"A": "v1"}  # C: not subscribed; D: no version


# ---------------------------------------------------------------- servicer over grpc.aio


class DeltaClient:
    """A DeltaAggregatedResources stream read by a background task (cancelling
    a grpc.aio read would cancel the call)."""

    def __init__(self, ch: grpc.aio.Channel) -> None:
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).DeltaAggregatedResources()
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for r in self.call:
            await self.responses.put(r)

    async def send(self, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        await self.call.write(req)

    async def recv(self, timeout: float = 5.0) -> Any:
        return await asyncio.wait_for(self.responses.get(), timeout)

    async def nothing(self, timeout: float = 0.2) -> bool:
        try:
            r = await asyncio.wait_for(self.responses.get(), timeout)
        except TimeoutError:
            return True
        raise AssertionError(f"unexpected response: {r}")

    async def ack(self, r: Any) -> None:
        await self.send(dreq(nonce=r.nonce, type_url=r.type_url))

    def close(self) -> None:
        self._reader.cancel()
        self.call.cancel()


def names(r: Any) -> list[str]:
    return [x.name for x in r.resources]


def serve(fn: Callable[[SnapshotCache, AdsServicer, grpc.aio.Channel], Awaitable[None]]) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as d:
            cache = SnapshotCache()
            ads = AdsServicer(cache)
            server = grpc.aio.server()
            add_to_server(ads, server)
            target = f"unix:{os.path.join(d, 'ads.sock')}"
            server.add_insecure_port(target)
            await server.start()
            try:
                async with grpc.aio.insecure_channel(target) as ch:
                    await asyncio.wait_for(fn(cache, ads, ch), 20)
            finally:
                await server.stop(0)

    asyncio.run(main())


async def until(pred: Callable[[], bool]) -> None:
    for _ in range(200):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


def test_subscribe_ack_change_delete_unsubscribe() -> None:
    async def body(cache: SnapshotCache, ads: AdsServicer, ch: grpc.aio.Channel) -> None:
        cache.set_default(snap(a="10.0.0.1", b="10.0.0.2"))
        c = DeltaClient(ch)
        await c.send(dreq())  # legacy wildcard
        r = await c.recv()
        assert names(r) == ["a", "b"] and r.type_url == T and r.nonce and not r.removed_resources
        assert r.system_version_info == cache.snapshot_for("x").version(T)  # type: ignore[union-attr]
        assert mesh_pb2.Workload.FromString(r.resources[0].resource.value).ip == "10.0.0.1"
        assert r.resources[0].version == resource_version(wl_any("a", "10.0.0.1"))
        await c.ack(r)
        await until(lambda: ads.stats.acks == 1)
        assert await c.nothing()  # an ACK is not answered

        cache.set_default(snap(a="10.0.0.1", b="10.0.0.9"))  # one change: only it is sent
        r = await c.recv()
        assert names(r) == ["b"] and not r.removed_resources
        await c.ack(r)
        cache.set_default(snap(b="10.0.0.9"))  # a deletion
        r = await c.recv()
        assert names(r) == [] and list(r.removed_resources) == ["a"]
        await c.ack(r)

        # Switch to names: drop the wildcard, follow only "b" and a missing "m".
        await c.send(dreq(("b", "m"), ("*",)))
        r = await c.recv()
        assert names(r) == ["b"] and list(r.removed_resources) == ["m"]  # m does not exist
        await c.ack(r)
        await c.send(dreq(unsub=("b",)))  # unsubscribe: no answer needed, none sent
        assert await c.nothing()
        cache.set_default(snap(b="10.0.0.10", z="10.0.0.4"))  # b changed, z new: neither followed
        assert await c.nothing()
        cache.set_default(snap(m="10.0.0.6"))  # the missing name springs into existence
        r = await c.recv()
        assert names(r) == ["m"] and not r.removed_resources
        await c.ack(r)
        await until(lambda: ads.stats.acks == 5)
        assert ads.stats.nacks == 0 and ads.stats.streams_active == 1
        c.close()
        await until(lambda: ads.stats.streams_active == 0 and cache.watch_count() == 0)

    serve(body)


def test_reconnect_with_initial_resource_versions_sends_only_what_changed() -> None:
    async def body(cache: SnapshotCache, ads: AdsServicer, ch: grpc.aio.Channel) -> None:
        cache.set_default(snap(a="10.0.0.1", b="10.0.0.2", c="10.0.0.3"))
        c = DeltaClient(ch)
        await c.send(dreq(("*",)))
        r = await c.recv()
        held = {x.name: x.version for x in r.resources}
        await c.ack(r)
        c.close()

        # Same content on reconnect: nothing at all is sent.
        c = DeltaClient(ch)
        await c.send(dreq(("*",), initial=held))
        assert await c.nothing()
        c.close()

        # While away, b changed and c went away: only those come.
        cache.set_default(snap(a="10.0.0.1", b="10.0.0.9", d="10.0.0.4"))
        c = DeltaClient(ch)
        await c.send(dreq(initial=held))  # legacy wildcard, with versions
        r = await c.recv()
        assert names(r) == ["b", "d"] and list(r.removed_resources) == ["c"]
        await c.ack(r)
        assert await c.nothing()
        c.close()

    serve(body)


def test_nack_is_counted_logged_and_not_answered_with_a_resend(caplog: Any) -> None:
    async def body(cache: SnapshotCache, ads: AdsServicer, ch: grpc.aio.Channel) -> None:
        cache.set_default(snap(a="10.0.0.1", b="10.0.0.2"))
        c = DeltaClient(ch)
        await c.send(dreq(("a", "b")))
        r = await c.recv()
        await c.ack(r)
        cache.set_default(snap(a="10.0.0.99", b="10.0.0.2"))
        bad = await c.recv()
        assert names(bad) == ["a"]
        await c.send(dreq(nonce=bad.nonce, error="a: address 10.0.0.99 refused"))
        await until(lambda: ads.stats.nacks == 1)
        assert "delta-node" in ads.stats.last_nack and "10.0.0.99 refused" in ads.stats.last_nack
        assert await c.nothing()  # the rejected version is not resent
        # A later snapshot that changes only b sends only b; the NACKed a stays as sent.
        cache.set_default(snap(a="10.0.0.99", b="10.0.0.3"))
        r = await c.recv()
        assert names(r) == ["b"]
        await c.ack(r)
        # A stale nonce: not an ACK, but its subscription change is honoured.
        await c.send(dreq(("c",), nonce=bad.nonce))
        r = await c.recv()
        assert names(r) == [] and list(r.removed_resources) == ["c"]
        await until(lambda: ads.stats.stale_requests == 1)
        assert ads.stats.acks == 2 and ads.stats.nacks == 1
        c.close()

    with caplog.at_level("WARNING", logger="nodemesh.controlplane.xds.delta"):
        serve(body)
    msg = "\n".join(r.getMessage() for r in caplog.records)
    assert "node delta-node rejected" in msg and "1 resource(s): a" in msg and "NACK 1" in msg


def test_request_without_type_url_is_refused() -> None:
    async def body(cache: SnapshotCache, ads: AdsServicer, ch: grpc.aio.Channel) -> None:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).DeltaAggregatedResources()
        await call.write(discovery_pb2.DeltaDiscoveryRequest())
        try:
            await call.read()
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "type_url" in (e.details() or "")
        else:
            raise AssertionError("a request without type_url was accepted")

    serve(body)


def test_an_empty_type_is_answered_once_so_a_new_client_is_not_left_waiting() -> None:
    async def body(cache: SnapshotCache, ads: AdsServicer, ch: grpc.aio.Channel) -> None:
        cache.set_default(XdsSnapshot.from_resources({T: {}}))
        c = DeltaClient(ch)
        await c.send(dreq(("*",)))
        r = await c.recv()
        assert names(r) == [] and list(r.removed_resources) == [] and r.nonce
        await c.ack(r)
        assert await c.nothing()
        c.close()

    serve(body)


def test_after_a_nack_the_client_is_taken_to_hold_its_last_acked_versions() -> None:
    """The NACKed response's versions are not booked as held: a snapshot going back
    to what the client kept sends nothing, the rejected version is not offered
    again, and a newer version of the same resource is."""
    async def body(cache: SnapshotCache, ads: AdsServicer, ch: grpc.aio.Channel) -> None:
        cache.set_default(snap(a="10.0.0.1", b="10.0.0.2"))
        c = DeltaClient(ch)
        await c.send(dreq(("a", "b")))
        await c.ack(await c.recv())
        cache.set_default(snap(a="10.0.0.99", b="10.0.0.2"))
        bad = await c.recv()
        await c.send(dreq(nonce=bad.nonce, error="a: refused"))
        await until(lambda: ads.stats.nacks == 1)
        # b changes: only b travels; a's rejected version is not offered again.
        cache.set_default(snap(a="10.0.0.99", b="10.0.0.3"))
        r = await c.recv()
        assert names(r) == ["b"]
        await c.ack(r)
        # Back to the a the client kept: nothing to say (it was booked as holding .1, not .99).
        cache.set_default(snap(a="10.0.0.1", b="10.0.0.3"))
        assert await c.nothing()
        # A newer a than the rejected one is sent.
        cache.set_default(snap(a="10.0.0.7", b="10.0.0.3"))
        r = await c.recv()
        assert names(r) == ["a"]
        await c.ack(r)
        c.close()

    serve(body)


def test_after_nack_restores_only_what_no_later_response_changed() -> None:
    from controlplane.xds.cache import REMOVAL
    from controlplane.xds.delta import _Sent, after_nack

    sent = _Sent("v2", ("a", "b"), ("c",), {"a": ("a1", "a2"), "b": (None, "b2"), "c": ("c1", None)})
    # A later response changed a again (a3): that one decides a.
    known, rejected = after_nack({"a": "a3", "b": "b2", "d": "d1"}, {}, sent)
    assert known == {"a": "a3", "c": "c1", "d": "d1"}
    assert rejected == {"a": "a2", "b": "b2", "c": REMOVAL}


def test_queue_depth_counts_the_snapshot_versions_a_stream_has_not_caught_up_on() -> None:
    """versions_behind: 0 once answered; each snapshot published while a response
    waits for its answer counts one more; an ACK at the latest brings it back to 0,
    and a snapshot that holds nothing new for the stream leaves it at 0."""
    async def body(cache: SnapshotCache, ads: AdsServicer, ch: grpc.aio.Channel) -> None:
        cache.set_default(snap(a="10.0.0.1"))
        c = DeltaClient(ch)
        await c.send(dreq(("a",)))
        r = await c.recv()
        await until(lambda: ads.sync.versions_behind() == {"delta-node": 1})  # sent, not answered
        await c.ack(r)
        await until(lambda: ads.sync.versions_behind() == {"delta-node": 0})
        cache.set_default(snap(a="10.0.0.1", b="10.0.0.2"))  # b is not subscribed: nothing to send
        await until(lambda: ads.sync.versions_behind() == {"delta-node": 0})
        cache.set_default(snap(a="10.0.0.3", b="10.0.0.2"))
        r = await c.recv()
        cache.set_default(snap(a="10.0.0.4", b="10.0.0.2"))  # the client has not answered yet
        cache.set_default(snap(a="10.0.0.4", b="10.0.0.5"))
        await until(lambda: ads.sync.versions_behind() == {"delta-node": 3})
        await c.ack(r)
        r = await c.recv()  # a's newest version
        await c.ack(r)
        await until(lambda: ads.sync.versions_behind() == {"delta-node": 0})
        c.close()

    serve(body)


def test_a_plain_ack_looks_only_at_what_changed_and_anything_else_at_everything(monkeypatch: Any) -> None:
    """An ACK's watch starts from the set the answer came from: it compares only the
    names changed since (also when a change lands between the answer and its ACK);
    a subscription change or a NACK compares the whole subscription."""
    from controlplane.xds import cache as xds_cache

    full: list[int] = []
    real = xds_cache.delta_diff

    def spy(*a: Any, **kw: Any) -> Any:
        if (a[4] if len(a) > 4 else kw.get("only")) is None:
            full.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(xds_cache, "delta_diff", spy)
    many = {f"w{i:03d}": f"10.0.0.{i % 250 + 1}" for i in range(200)}

    async def body(cache: SnapshotCache, ads: AdsServicer, ch: grpc.aio.Channel) -> None:
        cache.set_default(snap(**many))
        c = DeltaClient(ch)
        await c.send(dreq(("*",)))
        r = await c.recv()
        assert len(r.resources) == 200 and len(full) == 1
        cache.set_default(snap(**{**many, "w007": "10.9.9.9"}))  # changed before the ACK
        await c.ack(r)
        r = await c.recv()
        assert names(r) == ["w007"] and len(full) == 1  # found by the change alone
        await c.ack(r)
        await until(lambda: ads.stats.acks == 2)
        assert await c.nothing() and len(full) == 1
        await c.send(dreq(("extra",)))  # a subscription change: everything is compared
        r = await c.recv()
        assert list(r.removed_resources) == ["extra"] and len(full) == 2
        await c.send(dreq(nonce=r.nonce, error="no"))  # a NACK: everything again
        await until(lambda: ads.stats.nacks == 1)
        assert await c.nothing() and len(full) == 3
        c.close()

    serve(body)
