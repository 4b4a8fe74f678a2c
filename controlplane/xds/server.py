"""The ADS servicer: both RPCs run the one stream loop (controlplane/xds/stream.py)
that turns a gRPC stream into cache watches, one per type URL; state of the
world's protocol (nonces, one version per type, ACK and NACK) is the strategy
here, Delta's (incremental) in controlplane/xds/delta.py."""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.xds.cache import SnapshotCache, WatchQueue, WatchResponse
from controlplane.xds.delta import DeltaStrategy
from controlplane.xds.stream import AdsObserver, StreamInfo, WatchSlot, serve_stream
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
class _TypeState(WatchSlot):
    names: frozenset[str] = frozenset()  # empty: wildcard
    nonce: str = ""  # of the latest response sent
    sent_version: str = ""
    acked_version: str = ""


def _names(req: discovery_pb2.DiscoveryRequest) -> frozenset[str]:
    # Envoy spells an explicit wildcard "*"; both it and no names mean "everything".
    names = frozenset(req.resource_names)
    return frozenset() if "*" in names else names


class SotwStrategy:
    """One StreamAggregatedResources stream's protocol (controlplane/xds/stream.py
    runs the loop): a version per type, answered only for the latest nonce; after
    an ACK or a NACK the type waits for a snapshot newer than what was sent
    (resending a rejected version would only be rejected again)."""

    protocol = "sotw"
    method = "DiscoveryRequest"

    def __init__(self, observer: AdsObserver, cache: SnapshotCache, nonces: Iterator[int]) -> None:
        self._observer = observer
        self._cache = cache
        self._nonces = nonces

    def new_state(self) -> _TypeState:
        return _TypeState()

    def request(self, info: StreamInfo, st: _TypeState, req: discovery_pb2.DiscoveryRequest,
                first: bool) -> tuple[WatchQueue[WatchResponse], Callable[[], Any]] | None:
        stats, sync = self._observer.stats, self._observer.sync
        names = _names(req)
        if first:
            # First request of this type on this stream: always answer, even when
            # the client says it has the current version (it may have restarted).
            st.names = names
            known = ""
        else:
            if req.response_nonce != st.nonce:
                stats.stale_requests += 1  # an answer to a response since superseded
                return None
            if req.HasField("error_detail"):
                sync.answered(info.stream, req.type_url, req.response_nonce,
                              req.error_detail.message or "(no reason given)")
                stats.nacks += 1
                stats.last_nack = f"{info.node_id} {req.type_url}: {req.error_detail.message}"
                log.warning("node %s rejected %s version %s (nonce %s): %s; it keeps version %r until a new "
                            "snapshot", info.node_id or "?", req.type_url, st.sent_version, req.response_nonce,
                            req.error_detail.message, req.version_info)
            elif req.response_nonce:
                sync.answered(info.stream, req.type_url, req.response_nonce, None)
                stats.acks += 1
                st.acked_version = req.version_info
            # Whether ACK or NACK, wait for a snapshot newer than what was sent.
            known = st.sent_version
            if names != st.names:
                st.names = names
                known = ""  # a changed subscription is answered at once
        st.stop_watch()
        return self._cache.create_watch(info.node_id, req.type_url, st.names, known,
                                        on_current=functools.partial(sync.current, info.stream, req.type_url))

    def answer(self, info: StreamInfo, type_url: str, st: _TypeState, wresp: WatchResponse) -> Iterator[bytes]:
        st.nonce = str(next(self._nonces))
        st.sent_version = wresp.version
        data = sotw_response_bytes(wresp.version, type_url, st.nonce, wresp.encoded)
        if len(data) > FOREIGN_CLIENT_LIMIT_BYTES:
            log.warning("node %s: a %s response of %d bytes (%d resources) exceeds gRPC's default 4 MiB receive "
                        "limit; Envoy takes it, a proxyless gRPC client will reset the stream (use Delta, or "
                        "subscribe by name)", info.node_id or "?", type_url, len(data), len(wresp.names))
        self._observer.sync.sent(info.stream, type_url, wresp.version, st.nonce, len(data), wresp.generation)
        yield data


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """envoy.service.discovery.v3.AggregatedDiscoveryService over a SnapshotCache:
    both RPCs run the one stream loop (controlplane/xds/stream.py), each with its
    protocol's strategy."""

    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache
        self.stats = AdsStats()
        # Per-client state (proxy status), push timing and how far each stream is behind.
        self.sync = SyncTracker(generation=lambda: cache.generation)
        self._streams = itertools.count(1)
        self._nonces = itertools.count(1)

    async def StreamAggregatedResources(
            self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
            context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Yields encoded DiscoveryResponses (register with add_to_server)."""
        async for data in serve_stream(self, SotwStrategy(self, self._cache, self._nonces), request_iterator,
                                       context, next(self._streams)):
            yield data

    async def DeltaAggregatedResources(
            self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
            context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Yields encoded DeltaDiscoveryResponses (controlplane/xds/delta.py)."""
        async for data in serve_stream(self, DeltaStrategy(self, self._cache, CONTROL_PLANE_ID),
                                       request_iterator, context, next(self._streams)):
            yield data
