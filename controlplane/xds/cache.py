"""The xDS snapshot cache: versioned resource sets per node, and one-shot
watches answered through asyncio queues. Knows nothing of gRPC streams.

State-of-the-world watches compare one version per type; Delta watches
compare one version per resource (`resource_version`) against what the
client holds and answer with only what changed or went away."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from google.protobuf import any_pb2

from nodemesh import xdsnames


def content_version(resources: Mapping[str, any_pb2.Any]) -> str:
    """A stable version for a resource set: equal content gives an equal version,
    across processes and restarts (clients keep their version over reconnects)."""
    h = hashlib.sha256()
    for name in sorted(resources):
        a = resources[name]
        h.update(name.encode())
        h.update(b"\0")
        h.update(a.type_url.encode())
        h.update(b"\0")
        h.update(a.value)
        h.update(b"\1")
    return h.hexdigest()[:16]


EMPTY_VERSION = content_version({})


def resource_version(a: any_pb2.Any) -> str:
    """A stable version for one resource: equal bytes give an equal version, across
    processes and restarts, so a Delta client's initial_resource_versions after a
    reconnect (even to a restarted control plane) still match what it holds."""
    h = hashlib.sha256(a.type_url.encode())
    h.update(b"\0")
    h.update(a.value)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TypeResources:
    version: str
    resources: Mapping[str, any_pb2.Any]

    @cached_property
    def resource_versions(self) -> Mapping[str, str]:
        # Computed once per snapshot (cached_property writes the instance dict,
        # which a frozen dataclass allows), however many Delta streams read it.
        return {n: resource_version(a) for n, a in self.resources.items()}


class SnapshotError(ValueError):
    """A snapshot that is not consistent; it is never published."""


@dataclass(frozen=True)
class XdsSnapshot:
    """Every resource a node should see, per type URL, each type with its version."""

    types: Mapping[str, TypeResources] = field(default_factory=dict)

    @classmethod
    def from_resources(cls, by_type: Mapping[str, Mapping[str, any_pb2.Any]]) -> XdsSnapshot:
        return cls({t: TypeResources(content_version(r), dict(r)) for t, r in by_type.items()})

    def get(self, type_url: str) -> TypeResources:
        return self.types.get(type_url) or TypeResources(EMPTY_VERSION, {})

    def version(self, type_url: str) -> str:
        return self.get(type_url).version

    def consistent(self) -> None:
        """Every cluster has a load assignment and every load assignment a cluster,
        so a client never waits on EDS for a name that will not come."""
        clusters = set(self.get(xdsnames.CLUSTER).resources)
        endpoints = set(self.get(xdsnames.ENDPOINT).resources)
        if clusters != endpoints:
            raise SnapshotError(
                f"clusters without endpoints: {sorted(clusters - endpoints)}; "
                f"endpoints without clusters: {sorted(endpoints - clusters)}")
        for t, tr in self.types.items():
            for name, a in tr.resources.items():
                if a.type_url != t:
                    raise SnapshotError(f"resource {name} of type {a.type_url} filed under {t}")


@dataclass(frozen=True)
class WatchResponse:
    type_url: str
    version: str
    resources: tuple[any_pb2.Any, ...]  # sorted by name
    names: tuple[str, ...]


@dataclass(eq=False)
class _Watch:
    id: int
    node_id: str
    type_url: str
    names: frozenset[str]  # empty: wildcard
    known_version: str
    queue: asyncio.Queue[WatchResponse]


def _respond(snap: XdsSnapshot, w: _Watch) -> WatchResponse:
    tr = snap.get(w.type_url)
    picked = sorted(tr.resources) if not w.names else sorted(n for n in w.names if n in tr.resources)
    return WatchResponse(w.type_url, tr.version, tuple(tr.resources[n] for n in picked), tuple(picked))


# In a Delta known-versions map: the client was told (by removed_resources) that
# this name, which it subscribes to, does not exist; nothing more to say until it does.
NOT_FOUND = ""
# In a Delta known-versions map: the client's copy is in doubt (it unsubscribed a
# name that the wildcard may also cover); the next answer must say, either way.
UNCERTAIN = "?"


@dataclass(frozen=True)
class DeltaSubscription:
    """What a Delta client asked for, for one type: the wildcard ("*", or the
    legacy empty first request) and/or resource names."""

    wildcard: bool = False
    names: frozenset[str] = frozenset()

    def covers(self, name: str) -> bool:
        return self.wildcard or name in self.names


@dataclass(frozen=True)
class DeltaResource:
    name: str
    version: str
    resource: any_pb2.Any


@dataclass(frozen=True)
class DeltaWatchResponse:
    type_url: str
    system_version: str  # the type's content version, for logs and push-latency metrics
    resources: tuple[DeltaResource, ...]  # new or changed, sorted by name
    removed: tuple[str, ...]  # gone, or subscribed by name and never existed; sorted
    known: Mapping[str, str]  # what the client holds once it has this response


def delta_diff(type_url: str, tr: TypeResources, sub: DeltaSubscription,
               known: Mapping[str, str]) -> DeltaWatchResponse | None:
    """What a client holding `known` (name -> resource version) must be told about
    `tr` under `sub`; None when nothing. Pure, so the rules are tested alone:
    - a covered resource whose version the client does not hold is sent;
    - a held resource that no longer exists is removed;
    - a name subscribed explicitly that does not exist is reported in removed
      once (the spec's "resource does not exist" signal), then remembered as
      NOT_FOUND so that later snapshots do not repeat it."""
    versions = tr.resource_versions
    wanted = (set(versions) if sub.wildcard else set()) | {n for n in sub.names if n in versions}
    changed = sorted(n for n in wanted if known.get(n) != versions[n])
    removed = sorted(n for n in set(known) | sub.names
                     if n not in versions and known.get(n, UNCERTAIN) != NOT_FOUND)
    if not changed and not removed:
        return None
    after = dict(known)
    for n in changed:
        after[n] = versions[n]
    for n in removed:
        if n in sub.names:
            after[n] = NOT_FOUND
        else:
            after.pop(n, None)
    return DeltaWatchResponse(type_url, tr.version,
                              tuple(DeltaResource(n, versions[n], tr.resources[n]) for n in changed),
                              tuple(removed), after)


@dataclass(eq=False)
class _DeltaWatch:
    id: int
    node_id: str
    type_url: str
    sub: DeltaSubscription
    known: Mapping[str, str]
    queue: asyncio.Queue[DeltaWatchResponse]


def _delta_respond(snap: XdsSnapshot, w: _DeltaWatch) -> DeltaWatchResponse | None:
    return delta_diff(w.type_url, snap.get(w.type_url), w.sub, w.known)


class SnapshotCache:
    """Per-node snapshots, plus a default for nodes without one of their own."""

    def __init__(self) -> None:
        self._snapshots: dict[str, XdsSnapshot] = {}
        self._default: XdsSnapshot | None = None
        self._watches: dict[int, _Watch] = {}
        self._delta_watches: dict[int, _DeltaWatch] = {}
        self._ids = itertools.count(1)

    def snapshot_for(self, node_id: str) -> XdsSnapshot | None:
        return self._snapshots.get(node_id, self._default)

    def set_snapshot(self, node_id: str, snap: XdsSnapshot) -> None:
        snap.consistent()
        self._snapshots[node_id] = snap
        self._answer(lambda w: w.node_id == node_id)

    def set_default(self, snap: XdsSnapshot) -> None:
        """The snapshot for every node that has none of its own (the usual case:
        node agents all see the same mesh)."""
        snap.consistent()
        self._default = snap
        self._answer(lambda w: w.node_id not in self._snapshots)

    def clear_snapshot(self, node_id: str) -> None:
        self._snapshots.pop(node_id, None)

    def watch_count(self) -> int:
        return len(self._watches) + len(self._delta_watches)

    def create_watch(self, node_id: str, type_url: str, resource_names: Iterable[str],
                     known_version: str) -> tuple[asyncio.Queue[WatchResponse], Callable[[], None]]:
        """Ask for `type_url` resources newer than `known_version`. The queue gets
        one response: at once when the node's snapshot has another version of the
        type, else when a new snapshot changes it. `cancel()` drops the watch."""
        queue: asyncio.Queue[WatchResponse] = asyncio.Queue(maxsize=1)
        w = _Watch(next(self._ids), node_id, type_url, frozenset(resource_names), known_version, queue)
        snap = self.snapshot_for(node_id)
        if snap is not None and snap.version(type_url) != known_version:
            queue.put_nowait(_respond(snap, w))
        else:
            self._watches[w.id] = w

        def cancel() -> None:
            self._watches.pop(w.id, None)

        return queue, cancel

    def create_delta_watch(self, node_id: str, type_url: str, sub: DeltaSubscription,
                           known: Mapping[str, str]
                           ) -> tuple[asyncio.Queue[DeltaWatchResponse], Callable[[], None]]:
        """Ask for what a client holding `known` (name -> resource version, see
        NOT_FOUND and UNCERTAIN) lacks under `sub`. The queue gets one response:
        at once when the node's snapshot differs from `known`, else when a new
        snapshot makes it differ. `cancel()` drops the watch."""
        queue: asyncio.Queue[DeltaWatchResponse] = asyncio.Queue(maxsize=1)
        w = _DeltaWatch(next(self._ids), node_id, type_url, sub, dict(known), queue)
        snap = self.snapshot_for(node_id)
        resp = _delta_respond(snap, w) if snap is not None else None
        if resp is not None:
            queue.put_nowait(resp)
        else:
            self._delta_watches[w.id] = w

        def cancel() -> None:
            self._delta_watches.pop(w.id, None)

        return queue, cancel

    def _answer(self, which: Callable[[_Watch | _DeltaWatch], bool]) -> None:
        for wid, w in list(self._watches.items()):
            if not which(w):
                continue
            snap = self.snapshot_for(w.node_id)
            if snap is None or snap.version(w.type_url) == w.known_version:
                continue
            del self._watches[wid]
            w.queue.put_nowait(_respond(snap, w))
        for wid, dw in list(self._delta_watches.items()):
            if not which(dw):
                continue
            snap = self.snapshot_for(dw.node_id)
            resp = _delta_respond(snap, dw) if snap is not None else None
            if resp is None:
                continue
            del self._delta_watches[wid]
            dw.queue.put_nowait(resp)
