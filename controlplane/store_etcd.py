"""The Store in etcd, for several control plane replicas serving one mesh.

Layout under the prefix (default /nodemesh):
  <p>/res/<kind>/<namespace>/<name>  a config resource (JSON); its resource_version is the key's mod_revision
  <p>/guard/config                   bumped by every config write: a planned apply (VIP allocation)
                                     compares it, so two replicas never plan from the same state
  <p>/nodes/<name>                   a node registration, written by the replica holding the agent's
                                     registry session (its id in the value); no etcd lease: it outlives
                                     that replica, and only the leader deletes it once the node's
                                     liveness lapsed (or a revocation withdraws it)
  <p>/alive/<name>                   that node's liveness: {"until_unix_ms", "replica"}, rewritten by the
                                     holding replica when the lease moved by half a lease or more
                                     (controlplane/noderegistry.py); the leader's expiry compares its
                                     mod_revision, so a renewal published meanwhile wins
  <p>/health/<name>                  the endpoints that node's agent reports unhealthy ({"replica",
                                     "unhealthy"}; no lease, deleted with the node)
  <p>/telemetry/<name>               that node's latest traffic summary for the mesh view, shared every
                                     TELEMETRY_SHARE_S (same lease)
  <p>/leader                         the replica elected for singleton duties (its lease: it goes with it)
  <p>/sec/<table>/<key>              operators, credentials, node identities (controlplane/records.py)
  <p>/seclog/audit/<seq>, <p>/seclog-head/audit   the hash-chained change log (controlplane/audit.py)
  <p>/tokens/<id>                    join tokens (controlplane/tokens.py)
  <p>/cp-ca-pin                      SHA-256 of the control-plane CA certificate every replica must hold

Every replica keeps a mirror of the prefix (all but the audit log and the
telemetry) in memory, loaded once and kept current by one etcd watch, as a
Kubernetes informer does: reads (get, list, revision, operators, tokens,
registrations) never wait on etcd. The store-wide revision is etcd's revision as
far as the mirror has seen it. Writes go to etcd through aetcd on the client's
own loop (controlplane/etcd_client.py); an apply returns once the mirror holds
its result, so a replica reads its own writes. A batch is one etcd txn whose
compares hold the mod_revision of every key it read and of the guard, so
concurrent writers on other replicas never lose an update: on a conflict the
batch waits for the mirror to catch up, then is read and computed again (a few
times, then the caller is told the store is busy).

Registrations, liveness, health and telemetry writes are queued in order and
never make the caller wait when it runs on an event loop. A node's expiry is
the leader's (expire_node: one txn fenced by the leader key's lease and the
node's liveness revision).
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from controlplane.etcd_client import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdTLS,
    EtcdUnavailable,
    KeyValue,
    WatchBatch,
    compare,
    delete_op,
    prefix_end,
    put_op,
    range_op,
)
from controlplane.operators import Operators
from controlplane.records import Record, Records
from controlplane.store import (
    ADDED,
    DELETED,
    EVENT_LOG_RETENTION,
    MODIFIED,
    CompactedError,
    Delete,
    NodeLiveness,
    NodeRecord,
    Put,
    Store,
    StoredResource,
    StoreError,
    StoreEvent,
    Write,
    WriteResult,
)
from controlplane.tokens import JoinTokens

if TYPE_CHECKING:
    from controlplane.leader import Leadership
    from controlplane.noderegistry import NodeRegistry

log = logging.getLogger("nodemesh.controlplane.store_etcd")

DEFAULT_PREFIX = "/nodemesh"
DEFAULT_NODE_LEASE_S = 15.0
MAX_TXN_ATTEMPTS = 16  # concurrent writers: re-read and re-plan this many times before "busy"
WATCH_RETRY_S = 1.0
TELEMETRY_SHARE_S = 10.0  # how often a node's summary is written for the other replicas' mesh views
GC_INTERVAL_S = 60.0  # the leader's sweep of the audit log and used-up join tokens
# Sections of the prefix the mirror keeps; the others (audit, telemetry) are only passed on.
# "sec": operators, credentials and node identities (controlplane/records.py), read on every call.
MIRRORED = frozenset({"res", "guard", "nodes", "alive", "health", "leader", "operators", "tokens", "cp-ca-pin",
                      "sec"})
# Sections whose records name the replica that wrote them (no etcd lease says it).
OWNED_BY_VALUE = frozenset({"nodes", "health"})
# Sections that are one key (<prefix>/<section>), not a directory of keys. The
# leader key was read as a directory once: a replica started after the election
# never mirrored it, took the leader as "already gone" and campaigned in a loop
# (about a thousand etcd transactions a second, most of a core).
SINGLE_KEYS = frozenset({"cp-ca-pin", "leader"})


class _Stale(Exception):
    """The state a batch read changed before its write."""

    def __init__(self, revision: int) -> None:
        super().__init__(revision)
        self.revision = revision


def _canonical_json(text: str) -> str:
    return json.dumps(json.loads(text or "{}"), sort_keys=True, separators=(",", ":"))


def _on_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@dataclass(frozen=True)
class NodeChange:
    name: str
    record: NodeRecord | None  # None: the registration is gone (deleted or its lease ran out)
    mine: bool  # written under this replica's lease


@dataclass(frozen=True)
class SectionChange:
    """A key of a section changed: `value` None when it was deleted (or its lease ran out)."""

    name: str  # the key below the section
    value: bytes | None
    mine: bool  # written under this replica's lease


@dataclass(eq=False)
class _Subscriber:
    kind: str | None
    namespace: str | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StoreEvent | BaseException]

    def wants(self, ev: StoreEvent) -> bool:
        r = ev.resource
        return (self.kind is None or r.kind == self.kind) and (self.namespace is None or r.namespace == self.namespace)


class EtcdStore(Store):
    """A Store in etcd with an in-memory mirror (module docstring)."""

    shares_state = True

    def __init__(self, endpoints: Sequence[str], prefix: str = DEFAULT_PREFIX, *,
                 clock: Callable[[], float] = time.time, node_lease_s: float = DEFAULT_NODE_LEASE_S,
                 timeout_s: float = 5.0, tls: EtcdTLS | None = None) -> None:
        if not prefix.startswith("/") or prefix.rstrip("/") == "":
            raise StoreError(f"etcd prefix {prefix!r} must start with '/' and name a directory, e.g. /nodemesh")
        self._client = EtcdClient(endpoints, timeout_s, tls)  # ValueError: bad endpoints or TLS files
        self._p = prefix.rstrip("/").encode()
        self._clock = clock
        self.node_lease_s = node_lease_s
        self.replica_id = uuid.uuid4().hex[:12]
        self._lock = threading.RLock()
        self._kv: dict[bytes, KeyValue] = {}
        self._rev = 0
        self._log: deque[StoreEvent] = deque(maxlen=EVENT_LOG_RETENTION)
        self._log_from = 0  # the mirror replays watches from after this revision
        self._subs: list[_Subscriber] = []
        self._listeners: dict[str, list[tuple[asyncio.AbstractEventLoop, Callable[[list[SectionChange]], None]]]] = {}
        self._lease = 0
        self._mine: dict[str, bytes] = {}  # registrations this replica wrote and still holds: their values
        # When this replica last found etcd away (or opened the store): liveness published
        # before then may not have reached it (liveness_view_since).
        self._view_since = clock()
        self._closed = False
        self._resigned = False  # stopping: campaign no more
        # Only touched on the etcd loop:
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._writes: asyncio.Queue[tuple[Callable[[], Coroutine[Any, Any, Any]], Future[Any]]] | None = None
        self._leader_gone: asyncio.Event | None = None
        self._lease_lost: asyncio.Event | None = None
        self.leadership: Leadership | None = None
        self._tasks: list[asyncio.Task[None]] = []
        try:
            self._sync(self._start())
        except StoreError as e:
            self._client.close()
            raise StoreError(f"cannot open the etcd store: {e}") from None

    # ------------------------------------------------------------ plumbing

    def key(self, *parts: str) -> bytes:
        return self._p + b"/" + "/".join(parts).encode()

    def _res_key(self, kind: str, namespace: str, name: str) -> bytes:
        return self.key("res", kind, namespace, name)

    def _section(self, key: bytes) -> tuple[str, str]:
        """(section, rest) of a key under the prefix."""
        section, _, rest = key[len(self._p) + 1:].decode(errors="replace").partition("/")
        return section, rest

    @property
    def client(self) -> EtcdClient:
        return self._client

    def _sync(self, coro: Coroutine[Any, Any, Any]) -> Any:
        try:
            return self._client.sync(coro)
        except EtcdError as e:
            raise StoreError(str(e)) from None

    async def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        try:
            return await self._client.run(coro)
        except EtcdError as e:
            raise StoreError(str(e)) from None

    def _queue_write(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Future[Any]:
        """Queue a write for the etcd loop's writer (in order); the caller waits only
        when it is not on an event loop (tests, tools)."""
        fut: Future[Any] = Future()
        if self._closed or self._writes is None:
            fut.set_exception(StoreError("the etcd store is closed"))
            return fut
        self._client.loop.call_soon_threadsafe(self._writes.put_nowait, (make, fut))
        if not _on_running_loop():
            try:
                fut.result(self._client.timeout_s * 3 + self.node_lease_s)
            except (EtcdError, TimeoutError) as e:
                raise StoreError(str(e) or "etcd did not take the write in time") from None
        return fut

    async def _writer(self) -> None:
        """The queued writes, in order. One that cannot reach etcd is tried again (the
        writes after it wait, so order holds) for up to a lease TTL, then dropped with
        a warning: the node's next registration or report writes it again."""
        if self._writes is None:
            raise RuntimeError("the etcd store's writer is not started (EtcdStore._start)")
        while True:
            make, fut = await self._writes.get()
            deadline = time.monotonic() + max(2.0, self.node_lease_s)
            delay = 0.1
            while True:
                try:
                    fut.set_result(await make())
                    break
                except EtcdUnavailable as e:
                    if time.monotonic() + delay < deadline and not self._closed:
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 2.0)
                        continue
                    log.warning("a queued etcd write failed: %s", e)
                    fut.set_exception(e)
                    break
                except Exception as e:  # noqa: BLE001 - handed to whoever waits; logged for those who do not
                    log.warning("a queued etcd write failed: %s", e)
                    fut.set_exception(e)
                    break

    # ------------------------------------------------------------ the mirror (on the etcd loop)

    async def _start(self) -> None:
        self._writes = asyncio.Queue()
        self._leader_gone = asyncio.Event()
        self._lease_lost = asyncio.Event()
        rev = await self._reload()
        self._log_from = rev
        self._lease = await self._client.lease_grant(max(2, round(self.node_lease_s)))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow(rev + 1)), loop.create_task(self._writer()),
                       loop.create_task(self._keep_alive())]

    async def _reload(self) -> int:
        """Read every mirrored section at one revision and replace the mirror,
        passing on what differs (as after a compaction the watch could not bridge)."""
        sections = sorted(MIRRORED)
        read = await self._client.txn([], [range_op(self.key(s) if s in SINGLE_KEYS else self.key(s, ""),
                                                    None if s in SINGLE_KEYS else prefix_end(self.key(s, "")))
                                           for s in sections])
        fresh = {kv.key: kv for kvs in read.ranges() for kv in kvs}
        events = []
        with self._lock:
            old = self._kv
            for k, kv in fresh.items():
                if old.get(k) != kv:
                    events.append(_synth("PUT", kv, old.get(k)))
            for k, kv in old.items():
                if k not in fresh:
                    events.append(_synth("DELETE", dataclasses.replace(kv, mod_revision=read.revision), kv))
        if old:
            self._apply_batch(WatchBatch(tuple(events), read.revision), reload=True)
        else:
            with self._lock:
                self._kv = fresh
                self._rev = read.revision
        return read.revision

    def _stopping(self) -> bool:
        # A call, not the attribute: close() sets it from another thread while a loop runs.
        return self._closed

    async def _follow(self, start_revision: int) -> None:
        next_rev = start_revision
        while not self._closed:
            try:
                async for batch in self._client.watch(self._p + b"/", prefix_end(self._p + b"/"), next_rev):
                    self._apply_batch(batch)
                    next_rev = max(next_rev, batch.revision + 1)
            except EtcdCompacted:
                log.warning("the etcd watch fell behind compaction; reloading the mirror")
                try:
                    next_rev = await self._reload() + 1
                except EtcdError as e:
                    log.warning("cannot reload the mirror from etcd (%s); retrying", e)
                    self._view_since = self._clock()
                    await asyncio.sleep(WATCH_RETRY_S)
            except EtcdError as e:
                if self._stopping():
                    return
                log.warning("the etcd watch broke (%s); resuming from revision %d", e, next_rev)
                self._view_since = self._clock()
                await asyncio.sleep(WATCH_RETRY_S)
                self._view_since = self._clock()

    def _apply_batch(self, batch: WatchBatch, reload: bool = False) -> None:
        res_events: builtins.list[StoreEvent] = []
        changes: dict[str, builtins.list[SectionChange]] = {}
        with self._lock:
            for ev in batch.events:
                section, rest = self._section(ev.kv.key)
                old = self._kv.get(ev.kv.key)
                if section in MIRRORED:
                    if ev.type == "DELETE":
                        self._kv.pop(ev.kv.key, None)
                    else:
                        self._kv[ev.kv.key] = ev.kv
                if section == "res":
                    res_events.append(self._to_event(ev.type, ev.kv, old or ev.prev_kv))
                elif section in ("nodes", "health", "telemetry", "leader"):
                    before = old or ev.prev_kv
                    changes.setdefault(section, []).append(SectionChange(
                        rest, None if ev.type == "DELETE" else ev.kv.value,
                        self._is_mine(section, ev.kv if ev.type != "DELETE" else before, ev.type == "DELETE")))
            self._rev = max(self._rev, batch.revision)
            if reload:
                self._log.clear()
                self._log_from = self._rev
            self._log.extend(res_events)
            if len(self._log) == self._log.maxlen and self._log:
                self._log_from = self._log[0].revision - 1
            for rev_ev in res_events:
                for sub in builtins.list(self._subs):
                    if sub.wants(rev_ev) and not _post(sub.loop, sub.queue.put_nowait, rev_ev):
                        self._subs.remove(sub)  # its loop is gone
            for section, items in changes.items():
                listeners = self._listeners.get(section, [])
                listeners[:] = [(loop, cb) for loop, cb in listeners if _post(loop, cb, items)]
        if "leader" in changes and self._leader_gone is not None and any(c.value is None for c in changes["leader"]):
            self._leader_gone.set()
        rev = self._rev
        still = []
        for want, fut in self._waiters:
            if want <= rev:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((want, fut))
        self._waiters = still

    async def _wait_rev(self, rev: int) -> None:
        """Until the mirror holds revision `rev` (on the etcd loop): a revision that
        wrote under this prefix (the mirror moves on events only)."""
        with self._lock:
            if self._rev >= rev:
                return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((rev, fut))
        try:
            await asyncio.wait_for(fut, self._client.timeout_s * 2)
        except TimeoutError:
            raise EtcdUnavailable(f"this replica's view of etcd did not reach revision {rev} within "
                                  f"{self._client.timeout_s * 2:.0f} s (its watch is behind or broken); "
                                  "check that etcd is reachable") from None

    async def _catch_up(self) -> None:
        """A barrier: write a marker under the prefix and wait for its event. The watch
        delivers in revision order, so the mirror then holds every earlier write."""
        rev = await self._client.put(self.key("sync", self.replica_id), b"", self._lease)
        await self._wait_rev(rev)

    def catch_up(self) -> None:
        """Wait until the mirror holds everything etcd had when called (a read that
        must see other replicas' latest writes, off the event loop)."""
        self._sync(self._catch_up())

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

    def _to_event(self, kind: str, kv: KeyValue, prev: KeyValue | None) -> StoreEvent:
        if kind == "DELETE":
            parts = kv.key[len(self._p) + 1:].decode().split("/", 3)
            # The mirror had the value: a deletion carries what was deleted.
            gone = self._decode(prev) if prev is not None else StoredResource(parts[1], parts[2], parts[3], "{}")
            gone = dataclasses.replace(gone, resource_version=kv.mod_revision,
                                       updated_unix_ms=int(self._clock() * 1000))
            return StoreEvent(DELETED, gone, kv.mod_revision)
        return StoreEvent(ADDED if kv.create_revision == kv.mod_revision or prev is None else MODIFIED,
                     self._decode(kv), kv.mod_revision)

    # ------------------------------------------------------------ reads (the mirror; never wait on etcd)

    def revision(self) -> int:
        with self._lock:
            return self._rev

    def get(self, kind: str, namespace: str, name: str) -> StoredResource | None:
        with self._lock:
            kv = self._kv.get(self._res_key(kind, namespace, name))
        return self._decode(kv) if kv else None

    def list(self, kind: str | None = None, namespace: str | None = None) -> tuple[builtins.list[StoredResource], int]:
        start = self.key("res", kind, "") if kind else self.key("res", "")
        with self._lock:
            kvs = [kv for k, kv in self._kv.items() if k.startswith(start)]
            rev = self._rev
        out = [r for r in (self._decode(kv) for kv in kvs) if not namespace or r.namespace == namespace]
        out.sort(key=lambda r: r.ref)
        return out, rev

    def section(self, name: str) -> dict[str, KeyValue]:
        """The mirror's keys of one section (operators, tokens, nodes, ...), by the rest of their key."""
        start = self.key(name, "")
        with self._lock:
            return {k[len(start):].decode(): kv for k, kv in self._kv.items() if k.startswith(start)}

    def mirrored(self, key: bytes) -> KeyValue | None:
        with self._lock:
            return self._kv.get(key)

    # ------------------------------------------------------------ config writes

    def apply(self, writes: Sequence[Write], dry_run: bool = False) -> builtins.list[WriteResult]:
        return self.apply_planned(lambda: writes, dry_run)

    def apply_planned(self, plan: Callable[[], Sequence[Write]],
                      dry_run: bool = False) -> builtins.list[WriteResult]:
        result: builtins.list[WriteResult] = self._sync(self._apply_loop(plan, dry_run))
        return result

    async def apply_planned_async(self, plan: Callable[[], Sequence[Write]],
                                  dry_run: bool = False) -> builtins.list[WriteResult]:
        result: builtins.list[WriteResult] = await self._run(self._apply_loop(plan, dry_run))
        return result

    async def _apply_loop(self, plan: Callable[[], Sequence[Write]], dry_run: bool) -> builtins.list[WriteResult]:
        for _ in range(MAX_TXN_ATTEMPTS):
            try:
                return await self._apply_once(plan, dry_run)
            except _Stale:
                await self._catch_up()  # another replica wrote: read its write, plan again
        raise StoreError(f"the config changed under this apply {MAX_TXN_ATTEMPTS} times in a row (other "
                         "control plane replicas are writing); apply again")

    async def _apply_once(self, plan: Callable[[], Sequence[Write]], dry_run: bool) -> builtins.list[WriteResult]:
        now_ms = int(self._clock() * 1000)
        guard_key = self.key("guard", "config")
        with self._lock:  # one consistent state for the plan and the compares
            guard = self._kv.get(guard_key)
            rev = self._rev
            writes = builtins.list(plan())
            refs = builtins.list(dict.fromkeys(w.ref for w in writes))
            seen = {r: self._kv.get(self._res_key(*r)) for r in refs}
        guard_mod = guard.mod_revision if guard else 0
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
        compares = [compare(self._res_key(*r), "MOD", "EQUAL", kv.mod_revision if kv else 0) for r, kv in seen.items()]
        compares.append(compare(guard_key, "MOD", "EQUAL", guard_mod))
        done = await self._client.txn(compares, ops)
        if not done.succeeded:
            raise _Stale(done.revision)
        await self._wait_rev(done.revision)  # read-your-writes: the mirror holds this batch
        return [WriteResult(*w.ref, action, done.revision if v is None else v) for w, action, v in results]

    # ------------------------------------------------------------ watch

    async def watch(self, kind: str | None = None, namespace: str | None = None,
                    since_revision: int = 0) -> AsyncIterator[StoreEvent]:
        loop = asyncio.get_running_loop()
        sub = _Subscriber(kind or None, namespace or None, loop, asyncio.Queue())
        with self._lock:  # the backlog and the subscription at one revision: nothing lost, nothing twice
            if since_revision <= 0:
                resources, at = self.list(kind, namespace)
                backlog = [StoreEvent(ADDED, r, at) for r in resources]
            else:
                if since_revision > self._rev:
                    raise StoreError(f"watch from revision {since_revision} but the store is at {self._rev}; "
                                     "use a revision returned by List")
                if since_revision < self._log_from:
                    raise CompactedError(
                        f"revision {since_revision} is older than this replica's event log (it starts after "
                        f"{self._log_from}); re-list and watch from the listed revision")
                backlog = [e for e in self._log if e.revision > since_revision and sub.wants(e)]
            self._subs.append(sub)
        try:
            for ev in backlog:
                yield ev
            while True:
                item = await sub.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            with self._lock:
                if sub in self._subs:
                    self._subs.remove(sub)

    def listen(self, section: str, callback: Callable[[builtins.list[SectionChange]], None],
               loop: asyncio.AbstractEventLoop | None = None) -> builtins.list[SectionChange]:
        """Call `callback` (on `loop`, default the running one) with every later change of
        `section` (nodes, health, telemetry, leader); returns its current keys (the
        mirror's; telemetry is not mirrored and starts empty), at the same revision."""
        loop = loop or asyncio.get_running_loop()
        with self._lock:
            self._listeners.setdefault(section, []).append((loop, callback))
            return [SectionChange(name, kv.value, self._is_mine(section, kv, False))
                    for name, kv in self.section(section).items()]

    def _is_mine(self, section: str, kv: KeyValue | None, deleted: bool) -> bool:
        """Whether this replica wrote the change: by the lease a key lives under, or for
        the records that outlive their writer (OWNED_BY_VALUE) by the id in the value.
        Their deletion is never 'mine': whoever deleted a node, every replica drops it."""
        if kv is None:
            return False
        if section in OWNED_BY_VALUE:
            if deleted:
                return False
            try:
                return bool(json.loads(kv.value).get("replica") == self.replica_id)
            except (ValueError, AttributeError):
                return False
        return bool(self._lease) and kv.lease == self._lease

    # ------------------------------------------------------------ the replica's lease, nodes, health, telemetry

    async def _keep_alive(self) -> None:
        """Renew this replica's lease at a third of its TTL. A lease etcd dropped (etcd
        unreachable for a whole TTL) is replaced and leadership is given up (node
        records and health reports live under no lease: they stay)."""
        if self._lease_lost is None:
            raise RuntimeError("the etcd store is not started (EtcdStore._start)")
        interval = max(0.5, self.node_lease_s / 3)
        while not self._closed:
            await asyncio.sleep(interval)
            lease = self._lease
            try:
                ttl = await self._client.lease_keepalive(lease)
                if ttl > 0:
                    continue
                log.warning("this replica's etcd lease %x expired; taking a new one (leadership is given up)",
                            lease)
                self._lease = await self._client.lease_grant(max(2, round(self.node_lease_s)))
                self._lease_lost.set()
            except EtcdError as e:
                log.warning("cannot renew the etcd lease of this replica: %s", e)
                self._view_since = self._clock()

    def _node_value(self, record: NodeRecord) -> bytes:
        return json.dumps({"registration": base64.b64encode(record.registration).decode(),
                           "lease_expiry_unix_ms": record.lease_expiry_unix_ms,
                           "replica": self.replica_id}).encode()

    def node_record(self, name: str, value: bytes) -> NodeRecord:
        d = json.loads(value)
        return NodeRecord(name, base64.b64decode(d["registration"]), int(d["lease_expiry_unix_ms"]))

    def _node_keys(self, name: str) -> tuple[bytes, bytes, bytes, bytes]:
        """Everything kept about a node: registration, liveness, health, telemetry."""
        return (self.key("nodes", name), self.key("alive", name), self.key("health", name),
                self.key("telemetry", name))

    def _alive_value(self, until_unix_ms: int) -> bytes:
        return json.dumps({"until_unix_ms": int(until_unix_ms), "replica": self.replica_id}).encode()

    def save_node(self, record: NodeRecord) -> None:
        """Write a registration and its liveness (no etcd lease: the record outlives
        this replica until the leader expires it); a health report another replica
        wrote for the node goes (its agent re-reports here)."""
        key, alive, health, _ = self._node_keys(record.name)
        value = self._node_value(record)
        self._mine[record.name] = value
        live = self._alive_value(record.lease_expiry_unix_ms)

        async def write() -> None:
            await self._client.txn([], [put_op(key, value), put_op(alive, live), delete_op(health)])
        self._queue_write(write)

    def publish_liveness(self, name: str, until_unix_ms: int) -> None:
        """Rewrite a node's liveness while its registration is still the one this
        replica wrote (a node that moved to another replica, or was expired or
        withdrawn, is not written back)."""
        mine = self._mine.get(name)
        if mine is None:
            return
        key, alive, _, _ = self._node_keys(name)
        live = self._alive_value(until_unix_ms)

        async def write() -> None:
            await self._client.txn([compare(key, "VALUE", "EQUAL", mine)], [put_op(alive, live)])
        self._queue_write(write)

    def node_liveness(self) -> dict[str, NodeLiveness]:
        out = {}
        for name, kv in self.section("alive").items():
            try:
                d = json.loads(kv.value)
                out[name] = NodeLiveness(int(d["until_unix_ms"]), str(d.get("replica", "")), kv.mod_revision)
            except (ValueError, KeyError, TypeError) as e:
                log.warning("ignoring the unreadable liveness record of node %s: %s", name, e)
        return out

    def liveness_view_since(self) -> float:
        """Since when this replica has been in touch with etcd without a break: the
        holders' publications may have failed while etcd was away, so the leader
        gives every node a lease from then (as after a start)."""
        return self._view_since

    async def expire_node(self, name: str, seen: NodeLiveness | None) -> bool:
        """One txn, fenced twice: this replica still holds the leader key under its
        current lease (a deposed leader that has not learnt it yet expires nothing),
        and the node's liveness is still the publication the decision read."""
        key, alive, health, telemetry = self._node_keys(name)
        fence = [compare(self.key("leader"), "LEASE", "EQUAL", self._lease),
                 compare(alive, "MOD", "EQUAL", seen.token if seen is not None else 0)]
        done = await self._run(self._client.txn(fence, [delete_op(key), delete_op(alive), delete_op(health),
                                                        delete_op(telemetry)]))
        if done.succeeded:
            self._mine.pop(name, None)
        return bool(done.succeeded)

    def delete_node(self, name: str) -> None:
        """Delete a node's registration, liveness, health and telemetry whoever holds
        its session (a revoked node is withdrawn everywhere)."""
        self._mine.pop(name, None)
        keys = self._node_keys(name)

        async def write() -> None:
            await self._client.txn([], [delete_op(k) for k in keys])
        self._queue_write(write)

    def save_health(self, name: str, unhealthy: dict[tuple[str, int], str]) -> None:
        """Share the endpoints a node's agent (held here) reports unhealthy."""
        key = self.key("health", name)
        value = json.dumps({"replica": self.replica_id,
                            "unhealthy": [[w, p, d] for (w, p), d in sorted(unhealthy.items())]}).encode()

        async def write() -> None:
            await self._client.put(key, value)
        self._queue_write(write)

    def save_telemetry(self, name: str, text: str) -> None:
        key = self.key("telemetry", name)
        value = text.encode()

        async def write() -> None:
            await self._client.put(key, value, self._lease)
        self._queue_write(write)

    def load_nodes(self) -> builtins.list[NodeRecord]:
        if not _on_running_loop():
            self.catch_up()
        out = []
        for name, kv in sorted(self.section("nodes").items()):
            try:
                out.append(self.node_record(name, kv.value))
            except (ValueError, KeyError) as e:
                log.warning("skipping an unreadable node record %s in etcd: %s", name, e)
        return out

    # ------------------------------------------------------------ leader election

    def start_election(self, leadership: Leadership) -> None:
        """Campaign for the leader key (module docstring) and keep `leadership` told."""
        self.leadership = leadership
        self._client.loop.call_soon_threadsafe(lambda: self._tasks.append(
            self._client.loop.create_task(self._campaign(leadership))))

    async def _campaign(self, leadership: Leadership) -> None:
        if self._leader_gone is None or self._lease_lost is None:
            raise RuntimeError("the etcd store is not started (EtcdStore._start)")
        key = self.key("leader")
        while not self._closed and not self._resigned:
            self._leader_gone.clear()
            self._lease_lost.clear()
            lease = self._lease
            value = json.dumps({"replica": self.replica_id, "since_unix": self._clock()}).encode()
            try:
                done = await self._client.txn([compare(key, "CREATE", "EQUAL", 0)], [put_op(key, value, lease)],
                                              [range_op(key)])
            except EtcdError as e:
                log.warning("cannot campaign for leadership: %s", e)
                await asyncio.sleep(WATCH_RETRY_S)
                continue
            holder = ""
            if done.succeeded:
                holder = self.replica_id
            else:
                kvs = done.ranges()[0] if done.ranges() else []
                if kvs:
                    holder = json.loads(kvs[0].value).get("replica", "")
                    if kvs[0].lease == lease:
                        holder = self.replica_id
            leadership._set(holder == self.replica_id, holder)
            if holder == self.replica_id:
                log.info("this replica (%s) leads: it runs the singleton duties", self.replica_id)
            await self._wait_leader_change(holder)

    async def _wait_leader_change(self, holder: str) -> None:
        if self._leader_gone is None or self._lease_lost is None:
            raise RuntimeError("the etcd store is not started (EtcdStore._start)")
        with self._lock:
            if holder and self._kv.get(self.key("leader")) is None and holder != self.replica_id:
                return  # already gone again
        gone = asyncio.ensure_future(self._leader_gone.wait())
        lost = asyncio.ensure_future(self._lease_lost.wait())
        try:
            await asyncio.wait([gone, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            lost.cancel()
        if self._lease_lost.is_set() and self.leadership is not None:
            self.leadership._set(False, "")

    def resign(self) -> None:
        """Give up leadership now and campaign no more (a clean stop): another replica
        takes over at once rather than a lease later."""
        self._resigned = True
        if self.leadership is None or not self.leadership.is_leader():
            return
        self.leadership._set(False, "")
        key = self.key("leader")
        try:
            self._sync(self._client.txn([compare(key, "LEASE", "EQUAL", self._lease)], [delete_op(key)]))
        except StoreError as e:
            log.warning("cannot resign leadership: %s", e)

    # ------------------------------------------------------------ singleton duties

    async def collect_garbage(self) -> None:
        """The leader's sweep, every GC_INTERVAL_S: the audit log down to its limit,
        join tokens expired more than a day ago."""
        from controlplane.auth import AUDIT_KEEP

        while True:
            try:
                await self._run(_prune_audit(self, AUDIT_KEEP))
                await self._run(_purge_tokens(self, self._clock()))
            except StoreError as e:
                log.warning("the shared-records sweep failed: %s", e)
            await asyncio.sleep(GC_INTERVAL_S)

    # ------------------------------------------------------------ access control records

    def security_records(self) -> Records:
        """Operators, credentials, node identities and the audit chain, shared by every replica."""
        return EtcdRecords(self)

    def join_tokens(self, clock: Callable[[], float] = time.time) -> JoinTokens:
        return EtcdJoinTokens(self, clock)

    def security_tables(self, clock: Callable[[], float] = time.time) -> tuple[Operators, JoinTokens]:
        """Operators and join tokens kept in etcd, shared by every replica."""
        return Operators(self.security_records(), clock), self.join_tokens(clock)

    def claim_cp_ca(self, state_dir: str) -> str:
        """Make sure this replica holds the same control-plane CA as the others (its
        server certificates, node and operator certificates and join-token pins must
        agree). The first replica publishes its CA's pin; later ones must match it.
        Returns the pin."""
        from controlplane.auth import CP_CA_CERT_FILE, CP_CA_KEY_FILE, ControlPlaneCA

        key = self.key("cp-ca-pin")
        kv = self.mirrored(key)
        have_files = all(os.path.exists(os.path.join(state_dir, f)) for f in (CP_CA_CERT_FILE, CP_CA_KEY_FILE))
        if kv is not None and not have_files:
            raise StoreError(
                f"another control plane replica created the control-plane CA of this etcd store (pin sha256:"
                f"{kv.value.decode()[:16]}…), and {state_dir} holds no {CP_CA_CERT_FILE}/{CP_CA_KEY_FILE}: copy "
                "both from that replica's state dir (the key with mode 0600) before starting this one "
                "(docs/reference.md, \"Store backends and replicas\")")
        pin = ControlPlaneCA.load_or_create(state_dir).pin
        if kv is None:
            done = self._sync(self._client.txn([compare(key, "CREATE", "EQUAL", 0)], [put_op(key, pin.encode())],
                                               [range_op(key)]))
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

    def flush(self) -> None:
        """Wait for the queued writes (registrations, health, telemetry) to reach etcd."""
        async def nothing() -> None:
            return None
        fut = self._queue_write(nothing)
        fut.result(self._client.timeout_s * 3)

    def close(self) -> None:
        # The lease is left to run out rather than revoked: agents of a stopping
        # replica keep their registrations while they reconnect to another one.
        if self._closed:
            return
        self._closed = True

        async def stop() -> None:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            self._client.submit(stop()).result(3)
        except Exception as e:  # noqa: BLE001 - closing anyway
            log.debug("stopping the etcd store's tasks: %s", e)
        with self._lock:
            for sub in self._subs:
                sub.loop.call_soon_threadsafe(sub.queue.put_nowait, StoreError("the etcd store was closed"))
        self._client.close()


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], arg: Any) -> bool:
    """Hand `arg` to `fn` on `loop`; False when that loop is closed (its listener is dropped)."""
    try:
        loop.call_soon_threadsafe(fn, arg)
    except RuntimeError:
        return False
    return True


