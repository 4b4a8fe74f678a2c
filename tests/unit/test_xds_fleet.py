"""xDS for a fleet: responses encoded once and shared, Delta answers split
below the message size limits, a change diffed by its own size, fan-out in
batches, and what Envoy would NACK refused at apply."""

from __future__ import annotations

import asyncio
import random

import pytest
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from controlplane.api import plan_changes
from controlplane.store import SQLiteStore
from controlplane.xds import validate as xds_validate
from controlplane.xds.cache import (
    NOT_FOUND,
    DeltaSubscription,
    SnapshotCache,
    TypeResources,
    WatchQueue,
    XdsSnapshot,
    content_version,
    delta_diff,
)
from controlplane.xds.delta import response_bytes, split_response
from controlplane.xds.server import sotw_response_bytes
from nodemesh import model, xdsnames
from nodemesh.cli.configcmds import bootstrap_listener
from nodemesh.v1 import mesh_pb2

T = xdsnames.WORKLOAD


def wl_any(name: str, ip: str, pad: int = 0) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(mesh_pb2.Workload(name=name, ip=ip, labels={"pad": "x" * pad} if pad else {}))
    return a


def tr(**workloads: str) -> TypeResources:
    res = {n: wl_any(n, ip) for n, ip in workloads.items()}
    return TypeResources(content_version(res), res)


def test_shared_bytes_decode_as_the_messages_they_stand_for() -> None:
    t = tr(a="10.0.0.1", b="10.0.0.2")
    raw = sotw_response_bytes(t.version, T, "7", t.wildcard_blob)
    msg = discovery_pb2.DiscoveryResponse.FromString(raw)
    assert msg.version_info == t.version and msg.nonce == "7" and msg.control_plane.identifier == "nodemesh"
    assert list(msg.resources) == [t.resources["a"], t.resources["b"]]
    d = delta_diff(T, t, DeltaSubscription(wildcard=True), {})
    assert d is not None
    raw = response_bytes(T, "9", d.system_version, d.resources, ("gone",), "nodemesh")
    dm = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
    assert [(r.name, r.version) for r in dm.resources] == [("a", t.resource_versions["a"]),
                                                          ("b", t.resource_versions["b"])]
    assert dm.resources[0].resource == t.resources["a"] and list(dm.removed_resources) == ["gone"]
    # Encoded once: the same bytes object serves every stream.
    assert t.delta_entry("a") is t.delta_entry("a") and t.wildcard_blob is t.wildcard_blob


def test_a_large_answer_is_split_into_responses_below_the_chunk_size() -> None:
    res = {f"w{i:05d}": wl_any(f"w{i:05d}", "10.0.0.1", pad=900) for i in range(3000)}
    t = TypeResources(content_version(res), res)
    d = delta_diff(T, t, DeltaSubscription(wildcard=True), {"old": "v"})
    assert d is not None
    parts = split_response(d, limit=256 * 1024)
    assert len(parts) > 10
    assert [r.name for p in parts for r in p[0]] == sorted(res)
    assert all(sum(len(r.encoded) for r in p[0]) <= 256 * 1024 for p in parts)
    assert [p[1] for p in parts][-1] == ("old",) and all(p[1] == () for p in parts[:-1])


def test_diff_by_changes_equals_the_full_diff() -> None:
    rng = random.Random(7)
    names = [f"n{i}" for i in range(40)]
    for _ in range(300):
        old = tr(**{n: f"10.0.0.{rng.randint(1, 3)}" for n in names if rng.random() < 0.7})
        new = tr(**{n: f"10.0.0.{rng.randint(1, 3)}" for n in names if rng.random() < 0.7})
        sub = DeltaSubscription(rng.random() < 0.5, frozenset(rng.sample(names, 5)))
        # A client in sync with `old` under `sub` (what the full diff leaves it with).
        first = delta_diff(T, old, sub, {})
        known = dict(first.known) if first is not None else {}
        assert delta_diff(T, old, sub, known) is None
        full = delta_diff(T, new, sub, known)
        fast = delta_diff(T, new, sub, known, new.changes_since(old))
        assert (full is None) == (fast is None)
        if full is not None and fast is not None:
            assert [r.name for r in full.resources] == [r.name for r in fast.resources]
            assert full.removed == fast.removed and dict(full.known) == dict(fast.known)
            assert all(v == NOT_FOUND for n, v in full.known.items() if n not in new.resources)


def test_fanout_in_batches_lets_the_loop_run_and_answers_everyone() -> None:
    async def body() -> None:
        c = SnapshotCache()
        s1 = XdsSnapshot.from_resources({T: {"a": wl_any("a", "10.0.0.1")}})
        c.set_default(s1)
        queues = []
        for i in range(1000):
            q, _ = c.create_delta_watch(f"n{i}", T, DeltaSubscription(wildcard=True),
                                        {"a": s1.get(T).resource_versions["a"]})
            assert q.empty()
            queues.append(q)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        s2 = XdsSnapshot.from_resources({T: {"a": wl_any("a", "10.0.0.1"), "b": wl_any("b", "10.0.0.2")}})
        result = await c.publish_default(s2, batch=100)
        t.cancel()
        assert result.answered == 1000 and ticks >= 9  # the loop ran between batches
        got = [q.get_nowait() for q in queues]
        assert {tuple(r.name for r in g.resources) for g in got} == {("b",)}
        # Every stream got the same encoded bytes, not a copy each.
        assert len({id(g.resources[0].encoded) for g in got}) == 1

    asyncio.run(body())


