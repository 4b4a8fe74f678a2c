"""The Delta (incremental) ADS servicer logic: turns one DeltaAggregatedResources
stream into SnapshotCache delta watches, one per type URL, and keeps per type
what the client subscribes to and which resource versions it holds.

The cache decides what to send (controlplane.xds.cache.delta_diff); this module
only follows the protocol (envoy docs, "xDS REST and gRPC protocol",
Incremental xDS): subscriptions (the "*" wildcard and the legacy empty first
request), initial_resource_versions after a reconnect, nonces, ACK and NACK.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.xds.cache import (
    REMOVAL,
    UNCERTAIN,
    DeltaResource,
    DeltaSubscription,
    DeltaWatchResponse,
    SnapshotCache,
    TypeResources,
)

if TYPE_CHECKING:
    from controlplane.xds.server import AdsStats
    from controlplane.xds.sync import SyncTracker

log = logging.getLogger("nodemesh.controlplane.xds.delta")

WILDCARD = "*"
# Responses a client has not answered yet, per type. Envoy and gRPC answer every
# response at once; the bound only keeps a client that never does from growing it.
MAX_UNANSWERED = 64
# One watch answer is split into responses of about this many resource bytes, so
# that a join into a large mesh (50,000 endpoint memberships and more) never
# builds one message near the gRPC size limits (controlplane/xds/server.py).
DELTA_CHUNK_BYTES = 1024 * 1024


class AdsObserver(Protocol):
    """What the Delta stream reports to: the ADS servicer's counters and hooks,
    shared with state of the world so that stats and metrics cover both."""

    stats: AdsStats
    sync: SyncTracker


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
class _DeltaTypeState:
    sub: DeltaSubscription = field(default_factory=DeltaSubscription)
    known: Mapping[str, str] = field(default_factory=dict)  # what the client holds (name -> version)
    rejected: dict[str, str] = field(default_factory=dict)  # what it NACKed (name -> version or REMOVAL)
    unanswered: OrderedDict[str, _Sent] = field(default_factory=OrderedDict)  # nonce -> response
    watch_id: int = 0
    cancel: Callable[[], TypeResources | None] | None = None
    forwarder: asyncio.Task[None] | None = field(default=None, repr=False)
    # A set the client lacks nothing of (under sub and known): the next watch
    # looks only at what changed since (SnapshotCache.create_delta_watch).
    base: TypeResources | None = field(default=None, repr=False)

    def stop_watch(self) -> None:
        if self.cancel is not None:
            found = self.cancel()
            if found is not None:
                self.base = found
            self.cancel = None
        if self.forwarder is not None:
            self.forwarder.cancel()
            self.forwarder = None


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


async def serve_delta(observer: AdsObserver, cache: SnapshotCache, control_plane: str,
                      request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
                      context: grpc.aio.ServicerContext, stream: int = 0) -> AsyncIterator[bytes]:
    """One DeltaAggregatedResources stream. Every request re-arms its type's watch
    (with the subscription it leaves); a response is sent when the watch fires,
    and the client's held versions advance when it is sent. So after a NACK
    nothing is resent until a new snapshot changes a covered resource: sending the
    rejected resources again would only be rejected again."""
    stats = observer.stats
    # Requests and watch answers meet in one queue, so all per-stream state is
    # touched by this one loop only.
    events: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
    states: dict[str, _DeltaTypeState] = {}
    nonces = itertools.count(1)
    watch_ids = itertools.count(1)
    node_id = ""
    nacks_on_stream = 0

    async def read() -> None:
        try:
            async for req in request_iterator:
                await events.put(("req", req))
            await events.put(("eof", None))
        except Exception as e:  # noqa: BLE001 - the client went away; any error ends the stream
            await events.put(("eof", e))

    async def forward(type_url: str, watch_id: int, q: asyncio.Queue[DeltaWatchResponse]) -> None:
        resp = await q.get()
        await events.put(("resp", (type_url, watch_id, resp)))

    reader = asyncio.create_task(read())
    sync = observer.sync
    sync.opened(stream, "delta")
    stats.streams_opened += 1
    stats.delta_streams_opened += 1
    stats.streams_active += 1
    try:
        while True:
            kind, item = await events.get()
            if kind == "eof":
                return
            if kind == "req":
                req = cast(discovery_pb2.DeltaDiscoveryRequest, item)
                if req.node.id:
                    node_id = req.node.id
                    sync.identify(stream, req.node)
                if not req.type_url:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "DeltaDiscoveryRequest without type_url; ADS needs it on every "
                                        "request (check the client's xDS configuration)")
                st = states.get(req.type_url)
                first = st is None
                if st is None:
                    st = states[req.type_url] = _DeltaTypeState()
                if req.response_nonce:
                    sent = st.unanswered.pop(req.response_nonce, None)
                    if sent is None:
                        # Not a nonce of this stream's pending responses (already answered,
                        # or from a previous stream). The spec says subscription changes
                        # still count, so go on.
                        stats.stale_requests += 1
                    elif req.HasField("error_detail"):
                        st.known, st.rejected = after_nack(st.known, st.rejected, sent)
                        sync.answered(stream, req.type_url, req.response_nonce,
                                      req.error_detail.message or "(no reason given)")
                        nacks_on_stream += 1
                        stats.nacks += 1
                        stats.last_nack = f"{node_id} {req.type_url}: {req.error_detail.message}"
                        shown = ", ".join(sent.names[:5]) + (" …" if len(sent.names) > 5 else "")
                        log.warning(
                            "node %s rejected a Delta %s response (nonce %s, system version %s, %d "
                            "resource(s): %s; %d removal(s)): %s. NACK %d on this stream; the node keeps "
                            "its previous copies, and nothing is resent until a new snapshot changes "
                            "these resources: check the mesh config that produced them",
                            node_id or "?", req.type_url, req.response_nonce, sent.system_version,
                            len(sent.names), shown or "-", len(sent.removed), req.error_detail.message,
                            nacks_on_stream)
                    else:
                        for n in (*sent.names, *sent.removed):
                            st.rejected.pop(n, None)
                        sync.answered(stream, req.type_url, req.response_nonce, None)
                        stats.acks += 1
                st.stop_watch()
                old_sub = st.sub
                st.sub, st.known = apply_subscription(st.sub, st.known, req, first)
                also: frozenset[str] | None = None
                if first or st.sub.wildcard != old_sub.wildcard:
                    st.base = None  # look at everything the subscription covers
                elif st.sub is not old_sub or req.resource_names_subscribe or req.resource_names_unsubscribe:
                    # Only the names (and slice globs) this request (un)subscribed, besides what changed.
                    also = frozenset(req.resource_names_subscribe) | frozenset(req.resource_names_unsubscribe)
                q, cancel = cache.create_delta_watch(node_id, req.type_url, st.sub, st.known, answer_now=first,
                                                     rejected=st.rejected,
                                                     on_current=functools.partial(sync.current, stream, req.type_url),
                                                     base=st.base, also=also)
                st.watch_id = next(watch_ids)
                st.cancel = cancel
                st.forwarder = asyncio.create_task(forward(req.type_url, st.watch_id, q))
                continue
            # kind == "resp"
            type_url, watch_id, wresp = cast(tuple[str, int, DeltaWatchResponse], item)
            st = states.get(type_url)
            if st is None or st.watch_id != watch_id:
                continue  # superseded by a later request of this type
            st.cancel = None
            st.forwarder = None
            before = st.known
            st.known = wresp.known  # a fresh map per answer (delta_diff), owned by this stream now
            st.base = wresp.source
            for resources, removed in split_response(wresp):
                nonce = str(next(nonces))
                st.unanswered[nonce] = _Sent(
                    wresp.system_version, tuple(r.name for r in resources), removed,
                    {n: (before.get(n), st.known.get(n)) for n in (*(r.name for r in resources), *removed)})
                while len(st.unanswered) > MAX_UNANSWERED:
                    st.unanswered.popitem(last=False)
                stats.responses += 1
                data = response_bytes(type_url, nonce, wresp.system_version, resources, removed, control_plane)
                sync.sent(stream, type_url, wresp.system_version, nonce, len(data), wresp.generation)
                yield data
    finally:
        sync.closed(stream)
        stats.streams_active -= 1
        reader.cancel()
        for st in states.values():
            st.stop_watch()
