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
import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.xds.cache import UNCERTAIN, DeltaSubscription, DeltaWatchResponse, SnapshotCache

if TYPE_CHECKING:
    from controlplane.xds.server import AdsStats

log = logging.getLogger("nodemesh.controlplane.xds.delta")

WILDCARD = "*"
# Responses a client has not answered yet, per type. Envoy and gRPC answer every
# response at once; the bound only keeps a client that never does from growing it.
MAX_UNANSWERED = 64


class AdsObserver(Protocol):
    """What the Delta stream reports to: the ADS servicer's counters and hooks,
    shared with state of the world so that stats and metrics cover both."""

    stats: AdsStats
    on_ack: Callable[[str, str, str], None] | None
    on_nack: Callable[[str, str], None] | None


def apply_subscription(sub: DeltaSubscription, known: Mapping[str, str],
                       req: discovery_pb2.DeltaDiscoveryRequest,
                       first: bool) -> tuple[DeltaSubscription, dict[str, str]]:
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
    if not wildcard:
        # Only what is still subscribed by name is tracked; the rest the client drops.
        held = {n: v for n, v in held.items() if n in names}
    return DeltaSubscription(wildcard, frozenset(names)), held


@dataclass(frozen=True)
class _Sent:
    system_version: str
    names: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass
class _DeltaTypeState:
    sub: DeltaSubscription = field(default_factory=DeltaSubscription)
    known: dict[str, str] = field(default_factory=dict)  # what the client holds (name -> version)
    unanswered: OrderedDict[str, _Sent] = field(default_factory=OrderedDict)  # nonce -> response
    watch_id: int = 0
    cancel: Callable[[], None] | None = None
    forwarder: asyncio.Task[None] | None = field(default=None, repr=False)

    def stop_watch(self) -> None:
        if self.cancel is not None:
            self.cancel()
            self.cancel = None
        if self.forwarder is not None:
            self.forwarder.cancel()
            self.forwarder = None


def _response(type_url: str, nonce: str, w: DeltaWatchResponse,
              control_plane: str) -> discovery_pb2.DeltaDiscoveryResponse:
    resp = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=w.system_version, type_url=type_url, nonce=nonce,
        removed_resources=list(w.removed))
    for r in w.resources:
        out = resp.resources.add(name=r.name, version=r.version)
        out.resource.CopyFrom(r.resource)
    resp.control_plane.identifier = control_plane
    return resp


async def serve_delta(observer: AdsObserver, cache: SnapshotCache, control_plane: str,
                      request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
                      context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
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
                        if observer.on_nack is not None:
                            observer.on_nack(node_id, req.type_url)
                    else:
                        stats.acks += 1
                        if observer.on_ack is not None:
                            observer.on_ack(node_id, req.type_url, sent.system_version)
                st.sub, st.known = apply_subscription(st.sub, st.known, req, first)
                st.stop_watch()
                q, cancel = cache.create_delta_watch(node_id, req.type_url, st.sub, st.known)
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
            st.known = dict(wresp.known)
            nonce = str(next(nonces))
            st.unanswered[nonce] = _Sent(wresp.system_version, tuple(r.name for r in wresp.resources),
                                         wresp.removed)
            while len(st.unanswered) > MAX_UNANSWERED:
                st.unanswered.popitem(last=False)
            stats.responses += 1
            yield _response(type_url, nonce, wresp, control_plane)
    finally:
        stats.streams_active -= 1
        reader.cancel()
        for st in states.values():
            st.stop_watch()