def _synth(kind: str, kv: KeyValue, prev: KeyValue | None) -> Any:
    from controlplane.etcd_client import WatchEvent

    return WatchEvent(kind, kv, prev)


# ---------------------------------------------------------------- the shared registry


def share_registry(store: EtcdStore, registry: NodeRegistry) -> int:
    """Load every registration and health report other replicas hold into `registry`
    and keep it in step (callbacks on the running loop); report this replica's
    health changes to the store. Returns how many nodes other replicas hold."""
    registry.on_health = store.save_health
    for change in store.listen("nodes", lambda items: _node_changes(store, registry, items)):
        _node_change(store, registry, change)
    for change in store.listen("health", lambda items: _health_changes(registry, items)):
        _health_change(registry, change)
    return len(registry.nodes())


def _node_changes(store: EtcdStore, registry: NodeRegistry, items: builtins.list[SectionChange]) -> None:
    for change in items:
        _node_change(store, registry, change)


def _node_change(store: EtcdStore, registry: NodeRegistry, change: SectionChange) -> None:
    from controlplane.nodes import node_from_proto
    from nodemesh.v1 import mesh_pb2

    if change.mine:
        return  # this replica's own write: the registry already has it
    if change.value is None:  # expired by the leader, or withdrawn: gone for every replica
        store._mine.pop(change.name, None)
        registry.set_remote(change.name, None)
        return
    reg = mesh_pb2.NodeRegistration()
    try:
        reg.ParseFromString(store.node_record(change.name, change.value).registration)
        node = node_from_proto(reg)
    except Exception as e:  # noqa: BLE001 - a bad record must not stop the control plane
        log.warning("ignoring the stored registration of node %s: %s", change.name, e)
        return
    store._mine.pop(change.name, None)  # another replica holds this node's session now
    registry.set_remote(change.name, node)


