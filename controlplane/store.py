"""Durable config storage: resources keyed by (kind, namespace, name) under one
store-wide monotonic revision, node registrations, and watches fed in process.

`Store` is the interface (controlplane/store_etcd.py is the etcd backend); `SQLiteStore` keeps
state in one SQLite file in WAL mode. A batch is one transaction and one
revision, as in etcd: every write of an apply shares the revision it created.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from nodemesh.model import API_VERSION

ADDED = "ADDED"
MODIFIED = "MODIFIED"
DELETED = "DELETED"

# Watches that resume from a revision replay the event log; older entries are
# dropped beyond this many, and a watch from before them must re-list.
EVENT_LOG_RETENTION = 10_000


class StoreError(Exception):
    """A store operation that cannot be done; the message says what to check."""


class CompactedError(StoreError):
    """A watch asked to resume from a revision whose events were compacted away."""


@dataclass(frozen=True)
class StoredResource:
    kind: str
    namespace: str
    name: str
    spec_json: str
    status_json: str = "{}"
    labels: tuple[tuple[str, str], ...] = ()
    api_version: str = API_VERSION
    resource_version: int = 0
    created_unix_ms: int = 0
    updated_unix_ms: int = 0

    @property
    def ref(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    def spec(self) -> dict[str, object]:
        value = json.loads(self.spec_json)
        if not isinstance(value, dict):
            raise ValueError(f"{self.kind} {self.namespace}/{self.name}: stored spec is not a JSON object")
        return value

    def status(self) -> dict[str, object]:
        value = json.loads(self.status_json or "{}")
        if not isinstance(value, dict):
            raise ValueError(f"{self.kind} {self.namespace}/{self.name}: stored status is not a JSON object")
        return value


@dataclass(frozen=True)
class Put:
    kind: str
    namespace: str
    name: str
    spec_json: str
    status_json: str = "{}"
    labels: tuple[tuple[str, str], ...] = ()
    api_version: str = API_VERSION

    @property
    def ref(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)


@dataclass(frozen=True)
class Delete:
    kind: str
    namespace: str
    name: str

    @property
    def ref(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)


Write = Put | Delete


@dataclass(frozen=True)
class WriteResult:
    kind: str
    namespace: str
    name: str
    action: str  # created | configured | unchanged | deleted | not_found
    resource_version: int


@dataclass(frozen=True)
class StoreEvent:
    type: str  # ADDED | MODIFIED | DELETED
    resource: StoredResource
    revision: int


@dataclass(frozen=True)
class NodeRecord:
    name: str
    registration: bytes  # a serialized nodemesh.v1.NodeRegistration
    lease_expiry_unix_ms: int


@dataclass(frozen=True)
class NodeLiveness:
    """How long the replica holding a node's registry session last said it is alive
    (controlplane/noderegistry.py publishes it at a bounded rate): the node's lease
    ran until `until_unix_ms` as of the last publication. `token` identifies that
    publication, so an expiry decided on it loses to a later one (etcd: the key's
    mod_revision)."""

    until_unix_ms: int
    replica: str
    token: int


class Store(abc.ABC):
    """What the control plane needs from durable storage."""

    @abc.abstractmethod
    def revision(self) -> int: ...

    @abc.abstractmethod
    def apply(self, writes: Sequence[Write], dry_run: bool = False) -> builtins.list[WriteResult]:
        """Apply every write or none. Writes that change nothing are 'unchanged'
        and do not bump the revision; a batch of only those keeps it."""

    @abc.abstractmethod
    def get(self, kind: str, namespace: str, name: str) -> StoredResource | None: ...

    @abc.abstractmethod
    def list(self, kind: str | None = None, namespace: str | None = None) -> tuple[builtins.list[StoredResource], int]:
        """Resources sorted by (kind, namespace, name), and the revision they reflect."""

    def delete(self, kind: str, namespace: str, name: str) -> WriteResult:
        return self.apply([Delete(kind, namespace, name)])[0]

    @abc.abstractmethod
    def watch(self, kind: str | None = None, namespace: str | None = None,
              since_revision: int = 0) -> AsyncIterator[StoreEvent]:
        """since_revision 0: current state as ADDED events, then changes.
        Otherwise: every change after that revision, then live changes."""

    @abc.abstractmethod
    def save_node(self, record: NodeRecord) -> None: ...

    @abc.abstractmethod
    def delete_node(self, name: str) -> None: ...

    @abc.abstractmethod
    def load_nodes(self) -> builtins.list[NodeRecord]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    # Several control plane replicas on one store (controlplane/store_etcd.py) need
    # these; a store only one process uses keeps the defaults.
    shares_state: bool = False  # node records, operators, tokens and audit are shared between replicas

    def publish_liveness(self, name: str, until_unix_ms: int) -> None:
        """The replica holding `name`'s session says its lease now runs until then
        (called at a bounded rate, controlplane/noderegistry.py). A store only one
        control plane uses has nobody to tell: that control plane holds every
        session and knows each lease itself."""
        return

    def node_liveness(self) -> dict[str, NodeLiveness]:
        """The last published liveness of every stored node (empty: none published)."""
        return {}

    def liveness_view_since(self) -> float:
        """Unix time since which the published liveness reached this replica without a
        break (the store unreachable): no published lease is judged stale before a
        lease from then. 0: always (nothing is published here)."""
        return 0.0

    async def expire_node(self, name: str, seen: NodeLiveness | None) -> bool:
        """Delete a node whose lease lapsed, as the leader decided from `seen` (its
        last published liveness, None when the session is held here). True when it
        was deleted; False when the decision no longer holds: this replica is not
        the leader any more, or the node's liveness was published again since `seen`.
        A store only one control plane uses is always led by it."""
        self.delete_node(name)
        return True

    def apply_planned(self, plan: Callable[[], Sequence[Write]],
                      dry_run: bool = False) -> builtins.list[WriteResult]:
        """Apply the writes `plan()` computes from what it reads in this store (VIPs
        from the services already stored). A store that other processes write re-runs
        `plan` when the state it read changed before the write; here nothing can
        come in between."""
        return self.apply(plan(), dry_run)

    async def apply_planned_async(self, plan: Callable[[], Sequence[Write]],
                                  dry_run: bool = False) -> builtins.list[WriteResult]:
        """apply_planned for the event loop. A store whose writes wait on the network
        overrides it so the loop never waits (store_etcd.py); a local one writes here,
        plan and write in one step of the loop."""
        return self.apply_planned(plan, dry_run)


T = TypeVar("T")


async def off_loop(blocking: bool, fn: Callable[..., T], *args: Any) -> T:
    """Call a store-backed method from the event loop: in a worker thread when it
    waits on the network (`blocking`, e.g. EtcdJoinTokens.blocking), else here."""
    if blocking:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


@dataclass(eq=False)
class _Subscriber:
    kind: str | None
    namespace: str | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StoreEvent] = field(default_factory=asyncio.Queue)

    def wants(self, ev: StoreEvent) -> bool:
        r = ev.resource
        return (self.kind is None or r.kind == self.kind) and (
            self.namespace is None or r.namespace == self.namespace)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    api_version TEXT NOT NULL, spec_json TEXT NOT NULL, status_json TEXT NOT NULL,
    labels_json TEXT NOT NULL, resource_version INTEGER NOT NULL,
    created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
    PRIMARY KEY (kind, namespace, name));
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, revision INTEGER NOT NULL, type TEXT NOT NULL,
    kind TEXT NOT NULL, namespace TEXT NOT NULL, resource_json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_revision ON events (revision);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, registration BLOB NOT NULL, lease_expiry_ms INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0), ('compacted', 0);
"""

