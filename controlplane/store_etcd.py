"""The Store in etcd, for several control plane replicas serving one mesh.

Layout under the prefix (default /nodemesh):
  <p>/res/<kind>/<namespace>/<name>  a config resource (JSON); its resource_version is the key's mod_revision
  <p>/guard/config                   bumped by every config write: a planned apply (VIP allocation)
                                     compares it, so two replicas never plan from the same state
  <p>/nodes/<name>                   a node registration, under the etcd lease of the replica holding the
                                     agent's registry session: a replica that dies takes its nodes with it
                                     after the lease TTL, unless their agents re-register elsewhere
  <p>/operators/<name>, <p>/tokens/<id>, <p>/audit/<ms>-<n>   access control (controlplane/auth.py, tokens.py)
  <p>/cp-ca-pin                      SHA-256 of the control-plane CA certificate every replica must hold

The store-wide revision is etcd's revision. A batch is one etcd txn whose
compares hold the mod_revision of every key it read, so concurrent writers on
other replicas never lose an update: on a conflict the batch is read and
computed again (a few times, then the caller is told the store is busy).
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import hmac
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from controlplane.auth import Operators
from controlplane.etcd_client import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    WatchEvent,
    compare,
    delete_op,
    prefix_end,
    put_op,
    range_op,
)
from controlplane.store import (
    ADDED,
    DELETED,
    MODIFIED,
    CompactedError,
    Delete,
    Event,
    NodeRecord,
    Put,
    Store,
    StoredResource,
    StoreError,
    Write,
    WriteResult,
)
from controlplane.tokens import JoinTokens

if TYPE_CHECKING:
    from controlplane.registry import NodeRegistry

log = logging.getLogger("nodemesh.controlplane.store_etcd")

DEFAULT_PREFIX = "/nodemesh"
DEFAULT_NODE_LEASE_S = 15.0
MAX_TXN_ATTEMPTS = 16  # concurrent writers: re-read and re-plan this many times before "busy"
WATCH_RETRY_S = 1.0


class _Stale(Exception):
    """The state a planned apply read changed before its write."""


def _canonical_json(text: str) -> str:
    return json.dumps(json.loads(text or "{}"), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class NodeChange:
    name: str
    record: NodeRecord | None  # None: the registration is gone (deleted or its lease ran out)
    mine: bool  # written under this replica's lease


class EtcdStore(Store):
    """A Store in etcd. Calls block briefly (one or two HTTP round trips); the
    control plane makes them from its event loop, as it does with SQLite."""

    shares_state = True

    def __init__(self, endpoints: Sequence[str], prefix: str = DEFAULT_PREFIX, *,
                 clock: Callable[[], float] = time.time, node_lease_s: float = DEFAULT_NODE_LEASE_S,
                 timeout_s: float = 5.0) -> None:
        if not prefix.startswith("/") or prefix.rstrip("/") == "":
            raise StoreError(f"etcd prefix {prefix!r} must start with '/' and name a directory, e.g. /nodemesh")
        self._client = EtcdClient(endpoints, timeout_s)
        self._p = prefix.rstrip("/").encode()
        self._clock = clock
        self.node_lease_s = node_lease_s
        self.replica_id = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._lease = 0
        self._mine: dict[str, NodeRecord] = {}  # registrations this replica wrote and still holds
        self._stop = threading.Event()
        self._keepalive: threading.Thread | None = None
        try:
            self._client.revision()
        except EtcdError as e:
            raise StoreError(f"cannot open the etcd store: {e}") from None

    # ------------------------------------------------------------ keys

    def key(self, *parts: str) -> bytes:
        return self._p + b"/" + "/".join(parts).encode()

    def _res_key(self, kind: str, namespace: str, name: str) -> bytes:
        return self.key("res", kind, namespace, name)

    def _res_prefix(self, kind: str | None = None) -> bytes:
        return self.key("res", kind, "") if kind else self.key("res", "")

    @property
    def client(self) -> EtcdClient:
        return self._client

    def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except EtcdError as e:
            raise StoreError(str(e)) from None

    # ------------------------------------------------------------ resources

    def _decode(self, kv: KeyValue) -> StoredResource:
        parts = kv.key[len(self._p) + 1:].decode().split("/", 3)
        d = json.loads(kv.value)
        return StoredResource(kind=parts[1], namespace=parts[2], name=parts[3], spec_json=d["spec_json"],
                              status_json=d["status_json"], labels=tuple(sorted(d["labels"].items())),
                              api_version=d["api_version"], resource_version=kv.mod_revision,
                              created_unix_ms=int(d["created_unix_ms"]), updated_unix_ms=int(d["updated_unix_ms"]))

    @staticmethod
    def _encode(r: StoredResource) -> bytes:
        return json.dumps({"spec_json": r.spec_json, "status_json": r.status_json, "labels": dict(r.labels),
                           "api_version": r.api_version, "created_unix_ms": r.created_unix_ms,
                           "updated_unix_ms": r.updated_unix_ms}, sort_keys=True).encode()

    def revision(self) -> int:
        return int(self._call(self._client.revision))

    def get(self, kind: str, namespace: str, name: str) -> StoredResource | None:
        kv, _ = self._call(self._client.get, self._res_key(kind, namespace, name))
        return self._decode(kv) if kv else None

    def list(self, kind: str | None = None, namespace: str | None = None) -> tuple[builtins.list[StoredResource], int]:
        start = self._res_prefix(kind or None)
        kvs, rev, _ = self._call(self._client.range, start, prefix_end(start))
        out = [r for r in (self._decode(kv) for kv in kvs) if not namespace or r.namespace == namespace]
        # etcd sorts by key bytes ('-' before '/'), the interface by (kind, namespace, name).
        out.sort(key=lambda r: r.ref)
        return out, rev

    def apply(self, writes: Sequence[Write], dry_run: bool = False) -> builtins.list[WriteResult]:
        for _ in range(MAX_TXN_ATTEMPTS):
            try:
                return self._apply_once(writes, dry_run, None)
            except _Stale:
                continue
        raise self._busy()

    def apply_planned(self, plan: Callable[[], Sequence[Write]],
                      dry_run: bool = False) -> builtins.list[WriteResult]:
        for _ in range(MAX_TXN_ATTEMPTS):
            guard, _rev = self._call(self._client.get, self.key("guard", "config"))
            try:
                return self._apply_once(plan(), dry_run, guard.mod_revision if guard else 0)
            except _Stale:
                continue  # another replica changed config since we read it: plan again
        raise self._busy()

    @staticmethod
    def _busy() -> StoreError:
        return StoreError(f"the config changed under this apply {MAX_TXN_ATTEMPTS} times in a row (other "
                          "control plane replicas are writing); apply again")

    def _apply_once(self, writes: Sequence[Write], dry_run: bool, guard_rev: int | None) -> builtins.list[WriteResult]:
        now_ms = int(self._clock() * 1000)
        guard_key = self.key("guard", "config")
        refs = list(dict.fromkeys(w.ref for w in writes))
        # One read txn: every key the batch touches and the guard, at one revision.
        read = self._call(self._client.txn, [], [range_op(self._res_key(*r)) for r in refs] + [range_op(guard_key)])
        ranges = read.ranges()
        seen: dict[tuple[str, str, str], KeyValue | None] = {r: (kvs[0] if kvs else None)
                                                             for r, kvs in zip(refs, ranges)}
        guard_kv = ranges[-1][0] if ranges[-1] else None
        guard_mod = guard_kv.mod_revision if guard_kv else 0
        if guard_rev is not None and guard_mod != guard_rev:
            raise _Stale()
        rev = read.revision
        current: dict[tuple[str, str, str], StoredResource | None] = {
            r: (self._decode(kv) if kv else None) for r, kv in seen.items()}
        results: builtins.list[tuple[Write, str, int | None]] = []  # None: the new revision
        for w in writes:
            old = current[w.ref]
            if isinstance(w, Delete):
                if old is None:
                    results.append((w, "not_found", rev))
                    continue
                current[w.ref] = None
                results.append((w, "deleted", None))
                continue
            spec, status = _canonical_json(w.spec_json), _canonical_json(w.status_json)
            labels = tuple(sorted(w.labels))
            if old is not None and (old.spec_json, old.status_json, old.labels, old.api_version) == (
                    spec, status, labels, w.api_version):
                results.append((w, "unchanged", old.resource_version))
                continue
            current[w.ref] = StoredResource(
                kind=w.kind, namespace=w.namespace, name=w.name, spec_json=spec, status_json=status,
                labels=labels, api_version=w.api_version, resource_version=0,
                created_unix_ms=old.created_unix_ms if old else now_ms, updated_unix_ms=now_ms)
            results.append((w, "configured" if old else "created", None))
        # A key changes when it appears, goes, or got a new value (resource_version 0 marks one).
        changed = [r for r in refs if (current[r] is None) != (seen[r] is None) or (
            (cur := current[r]) is not None and cur.resource_version == 0)]
        if not changed or dry_run:
            return [WriteResult(*w.ref, action, rev + 1 if v is None else v) for w, action, v in results]
        ops = []
        for r in changed:
            res = current[r]
            ops.append(delete_op(self._res_key(*r)) if res is None else put_op(self._res_key(*r), self._encode(res)))
        ops.append(put_op(guard_key, str(now_ms).encode()))
        compares = [compare(self._res_key(*r), "MOD", "EQUAL", seen[r].mod_revision if seen[r] else 0)  # type: ignore[union-attr]
                    for r in refs]
        compares.append(compare(guard_key, "MOD", "EQUAL", guard_mod))
        done = self._call(self._client.txn, compares, ops)
        if not done.succeeded:
            raise _Stale()
        return [WriteResult(*w.ref, action, done.revision if v is None else v) for w, action, v in results]

    # ------------------------------------------------------------ watch

    def _to_event(self, ev: WatchEvent) -> Event | None:
        key = ev.kv.key
        if ev.type == "DELETE":
            parts = key[len(self._p) + 1:].decode().split("/", 3)
            if ev.prev_kv is not None:
                gone = self._decode(ev.prev_kv)
            else:  # the previous value was compacted: the identity is all there is
                gone = StoredResource(parts[1], parts[2], parts[3], "{}")
            gone = dataclasses.replace(gone, resource_version=ev.kv.mod_revision,
                                       updated_unix_ms=int(self._clock() * 1000))
            return Event(DELETED, gone, ev.kv.mod_revision)
        res = self._decode(ev.kv)
        return Event(ADDED if ev.kv.create_revision == ev.kv.mod_revision else MODIFIED, res, ev.kv.mod_revision)

    async def _follow(self, start: bytes, start_revision: int) -> AsyncIterator[builtins.list[WatchEvent]]:
        """etcd watch batches from `start_revision` under the prefix `start`, resumed
        after a broken stream from the revision after the last one seen."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[builtins.list[WatchEvent] | BaseException] = asyncio.Queue()
        stop = threading.Event()
        current: dict[str, Any] = {}

        def pump() -> None:
            next_rev = start_revision
            while not stop.is_set():
                w = self._client.watch(start, prefix_end(start), next_rev)
                current["w"] = w
                if stop.is_set():
                    w.close()
                    return
                try:
                    for batch in w:
                        next_rev = batch[-1].kv.mod_revision + 1
                        loop.call_soon_threadsafe(queue.put_nowait, batch)
                except EtcdCompacted as e:
                    loop.call_soon_threadsafe(queue.put_nowait, e)
                    return
                except (EtcdUnavailable, OSError) as e:
                    if stop.is_set():
                        return
                    log.warning("the etcd watch on %s broke (%s); resuming from revision %d", start.decode(),
                                e, next_rev)
                    stop.wait(WATCH_RETRY_S)
                except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
                    loop.call_soon_threadsafe(queue.put_nowait, e)
                    return
                finally:
                    w.close()

        thread = threading.Thread(target=pump, name="etcd-watch", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            w = current.get("w")
            if w is not None:
                w.close()

    async def watch(self, kind: str | None = None, namespace: str | None = None,
                    since_revision: int = 0) -> AsyncIterator[Event]:
        start = self._res_prefix(kind or None)
        if since_revision <= 0:
            resources, rev = self.list(kind, namespace)
            for r in resources:
                yield Event(ADDED, r, rev)
            since_revision = rev
        else:
            rev = self.revision()
            if since_revision > rev:
                raise StoreError(f"watch from revision {since_revision} but the store is at {rev}; "
                                 "use a revision returned by List")
        try:
            async for batch in self._follow(start, since_revision + 1):
                for wev in batch:
                    ev = self._to_event(wev)
                    if ev is not None and (not namespace or ev.resource.namespace == namespace):
                        yield ev
        except EtcdCompacted as e:
            raise CompactedError(f"revision {since_revision} was compacted in etcd (oldest kept is "
                                 f"{e.compact_revision}); re-list and watch from the listed revision") from None
        except EtcdError as e:
            raise StoreError(f"the etcd watch failed: {e}") from None

    # ------------------------------------------------------------ nodes

    def _ensure_lease(self) -> int:
        with self._lock:
            if self._lease:
                return self._lease
            self._lease = int(self._call(self._client.lease_grant, max(2, round(self.node_lease_s))))
            if self._keepalive is None:
                self._keepalive = threading.Thread(target=self._keep_alive, name="etcd-lease", daemon=True)
                self._keepalive.start()
            return self._lease

    def _keep_alive(self) -> None:
        """Renew this replica's lease at a third of its TTL. A lease etcd has dropped
        (etcd unreachable for a whole TTL) is replaced and the nodes still held
        here are written again under the new one."""
        interval = max(0.5, self.node_lease_s / 3)
        while not self._stop.wait(interval):
            lease = self._lease
            try:
                ttl = self._client.lease_keepalive(lease)
                if ttl > 0:
                    continue
                with self._lock:
                    if self._lease == lease:
                        self._lease = 0
                log.warning("this replica's etcd lease %x expired; writing its %d node registrations again",
                            lease, len(self._mine))
                for rec in list(self._mine.values()):
                    self.save_node(rec)
            except (EtcdError, StoreError) as e:
                log.warning("cannot renew the etcd lease of this replica's nodes: %s", e)

    def _node_value(self, record: NodeRecord) -> bytes:
        import base64

        return json.dumps({"registration": base64.b64encode(record.registration).decode(),
                           "lease_expiry_unix_ms": record.lease_expiry_unix_ms,
                           "replica": self.replica_id}).encode()

    def _node_record(self, kv: KeyValue) -> NodeRecord:
        import base64

        d = json.loads(kv.value)
        name = kv.key[len(self.key("nodes", "")):].decode()
        return NodeRecord(name, base64.b64decode(d["registration"]), int(d["lease_expiry_unix_ms"]))

    def save_node(self, record: NodeRecord) -> None:
        lease = self._ensure_lease()
        self._mine[record.name] = record
        self._call(self._client.put, self.key("nodes", record.name), self._node_value(record), lease)

    def delete_node(self, name: str) -> None:
        """Delete a registration only while it is this replica's: a node whose agent
        moved to another replica is that replica's to keep."""
        self._mine.pop(name, None)
        key = self.key("nodes", name)
        if self._lease:
            self._call(self._client.txn, [compare(key, "LEASE", "EQUAL", self._lease)], [delete_op(key)])

    def load_nodes(self) -> builtins.list[NodeRecord]:
        return [c.record for c in self.load_node_changes()[0] if c.record is not None]

    def load_node_changes(self) -> tuple[builtins.list[NodeChange], int]:
        start = self.key("nodes", "")
        kvs, rev, _ = self._call(self._client.range, start, prefix_end(start))
        out = []
        for kv in kvs:
            try:
                out.append(NodeChange(kv.key[len(start):].decode(), self._node_record(kv),
                                      bool(self._lease) and kv.lease == self._lease))
            except (ValueError, KeyError) as e:
                log.warning("skipping an unreadable node record %s in etcd: %s", kv.key.decode(errors="replace"), e)
        return out, rev

    async def watch_nodes(self, since_revision: int) -> AsyncIterator[NodeChange]:
        start = self.key("nodes", "")
        async for batch in self._follow(start, since_revision + 1):
            for ev in batch:
                name = ev.kv.key[len(start):].decode()
                if ev.type == "DELETE":
                    yield NodeChange(name, None, False)
                    continue
                try:
                    rec = self._node_record(ev.kv)
                except (ValueError, KeyError) as e:
                    log.warning("skipping an unreadable node record of %s in etcd: %s", name, e)
                    continue
                mine = bool(self._lease) and ev.kv.lease == self._lease
                if not mine:
                    self._mine.pop(name, None)  # another replica holds this node's session now
                yield NodeChange(name, rec, mine)

    # ------------------------------------------------------------ access control records

    def security_tables(self, clock: Callable[[], float] = time.time) -> tuple[Operators, JoinTokens]:
        """Operators (with the audit log) and join tokens kept in etcd, shared by every replica."""
        return EtcdOperators(self, clock), EtcdJoinTokens(self, clock)

    def claim_cp_ca(self, state_dir: str) -> str:
        """Make sure this replica holds the same control-plane CA as the others (its
        server certificates, node and operator certificates and join-token pins must
        agree). The first replica publishes its CA's pin; later ones must match it.
        Returns the pin."""
        from controlplane.auth import CP_CA_CERT_FILE, CP_CA_KEY_FILE, ControlPlaneCA

        key = self.key("cp-ca-pin")
        kv, _ = self._call(self._client.get, key)
        have_files = all(os.path.exists(os.path.join(state_dir, f)) for f in (CP_CA_CERT_FILE, CP_CA_KEY_FILE))
        if kv is not None and not have_files:
            raise StoreError(
                f"another control plane replica created the control-plane CA of this etcd store (pin sha256:"
                f"{kv.value.decode()[:16]}…), and {state_dir} holds no {CP_CA_CERT_FILE}/{CP_CA_KEY_FILE}: copy "
                "both from that replica's state dir (the key with mode 0600) before starting this one "
                "(docs/reference.md, \"Store backends and replicas\")")
        pin = ControlPlaneCA.load_or_create(state_dir).pin
        if kv is None:
            done = self._call(self._client.txn, [compare(key, "CREATE", "EQUAL", 0)], [put_op(key, pin.encode())],
                              [range_op(key)])
            if done.succeeded:
                log.info("published the control-plane CA pin sha256:%s… for the other replicas", pin[:16])
                return pin
            kv = done.ranges()[0][0]
        if kv.value.decode() != pin:
            raise StoreError(
                f"the control-plane CA in {state_dir} (pin sha256:{pin[:16]}…) is not the one the other replicas "
                f"of this etcd store use (sha256:{kv.value.decode()[:16]}…): replace {CP_CA_CERT_FILE} and "
                f"{CP_CA_KEY_FILE} with theirs")
        return pin

    def close(self) -> None:
        # The lease is left to run out rather than revoked: agents of a stopping
        # replica keep their registrations while they reconnect to another one.
        self._stop.set()
        self._client.close()


# ---------------------------------------------------------------- the shared registry


def prime_registry(store: EtcdStore, registry: NodeRegistry) -> int:
    """Load every node registration in etcd into `registry` as held by another
    replica (alive while its record lasts); returns the revision they reflect."""
    changes, rev = store.load_node_changes()
    for change in changes:
        _apply_node_change(registry, change)
    return rev


def _apply_node_change(registry: NodeRegistry, change: NodeChange) -> None:
    from controlplane.nodes import node_from_proto
    from nodemesh.v1 import mesh_pb2

    if change.mine:
        return  # this replica's own write: the registry already has it
    if change.record is None:
        registry.set_remote(change.name, None)
        return
    reg = mesh_pb2.NodeRegistration()
    try:
        reg.ParseFromString(change.record.registration)
        node = node_from_proto(reg)
    except Exception as e:  # noqa: BLE001 - a bad record must not stop the control plane
        log.warning("ignoring the stored registration of node %s: %s", change.name, e)
        return
    registry.set_remote(change.name, node)


async def follow_registry(store: EtcdStore, registry: NodeRegistry, since_revision: int) -> None:
    """Keep `registry` in step with the registrations other replicas write."""
    while True:
        try:
            async for change in store.watch_nodes(since_revision):
                _apply_node_change(registry, change)
            return
        except EtcdCompacted:
            # Missed changes: take the whole set again.
            log.warning("the node watch fell behind etcd's compaction; reloading every registration")
            since_revision = prime_registry(store, registry)


# ---------------------------------------------------------------- operators, audit and join tokens


def _json(kv: KeyValue) -> dict[str, Any]:
    d = json.loads(kv.value)
    assert isinstance(d, dict)
    return d


def _cas(store: EtcdStore, key: bytes, change: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> Any:
    """Read-modify-write of one JSON record, retried while another replica writes it.
    `change` returns the new record, or None to leave it; returns what change returned."""
    client = store.client
    for _ in range(MAX_TXN_ATTEMPTS):
        kv, _rev = store._call(client.get, key)
        new = change(_json(kv) if kv else None)
        if new is None:
            return None
        done = store._call(client.txn, [compare(key, "MOD", "EQUAL", kv.mod_revision if kv else 0)],
                           [put_op(key, json.dumps(new, sort_keys=True).encode())])
        if done.succeeded:
            return new
    raise StoreError(f"{key.decode()} kept changing under this write (other replicas); try again")


AUDIT_PRUNE_EVERY = 500


class EtcdOperators(Operators):
    """controlplane.auth.Operators with its records in etcd (same rules, same messages)."""

    def __init__(self, store: EtcdStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._appended = 0
        self._lock = threading.Lock()

    def _ops(self) -> builtins.list[dict[str, Any]]:
        start = self._store.key("operators", "")
        kvs, _, _ = self._store._call(self._store.client.range, start, prefix_end(start))
        return [_json(kv) for kv in kvs]

    def count(self) -> int:
        start = self._store.key("operators", "")
        _, _, n = self._store._call(self._store.client.range, start, prefix_end(start), count_only=True)
        return int(n)

    def _upsert(self, name: str, role: str, token_id: str | None, token_hash: str | None) -> None:
        def change(old: dict[str, Any] | None) -> dict[str, Any]:
            return {"name": name, "role": role,
                    "token_id": token_id if token_id is not None else (old or {}).get("token_id"),
                    "token_sha256": token_hash if token_hash is not None else (old or {}).get("token_sha256"),
                    "created_unix": (old or {}).get("created_unix", self._clock()), "revoked_unix": None}

        _cas(self._store, self._store.key("operators", name), change)

    def revoke(self, name: str) -> bool:
        def change(old: dict[str, Any] | None) -> dict[str, Any] | None:
            if old is None or old.get("revoked_unix") is not None:
                return None
            return {**old, "revoked_unix": self._clock(), "token_id": None, "token_sha256": None}

        return _cas(self._store, self._store.key("operators", name), change) is not None

    def by_token(self, token: str) -> Any:
        from controlplane.auth import OPERATOR_TOKEN_PREFIX, Caller, _hash

        parts = token.strip().split(".")
        if len(parts) != 3 or parts[0] != OPERATOR_TOKEN_PREFIX:
            return Caller("anonymous", why_anonymous="the bearer token is not an operator token "
                                                     f"({OPERATOR_TOKEN_PREFIX}.<id>.<secret>)")
        row = next((o for o in self._ops() if o.get("token_id") == parts[1] and o.get("revoked_unix") is None),
                   None)
        if row is None or not hmac.compare_digest(str(row.get("token_sha256")), _hash(parts[2])):
            return Caller("anonymous", why_anonymous="the bearer token is unknown or revoked")
        return Caller("operator", str(row["name"]), str(row["role"]))

    def by_name(self, name: str) -> Any:
        from controlplane.auth import Caller

        kv, _ = self._store._call(self._store.client.get, self._store.key("operators", name))
        row = _json(kv) if kv else None
        if row is None or row.get("revoked_unix") is not None:
            return Caller("anonymous", why_anonymous=f"the certificate's operator {name!r} is unknown or revoked")
        return Caller("operator", name, str(row["role"]))

    def audit(self, principal: str, action: str, detail: str, outcome: str) -> None:
        from controlplane.auth import AUDIT_KEEP

        ms = int(self._clock() * 1000)
        # Time first so keys sort by time; a random tail keeps two replicas' entries apart.
        key = self._store.key("audit", f"{ms:015d}-{secrets.token_hex(4)}")
        entry = {"unix_ms": ms, "principal": principal, "action": action, "detail": detail[:2000],
                 "outcome": outcome[:500]}
        self._store._call(self._store.client.put, key, json.dumps(entry).encode())
        with self._lock:
            self._appended += 1
            prune = self._appended % AUDIT_PRUNE_EVERY == 0
        if prune:
            self._prune(AUDIT_KEEP)

    def _prune(self, keep: int) -> None:
        client, start = self._store.client, self._store.key("audit", "")
        _, _, n = self._store._call(client.range, start, prefix_end(start), count_only=True)
        if n <= keep:
            return
        # Oldest by write order (mod revision), not by key: two entries written in the
        # same millisecond sort by their random tails, not by time.
        newest_first, _, _ = self._store._call(client.range, start, prefix_end(start), keys_only=True,
                                               descending=True, sort_target="MOD")
        for kv in newest_first[keep:]:
            self._store._call(client.delete_range, kv.key, kv.key + b"\x00")

    def audit_entries(self, limit: int = 100) -> builtins.list[Any]:
        from nodemesh.v1 import mesh_pb2

        start = self._store.key("audit", "")
        kvs, _, _ = self._store._call(self._store.client.range, start, prefix_end(start),
                                      limit=max(1, min(limit, 10_000)), descending=True,
                                      sort_target="MOD")  # etcd's write order, across replicas
        out = []
        for kv in kvs:
            d = _json(kv)
            out.append(mesh_pb2.AuditEntry(unix_ms=d["unix_ms"], principal=d["principal"], action=d["action"],
                                           detail=d["detail"], outcome=d["outcome"]))
        return out


class EtcdJoinTokens(JoinTokens):
    """controlplane.tokens.JoinTokens with its rows in etcd: a token used on one
    replica is used for all (the compare-and-set that marks it used is one txn)."""

    def __init__(self, store: EtcdStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()

    def _insert(self, token_id: str, node_name: str, secret_hash: str, created: float, expires: float) -> None:
        start = self._store.key("tokens", "")
        kvs, _, _ = self._store._call(self._store.client.range, start, prefix_end(start))
        for kv in kvs:  # tokens expired more than a day ago
            if float(_json(kv)["expires_unix"]) < created - 86400:
                self._store._call(self._store.client.delete_range, kv.key)
        row = {"node_name": node_name, "secret_sha256": secret_hash, "created_unix": created,
               "expires_unix": expires, "used_unix": None}
        self._store._call(self._store.client.put, self._store.key("tokens", token_id), json.dumps(row).encode())

    def _row(self, token_id: str) -> tuple[str, str, float, float | None] | None:
        kv, _ = self._store._call(self._store.client.get, self._store.key("tokens", token_id))
        if kv is None:
            return None
        d = _json(kv)
        return (str(d["node_name"]), str(d["secret_sha256"]), float(d["expires_unix"]),
                None if d.get("used_unix") is None else float(d["used_unix"]))

    def _mark_used(self, token_id: str, now: float) -> bool:
        def change(old: dict[str, Any] | None) -> dict[str, Any] | None:
            if old is None or old.get("used_unix") is not None:
                return None
            return {**old, "used_unix": now}

        return _cas(self._store, self._store.key("tokens", token_id), change) is not None


def open_store(kind: str, *, sqlite_path: str, etcd_endpoints: Sequence[str] = (), etcd_prefix: str = DEFAULT_PREFIX,
               node_lease_s: float = DEFAULT_NODE_LEASE_S) -> Store:
    """The store the settings name: sqlite (one control plane) or etcd (several replicas)."""
    if kind == "etcd":
        return EtcdStore(etcd_endpoints, etcd_prefix, node_lease_s=node_lease_s)
    from controlplane.store import SQLiteStore

    return SQLiteStore(sqlite_path)


__all__ = [
    "EtcdJoinTokens",
    "EtcdOperators",
    "EtcdStore",
    "NodeChange",
    "Put",
    "follow_registry",
    "open_store",
    "prime_registry",
]
