"""The xDS snapshot cache: versioned resource sets per node, and one-shot
watches answered through asyncio queues. Knows nothing of gRPC streams.

State-of-the-world watches compare one version per type; Delta watches
compare one version per resource (`resource_version`) against what the
client holds and answer with only what changed or went away."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Generic, TypeVar

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from nodemesh import xdsnames

# Responses are assembled from bytes encoded once per resource version and shared
# by every stream (the ADS servicer sends bytes, not messages): protobuf allows a
# message to be written as the concatenation of its fields, so a repeated field is
# appended entry by entry. Field numbers come from the descriptors, not by hand.
_SOTW_RESOURCES = discovery_pb2.DiscoveryResponse.DESCRIPTOR.fields_by_name["resources"].number
_DELTA_RESOURCES = discovery_pb2.DeltaDiscoveryResponse.DESCRIPTOR.fields_by_name["resources"].number


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One length-delimited field (wire type 2) in protobuf encoding."""
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


# Earlier sets whose differences to a set are remembered on it (TypeResources.changes_since).
SINCE_KEPT = 8

# Watches answered between two yields to the event loop during a fan-out, so that
# pushing to a thousand streams never holds heartbeats or API calls for long.
FANOUT_BATCH = 128


def resource_version(a: any_pb2.Any) -> str:
    """A stable version for one resource: equal bytes give an equal version, across
    processes and restarts, so a Delta client's initial_resource_versions after a
    reconnect (even to a restarted control plane) still match what it holds."""
    h = hashlib.sha256(a.type_url.encode())
    h.update(b"\0")
    h.update(a.value)
    return h.hexdigest()[:16]


def versions_digest(versions: Mapping[str, str]) -> str:
    """A type's version from its resources' names and versions (not their bytes:
    a rebuild that carries most resources over hashes only the changed ones)."""
    h = hashlib.sha256()
    for name in sorted(versions):
        h.update(name.encode())
        h.update(b"\0")
        h.update(versions[name].encode())
        h.update(b"\1")
    return h.hexdigest()[:16]


def content_version(resources: Mapping[str, any_pb2.Any]) -> str:
    """A stable version for a resource set: equal content gives an equal version,
    across processes and restarts (clients keep their version over reconnects)."""
    return versions_digest({n: resource_version(a) for n, a in resources.items()})


EMPTY_VERSION = content_version({})


