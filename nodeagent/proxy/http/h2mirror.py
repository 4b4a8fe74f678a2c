"""Request mirroring (the route's RequestMirror filter) for HTTP/2 and gRPC.

Fire and forget: for each mirror the route selects (by its percentage), a task
waits for the original request to be complete, then sends a copy (headers and
the buffered body, `:authority` with a `-shadow` suffix as Envoy does) to an
endpoint of the mirror's cluster on a stream of the same pooled h2c upstream
connections the original uses (h2upstream.H2UpstreamPool). The original never
waits for it: the copy is made from the body the call keeps anyway for retries
(bounded by MAX_BUFFERED_BODY); a body over that bound is not mirrored and is
counted (`skipped_body`). The mirror's response is read and discarded (window
credit returned at once so it can never hold the shared connection), and any
failure is counted and logged at debug level, never reported to the client.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import h2.exceptions

from nodeagent.meshview.snapshot import Snapshot

from ..errors import ProxyError
from .h2core import Headers, strip_connection_headers
from .h2upstream import StreamHandler
from .pipeline import MAX_BUFFERED_BODY, Request, shadow_authority
from .timeout import GRPC_TIMEOUT_HEADER, MESH_DEADLINE_HEADER

if TYPE_CHECKING:
    from .h2stack import H2Call
    from .h2upstream import H2Upstream

log = logging.getLogger(__name__)

MIRROR_TIMEOUT_S = 5.0  # a mirror still unanswered after this is reset (it holds a stream slot)


class _Sink(StreamHandler):
    """The mirror stream's handler: discards the response, returns its window."""

    def __init__(self, conn: H2Upstream) -> None:
        self.conn = conn
        self.sid = 0
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.closed = False

    def _end(self, what: str) -> None:
        if not self.done.done():
            self.done.set_result(what)

    def on_head(self, headers: Headers, ended: bool) -> None:
        if ended:
            self.closed = True
            self.conn.release(self.sid, reset=False)
            self._end("")

    def on_data(self, data: bytes, flow_controlled_length: int) -> None:
        self.conn.core.acknowledge(self.sid, flow_controlled_length)
        self.conn.flush()

    def on_trailers(self, headers: Headers) -> None:
        self.on_end()

    def on_end(self) -> None:
        if not self.closed:
            self.closed = True
            self.conn.release(self.sid, reset=False)
        self._end("")

    def on_reset(self, why: str) -> None:
        self.closed = True
        self._end(why or "reset")

    def on_drained(self) -> None:
        pass

    def abandon(self) -> None:
        if not self.closed:
            self.closed = True
            self.conn.release(self.sid, reset=True)


async def mirror(call: H2Call, snapshot: Snapshot, cluster: str, req: Request) -> None:
    """One copy of the call's request to an endpoint of `cluster` (its own task)."""
    rt = call.rt
    st = rt.mirror_stats
    # The copy needs the whole request: wait (without holding the original) until it is in.
    complete = await asyncio.shield(call.request_complete)
    if not complete:
        if call.overflow:
            st.skipped_body += 1
            log.debug("mirror to %s skipped: request body over the %d-byte buffer", cluster, MAX_BUFFERED_BODY)
        else:
            st.skipped_incomplete += 1
        return
    sp = rt.port_of_cluster(snapshot, cluster)
    if sp is None:
        st.skipped_no_endpoint += 1
        log.info("mirror cluster %s is not known (does the RequestMirror backendRef name an existing Service "
                 "and port?)", cluster)
        return
    dest = rt.destination(sp)
    cands = dest.candidates(sp.endpoints, rt.proxy.settings.node_name, "")
    if not cands:
        st.skipped_no_endpoint += 1
        return
    ep = dest.pick(cands, None)
    fwd: Headers = [(":method", req.method), (":scheme", call.pseudo.get(":scheme", "http")),
                    (":path", req.target), (":authority", shadow_authority(req.authority))]
    # The shadow has its own timeout; the original's deadline headers do not apply to it.
    fwd += [(k, v) for k, v in strip_connection_headers(list(req.headers))
            if k not in ("host", MESH_DEADLINE_HEADER, GRPC_TIMEOUT_HEADER)]
    body = bytes(call.body)
    sink: _Sink | None = None
    try:
        async with asyncio.timeout(MIRROR_TIMEOUT_S):
            conn = await rt.h2_upstreams.get(snapshot, ep, call.source_id, call.session)
            sink = _Sink(conn)
            nothing_more = not body and call.request_trailers is None
            sink.sid = conn.open_stream(fwd, sink, end_stream=nothing_more)
            st.sent += 1
            if not nothing_more:
                if body:
                    conn.core.send_data(sink.sid, body)
                conn.core.end_stream(sink.sid, call.request_trailers)
                conn.flush()
            why = await sink.done
        if why:
            st.failed += 1
            log.debug("mirror to %s (%s:%s) failed: %s", cluster, ep.ip, ep.port, why)
        else:
            st.completed += 1
    except (TimeoutError, ProxyError, h2.exceptions.H2Error, OSError) as e:
        st.failed += 1
        log.debug("mirror to %s (%s:%s) failed: %r", cluster, ep.ip, ep.port, e)
    except Exception:
        st.failed += 1
        log.exception("mirror to %s failed unexpectedly", cluster)
    finally:
        if sink is not None:
            sink.abandon()
