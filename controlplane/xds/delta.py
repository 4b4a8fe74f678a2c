"""The Delta (incremental) ADS protocol as a strategy of the one stream loop
(controlplane/xds/stream.py): turns one DeltaAggregatedResources stream's
requests into SnapshotCache delta watches, one per type URL, and keeps per type
what the client subscribes to and which resource versions it holds.

The cache decides what to send (controlplane.xds.cache.delta_diff); this module
only follows the protocol (envoy docs, "xDS REST and gRPC protocol",
Incremental xDS): subscriptions (the "*" wildcard and the legacy empty first
request), initial_resource_versions after a reconnect, nonces, ACK and NACK.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from controlplane.xds.cache import (
    REMOVAL,
    UNCERTAIN,
    DeltaResource,
    DeltaSubscription,
    DeltaWatchResponse,
    SnapshotCache,
    TypeResources,
    WatchQueue,
)
from controlplane.xds.stream import AdsObserver, StreamInfo, WatchSlot

log = logging.getLogger("nodemesh.controlplane.xds.delta")

WILDCARD = "*"
# Responses a client has not answered yet, per type. Envoy and gRPC answer every
# response at once; the bound only keeps a client that never does from growing it.
MAX_UNANSWERED = 64
# One watch answer is split into responses of about this many resource bytes, so
# that a join into a large mesh (50,000 endpoint memberships and more) never
# builds one message near the gRPC size limits (controlplane/xds/server.py).
DELTA_CHUNK_BYTES = 1024 * 1024


def apply_subscription(sub: DeltaSubscription, known: Mapping[str, str],
                       req: discovery_pb2.DeltaDiscoveryRequest,
                       first: bool) -> tuple[DeltaSubscription, Mapping[str, str]]:
    """The subscription and the client's held versions after `req`. Pure.

    - First request of a type on a stream: no names to (un)subscribe means the
      legacy wildcard; `initial_resource_versions` is what the client kept from a
      previous stream, so matching resources are not sent again.
    - "*" subscribes or unsubscribes the wildcard explicitly.
    - A later subscription to a name is answered even if the client seems to hold
      the current version (the spec: it may have forgotten it).
    - Unsubscribing a name under a wildcard leaves the client unsure whether the
      wildcard still covers it: mark it UNCERTAIN so the next answer says which.
    """
    subscribe = set(req.resource_names_subscribe)
    unsubscribe = set(req.resource_names_unsubscribe)
    if not first and not subscribe and not unsubscribe:
        # A plain ACK or NACK: nothing changes, and the held map is not copied
        # (it is as large as the mesh; a fleet ACKs every push).
        return sub, known
    wildcard = sub.wildcard
    names = set(sub.names)
    held = dict(known)
    if first:
        wildcard = not subscribe and not unsubscribe
        # An empty version would read as NOT_FOUND: treat it as "some copy", i.e. resend.
        held = {n: v for n, v in req.initial_resource_versions.items() if v and n != WILDCARD}
    if WILDCARD in subscribe:
        wildcard = True
    added = subscribe - {WILDCARD}
    names |= added
    if not first:
        for n in added:
            held.pop(n, None)
    for n in unsubscribe - {WILDCARD}:
        if n not in names:
            continue  # a phantom unsubscription: nothing to do
        names.discard(n)
        if wildcard and n in held:
            held[n] = UNCERTAIN
        else:
            held.pop(n, None)
    if WILDCARD in unsubscribe:
        wildcard = False
    sub = DeltaSubscription(wildcard, frozenset(names))
    if not first and not unsubscribe:
        # Only names added: nothing held stops being covered (and a fleet's agents
        # add Workload names on every endpoint change, so skip the walk).
        return sub, held
    # Only what is still covered is tracked (by name, glob or wildcard); the rest
    # the client drops. A resource marked UNCERTAIN stays until answered.
    held = {n: v for n, v in held.items() if (v == UNCERTAIN and wildcard) or sub.covers(n)}
    return sub, held


@dataclass(frozen=True)
class _Sent:
    system_version: str
    names: tuple[str, ...]
    removed: tuple[str, ...]
    # name -> (what the client held before this response, what it holds once it
    # applies it); None: nothing held. A NACK puts back the first.
    held: Mapping[str, tuple[str | None, str | None]] = field(default_factory=dict)


def after_nack(known: Mapping[str, str], rejected: Mapping[str, str],
               sent: _Sent) -> tuple[dict[str, str], dict[str, str]]:
    """The client's held versions and the versions it rejected, after it NACKed
    `sent`. Pure. It keeps what it held before that response (its last ACK),
    for each name no later response has changed since; what it rejected is
    remembered, so that the same version is not offered again (a newer one is)."""
    held = dict(known)
    refused = dict(rejected)
    for name, (before, after) in sent.held.items():
        if held.get(name) != after:
            continue  # a later response changed it again: that one decides
        if before is None:
            held.pop(name, None)
        else:
            held[name] = before
    for name in sent.names:
        refused[name] = sent.held[name][1] or ""
    for name in sent.removed:
        refused[name] = REMOVAL
    return held, refused


@dataclass
class _DeltaTypeState(WatchSlot):
    sub: DeltaSubscription = field(default_factory=DeltaSubscription)
    known: Mapping[str, str] = field(default_factory=dict)  # what the client holds (name -> version)
    rejected: dict[str, str] = field(default_factory=dict)  # what it NACKed (name -> version or REMOVAL)
    unanswered: OrderedDict[str, _Sent] = field(default_factory=OrderedDict)  # nonce -> response
    # A set the client lacks nothing of (under sub and known): the next watch
    # looks only at what changed since (SnapshotCache.create_delta_watch).
    base: TypeResources | None = field(default=None, repr=False)


def split_response(w: DeltaWatchResponse, limit: int = DELTA_CHUNK_BYTES
                   ) -> list[tuple[tuple[DeltaResource, ...], tuple[str, ...]]]:
    """The (resources, removed) of each response `w` is sent as: consecutive runs
    of resources up to `limit` encoded bytes (at least one each), the removals
    with the last. Incremental xDS lets a client apply each on its own."""
    parts: list[tuple[tuple[DeltaResource, ...], tuple[str, ...]]] = []
    run: list[DeltaResource] = []
    size = 0
    for r in w.resources:
        if run and size + len(r.encoded) > limit:
            parts.append((tuple(run), ()))
            run, size = [], 0
        run.append(r)
        size += len(r.encoded)
    parts.append((tuple(run), w.removed))
    return parts


def response_bytes(type_url: str, nonce: str, system_version: str, resources: tuple[DeltaResource, ...],
                   removed: tuple[str, ...], control_plane: str) -> bytes:
    """An encoded DeltaDiscoveryResponse: a small header, then each resource's
    entry as encoded once for every stream (TypeResources.delta_entry)."""
    head = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=system_version, type_url=type_url, nonce=nonce, removed_resources=list(removed))
    head.control_plane.identifier = control_plane
    header: bytes = head.SerializeToString()
    return header + b"".join(r.encoded for r in resources)


class DeltaStrategy:
    """One DeltaAggregatedResources stream's protocol (controlplane/xds/stream.py
    runs the loop). Every request re-arms its type's watch (with the subscription
    it leaves); a response is sent when the watch fires, and the client's held
    versions advance when it is sent; a NACK puts back what the client held
    before (its last ACK) and remembers what it rejected, which is not offered
    again until a new snapshot changes it."""

    protocol = "delta"
    method = "DeltaDiscoveryRequest"

    def __init__(self, observer: AdsObserver, cache: SnapshotCache, control_plane: str) -> None:
        self._observer = observer
        self._cache = cache
        self._control_plane = control_plane
        self._nonces = itertools.count(1)
        self._nacks = 0

    def new_state(self) -> _DeltaTypeState:
        return _DeltaTypeState()

    def request(self, info: StreamInfo, st: _DeltaTypeState, req: discovery_pb2.DeltaDiscoveryRequest,
                first: bool) -> tuple[WatchQueue[DeltaWatchResponse], Callable[[], Any]]:
        stats, sync = self._observer.stats, self._observer.sync
        sent = None
        if req.response_nonce:
            sent = st.unanswered.pop(req.response_nonce, None)
            if sent is None:
                # Not a nonce of this stream's pending responses (already answered,
                # or from a previous stream). The spec says subscription changes
                # still count, so go on.
                stats.stale_requests += 1
            elif req.HasField("error_detail"):
                st.known, st.rejected = after_nack(st.known, st.rejected, sent)
                sync.answered(info.stream, req.type_url, req.response_nonce,
                              req.error_detail.message or "(no reason given)")
                self._nacks += 1
                stats.nacks += 1
                stats.last_nack = f"{info.node_id} {req.type_url}: {req.error_detail.message}"
                shown = ", ".join(sent.names[:5]) + (" …" if len(sent.names) > 5 else "")
                log.warning(
                    "node %s rejected a Delta %s response (nonce %s, system version %s, %d "
                    "resource(s): %s; %d removal(s)): %s. NACK %d on this stream; the node keeps "
                    "its previous copies, and nothing is resent until a new snapshot changes "
                    "these resources: check the mesh config that produced them",
                    info.node_id or "?", req.type_url, req.response_nonce, sent.system_version,
                    len(sent.names), shown or "-", len(sent.removed), req.error_detail.message, self._nacks)
            else:
                for n in (*sent.names, *sent.removed):
                    st.rejected.pop(n, None)
                sync.answered(info.stream, req.type_url, req.response_nonce, None)
                stats.acks += 1
        found = st.stop_watch()
        if found is not None:
            st.base = found
        st.sub, st.known = apply_subscription(st.sub, st.known, req, first)
        # A plain ACK changes neither the subscription nor what the client holds, so
        # its watch starts from the set the last answer came from (or the stopped
        # watch found nothing new in) and looks only at what changed since: an ACK
        # costs the size of the change, not of the subscription (a fleet ACKs every
        # push; at 1,000 nodes the full comparison was most of a push's CPU). Any
        # other request compares the whole subscription: the incremental diff was
        # also tried for subscription changes and NACKs and withdrawn (ed0ebf5: at
        # 100 simulated nodes a third of them missed a Workload or two during a join
        # storm, a hole in that bookkeeping not yet found).
        plain_ack = (sent is not None and not first and not req.HasField("error_detail")
                     and not req.resource_names_subscribe and not req.resource_names_unsubscribe)
        if not plain_ack:
            st.base = None
        return self._cache.create_delta_watch(
            info.node_id, req.type_url, st.sub, st.known, answer_now=first, rejected=st.rejected,
            on_current=functools.partial(sync.current, info.stream, req.type_url), base=st.base)

    def answer(self, info: StreamInfo, type_url: str, st: _DeltaTypeState,
               wresp: DeltaWatchResponse) -> Iterator[bytes]:
        before = st.known
        st.known = wresp.known  # a fresh map per answer (delta_diff), owned by this stream now
        st.base = wresp.source
        for resources, removed in split_response(wresp):
            nonce = str(next(self._nonces))
            st.unanswered[nonce] = _Sent(
                wresp.system_version, tuple(r.name for r in resources), removed,
                {n: (before.get(n), st.known.get(n)) for n in (*(r.name for r in resources), *removed)})
            while len(st.unanswered) > MAX_UNANSWERED:
                st.unanswered.popitem(last=False)
            data = response_bytes(type_url, nonce, wresp.system_version, resources, removed, self._control_plane)
            self._observer.sync.sent(info.stream, type_url, wresp.system_version, nonce, len(data),
                                     wresp.generation)
            yield data