SERVICE = """
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, protocol: http}]}
"""


def test_what_envoy_would_nack_is_refused_at_apply_with_the_field(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The model refuses a zero back-off itself, naming the field.
    with pytest.raises(model.ValidationError, match=r"retry\.backoff: must be greater than 0"):
        model.parse_documents(SERVICE + """---
apiVersion: nodemesh.io/v1alpha1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: web}]
  rules: [{backendRefs: [{name: web}], retry: {attempts: 2, backoff: 0ms}}]
""")
    # The generic check reads Envoy's own PGV rules from the proto descriptors.
    rc = route_pb2.RouteConfiguration(name="x")
    r = rc.virtual_hosts.add(name="x", domains=["*"]).routes.add(name="r")
    r.match.prefix = "/"
    r.route.cluster = "c"
    r.route.retry_policy.retry_back_off.base_interval.FromNanoseconds(0)
    found = xds_validate.violations(rc)
    assert found == [("virtual_hosts[0].routes[0].route.retry_policy.retry_back_off.base_interval: "
                     "must be greater than 0s, is 0s")]
    r.route.ClearField("cluster")
    assert any("route.cluster_specifier: one of" in v for v in xds_validate.violations(rc))
    # A sound route passes through plan_changes untouched (no false refusals).
    store = SQLiteStore(str(tmp_path / "db"))
    try:
        docs = model.parse_documents(SERVICE + """---
apiVersion: nodemesh.io/v1alpha1
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{name: web}]
  rules: [{backendRefs: [{name: web}], timeouts: {request: 2s}, retry: {attempts: 2, backoff: 5ms}}]
""")
        assert len(plan_changes(store, docs).writes) == 2
    finally:
        store.close()


def test_grpcroute_timeout_is_also_max_stream_duration() -> None:
    from controlplane.xds import build_routes as xds_routes

    docs = model.parse_documents(SERVICE + """---
apiVersion: nodemesh.io/v1alpha1
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{name: web}]
  rules: [{backendRefs: [{name: web}], timeouts: {request: 1500ms}}]
""")
    svc = [d.obj for d in docs if isinstance(d.obj, model.ServiceSpec)]
    route = next(d.obj for d in docs if d.kind == "GRPCRoute")
    rcs = xds_routes.route_configurations(model.MeshConfig(), svc, [xds_routes.StoredRoute(route)])
    act = next(iter(rcs.values())).virtual_hosts[0].routes[0].route
    assert act.timeout.ToMilliseconds() == 1500
    assert act.max_stream_duration.max_stream_duration.ToMilliseconds() == 1500


def test_bootstrap_listener_names_the_route_table() -> None:
    assert bootstrap_listener("8080=web.shop:80", "mesh") == (8080, "outbound|80||web.shop.svc.mesh")
    with pytest.raises(ValueError, match="PORT=SERVICE.NAMESPACE:PORT"):
        bootstrap_listener("8080=web", "mesh")


def test_slices_are_reached_by_glob_only_and_a_change_sends_one_slice() -> None:
    c = xdsnames.cluster_name("web", "default", 80, "mesh")

    def eds(**nodes: str) -> TypeResources:
        res = {c: wl_any("all", "10.0.0.1")}
        res.update({xdsnames.slice_name(c, n): wl_any(n, ip) for n, ip in nodes.items()})
        return TypeResources(content_version(res), res)

    old = eds(a="10.0.0.1", b="10.0.0.2")
    wild = delta_diff(T, old, DeltaSubscription(wildcard=True), {})
    assert wild is not None and [r.name for r in wild.resources] == [c]  # no slices under "*"
    glob = DeltaSubscription(False, frozenset({xdsnames.slice_glob(c)}))
    first = delta_diff(T, old, glob, {})
    assert first is not None and [r.name for r in first.resources] == [
        xdsnames.slice_name(c, "a"), xdsnames.slice_name(c, "b")]
    assert first.removed == ()  # a glob is not a name that could be missing
    new = eds(a="10.0.0.1", b="10.0.0.9", z="10.0.0.5")
    for only in (None, new.changes_since(old)):
        d = delta_diff(T, new, glob, dict(first.known), only)
        assert d is not None and [r.name for r in d.resources] == [
            xdsnames.slice_name(c, "b"), xdsnames.slice_name(c, "z")]
    gone = eds(a="10.0.0.1")
    d = delta_diff(T, gone, glob, dict(first.known))
    assert d is not None and d.removed == (xdsnames.slice_name(c, "b"),)
    # A snapshot may not carry slices of a cluster it does not have.
    with pytest.raises(Exception, match="slices of no cluster"):
        XdsSnapshot.from_resources({xdsnames.CLUSTER: {}, xdsnames.ENDPOINT: {
            xdsnames.slice_name(c, "a"): wl_any("a", "10.0.0.1")}}).consistent()


def test_a_rebuild_hashes_and_encodes_only_what_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Carried over from the snapshot in force: unchanged resources keep their
    version and encoded entries; only the changed one is hashed again, and the
    type's version equals the one a fresh build gives."""
    from controlplane.xds import cache as xds_cache

    res = {f"n{i}": wl_any(f"n{i}", f"10.0.0.{i}") for i in range(50)}
    s1 = XdsSnapshot.from_resources({T: res})
    t1 = s1.get(T)
    entry = t1.delta_entry("n1")
    blob = t1.wildcard_blob
    hashed: list[str] = []
    real = xds_cache.resource_version

    def counting(a: any_pb2.Any) -> str:
        hashed.append(a.value.hex())
        return real(a)

    monkeypatch.setattr(xds_cache, "resource_version", counting)
    changed = dict(res)
    changed["n7"] = wl_any("n7", "10.9.9.9")  # a new object with new bytes
    changed["n8"] = wl_any("n8", "10.0.0.8")  # a new object, the same bytes
    s2 = XdsSnapshot.from_resources({T: changed}, s1)
    t2 = s2.get(T)
    assert len(hashed) == 1
    monkeypatch.setattr(xds_cache, "resource_version", real)
    assert t2.version == content_version(changed) != t1.version
    assert t2.resources["n8"] is t1.resources["n8"] and t2.delta_entry("n1") is entry
    assert t2.changes_since(t1) == {"n7"}
    assert t2.wildcard_blob != blob and discovery_pb2.DiscoveryResponse.FromString(
        sotw_response_bytes(t2.version, T, "1", t2.wildcard_blob)).resources[
            t2.wildcard_names.index("n7")] == changed["n7"]


def test_snapshots_replaced_are_not_kept_alive_by_the_remembered_changes() -> None:
    """Each set remembers what changed since the one it replaced, but must not hold
    it: a chain of strong references kept every snapshot ever built alive."""
    import gc
    import weakref

    first = XdsSnapshot.from_resources({T: {"a": wl_any("a", "10.0.0.1")}})
    gone = weakref.ref(first.get(T))
    snap = first
    for i in range(2, 12):
        snap = XdsSnapshot.from_resources({T: {"a": wl_any("a", f"10.0.0.{i}")}}, snap)
    del first
    gc.collect()
    assert gone() is None
    assert snap.get(T).changes_since(snap.get(T)) == frozenset()


def test_a_watch_answer_reaches_the_stream_directly_now_or_later() -> None:
    async def body() -> None:
        q: WatchQueue[str] = WatchQueue()
        assert q.empty()
        q.put_nowait("first")
        with pytest.raises(asyncio.QueueFull):  # one answer per watch
            q.put_nowait("second")
        got: list[str] = []
        q.deliver(got.append)  # the answer already there is handed over at once ...
        assert got == ["first"] and q.empty()
        q.put_nowait("later")  # ... and a later one as it comes, with no task between
        assert got == ["first", "later"]
        w: WatchQueue[str] = WatchQueue()  # without a deliverer it is a one-slot queue
        waiter = asyncio.create_task(w.get())
        await asyncio.sleep(0)
        w.put_nowait("x")
        assert await waiter == "x" and w.empty()
        with pytest.raises(asyncio.QueueEmpty):
            w.get_nowait()

    asyncio.run(body())


def test_the_full_diff_matches_the_rules_name_by_name() -> None:
    """delta_diff's set operations give what the rules say, name by name: sent when
    covered and not held at the current version (unless that version was rejected);
    removed when held or subscribed, gone, not already reported missing, and the
    removal not rejected."""
    from controlplane.xds.cache import REMOVAL, UNCERTAIN

    rng = random.Random(11)
    names = [f"n{i}" for i in range(30)]
    for _ in range(400):
        t = tr(**{n: f"10.0.0.{rng.randint(1, 3)}" for n in names if rng.random() < 0.6})
        v = t.resource_versions
        sub = DeltaSubscription(rng.random() < 0.4, frozenset(rng.sample(names, 8)))
        known = {n: rng.choice([v.get(n, "x"), "old", NOT_FOUND, UNCERTAIN]) for n in rng.sample(names, 10)}
        rejected = {n: rng.choice([v.get(n, "y"), REMOVAL]) for n in rng.sample(names, 3)}
        d = delta_diff(T, t, sub, known, rejected=rejected)
        wanted = (set(t.wildcard_names) if sub.wildcard else set()) | {n for n in sub.plain if n in v}
        changed = sorted(n for n in wanted if known.get(n) != v[n] and rejected.get(n) != v[n])
        removed = sorted(n for n in set(known) | sub.plain if n not in v
                         and known.get(n, UNCERTAIN) != NOT_FOUND and rejected.get(n) != REMOVAL)
        if not changed and not removed:
            assert d is None
        else:
            assert d is not None
            assert [r.name for r in d.resources] == changed and list(d.removed) == removed
