"""HBONE over an mTLS transport: asyncio Protocols that drive the HBONE core,
and StreamEnd, one tunnel seen as a relay end."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from . import hbone
from .errors import ProxyError, RemoteProtocolError, StreamRefused
from .relay import End, Session
from .tls import peer_serial

log = logging.getLogger(__name__)


class StreamEnd:
    """One CONNECT tunnel. Data received is acknowledged (HTTP/2 window credit
    returned) only once the partner took it without pushing back.

    The peer may send data right behind its 200 (a server that speaks first:
    an HTTP/2 server's SETTINGS, an SMTP banner), often in the same read as
    the 200, before the opener had a turn to attach its partner. That data
    (and an early EOF) is held, unacknowledged, until attach() delivers it."""

    def __init__(self, conn: HboneProtocol, stream_id: int, session: Session) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.session = session
        self.partner: End | None = None
        self.rx = 0
        self.tx = 0
        self._unacked = 0
        self._ack_paused = False
        self._window_blocked = False
        self._partner_paused = False
        self._closed = False
        self._early: list[bytes] = []  # received before a partner was attached
        self._early_eof = False
        self._eof_seen = False
        session.end_opened()

    def attach(self, partner: End) -> None:
        """Join the partner and hand it what arrived before it (see the class doc)."""
        self.partner = partner
        early, self._early = self._early, []
        for chunk in early:
            partner.send(chunk)  # may call our pause_reading() synchronously
        if self._early_eof:
            self._early_eof = False
            partner.send_eof()
        self._update_partner_reading()  # a window that blocked before the partner came
        if not self._ack_paused and self._unacked and not self._closed:
            n, self._unacked = self._unacked, 0
            self.conn.core.acknowledge(self.stream_id, n)
            self.conn.flush()
        if self.conn.core.peer_ended(self.stream_id) and not self._eof_seen:
            self.on_peer_eof()  # END_STREAM came with the CONNECT itself

    # -- End: called by the partner --
    def send(self, data: bytes) -> None:
        if self._closed:
            return
        self.tx += len(data)
        self._window_blocked = self.conn.core.send(self.stream_id, data)
        self.conn.flush()
        self._update_partner_reading()

    def send_eof(self) -> None:
        if self._closed:
            return
        finished = self.conn.core.end(self.stream_id)
        self.conn.flush()
        if finished:
            self._on_closed()

    def abort(self) -> None:
        if self._closed:
            return
        self.conn.core.reset(self.stream_id, hbone.RST_CANCEL)
        self.conn.flush()
        self._on_closed(propagate=False)

    def pause_reading(self) -> None:
        self._ack_paused = True

    def resume_reading(self) -> None:
        self._ack_paused = False
        if self._unacked:
            n, self._unacked = self._unacked, 0
            self.conn.core.acknowledge(self.stream_id, n)
            self.conn.flush()

    # -- events from the connection --
    def on_data(self, data: bytes, flow_controlled_length: int) -> None:
        self.rx += len(data)
        self._unacked += flow_controlled_length
        if self.partner is None:
            self._early.append(data)  # no credit back until attach() passed it on
            return
        self.partner.send(data)  # may call our pause_reading() synchronously
        if not self._ack_paused and self._unacked:
            n, self._unacked = self._unacked, 0
            self.conn.core.acknowledge(self.stream_id, n)

    def on_peer_eof(self) -> None:
        self._eof_seen = True
        if self.partner is not None:
            self.partner.send_eof()
        else:
            self._early_eof = True

    def on_unblocked(self) -> None:
        self._window_blocked = False
        self._update_partner_reading()

    def on_connection_paused(self) -> None:
        self._update_partner_reading()

    def on_reset(self, why: str) -> None:
        if self._closed:
            return
        self.session.fields.setdefault("error", why)
        self._on_closed(propagate=True)

    def on_closed(self) -> None:
        self._on_closed(propagate=False)

    def _update_partner_reading(self) -> None:
        want_pause = self._window_blocked or self.conn.write_paused
        if self.partner is None or want_pause == self._partner_paused:
            return
        self._partner_paused = want_pause
        if want_pause:
            self.partner.pause_reading()
        else:
            self.partner.resume_reading()

    def _on_closed(self, propagate: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self.conn.stream_finished(self.stream_id)
        if self._unacked:
            # Bytes received and never passed on (held while the partner pushed back, or
            # before it came): the stream is gone but they still count against the
            # connection's window, which would leak shut without this credit.
            n, self._unacked = self._unacked, 0
            self._early.clear()
            self.conn.core.acknowledge(self.stream_id, n)
            self.conn.flush()
        if propagate and self.partner is not None:
            self.partner.abort()
        self.session.end_closed()


class HboneProtocol(asyncio.BufferedProtocol):
    """Shared by both sides: feeds the core, dispatches its events to StreamEnds.

    A BufferedProtocol: the TLS transport decrypts straight into one buffer
    this connection owns (uvloop's SSL layer does so for buffered protocols;
    for plain ones it allocates a 256 KiB bytes object per read, which cost a
    fifth of a busy proxy's CPU in mmap and page faults). Writes are gathered:
    everything the core queued during one pass of the event loop (DATA for
    many streams, window updates, answers) goes out in one transport.write,
    so one TLS record and one syscall carry it."""

    READ_BUFFER = 256 * 1024

    def __init__(self, client: bool, limits: hbone.HboneLimits = hbone.DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.core = hbone.HboneConnection(client=client, stream_window=limits.stream_window,
                                          connection_window=limits.connection_window,
                                          max_concurrent_streams=limits.max_streams_per_connection,
                                          max_frame_size=limits.max_frame_size)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, StreamEnd] = {}
        self.write_paused = False
        self.lost = False
        self.close_reason = ""
        self.on_lost: list[Callable[[], None]] = []
        self.on_stream_finished: Callable[[int], None] | None = None
        self._rbuf = bytearray(self.READ_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._flush_handle: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # The TLS transport's write buffer: uvloop's default (512 KiB high, 128 KiB low)
    # holds two of our 256 KiB frames, so a bulk stream paused and resumed its
    # source on nearly every frame. Bounded per connection, like the windows.
    WRITE_HIGH_WATER = 4 * 1024 * 1024
    WRITE_LOW_WATER = 1024 * 1024

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self.transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        set_limits = getattr(transport, "set_write_buffer_limits", None)
        if set_limits is not None:
            set_limits(high=self.WRITE_HIGH_WATER, low=self.WRITE_LOW_WATER)
        self.core.initiate()
        self.flush_now()

    def flush(self) -> None:
        """Write what the core queued at the end of this loop pass (one write for all)."""
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self.core.has_output():
            return
        chunks = self.core.output_chunks()
        t = self.transport
        if t is None or t.is_closing():
            return
        if len(chunks) == 1:
            t.write(chunks[0])
        else:
            # One gathered write: uvloop's TLS layer encrypts each piece into the same
            # outgoing buffer and sends it with one syscall; no join of big payloads.
            t.writelines(chunks)

    # -- reading --
    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rview

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._rview[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        for ev in self.core.receive_data(data):
            self.handle(ev)
        self.flush_now()
        if self.core.closed and not self.streams and self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        return None  # the peer closed its side: so do we (TLS has no half-close)

    def handle(self, ev: hbone.Event) -> None:
        if isinstance(ev, hbone.Data):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.on_data(ev.data, ev.flow_controlled_length)
            else:
                self.core.acknowledge(ev.stream_id, ev.flow_controlled_length)
        elif isinstance(ev, hbone.PeerHalfClosed):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.on_peer_eof()
        elif isinstance(ev, hbone.StreamClosed):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.on_closed()
        elif isinstance(ev, hbone.StreamReset):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.on_reset(f"stream reset by {'peer' if ev.remote else 'us'} (code {ev.error_code})")
        elif isinstance(ev, hbone.SendUnblocked):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.on_unblocked()
        elif isinstance(ev, hbone.ConnectionClosed):
            self.close_reason = ev.reason
            log.info("HBONE connection closed: %s", ev.reason)
        elif isinstance(ev, hbone.GoingAway):
            # Graceful: the pool opens no stream here any more (core.closed); the open ones finish.
            log.info("HBONE connection draining (%s): %d stream(s) finish on it", ev.reason, len(self.streams))

    def stream_finished(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if self.on_stream_finished is not None:
            self.on_stream_finished(stream_id)

    def pause_writing(self) -> None:
        self.write_paused = True
        for s in list(self.streams.values()):
            s.on_connection_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        for s in list(self.streams.values()):
            s.on_connection_paused()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        why = f"HBONE connection lost: {exc or self.close_reason or 'closed'}"
        for s in list(self.streams.values()):
            s.on_reset(why)
        self.streams.clear()
        for cb in self.on_lost:
            cb()

    def close(self, reason: str = "") -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.core.close(reason)
            self.flush_now()
            self.transport.close()


class HboneClientProtocol(HboneProtocol):
    """Client side: opens tunnels; the pool owns it."""

    def __init__(self, limits: hbone.HboneLimits = hbone.DEFAULT_LIMITS) -> None:
        super().__init__(client=True, limits=limits)
        self._pending: dict[int, asyncio.Future[None]] = {}

    def open_tunnel(self, ip: str, port: int, session: Session) -> tuple[StreamEnd, asyncio.Future[None]]:
        sid = self.core.open_tunnel(ip, port, session.connect_headers())
        end = StreamEnd(self, sid, session)
        self.streams[sid] = end
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[sid] = fut
        self.flush_now()  # the CONNECT goes out at once: its answer is what we wait for
        return end, fut

    def handle(self, ev: hbone.Event) -> None:
        if isinstance(ev, hbone.TunnelEstablished):
            fut = self._pending.pop(ev.stream_id, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if isinstance(ev, hbone.TunnelRefused):
            fut = self._pending.pop(ev.stream_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(StreamRefused(ev.status, ev.reason))
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.on_closed()
            return
        if isinstance(ev, (hbone.StreamReset, hbone.ConnectionClosed)):
            sids = [ev.stream_id] if isinstance(ev, hbone.StreamReset) else list(self._pending)
            for sid in sids:
                fut = self._pending.pop(sid, None)
                if fut is not None and not fut.done():
                    fut.set_exception(RemoteProtocolError(f"tunnel closed before it was established: {ev}"))
        super().handle(ev)

    def cancel_tunnel(self, end: StreamEnd) -> None:
        """Give up on a tunnel still waiting for its answer (timeout)."""
        self._pending.pop(end.stream_id, None)
        end.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(RemoteProtocolError(f"HBONE connection lost: {exc or self.close_reason or 'closed'}"))
        self._pending.clear()
        super().connection_lost(exc)


# The server's decision for one CONNECT: returns the StreamEnd's partner, or raises ProxyError
# whose .status (if any) becomes the HTTP status.
InboundHandler = Callable[["HboneServerProtocol", int, str, int, Session], Awaitable[End]]


class HboneServerProtocol(HboneProtocol):
    """Server side of 15008: one per accepted mTLS connection."""

    def __init__(
        self,
        on_connect: InboundHandler,
        make_session: Callable[[HboneServerProtocol, hbone.ConnectRequested], Session],
        describe_tls: Callable[[Any], tuple[str, str]],
        limits: hbone.HboneLimits = hbone.DEFAULT_LIMITS,
        on_idle_close: Callable[[], None] | None = None,
        admit_peer: Callable[[HboneServerProtocol], str] | None = None,
    ) -> None:
        super().__init__(client=False, limits=limits)
        # '' to serve the peer that just finished its handshake, else why not (a revoked certificate).
        self._admit_peer = admit_peer
        self._on_idle_close = on_idle_close  # counts the closes (metrics)
        self._idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._on_connect = on_connect
        self._make_session = make_session
        self._describe_tls = describe_tls
        self.peer_identity = ""
        self.peer_serial = ""  # hex, as OpenSSL prints it
        self.presented_identity = ""
        self.peer_addr: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        self.peer_identity, self.presented_identity = self._describe_tls(ssl_object)
        self.peer_serial = peer_serial(ssl_object)
        peer = transport.get_extra_info("peername")
        self.peer_addr = (str(peer[0]), int(peer[1])) if peer else None
        super().connection_made(transport)
        if self._admit_peer is not None and self._admit_peer(self):
            self.close("peer certificate revoked")  # the reason is in this node's log, counted
            return
        self._went_idle()  # a connection that never opens a stream is idle from the start

    # -- idle timeout: no stream for limits.server_idle_timeout_s -> GOAWAY, close --
    def _went_idle(self) -> None:
        timeout = self.limits.server_idle_timeout_s
        if timeout <= 0 or self._loop is None:
            return
        self._idle_since = self._loop.time()
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_at(self._idle_since + timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self._loop is None:
            return
        if self.lost or self.core.open_streams or self._tasks:
            return  # busy again; the next stream to finish re-arms the timer
        due = self._idle_since + self.limits.server_idle_timeout_s
        if self._loop.time() < due:
            self._idle_timer = self._loop.call_at(due, self._idle_check)
            return
        log.info("HBONE connection from %s idle for %gs: closing", self.peer_addr,
                 self.limits.server_idle_timeout_s)
        if self._on_idle_close is not None:
            self._on_idle_close()
        self.close("idle timeout")

    def stream_finished(self, stream_id: int) -> None:
        super().stream_finished(stream_id)
        if not self.streams and not self.core.open_streams:
            self._went_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        super().connection_lost(exc)

    def handle(self, ev: hbone.Event) -> None:
        if isinstance(ev, hbone.ConnectRequested):
            session = self._make_session(self, ev)
            t = asyncio.get_running_loop().create_task(self._serve(ev, session))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
            return
        if isinstance(ev, hbone.ConnectRejected):
            session = self._make_session(self, hbone.ConnectRequested(ev.stream_id, "", 0, ()))
            session.fail(ev.code, f"refused CONNECT with {ev.status}: {ev.reason}")
            session.finish()
            return
        super().handle(ev)

    async def _serve(self, ev: hbone.ConnectRequested, session: Session) -> None:
        try:
            upstream = await self._on_connect(self, ev.stream_id, ev.host, ev.port, session)
        except ProxyError as e:
            status = int(getattr(e, "status", 503))
            session.fail(e)
            self.core.refuse(ev.stream_id, status, f"{e.reason}: {e.message}")
            self.flush()
            session.finish()
            if not self.core.open_streams:
                self._went_idle()
            return
        if self.lost or self.core.closed:
            upstream.abort()
            return
        end = StreamEnd(self, ev.stream_id, session)
        session.downstream = end
        try:
            early = self.core.accept(ev.stream_id)
        except hbone.HboneProtocolError as e:  # the caller reset the stream while we were connecting
            session.fail("downstream_gone", f"stream gone before accept: {e}")
            end.on_closed()
            upstream.abort()
            return
        self.streams[ev.stream_id] = end
        end.partner = upstream
        self.flush()
        attach = getattr(upstream, "attach", None)
        if attach is not None:
            attach(end)
        for d in early:  # what the caller sent ahead of our 200
            end.on_data(d.data, d.flow_controlled_length)
        if early:
            self.flush()
        if self.core.peer_ended(ev.stream_id):
            end.on_peer_eof()  # END_STREAM rode on the CONNECT (before the end existed)
