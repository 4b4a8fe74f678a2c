"""The one ADS stream loop, for state of the world and Delta alike: requests and
watch answers meet in one queue, so all of a stream's state is touched by this
loop only; each type URL has one watch at a time, re-armed by every request of
that type. What a request and an answer mean is the protocol's own business,
given as a strategy (controlplane/xds/server.py SotwStrategy, delta.py
DeltaStrategy); the loop owns the rest: the reader, the watch answers, node
identity, the stream counters and the proxy-status records.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc

if TYPE_CHECKING:
    from controlplane.xds.cache import WatchQueue
    from controlplane.xds.server import AdsStats
    from controlplane.xds.sync import SyncTracker


class AdsObserver(Protocol):
    """What a stream reports to: the ADS servicer's counters and per-client sync
    state, shared by both protocols so that stats and metrics cover both."""

    stats: AdsStats
    sync: SyncTracker


@dataclass
class WatchSlot:
    """A type's one pending watch on a stream. Protocol states extend it."""

    watch_id: int = 0
    cancel: Callable[[], Any] | None = None

    def stop_watch(self) -> Any:
        """Drop the pending watch; returns what its cancel() returned (Delta: the
        latest set the watch found nothing new in), else None. An answer it gave
        already is in the stream's events with the old watch id, and is skipped."""
        found = None
        if self.cancel is not None:
            found = self.cancel()
            self.cancel = None
        return found


@dataclass
class StreamInfo:
    """What the strategy may read about its stream."""

    stream: int
    node_id: str = ""


StateT = TypeVar("StateT", bound=WatchSlot)
ReqT = TypeVar("ReqT", contravariant=True)
RespT = TypeVar("RespT")


class StreamStrategy(Protocol[StateT, ReqT, RespT]):
    protocol: str  # "sotw" or "delta", for proxy status and the counters
    method: str  # the RPC's name, for error messages

    def new_state(self) -> StateT: ...

    def request(self, info: StreamInfo, st: StateT, req: ReqT,
                first: bool) -> tuple[WatchQueue[RespT], Callable[[], Any]] | None:
        """Account for `req` (ACK, NACK, subscription) and return the type's new
        watch (queue, cancel), or None to leave the current one in place."""
        ...

    def answer(self, info: StreamInfo, type_url: str, st: StateT, resp: RespT) -> Iterator[bytes]:
        """The encoded responses that the watch's answer `resp` becomes."""
        ...


async def serve_stream(observer: AdsObserver, strategy: StreamStrategy[StateT, ReqT, RespT],
                       request_iterator: AsyncIterator[ReqT], context: grpc.aio.ServicerContext,
                       stream: int) -> AsyncIterator[bytes]:
    """One ADS stream: yields encoded responses until the client goes away."""
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    states: dict[str, StateT] = {}
    info = StreamInfo(stream)
    watch_ids = 0
    stats, sync = observer.stats, observer.sync

    async def read() -> None:
        try:
            async for req in request_iterator:
                await events.put(("req", req))
            await events.put(("eof", None))
        except Exception as e:  # noqa: BLE001 - the client went away; any error ends the stream
            await events.put(("eof", e))

    def answered(type_url: str, watch_id: int) -> Callable[[RespT], None]:
        # A watch's answer goes straight into this stream's events (no task per watch).
        return lambda resp: events.put_nowait(("resp", (type_url, watch_id, resp)))

    reader = asyncio.create_task(read())
    sync.opened(stream, strategy.protocol)
    stats.streams_opened += 1
    if strategy.protocol == "delta":
        stats.delta_streams_opened += 1
    stats.streams_active += 1
    try:
        while True:
            kind, item = await events.get()
            if kind == "eof":
                return
            if kind == "req":
                req = item
                if req.node.id:
                    info.node_id = req.node.id
                    sync.identify(stream, req.node)
                if not req.type_url:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"{strategy.method} request without type_url; ADS needs it on every "
                                        "request (check the client's xDS configuration)")
                st = states.get(req.type_url)
                first = st is None
                if st is None:
                    st = states[req.type_url] = strategy.new_state()
                watch = strategy.request(info, st, req, first)
                if watch is None:
                    continue
                q, cancel = watch
                watch_ids += 1
                st.watch_id = watch_ids
                st.cancel = cancel
                q.deliver(answered(req.type_url, st.watch_id))
                continue
            # kind == "resp": a watch fired
            type_url, watch_id, resp = item
            st = states.get(type_url)
            if st is None or st.watch_id != watch_id:
                continue  # superseded by a later request of this type
            st.cancel = None
            for data in strategy.answer(info, type_url, st, resp):
                stats.responses += 1
                yield data
    finally:
        sync.closed(stream)
        stats.streams_active -= 1
        reader.cancel()
        for st in states.values():
            st.stop_watch()
