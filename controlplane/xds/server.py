"""The ADS servicer: turns a gRPC stream into cache watches, one per type URL,
and tracks nonces, ACKs and NACKs per stream. State of the world here; Delta
(incremental) in controlplane/xds/delta.py."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.xds.cache import SnapshotCache, WatchResponse
from controlplane.xds.delta import serve_delta
from controlplane.xds.sync import SyncTracker

log = logging.getLogger("nodemesh.controlplane.xds")

CONTROL_PLANE_ID = "nodemesh"
_ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

# gRPC message size limits, set on purpose rather than left at the library's
# defaults (4 MiB received, unlimited sent). Delta responses are split well below
# them (controlplane/xds/delta.py DELTA_CHUNK_BYTES), so only one resource larger
# than the limit, or a state-of-the-world type larger than it, can reach them;
# our agents accept the same size (nodeagent/cpchannel.py). Requests are small:
# a subscription list, at most initial_resource_versions for what a client holds.
MAX_SEND_BYTES = 64 * 1024 * 1024
MAX_RECEIVE_BYTES = 16 * 1024 * 1024
# gRPC clients other than ours keep the 4 MiB default: warn when a state-of-the-world
# response is larger, naming the type, since such a client will drop the stream.
FOREIGN_CLIENT_LIMIT_BYTES = 4 * 1024 * 1024
SERVER_OPTIONS = (("grpc.max_send_message_length", MAX_SEND_BYTES),
                  ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES))


def _passthrough(msg: bytes | object) -> bytes:
    # Responses are assembled from pre-encoded bytes (controlplane/xds/cache.py);
    # anything else is a message to serialize.
    return msg if isinstance(msg, bytes) else msg.SerializeToString()  # type: ignore[attr-defined]


def add_to_server(servicer: AdsServicer, server: grpc.aio.Server) -> None:
    """Register ADS with a response serializer that passes bytes through (the
    generated helper would serialize each response again, per stream)."""
    handlers = {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.StreamAggregatedResources,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=_passthrough),
        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.DeltaAggregatedResources,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=_passthrough),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_ADS_SERVICE, handlers),))


def sotw_response_bytes(version: str, type_url: str, nonce: str, encoded_resources: bytes) -> bytes:
    head = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url, nonce=nonce)
    head.control_plane.identifier = CONTROL_PLANE_ID
    header: bytes = head.SerializeToString()
    return header + encoded_resources


@dataclass
class AdsStats:
    """Counters for the admin page and tests."""

    streams_opened: int = 0
    streams_active: int = 0
    delta_streams_opened: int = 0  # of streams_opened, those on DeltaAggregatedResources
    responses: int = 0
    acks: int = 0
    nacks: int = 0
    stale_requests: int = 0
    last_nack: str = ""  # "<node> <type>: <error>"


@dataclass
class _TypeState:
    names: frozenset[str] = frozenset()  # empty: wildcard
    nonce: str = ""  # of the latest response sent
    sent_version: str = ""
    acked_version: str = ""
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


def _names(req: discovery_pb2.DiscoveryRequest) -> frozenset[str]:
    # Envoy spells an explicit wildcard "*"; both it and no names mean "everything".
    names = frozenset(req.resource_names)
    return frozenset() if "*" in names else names


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """envoy.service.discovery.v3.AggregatedDiscoveryService over a SnapshotCache."""

    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache
        self.stats = AdsStats()
        # Per-client state (proxy status), push timing and how far each stream is behind.
        self.sync = SyncTracker(generation=lambda: cache.generation)
        self._streams = itertools.count(1)
        self._nonces = itertools.count(1)
        self._watch_ids = itertools.count(1)

    async def StreamAggregatedResources(
            self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
            context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Yields encoded DiscoveryResponses (register with add_to_server)."""
        # Requests and watch answers meet in one queue, so all per-stream state is
        # touched by this one loop only.
        events: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        states: dict[str, _TypeState] = {}
        node_id = ""

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await events.put(("req", req))
                await events.put(("eof", None))
            except Exception as e:  # noqa: BLE001 - the client went away; any error ends the stream
                await events.put(("eof", e))

        async def forward(type_url: str, watch_id: int, q: asyncio.Queue[WatchResponse]) -> None:
            resp = await q.get()
            await events.put(("resp", (type_url, watch_id, resp)))

        reader = asyncio.create_task(read())
        self.stats.streams_opened += 1
        self.stats.streams_active += 1
        stream = next(self._streams)
        self.sync.opened(stream, "sotw")
        try:
            while True:
                kind, item = await events.get()
                if kind == "eof":
                    return
                if kind == "req":
                    assert isinstance(item, discovery_pb2.DiscoveryRequest)
                    req = item
                    if req.node.id:
                        node_id = req.node.id
                        self.sync.identify(stream, req.node)
                    if not req.type_url:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            "DiscoveryRequest without type_url; ADS needs it on every request")
                    st = states.get(req.type_url)
                    names = _names(req)
                    if st is None:
                        # First request of this type on this stream: always answer, even when
                        # the client says it has the current version (it may have restarted).
                        st = states[req.type_url] = _TypeState(names=names)
                        known = ""
                    else:
                        if req.response_nonce != st.nonce:
                            # An answer to a response that has since been superseded.
                            self.stats.stale_requests += 1
                            continue
                        if req.HasField("error_detail"):
                            self.sync.answered(stream, req.type_url, req.response_nonce,
                                               req.error_detail.message or "(no reason given)")
                            self.stats.nacks += 1
                            self.stats.last_nack = (f"{node_id} {req.type_url}: "
                                                    f"{req.error_detail.message}")
                            log.warning("node %s rejected %s version %s (nonce %s): %s; it keeps "
                                        "version %r until a new snapshot", node_id or "?", req.type_url,
                                        st.sent_version, req.response_nonce, req.error_detail.message,
                                        req.version_info)
                        elif req.response_nonce:
                            self.sync.answered(stream, req.type_url, req.response_nonce, None)
                            self.stats.acks += 1
                            st.acked_version = req.version_info
                        # Whether ACK or NACK, wait for a snapshot newer than what was sent:
                        # resending a rejected version would only be rejected again.
                        known = st.sent_version
                        if names != st.names:
                            st.names = names
                            known = ""  # a changed subscription is answered at once
                    st.stop_watch()
                    q, cancel = self._cache.create_watch(
                        node_id, req.type_url, st.names, known,
                        on_current=functools.partial(self.sync.current, stream, req.type_url))
                    st.watch_id = next(self._watch_ids)
                    st.cancel = cancel
                    st.forwarder = asyncio.create_task(forward(req.type_url, st.watch_id, q))
                    continue
                # kind == "resp"
                type_url, watch_id, wresp = cast(tuple[str, int, WatchResponse], item)
                st = states.get(type_url)
                if st is None or st.watch_id != watch_id:
                    continue
                st.cancel = None
                st.forwarder = None
                st.nonce = str(next(self._nonces))
                st.sent_version = wresp.version
                self.stats.responses += 1
                data = sotw_response_bytes(wresp.version, type_url, st.nonce, wresp.encoded)
                if len(data) > FOREIGN_CLIENT_LIMIT_BYTES:
                    log.warning("node %s: a %s response of %d bytes (%d resources) exceeds gRPC's default "
                                "4 MiB receive limit; Envoy takes it, a proxyless gRPC client will reset the "
                                "stream (use Delta, or subscribe by name)", node_id or "?", type_url,
                                len(data), len(wresp.names))
                self.sync.sent(stream, type_url, wresp.version, st.nonce, len(data), wresp.generation)
                yield data
        finally:
            self.sync.closed(stream)
            self.stats.streams_active -= 1
            reader.cancel()
            for st in states.values():
                st.stop_watch()

    async def DeltaAggregatedResources(
            self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
            context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        # Incremental ADS (controlplane/xds/delta.py), over the same cache and counters.
        async for resp in serve_delta(self, self._cache, CONTROL_PLANE_ID, request_iterator, context,
                                      next(self._streams)):
            yield resp