_COLUMNS = ("kind, namespace, name, api_version, spec_json, status_json, labels_json, "
            "resource_version, created_ms, updated_ms")
# Columns and clauses are constants; every value is bound with "?".
_SELECT_ALL = f"SELECT {_COLUMNS} FROM resources"  # noqa: S608
_SELECT_ONE = _SELECT_ALL + " WHERE kind = ? AND namespace = ? AND name = ?"
_UPSERT = f"INSERT OR REPLACE INTO resources ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"  # noqa: S608


def _row_to_resource(row: Sequence[object]) -> StoredResource:
    labels = json.loads(str(row[6]))
    return StoredResource(
        kind=str(row[0]), namespace=str(row[1]), name=str(row[2]), api_version=str(row[3]),
        spec_json=str(row[4]), status_json=str(row[5]), labels=tuple(sorted(labels.items())),
        resource_version=int(row[7]),  # type: ignore[call-overload]
        created_unix_ms=int(row[8]),  # type: ignore[call-overload]
        updated_unix_ms=int(row[9]),  # type: ignore[call-overload]
    )


def _resource_to_json(r: StoredResource) -> str:
    return json.dumps({
        "kind": r.kind, "namespace": r.namespace, "name": r.name, "api_version": r.api_version,
        "spec_json": r.spec_json, "status_json": r.status_json, "labels": dict(r.labels),
        "resource_version": r.resource_version, "created_unix_ms": r.created_unix_ms,
        "updated_unix_ms": r.updated_unix_ms,
    }, sort_keys=True)


