"""SQLiteStore: one transaction and one revision per batch, persistence across
restarts, watches, node records; and VIP allocation with its planning rules."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from pathlib import Path

import pytest

from controlplane.api import current_services, plan_changes
from controlplane.store import (
    ADDED,
    DELETED,
    MODIFIED,
    Delete,
    NodeRecord,
    Put,
    SQLiteStore,
    StoreError,
    StoreEvent,
)
from controlplane.vip import VipExhausted, allocate_vip, is_usable
from nodemesh import model


def put(name: str, spec: dict[str, object] | None = None, ns: str = "default") -> Put:
    return Put("Service", ns, name, json.dumps(spec or {"a": 1}))


def test_batch_shares_one_revision_and_unchanged_does_not_bump(tmp_path: Path) -> None:
    s = SQLiteStore(str(tmp_path / "db"))
    assert s.revision() == 0
    res = s.apply([put("a"), put("b")])
    assert [(r.name, r.action, r.resource_version) for r in res] == [("a", "created", 1), ("b", "created", 1)]
    res = s.apply([put("a"), put("b", {"a": 2})])
    assert [(r.action, r.resource_version) for r in res] == [("unchanged", 1), ("configured", 2)]
    assert s.revision() == 2
    # Key order and spacing do not count as a change.
    assert s.apply([Put("Service", "default", "a", '{ "a" : 1 }')])[0].action == "unchanged"
    b = s.get("Service", "default", "b")
    assert b is not None and b.spec() == {"a": 2} and b.created_unix_ms <= b.updated_unix_ms
    assert s.apply([Delete("Service", "default", "zzz")])[0].action == "not_found"
    assert s.revision() == 2


def test_a_failing_batch_writes_nothing(tmp_path: Path) -> None:
    s = SQLiteStore(str(tmp_path / "db"))
    s.apply([put("a")])
    with pytest.raises(ValueError):  # json.JSONDecodeError
        s.apply([put("b"), Put("Service", "default", "c", "not json")])
    assert s.get("Service", "default", "b") is None
    assert s.revision() == 1


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    s = SQLiteStore(str(tmp_path / "db"))
    assert s.apply([put("a")], dry_run=True)[0].action == "created"
    assert s.list() == ([], 0)


def test_everything_survives_a_restart_and_wal_is_on(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    s = SQLiteStore(path)
    s.apply([put("a"), put("b", ns="x")])
    s.apply([Delete("Service", "default", "a")])
    s.save_node(NodeRecord("node-a", b"\x01\x02", 1234))
    s.close()
    s2 = SQLiteStore(path)
    items, rev = s2.list()
    assert [(r.namespace, r.name) for r in items] == [("x", "b")] and rev == 2
    assert s2.load_nodes() == [NodeRecord("node-a", b"\x01\x02", 1234)]
    assert s2._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s2.delete_node("node-a")
    assert s2.load_nodes() == []
    s2.close()


def test_list_filters_by_kind_and_namespace(tmp_path: Path) -> None:
    s = SQLiteStore(str(tmp_path / "db"))
    s.apply([put("a", ns="x"), put("b", ns="y"), Put("MeshConfig", "", "mesh", "{}")])
    assert [r.name for r in s.list("Service")[0]] == ["a", "b"]
    assert [r.name for r in s.list(None, "y")[0]] == ["b"]
    assert [r.name for r in s.list("MeshConfig")[0]] == ["mesh"]


def test_watch_replays_then_follows(tmp_path: Path) -> None:
    async def main() -> None:
        s = SQLiteStore(str(tmp_path / "db"))
        s.apply([put("a")])
        s.apply([put("b", ns="other")])
        got: list[StoreEvent] = []

        async def consume(it: object, n: int) -> None:
            async for ev in it:  # type: ignore[attr-defined]
                got.append(ev)
                if len(got) == n:
                    return

        # From 0: current state (namespace default only) then live changes.
        task = asyncio.create_task(consume(s.watch("Service", "default", 0), 3))
        await asyncio.sleep(0.01)
        s.apply([put("a", {"a": 5})])
        s.apply([put("c", ns="other")])  # filtered out
        s.apply([Delete("Service", "default", "a")])
        await asyncio.wait_for(task, 2)
        assert [(e.type, e.resource.name, e.revision) for e in got] == [
            (ADDED, "a", 2), (MODIFIED, "a", 3), (DELETED, "a", 5)]
        # Resume from a revision: every change after it, including the delete.
        got.clear()
        await asyncio.wait_for(consume(s.watch(None, None, 2), 3), 2)
        assert [(e.type, e.resource.name) for e in got] == [(MODIFIED, "a"), (ADDED, "c"), (DELETED, "a")]
        with pytest.raises(StoreError):
            async for _ in s.watch(since_revision=99):
                pass

    asyncio.run(main())


# ---------------------------------------------------------------- VIPs


def test_allocate_vip_is_deterministic_and_skips_taken_and_edges() -> None:
    net = ipaddress.IPv4Network("10.0.0.0/29")  # 6 usable
    first = allocate_vip(net, "default/web", set())
    assert allocate_vip(net, "default/web", set()) == first
    assert is_usable(net, first)
    taken = {first}
    nxt = allocate_vip(net, "default/web", taken)
    assert nxt != first and is_usable(net, nxt)
    all_taken: set[str] = set()
    for i in range(6):
        all_taken.add(allocate_vip(net, f"ns/s{i}", all_taken))
    assert len(all_taken) == 6 and "10.0.0.0" not in all_taken and "10.0.0.7" not in all_taken
    with pytest.raises(VipExhausted):
        allocate_vip(net, "ns/more", all_taken)


def _docs(text: str) -> list[model.Document]:
    return model.parse_documents(text)


def _svc(name: str, extra: str = "") -> str:
    return (f"apiVersion: nodemesh.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\n"
            f"spec:\n  ports: [{{port: 80}}]\n  selector: {{app: {name}}}\n{extra}")


def _vips(s: SQLiteStore) -> dict[str, str]:
    return {e.service.name: e.vip for e in current_services(s)}


def test_vips_are_stable_unique_released_and_follow_the_range(tmp_path: Path) -> None:
    s = SQLiteStore(str(tmp_path / "db"))
    s.apply(plan_changes(s, _docs(_svc("a") + "---\n" + _svc("b"))).writes)
    v1 = _vips(s)
    assert len(set(v1.values())) == 2 and all(v.startswith("240.240.") for v in v1.values())
    # Re-applying keeps the VIP and changes nothing.
    res = s.apply(plan_changes(s, _docs(_svc("a"))).writes)
    assert res[0].action == "unchanged" and _vips(s) == v1
    # A fixed VIP that another service holds by allocation moves that one away.
    s.apply(plan_changes(s, _docs(_svc("c", f"  vip: {v1['a']}\n"))).writes)
    v2 = _vips(s)
    assert v2["c"] == v1["a"] and v2["a"] != v1["a"] and v2["b"] == v1["b"]
    # Two fixed VIPs may not collide.
    with pytest.raises(model.ValidationError) as e:
        plan_changes(s, _docs(_svc("d", f"  vip: {v1['a']}\n")))
    assert "already the fixed VIP of Service default/c" in str(e.value)
    # Delete releases the VIP.
    s.apply(plan_changes(s, [], [("Service", "default", "c")]).writes)
    assert "c" not in _vips(s)
    # A new range re-allocates allocated VIPs in the same transaction.
    mesh = "apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {vipRange: 10.5.0.0/24}\n"
    plan = plan_changes(s, _docs(mesh))
    assert plan.reported == 1 and len(plan.writes) == 3
    s.apply(plan.writes)
    assert all(ipaddress.ip_address(v) in ipaddress.ip_network("10.5.0.0/24") for v in _vips(s).values())


def test_db_file_is_where_asked(tmp_path: Path) -> None:
    SQLiteStore(str(tmp_path / "x.db")).close()
    assert os.path.exists(tmp_path / "x.db")
    with pytest.raises(StoreError) as e:
        SQLiteStore(str(tmp_path / "missing" / "x.db"))
    assert "writable" in str(e.value)