@dataclass(frozen=True)
class TypeResources:
    version: str
    resources: Mapping[str, any_pb2.Any]

    @cached_property
    def resource_versions(self) -> Mapping[str, str]:
        # Computed once per snapshot (cached_property writes the instance dict,
        # which a frozen dataclass allows), however many Delta streams read it.
        return {n: resource_version(a) for n, a in self.resources.items()}

    @cached_property
    def _sotw_encoded(self) -> dict[str, bytes]:
        return {}

    @cached_property
    def _delta_encoded(self) -> dict[str, bytes]:
        return {}

    def sotw_entry(self, name: str) -> bytes:
        """DiscoveryResponse.resources entry for `name`, encoded once per snapshot."""
        enc = self._sotw_encoded.get(name)
        if enc is None:
            enc = self._sotw_encoded[name] = length_delimited(
                _SOTW_RESOURCES, self.resources[name].SerializeToString())
        return enc

    def delta_entry(self, name: str) -> bytes:
        """DeltaDiscoveryResponse.resources entry (a Resource) for `name`, encoded once."""
        enc = self._delta_encoded.get(name)
        if enc is None:
            r = discovery_pb2.Resource(name=name, version=self.resource_versions[name])
            r.resource.CopyFrom(self.resources[name])
            enc = self._delta_encoded[name] = length_delimited(_DELTA_RESOURCES, r.SerializeToString())
        return enc

    @cached_property
    def wildcard_names(self) -> tuple[str, ...]:
        """What a wildcard subscription covers: everything but endpoint slices."""
        return tuple(sorted(n for n in self.resources if not xdsnames.is_slice(n)))

    @cached_property
    def slices_by_prefix(self) -> Mapping[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for n in self.resources:
            if xdsnames.is_slice(n):
                out.setdefault(xdsnames.slice_prefix(n), []).append(n)
        return {p: tuple(v) for p, v in out.items()}

    @cached_property
    def wildcard_blob(self) -> bytes:
        """Every resource a wildcard covers as DiscoveryResponse.resources entries:
        what every wildcard state-of-the-world stream is sent, encoded once."""
        return b"".join(self.sotw_entry(n) for n in self.wildcard_names)

    @classmethod
    def carried_over(cls, resources: Mapping[str, any_pb2.Any], previous: TypeResources | None) -> TypeResources:
        """The set `resources`, reusing from `previous` the version and encodings of
        every resource whose bytes did not change: a rebuild after one node changed
        hashes and encodes that node's resources, not the mesh's (issue 13: at
        1,000 nodes every rebuild re-hashed and re-encoded everything)."""
        if previous is None:
            return cls(content_version(resources), dict(resources))
        old = previous.resources
        old_versions = previous.resource_versions
        old_sotw, old_delta = previous._sotw_encoded, previous._delta_encoded
        kept: dict[str, any_pb2.Any] = {}
        versions: dict[str, str] = {}
        sotw: dict[str, bytes] = {}
        delta: dict[str, bytes] = {}
        for name, a in resources.items():
            p = old.get(name)
            if p is not None and (p is a or (p.type_url == a.type_url and p.value == a.value)):
                kept[name] = p
                versions[name] = old_versions[name]
                if name in old_sotw:
                    sotw[name] = old_sotw[name]
                if name in old_delta:
                    delta[name] = old_delta[name]
            else:
                kept[name] = a
                versions[name] = resource_version(a)
        tr = cls(versions_digest(versions), kept)
        # Seed the cached properties (a frozen dataclass's instance dict is writable).
        tr.__dict__["resource_versions"] = versions
        tr.__dict__["_sotw_encoded"] = sotw
        tr.__dict__["_delta_encoded"] = delta
        changed = {n for n in kept if n not in old or old_versions[n] != versions[n]}
        changed.update(n for n in old if n not in kept)
        tr._remember_since(previous, frozenset(changed))
        return tr

    @cached_property
    def _since(self) -> OrderedDict[int, tuple[weakref.ref[TypeResources], frozenset[str]]]:
        # Weak: a strong reference here would chain every set to the one before it,
        # keeping the whole history of snapshots alive.
        return OrderedDict()

    def changes_since(self, old: TypeResources) -> frozenset[str]:
        """Names added, changed or removed from `old` to this set. Remembered per
        set for the last few `old` ones, so the streams of a fleet that each diff
        against the set they last saw share one comparison."""
        hit = self._since.get(id(old))
        if hit is not None and hit[0]() is old:
            return hit[1]
        new_v, old_v = self.resource_versions, old.resource_versions
        changed = {n for n, v in new_v.items() if old_v.get(n) != v}
        changed.update(n for n in old_v if n not in new_v)
        return self._remember_since(old, frozenset(changed))

    def _remember_since(self, old: TypeResources, changed: frozenset[str]) -> frozenset[str]:
        self._since[id(old)] = (weakref.ref(old), changed)  # checked on use: an id may be reused
        while len(self._since) > SINCE_KEPT:
            self._since.popitem(last=False)
        return changed


class InconsistentSnapshotError(ValueError):
    """A snapshot that is not consistent; it is never published."""


@dataclass(frozen=True)
class XdsSnapshot:
    """Every resource a node should see, per type URL, each type with its version."""

    types: Mapping[str, TypeResources] = field(default_factory=dict)

    @classmethod
    def from_resources(cls, by_type: Mapping[str, Mapping[str, any_pb2.Any]],
                       previous: XdsSnapshot | None = None) -> XdsSnapshot:
        """`previous`: the snapshot this one replaces; resources it already holds
        keep their versions and encodings (TypeResources.carried_over)."""
        return cls({t: TypeResources.carried_over(r, previous.types.get(t) if previous is not None else None)
                    for t, r in by_type.items()})

    def get(self, type_url: str) -> TypeResources:
        return self.types.get(type_url) or TypeResources(EMPTY_VERSION, {})

    def version(self, type_url: str) -> str:
        return self.get(type_url).version

    def consistent(self) -> None:
        """Every cluster has a load assignment and every load assignment a cluster,
        so a client never waits on EDS for a name that will not come."""
        clusters = set(self.get(xdsnames.CLUSTER).resources)
        endpoints = set(self.get(xdsnames.ENDPOINT).wildcard_names)
        strays = {n for n in self.get(xdsnames.ENDPOINT).slices_by_prefix
                  if n[:-len(xdsnames.SLICE_MARK)] not in clusters}
        if strays:
            raise InconsistentSnapshotError(f"endpoint slices of no cluster: {sorted(strays)}")
        if clusters != endpoints:
            raise InconsistentSnapshotError(
                f"clusters without endpoints: {sorted(clusters - endpoints)}; "
                f"endpoints without clusters: {sorted(endpoints - clusters)}")
        for t, tr in self.types.items():
            for name, a in tr.resources.items():
                if a.type_url != t:
                    raise InconsistentSnapshotError(f"resource {name} of type {a.type_url} filed under {t}")


@dataclass(frozen=True)
class WatchResponse:
    type_url: str
    version: str
    resources: tuple[any_pb2.Any, ...]  # sorted by name
    names: tuple[str, ...]
    encoded: bytes = b""  # the resources as DiscoveryResponse.resources entries (shared bytes)
    generation: int = 0  # SnapshotCache.generation it was answered at


T = TypeVar("T")


class WatchQueue(Generic[T]):
    """Where a watch's one answer goes: a queue of at most one item, lighter than
    asyncio.Queue (a fleet arms a watch per request; at 1,000 nodes creating an
    asyncio.Queue, its Event and a task to forward each answer was a sixth of a
    push's control-plane time). `deliver(fn)` hands the answer, now or when it
    comes, straight to `fn` (the stream's own event queue), with no task between."""

    __slots__ = ("_item", "_full", "_waiter", "_deliver")

    def __init__(self) -> None:
        self._item: T | None = None
        self._full = False
        self._waiter: asyncio.Future[None] | None = None
        self._deliver: Callable[[T], None] | None = None

    def put_nowait(self, item: T) -> None:
        if self._deliver is not None:
            self._deliver(item)
            return
        if self._full:
            raise asyncio.QueueFull
        self._item, self._full = item, True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        return not self._full

    def get_nowait(self) -> T:
        if not self._full:
            raise asyncio.QueueEmpty
        item = self._item
        self._item, self._full = None, False
        return item  # type: ignore[return-value]  # set together with _full

    async def get(self) -> T:
        while not self._full:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self.get_nowait()

    def deliver(self, fn: Callable[[T], None]) -> None:
        """From now on hand each answer to `fn` (and the one already here, if any)."""
        if self._full:
            fn(self.get_nowait())
        self._deliver = fn


@dataclass(eq=False)
class _Watch:
    id: int
    node_id: str
    type_url: str
    names: frozenset[str]  # empty: wildcard
    known_version: str
    queue: WatchQueue[WatchResponse]
    on_current: Callable[[int], None] | None = None  # told each generation found to hold nothing new


def _respond(snap: XdsSnapshot, w: _Watch) -> WatchResponse:
    tr = snap.get(w.type_url)
    if not w.names:
        picked = list(tr.wildcard_names)
        encoded = tr.wildcard_blob
    else:
        picked = sorted(n for n in w.names if n in tr.resources)
        encoded = b"".join(tr.sotw_entry(n) for n in picked)
    return WatchResponse(w.type_url, tr.version, tuple(tr.resources[n] for n in picked), tuple(picked),
                         encoded)


# In a Delta known-versions map: the client was told (by removed_resources) that
# this name, which it subscribes to, does not exist; nothing more to say until it does.
NOT_FOUND = ""
# In a Delta known-versions map: the client's copy is in doubt (it unsubscribed a
# name that the wildcard may also cover); the next answer must say, either way.
UNCERTAIN = "?"


@dataclass(frozen=True)
class DeltaSubscription:
    """What a Delta client asked for, for one type: the wildcard ("*", or the
    legacy empty first request), resource names, and endpoint-slice globs
    ("<cluster>/slice/*", nodemesh.xdsnames): a glob covers every slice of
    its cluster, the wildcard none."""

    wildcard: bool = False
    names: frozenset[str] = frozenset()

    @cached_property
    def globs(self) -> frozenset[str]:
        """Slice prefixes subscribed ('<cluster>/slice/')."""
        return frozenset(n[:-1] for n in self.names if n.endswith(xdsnames.SLICE_GLOB))

    @cached_property
    def plain(self) -> frozenset[str]:
        """Names subscribed one by one (globs excluded)."""
        if not self.globs:
            return self.names  # the usual case for every type but endpoints: no second walk
        return frozenset(n for n in self.names if not n.endswith(xdsnames.SLICE_GLOB))

    def covers(self, name: str) -> bool:
        if xdsnames.is_slice(name):
            return xdsnames.slice_prefix(name) in self.globs
        return self.wildcard or name in self.names


@dataclass(frozen=True)
class DeltaResource:
    name: str
    version: str
    resource: any_pb2.Any
    encoded: bytes = b""  # as a DeltaDiscoveryResponse.resources entry (shared bytes)


@dataclass(frozen=True)
class DeltaWatchResponse:
    type_url: str
    system_version: str  # the type's content version, for logs and push-latency metrics
    resources: tuple[DeltaResource, ...]  # new or changed, sorted by name
    removed: tuple[str, ...]  # gone, or subscribed by name and never existed; sorted
    known: Mapping[str, str]  # what the client holds once it has this response
    generation: int = 0  # SnapshotCache.generation it was answered at
    # The set this answer was computed from: once sent, the client lacks nothing of
    # it, so the stream's next watch need only look at what changed since.
    source: TypeResources | None = field(default=None, repr=False)


# In a Delta rejected map: the client NACKed the removal of this name.
REMOVAL = "-"


def delta_diff(type_url: str, tr: TypeResources, sub: DeltaSubscription,
               known: Mapping[str, str], only: frozenset[str] | None = None,
               rejected: Mapping[str, str] | None = None) -> DeltaWatchResponse | None:
    """What a client holding `known` (name -> resource version) must be told about
    `tr` under `sub`; None when nothing. Pure, so the rules are tested alone:
    - a covered resource whose version the client does not hold is sent;
    - a held resource that no longer exists is removed;
    - a name subscribed explicitly that does not exist is reported in removed
      once (the spec's "resource does not exist" signal), then remembered as
      NOT_FOUND so that later snapshots do not repeat it.
    `only`: look at these names alone. Correct when the same client, subscription
    and `known` had nothing to be told about an earlier set and `only` holds every
    name changed since (TypeResources.changes_since): a change costs the size of
    the change, not of the mesh, per stream.
    `rejected`: name -> the version (or REMOVAL) the client NACKed; that same
    version (or removal) is not offered again, a newer one is."""
    rejected = rejected or {}
    versions = tr.resource_versions
    # Set operations on the maps' views run in C: a full comparison of a subscription
    # of hundreds of names (each Workload subscription change of a fleet's agents)
    # does not walk it name by name in Python.
    if only is None:
        wanted = set(tr.wildcard_names) if sub.wildcard else set()
        wanted |= sub.plain & versions.keys()
        for g in sub.globs:
            wanted.update(tr.slices_by_prefix.get(g, ()))
        gone = set(known) | sub.plain
    else:
        wanted = {n for n in only if n in versions and sub.covers(n)}
        gone = {n for n in only if n in known or n in sub.plain}
    if only is None:
        # What the client holds at the current version needs nothing (one pass in C
        # over the held map; the names-only path below stays the size of `only`).
        changing = wanted.difference(dict(known.items() & versions.items()))
    else:
        changing = {n for n in wanted if known.get(n) != versions[n]}
    if rejected:
        changing = {n for n in changing if rejected.get(n) != versions[n]}
    changed = sorted(changing)
    removed = sorted(n for n in gone.difference(versions) if known.get(n, UNCERTAIN) != NOT_FOUND
                     and rejected.get(n) != REMOVAL)
    if not changed and not removed:
        return None
    after = dict(known)
    for n in changed:
        after[n] = versions[n]
    for n in removed:
        if n in sub.plain:
            after[n] = NOT_FOUND
        else:
            after.pop(n, None)
    return DeltaWatchResponse(type_url, tr.version,
                              tuple(DeltaResource(n, versions[n], tr.resources[n], tr.delta_entry(n))
                                    for n in changed),
                              tuple(removed), after, source=tr)


@dataclass(eq=False)
class _DeltaWatch:
    id: int
    node_id: str
    type_url: str
    sub: DeltaSubscription
    known: Mapping[str, str]
    queue: WatchQueue[DeltaWatchResponse]
    # The set last found to hold nothing new for this watch: the next snapshot is
    # compared by its changes since this one, not resource by resource.
    base: TypeResources | None = None
    rejected: Mapping[str, str] | None = None  # what the client NACKed (delta_diff)
    on_current: Callable[[int], None] | None = None  # told each generation found to hold nothing new


def _delta_respond(snap: XdsSnapshot, w: _DeltaWatch,
                   also: frozenset[str] | None = None) -> DeltaWatchResponse | None:
    """`also`: names to look at besides those changed since the watch's base (a
    subscription change's new names); None with a base means none."""
    tr = snap.get(w.type_url)
    base = w.base
    if also is None and (base is tr or (base is not None and base.version == tr.version)):
        return None  # this type did not change for the watch
    only = None
    if base is not None:
        only = tr.changes_since(base)
        if also:
            extra = set(only)
            for n in also:
                if n.endswith(xdsnames.SLICE_GLOB):
                    extra.update(tr.slices_by_prefix.get(n[:-1], ()))
                else:
                    extra.add(n)
            only = frozenset(extra)
    resp = delta_diff(w.type_url, tr, w.sub, w.known, only, w.rejected)
    if resp is None:
        w.base = tr
    return resp


@dataclass(frozen=True)
class FanoutResult:
    answered: int  # watches that got a response
    examined: int  # watches looked at
    seconds: float  # from the snapshot being set to the last watch answered


class SnapshotCache:
    """Per-node snapshots, plus a default for nodes without one of their own."""

    def __init__(self) -> None:
        self._snapshots: dict[str, XdsSnapshot] = {}
        self._default: XdsSnapshot | None = None
        self._watches: dict[int, _Watch] = {}
        self._delta_watches: dict[int, _DeltaWatch] = {}
        self._ids = itertools.count(1)
        # Bumped by every snapshot set: how far a stream is behind is counted in these
        # (controlplane/xds/sync.py versions_behind).
        self.generation = 0

    @property
    def default_snapshot(self) -> XdsSnapshot | None:
        return self._default

    def snapshot_for(self, node_id: str) -> XdsSnapshot | None:
        return self._snapshots.get(node_id, self._default)

    def set_snapshot(self, node_id: str, snap: XdsSnapshot) -> None:
        snap.consistent()
        self.generation += 1
        self._snapshots[node_id] = snap
        self._answer(lambda w: w.node_id == node_id)

    def set_default(self, snap: XdsSnapshot) -> None:
        """The snapshot for every node that has none of its own (the usual case:
        node agents all see the same mesh)."""
        snap.consistent()
        self.generation += 1
        self._default = snap
        self._answer(lambda w: w.node_id not in self._snapshots)

    async def publish_default(self, snap: XdsSnapshot, batch: int = FANOUT_BATCH) -> FanoutResult:
        """set_default, with the fan-out done in batches of `batch` watches and the
        event loop let through between them: a push to many streams never delays a
        heartbeat or an API call by more than one batch."""
        snap.consistent()
        t0 = time.monotonic()
        self.generation += 1
        self._default = snap

        def which(w: _Watch | _DeltaWatch) -> bool:
            return w.node_id not in self._snapshots

        answered = examined = 0
        for group in (self._watches, self._delta_watches):
            ids = list(group)
            for i in range(0, len(ids), batch):
                if i:
                    await asyncio.sleep(0)
                    if self._default is not snap:
                        # A newer snapshot took over; its own fan-out answers the rest.
                        return FanoutResult(answered, examined, time.monotonic() - t0)
                a, e = self._answer(which, ids[i:i + batch])
                answered += a
                examined += e
        return FanoutResult(answered, examined, time.monotonic() - t0)

    def clear_snapshot(self, node_id: str) -> None:
        self._snapshots.pop(node_id, None)

    def watch_count(self) -> int:
        return len(self._watches) + len(self._delta_watches)

    def create_watch(self, node_id: str, type_url: str, resource_names: Iterable[str],
                     known_version: str, on_current: Callable[[int], None] | None = None
                     ) -> tuple[WatchQueue[WatchResponse], Callable[[], None]]:
        """Ask for `type_url` resources newer than `known_version`. The queue gets
        one response: at once when the node's snapshot has another version of the
        type, else when a new snapshot changes it. `cancel()` drops the watch."""
        queue: WatchQueue[WatchResponse] = WatchQueue()
        w = _Watch(next(self._ids), node_id, type_url, frozenset(resource_names), known_version, queue,
                   on_current)
        snap = self.snapshot_for(node_id)
        if snap is not None and snap.version(type_url) != known_version:
            queue.put_nowait(replace(_respond(snap, w), generation=self.generation))
        else:
            self._watches[w.id] = w
            if on_current is not None:
                on_current(self.generation)

        def cancel() -> None:
            self._watches.pop(w.id, None)

        return queue, cancel

    def create_delta_watch(self, node_id: str, type_url: str, sub: DeltaSubscription,
                           known: Mapping[str, str], answer_now: bool = False,
                           rejected: Mapping[str, str] | None = None,
                           on_current: Callable[[int], None] | None = None,
                           base: TypeResources | None = None, also: frozenset[str] | None = None
                           ) -> tuple[WatchQueue[DeltaWatchResponse], Callable[[], TypeResources | None]]:
        """Ask for what a client holding `known` (name -> resource version, see
        NOT_FOUND and UNCERTAIN) lacks under `sub`. The queue gets one response:
        at once when the node's snapshot differs from `known`, else when a new
        snapshot makes it differ. `answer_now`: answer at once even with nothing
        to send (a stream's first request of a type: an empty answer tells the
        client it holds everything there is, e.g. no routes at all, instead of
        leaving it waiting for a first response that would never come).
        `rejected`: versions the client NACKed, not offered again (delta_diff).
        `base`: a set the client lacks nothing of under `sub` and `known` (what
        its last answer was computed from, or what its last watch found nothing
        new in): only names changed since, and `also` (a subscription change's
        new names), are looked at, so an ACK costs the size of the change, not
        of the subscription. `cancel()` drops the watch and returns the latest
        such set it found, for the stream's next watch.
        `cancel()` drops the watch."""
        queue: WatchQueue[DeltaWatchResponse] = WatchQueue()
        # `known` is not copied: the stream hands over a map it no longer changes.
        w = _DeltaWatch(next(self._ids), node_id, type_url, sub, known, queue, base=base, rejected=rejected,
                        on_current=on_current)
        snap = self.snapshot_for(node_id)
        resp = _delta_respond(snap, w, also if base is not None else None) if snap is not None else None
        if resp is None and answer_now and snap is not None and not known:
            resp = DeltaWatchResponse(type_url, snap.version(type_url), (), (), w.known,
                                      source=snap.get(type_url))
        if resp is not None:
            queue.put_nowait(replace(resp, generation=self.generation))
        else:
            self._delta_watches[w.id] = w
            if on_current is not None:
                on_current(self.generation)

        def cancel() -> TypeResources | None:
            self._delta_watches.pop(w.id, None)
            return w.base

        return queue, cancel

    def _answer(self, which: Callable[[_Watch | _DeltaWatch], bool],
                ids: Iterable[int] | None = None) -> tuple[int, int]:
        """Answer the watches `which` selects (among `ids`, default all) whose
        snapshot now differs. Returns (answered, examined)."""
        answered = examined = 0
        for wid in list(self._watches) if ids is None else ids:
            w = self._watches.get(wid)
            if w is None or not which(w):
                continue
            examined += 1
            snap = self.snapshot_for(w.node_id)
            if snap is None or snap.version(w.type_url) == w.known_version:
                if w.on_current is not None:
                    w.on_current(self.generation)
                continue
            del self._watches[wid]
            w.queue.put_nowait(replace(_respond(snap, w), generation=self.generation))
            answered += 1
        for wid in list(self._delta_watches) if ids is None else ids:
            dw = self._delta_watches.get(wid)
            if dw is None or not which(dw):
                continue
            examined += 1
            snap = self.snapshot_for(dw.node_id)
            resp = _delta_respond(snap, dw) if snap is not None else None
            if resp is None:
                if dw.on_current is not None:
                    dw.on_current(self.generation)
                continue
            del self._delta_watches[wid]
            dw.queue.put_nowait(replace(resp, generation=self.generation))
            answered += 1
        return answered, examined