def _resource_from_json(text: str) -> StoredResource:
    d = json.loads(text)
    d["labels"] = tuple(sorted(d["labels"].items()))
    return StoredResource(**d)


def _canonical_json(text: str) -> str:
    # Compare specs by content, not by key order or spacing.
    return json.dumps(json.loads(text or "{}"), sort_keys=True, separators=(",", ":"))


class SQLiteStore(Store):
    """A Store in one SQLite file. Calls are synchronous and short; the
    control plane makes them from its event loop."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._subscribers: builtins.list[_Subscriber] = []
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the store at {path}: {e}; check that the state "
                             "directory exists and is writable") from e

    # ------------------------------------------------------------ reads

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def revision(self) -> int:
        with self._lock:
            return self._meta("revision")

    def get(self, kind: str, namespace: str, name: str) -> StoredResource | None:
        with self._lock:
            row = self._db.execute(
                _SELECT_ONE,
                (kind, namespace, name)).fetchone()
        return _row_to_resource(row) if row else None

    def list(self, kind: str | None = None, namespace: str | None = None) -> tuple[builtins.list[StoredResource], int]:
        with self._lock:
            return self._list_locked(kind, namespace)

    def _list_locked(self, kind: str | None, namespace: str | None) -> tuple[builtins.list[StoredResource], int]:
        where, args = [], []
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if namespace:
            where.append("namespace = ?")
            args.append(namespace)
        sql = _SELECT_ALL
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY kind, namespace, name"
        rows = self._db.execute(sql, args).fetchall()
        return [_row_to_resource(r) for r in rows], self._meta("revision")

    # ------------------------------------------------------------ writes

    def apply(self, writes: Sequence[Write], dry_run: bool = False) -> builtins.list[WriteResult]:
        now_ms = int(self._clock() * 1000)
        events: builtins.list[StoreEvent] = []
        results: builtins.list[WriteResult] = []
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                rev = self._meta("revision")
                new_rev = rev + 1
                changed = False
                for w in writes:
                    row = db.execute(
                        _SELECT_ONE,
                        w.ref).fetchone()
                    old = _row_to_resource(row) if row else None
                    if isinstance(w, Delete):
                        if old is None:
                            results.append(WriteResult(*w.ref, "not_found", rev))
                            continue
                        db.execute("DELETE FROM resources WHERE kind = ? AND namespace = ? AND name = ?",
                                   w.ref)
                        gone = replace(old, resource_version=new_rev, updated_unix_ms=now_ms)
                        events.append(StoreEvent(DELETED, gone, new_rev))
                        results.append(WriteResult(*w.ref, "deleted", new_rev))
                        changed = True
                        continue
                    spec = _canonical_json(w.spec_json)
                    status = _canonical_json(w.status_json)
                    labels = tuple(sorted(w.labels))
                    if old is not None and (old.spec_json, old.status_json, old.labels, old.api_version) == (
                            spec, status, labels, w.api_version):
                        results.append(WriteResult(*w.ref, "unchanged", old.resource_version))
                        continue
                    res = StoredResource(
                        kind=w.kind, namespace=w.namespace, name=w.name, spec_json=spec,
                        status_json=status, labels=labels, api_version=w.api_version,
                        resource_version=new_rev,
                        created_unix_ms=old.created_unix_ms if old else now_ms, updated_unix_ms=now_ms)
                    db.execute(
                        _UPSERT,
                        (res.kind, res.namespace, res.name, res.api_version, res.spec_json,
                         res.status_json, json.dumps(dict(labels), sort_keys=True),
                         res.resource_version, res.created_unix_ms, res.updated_unix_ms))
                    events.append(StoreEvent(MODIFIED if old else ADDED, res, new_rev))
                    results.append(WriteResult(*w.ref, "configured" if old else "created", new_rev))
                    changed = True
                if changed:
                    db.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (new_rev,))
                    for ev in events:
                        r = ev.resource
                        db.execute("INSERT INTO events (revision, type, kind, namespace, resource_json) "
                                   "VALUES (?,?,?,?,?)",
                                   (new_rev, ev.type, r.kind, r.namespace, _resource_to_json(r)))
                    self._compact_locked()
                if dry_run:
                    db.execute("ROLLBACK")
                    return results
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self._notify(events)
        return results

    def _compact_locked(self) -> None:
        row = self._db.execute("SELECT MAX(seq) FROM events").fetchone()
        max_seq = int(row[0] or 0)
        cutoff = max_seq - EVENT_LOG_RETENTION
        if cutoff <= 0:
            return
        row = self._db.execute("SELECT MAX(revision) FROM events WHERE seq <= ?", (cutoff,)).fetchone()
        if row and row[0] is not None:
            # Drop whole revisions only, so a resumed watch never sees half a batch.
            compacted = int(row[0])
            self._db.execute("DELETE FROM events WHERE revision <= ?", (compacted,))
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'compacted'", (compacted,))

    def _notify(self, events: Iterable[StoreEvent]) -> None:
        for ev in events:
            for sub in list(self._subscribers):
                if sub.wants(ev):
                    sub.loop.call_soon_threadsafe(sub.queue.put_nowait, ev)

    # ------------------------------------------------------------ watch

    async def watch(self, kind: str | None = None, namespace: str | None = None,
                    since_revision: int = 0) -> AsyncIterator[StoreEvent]:
        sub = _Subscriber(kind or None, namespace or None, asyncio.get_running_loop())
        # Subscribe before reading the backlog so nothing committed in between is lost;
        # live events at or below the backlog's revision are duplicates and skipped.
        with self._lock:
            self._subscribers.append(sub)
            try:
                backlog, at = self._backlog_locked(sub, since_revision)
            except BaseException:
                self._subscribers.remove(sub)
                raise
        try:
            for ev in backlog:
                yield ev
            while True:
                ev = await sub.queue.get()
                if ev.revision > at:
                    yield ev
        finally:
            with self._lock:
                if sub in self._subscribers:
                    self._subscribers.remove(sub)

    def _backlog_locked(self, sub: _Subscriber, since: int) -> tuple[builtins.list[StoreEvent], int]:
        rev = self._meta("revision")
        if since <= 0:
            resources, rev = self._list_locked(sub.kind, sub.namespace)
            return [StoreEvent(ADDED, r, rev) for r in resources], rev
        if since > rev:
            raise StoreError(f"watch from revision {since} but the store is at {rev}; "
                             "use a revision returned by List")
        compacted = self._meta("compacted")
        if since < compacted:
            raise CompactedError(f"revision {since} was compacted (oldest kept is {compacted + 1}); "
                                 "re-list and watch from the listed revision")
        rows = self._db.execute(
            "SELECT type, revision, resource_json FROM events WHERE revision > ? ORDER BY seq",
            (since,)).fetchall()
        out = [StoreEvent(str(t), _resource_from_json(str(j)), int(r)) for t, r, j in rows]
        return [e for e in out if sub.wants(e)], rev

    # ------------------------------------------------------------ nodes

    def save_node(self, record: NodeRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO nodes (name, registration, lease_expiry_ms) VALUES (?,?,?)",
                (record.name, record.registration, record.lease_expiry_unix_ms))

    def delete_node(self, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM nodes WHERE name = ?", (name,))

    def load_nodes(self) -> builtins.list[NodeRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, registration, lease_expiry_ms FROM nodes ORDER BY name").fetchall()
        return [NodeRecord(str(n), bytes(b), int(e)) for n, b, e in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