def _health_changes(registry: NodeRegistry, items: builtins.list[SectionChange]) -> None:
    for change in items:
        _health_change(registry, change)


def _health_change(registry: NodeRegistry, change: SectionChange) -> None:
    if change.mine:
        return
    bad: dict[tuple[str, int], str] = {}
    if change.value is not None:
        try:
            bad = {(str(w), int(p)): str(d) for w, p, d in json.loads(change.value)["unhealthy"]}
        except (ValueError, TypeError, KeyError) as e:
            log.warning("ignoring the stored health report of node %s: %s", change.name, e)
            return
    registry.set_remote_health(change.name, bad)


class TelemetryShare:
    """Shares each node's traffic summary with the other replicas' mesh views (at
    most every TELEMETRY_SHARE_S per node) and feeds theirs to this one's."""

    def __init__(self, store: EtcdStore, registry: NodeRegistry, ingest: Callable[[str, str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._registry = registry
        self._ingest = ingest
        self._clock = clock
        self._last: dict[str, float] = {}
        registry.on_departure(self._forget)
        store.listen("telemetry", self._changes)

    def _forget(self, node: str) -> None:
        self._last.pop(node, None)

    def offer(self, node: str, text: str) -> None:
        """A heartbeat's summary from a node held here: ingested locally, shared now and then."""
        self._ingest(node, text)
        now = self._clock()
        if now - self._last.get(node, -TELEMETRY_SHARE_S) >= TELEMETRY_SHARE_S:
            self._last[node] = now
            self._store.save_telemetry(node, text)

    def _changes(self, items: builtins.list[SectionChange]) -> None:
        for c in items:
            if c.mine or c.value is None or self._registry.lease(c.name) is not None:
                continue  # ours, gone (the departure forgets it), or a node whose session is here now
            self._ingest(c.name, c.value.decode(errors="replace"))


# ---------------------------------------------------------------- operators, audit and join tokens


def _json(kv: KeyValue) -> dict[str, Any]:
    d = json.loads(kv.value)
    if not isinstance(d, dict):
        raise StoreError(f"the etcd record {kv.key!r} is not a JSON object")
    return d


def _cas(store: EtcdStore, key: bytes, change: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> Any:
    """Read-modify-write of one JSON record, retried while another replica writes it.
    `change` returns the new record, or None to leave it; returns what change returned.
    Blocks for two round trips: callers on an event loop run it in a thread."""
    client = store.client
    for _ in range(MAX_TXN_ATTEMPTS):
        kv, _rev = store._sync(client.get(key))
        new = change(_json(kv) if kv else None)
        if new is None:
            return None
        done = store._sync(client.txn([compare(key, "MOD", "EQUAL", kv.mod_revision if kv else 0)],
                                      [put_op(key, json.dumps(new, sort_keys=True).encode())]))
        if done.succeeded:
            if not _on_running_loop():
                store._sync(store._wait_rev(done.revision))  # the caller's next read sees it
            return new
    raise StoreError(f"{key.decode()} kept changing under this write (other replicas); try again")


async def _prune_audit(store: EtcdStore, keep: int) -> None:
    client, start = store.client, store.key("audit", "")
    _, _, n = await client.range(start, prefix_end(start), count_only=True)
    if n <= keep:
        return
    # Oldest by write order (mod revision), not by key: two entries written in the
    # same millisecond sort by their random tails, not by time.
    newest_first, _, _ = await client.range(start, prefix_end(start), keys_only=True, descending=True,
                                            sort_target="MOD")
    for kv in newest_first[keep:]:
        await client.delete_range(kv.key)


async def _purge_tokens(store: EtcdStore, now: float) -> None:
    for kv in store.section("tokens").values():
        try:
            expired = float(_json(kv)["expires_unix"]) < now - 86400
        except (ValueError, KeyError):
            continue
        if expired:  # only if nobody touched it since
            await store.client.txn([compare(kv.key, "MOD", "EQUAL", kv.mod_revision)], [delete_op(kv.key)])


class EtcdRecords(Records):
    """controlplane.records.Records in etcd. Records live at <p>/sec/<table>/<key>
    and are read from the mirror (a lookup on every call never waits on etcd);
    updates are compare-and-set (_cas). Sequences live at <p>/seclog/<table>/<seq,
    20 digits> with their last seq at <p>/seclog-head/<table>: an append is one txn
    that moves that head, writes the record and (optionally) a head record in
    <p>/sec, so two replicas never both link to one predecessor. Appends are
    queued to the etcd loop's writer in order (a caller on an event loop does not
    wait); scans read etcd itself (callers run them off the event loop)."""

    blocking = True

    def __init__(self, store: EtcdStore) -> None:
        self._store = store

    def _k(self, table: str, key: str) -> bytes:
        return self._store.key("sec", table, key)

    def get(self, table: str, key: str) -> Record | None:
        kv = self._store.mirrored(self._k(table, key))
        return _json(kv) if kv else None

    def update(self, table: str, key: str, change: Callable[[Record | None], Record | None]) -> Record | None:
        out: Record | None = _cas(self._store, self._k(table, key), change)
        return out

    def items(self, table: str) -> builtins.list[tuple[str, Record]]:
        prefix = f"{table}/"
        return sorted((k[len(prefix):], _json(kv)) for k, kv in self._store.section("sec").items()
                      if k.startswith(prefix))

    def _log_key(self, table: str, seq: int) -> bytes:
        return self._store.key("seclog", table, f"{seq:020d}")

    async def _append(self, table: str, make: Callable[[Record | None], Record],
                      head: tuple[str, str, Callable[[Record], Record]] | None) -> Record:
        client, head_key = self._store.client, self._store.key("seclog-head", table)
        for _ in range(MAX_TXN_ATTEMPTS):
            hkv, _rev = await client.get(head_key)
            last = None
            if hkv is not None:
                lkv, _ = await client.get(self._log_key(table, int(_json(hkv)["seq"])))
                last = _json(lkv) if lkv else None
            rec = make(last)
            ops = [put_op(head_key, json.dumps({"seq": rec["seq"]}).encode()),
                   put_op(self._log_key(table, int(rec["seq"])), json.dumps(rec, sort_keys=True).encode())]
            if head is not None:
                ops.append(put_op(self._k(head[0], head[1]), json.dumps(head[2](rec), sort_keys=True).encode()))
            done = await client.txn([compare(head_key, "MOD", "EQUAL", hkv.mod_revision if hkv else 0)], ops)
            if done.succeeded:
                return rec
        raise StoreError(f"the {table} log kept moving under this append (other replicas); try again")

    def append(self, table: str, make: Callable[[Record | None], Record],
               head: tuple[str, str, Callable[[Record], Record]] | None = None) -> Record | None:
        fut = self._store._queue_write(lambda: self._append(table, make, head))
        if _on_running_loop():
            return None  # appended in order by the etcd loop's writer
        rec: Record = fut.result()
        self._store.catch_up()  # the caller's next read sees it
        return rec

    def _range(self, start: bytes, end: bytes, **kw: Any) -> Any:
        return self._store._sync(self._store.client.range(start, end, **kw))

    def tail(self, table: str, limit: int) -> builtins.list[Record]:
        start = self._store.key("seclog", table, "")
        kvs, _, _ = self._range(start, prefix_end(start), limit=limit, descending=True)
        return [_json(kv) for kv in kvs]

    def scan(self, table: str, after_seq: int, limit: int) -> builtins.list[Record]:
        start = self._store.key("seclog", table, "")
        kvs, _, _ = self._range(self._log_key(table, max(0, after_seq + 1)), prefix_end(start), limit=limit)
        return [_json(kv) for kv in kvs]

    def count(self, table: str) -> int:
        start = self._store.key("seclog", table, "")
        _, _, n = self._range(start, prefix_end(start), count_only=True)
        return int(n)

    def drop_upto(self, table: str, seq: int) -> None:
        self._store._sync(self._store.client.delete_range(self._store.key("seclog", table, ""),
                                                          self._log_key(table, seq + 1)))


class EtcdJoinTokens(JoinTokens):
    """controlplane.tokens.JoinTokens with its rows in etcd: a token used on one
    replica is used for all (the compare-and-set that marks it used is one txn).
    The leader purges tokens expired more than a day ago."""

    blocking = True

    def __init__(self, store: EtcdStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()

    def _insert(self, token_id: str, node_name: str, secret_hash: str, created: float, expires: float) -> None:
        row = {"node_name": node_name, "secret_sha256": secret_hash, "created_unix": created,
               "expires_unix": expires, "used_unix": None}
        key = self._store.key("tokens", token_id)
        rev = self._store._sync(self._store.client.put(key, json.dumps(row).encode()))
        self._store._sync(self._store._wait_rev(rev))

    def _row(self, token_id: str) -> tuple[str, str, float, float | None, float] | None:
        kv = self._store.mirrored(self._store.key("tokens", token_id))
        if kv is None:  # made on another replica a moment ago? Ask etcd itself.
            kv, _ = self._store._sync(self._store.client.get(self._store.key("tokens", token_id)))
        if kv is None:
            return None
        d = _json(kv)
        return (str(d["node_name"]), str(d["secret_sha256"]), float(d["expires_unix"]),
                None if d.get("used_unix") is None else float(d["used_unix"]), float(d.get("created_unix") or 0))

    def _mark_used(self, token_id: str, now: float) -> float | None:
        used_before: list[float] = []  # read from etcd by the compare-and-set, not from the mirror

        def change(old: dict[str, Any] | None) -> dict[str, Any] | None:
            if old is None or old.get("used_unix") is not None:
                used_before.append(float(old["used_unix"]) if old is not None else now)
                return None
            return {**old, "used_unix": now}

        if _cas(self._store, self._store.key("tokens", token_id), change) is not None:
            return None
        return used_before[-1] if used_before else now


def open_store(kind: str, *, sqlite_path: str, etcd_endpoints: Sequence[str] = (), etcd_prefix: str = DEFAULT_PREFIX,
               node_lease_s: float = DEFAULT_NODE_LEASE_S, etcd_tls: EtcdTLS | None = None) -> Store:
    """The store the settings name: sqlite (one control plane) or etcd (several replicas)."""
    if kind == "etcd":
        try:
            return EtcdStore(etcd_endpoints, etcd_prefix, node_lease_s=node_lease_s, tls=etcd_tls)
        except ValueError as e:
            raise StoreError(str(e)) from None
    from controlplane.store import SQLiteStore

    return SQLiteStore(sqlite_path)


__all__ = [
    "EtcdJoinTokens",
    "EtcdRecords",
    "EtcdStore",
    "NodeChange",
    "Put",
    "SectionChange",
    "TelemetryShare",
    "open_store",
    "share_registry",
]
