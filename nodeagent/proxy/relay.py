"""Byte relay between two connection ends, on asyncio Protocols: back-pressure
(a full writer pauses the other side's reader), half-close (EOF becomes
write_eof / END_STREAM), reset (abort both), and the per-connection Session
that writes the access log line when every end is closed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from . import splice
from .accesslog import AccessLog, iso_now
from .errors import ProxyError
from .idle import watch as idle_watch

if TYPE_CHECKING:
    from nodeagent.observe.telemetry import SessionTelemetry

log = logging.getLogger(__name__)

# A refused connection: what is still read and discarded after our FIN so that
# closing does not turn the client's unread bytes into a reset (TcpEnd.close).
REFUSE_DRAIN_BYTES = 64 * 1024
REFUSE_DRAIN_S = 2.0


class End(Protocol):
    """What an end offers its partner."""

    rx: int
    tx: int

    def send(self, data: bytes) -> None: ...
    def send_eof(self) -> None: ...
    def abort(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Session:
    """One proxied connection: its access log fields and its ends."""

    # Telemetry (nodeagent.observe.telemetry.ProxyTelemetry: metrics, traces, log sampling);
    # set by NodeProxy.new_session, None in bare unit tests.
    observer: Any = None
    # What the observer keeps per session (spans, the HTTP watch, the opened series).
    telemetry: SessionTelemetry | None = None
    # No bytes either way for this long closes both ends (nodeagent/proxy/idle.py);
    # 0 = none. Set before the ends are joined (outbound.carry_out).
    idle_timeout_s: float = 0.0

    def __init__(self, access_log: AccessLog, direction: str, **fields: Any) -> None:
        self._log = access_log
        self._t0 = time.monotonic()
        self.fields: dict[str, Any] = {"start": iso_now(), "direction": direction, **fields}
        self._open_ends = 0
        self._done = False
        self.downstream: End | None = None  # whose counters are the connection's bytes
        self.on_finish: list[Callable[[], None]] = []
        self.opened = False  # the connection reached its destination (metrics: opened)
        self.peer_headers: tuple[tuple[str, str], ...] = ()  # the HBONE CONNECT's headers (inbound)

    def connect_headers(self) -> tuple[tuple[str, str], ...]:
        """Extra headers for the HBONE CONNECT this session opens (trace context, baggage)."""
        return self.observer.connect_headers(self) if self.observer is not None else ()

    def connected(self) -> None:
        """Both ends are joined; called once (TcpEnd.attach), for the opened counters."""
        if not self.opened:
            self.opened = True
            if self.observer is not None:
                self.observer.opened(self)
            if self.idle_timeout_s > 0:
                idle_watch(self, self.idle_timeout_s)

    def set(self, **fields: Any) -> None:
        self.fields.update(fields)

    def fail(self, err: ProxyError | str, detail: str = "") -> None:
        if isinstance(err, ProxyError):
            self.fields.setdefault("reason", err.reason)
            self.fields.setdefault("error", str(err))
        else:
            self.fields.setdefault("reason", err)
            if detail:
                self.fields.setdefault("error", detail)

    def end_opened(self) -> None:
        self._open_ends += 1

    def end_closed(self) -> None:
        self._open_ends -= 1
        if self._open_ends <= 0:
            self.finish()

    def finish(self) -> None:
        if self._done:
            return
        self._done = True
        for cb in self.on_finish:
            try:
                cb()
            except Exception:  # bookkeeping must not stop the log line
                log.exception("session finish callback failed")
        rec = dict(self.fields)
        rec["duration_ms"] = round((time.monotonic() - self._t0) * 1000, 3)
        if self.downstream is not None:
            rec["bytes_sent"] = self.downstream.rx  # caller -> destination
            rec["bytes_received"] = self.downstream.tx
        if self.observer is not None and not self.observer.closed(self, rec):
            return  # sampled out of the access log (metrics were still recorded)
        self._log.write(rec)


class TcpEnd(asyncio.Protocol):
    """A plain TCP connection (application socket or upstream workload). Reads
    only while it has a partner and the partner has not pushed back.

    Two TcpEnds joined to each other with nobody watching the bytes (no tap)
    hand their sockets to a splice relay (splice.py) once both transports are
    empty: the payload then moves in the kernel."""

    # A passive observer of the bytes (nodeagent.observe.httpwatch.Http1Watch, or h2watch.H2Watch, on the inbound
    # end towards an HTTP workload): request(bytes sent to it), response(bytes read).
    tap: Any = None
    # Off switch (tests of the Protocol relay itself; NODEMESH_NO_SPLICE=1 for comparisons).
    splice_enabled: bool = splice.AVAILABLE and not os.environ.get("NODEMESH_NO_SPLICE")

    def __init__(self, session: Session, partner: End | None = None) -> None:
        self.session = session
        self.partner: End | None = partner
        self.transport: asyncio.Transport | None = None
        self.rx = 0
        self.tx = 0
        self._early: list[bytes] = []
        self._early_eof = False
        self._read_eof = False
        self._wrote_eof = False
        self._reading = True  # the transport's actual state
        self._want_paused = False  # the partner's wish (back-pressure)
        self._closed = False
        self._aborted_by_partner = False
        self._splice: splice.SpliceRelay | None = None
        self._splice_pending = False
        self._refusing: asyncio.TimerHandle | None = None  # set while a refusal drains (close())
        self._discarded = 0  # bytes read and dropped while refusing (not relayed: not in rx)
        session.end_opened()

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._apply_reading()  # paused while there is nothing to relay to yet
        # uvloop starts reading right after connection_made returns, ignoring a
        # pause made inside it: apply our state again on the next loop turn.
        asyncio.get_running_loop().call_soon(self._resync_reading)

    def data_received(self, data: bytes) -> None:
        if self._refusing is not None:
            self._discard(data)
            return
        self.rx += len(data)
        if self.tap is not None:
            self.tap.response(data)
        if self.partner is None:
            self._early.append(data)
        else:
            self.partner.send(data)

    def eof_received(self) -> bool:
        self._read_eof = True
        if self._refusing is not None:
            self._maybe_close()  # the client saw our FIN and closed: a clean end
            return True
        if self.partner is None:
            self._early_eof = True
        else:
            self.partner.send_eof()
        self._maybe_close()
        return True  # keep our write side open: the other direction may still flow

    def pause_writing(self) -> None:
        if self.partner is not None:
            self.partner.pause_reading()

    def resume_writing(self) -> None:
        if self.partner is not None:
            self.partner.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refusing is not None:
            self._refusing.cancel()
        if self._closed or self._splice is not None:
            return  # spliced: the relay owns the socket now and reports the end
        self._closed = True
        clean = self._read_eof and self._wrote_eof
        if not clean and not self._aborted_by_partner and self.partner is not None:
            # A reset (or an unexpected close) travels on as a reset.
            if exc is not None:
                self.session.fields.setdefault("error", f"connection reset: {exc}")
            self.partner.abort()
        self.session.end_closed()

    # -- an L7 adapter taking this connection over, and handing it back --
    def take_over(self) -> list[bytes]:
        """An L7 adapter becomes the transport's protocol: returns the bytes read
        before it; the reading flag stays in step with the adapter from now on
        (set_reading), or the deferred re-sync (_resync_reading) would undo its pauses."""
        early, self._early = self._early, []
        self._reading = True
        return early

    def set_reading(self, on: bool) -> None:
        """The adapter pauses or resumes the transport itself; the flag follows."""
        self._reading = on
        if on:
            cast(asyncio.Transport, self.transport).resume_reading()
        else:
            cast(asyncio.Transport, self.transport).pause_reading()

    def hand_back(self, sniffed: bytes) -> None:
        """Not the protocol the adapter speaks after all: this end relays the
        connection again, starting with the bytes the adapter already read."""
        transport = cast(asyncio.Transport, self.transport)
        transport.pause_reading()
        self._reading = False
        if sniffed:
            self._early.append(sniffed)
            self.rx += len(sniffed)
        transport.set_protocol(self)

    # -- End --
    def attach(self, partner: End) -> None:
        self.partner = partner
        early, self._early = self._early, []
        for chunk in early:
            partner.send(chunk)
        if self._early_eof:
            partner.send_eof()
        self.session.connected()
        self._apply_reading()  # flushing may already have made the partner push back
        if self.splice_enabled and isinstance(partner, TcpEnd) and partner.partner is self and (
                not self._splice_pending and not partner._splice_pending):
            # Next loop turn: the partner's own attach() (same-node hop) runs first.
            self._splice_pending = True
            asyncio.get_running_loop().call_soon(self._start_splice)

    def _start_splice(self) -> None:
        """Hand both sockets to a splice relay, if nothing sits in Python on either side."""
        a, b = self, self.partner
        if not isinstance(b, TcpEnd) or b.partner is not a:
            return
        ta, tb = a.transport, b.transport
        if ta is None or tb is None or ta.is_closing() or tb.is_closing():
            return
        if (a.tap is not None or b.tap is not None or a._early or b._early or a._read_eof or b._read_eof
                or a._wrote_eof or b._wrote_eof or ta.get_write_buffer_size() or tb.get_write_buffer_size()):
            return  # stay on the Protocol relay
        try:
            fds = [os.dup(t.get_extra_info("socket").fileno()) for t in (ta, tb)]
        except (OSError, AttributeError):
            return
        ta.pause_reading()
        tb.pause_reading()
        socks = [socket.socket(fileno=fd) for fd in fds]

        def a_to_b(n: int) -> None:
            a.rx += n
            b.tx += n

        def b_to_a(n: int) -> None:
            b.rx += n
            a.tx += n

        relay = splice.SpliceRelay(socks[0], socks[1], a_to_b, b_to_a, self._splice_done)
        a._splice = b._splice = relay
        ta.close()  # closes the transports' descriptors only; the duplicates carry on
        tb.close()
        relay.start()

    def _splice_done(self, why: str) -> None:
        b = self.partner
        if why:
            self.session.fields.setdefault("error", why)
        for end in (self, b):
            if isinstance(end, TcpEnd) and not end._closed:
                end._closed = True
                end.session.end_closed()

    def send(self, data: bytes) -> None:
        if self.transport is None or self._closed or self.transport.is_closing():
            return
        self.tx += len(data)
        if self.tap is not None:
            self.tap.request(data)
        self.transport.write(data)

    def send_eof(self) -> None:
        if self._wrote_eof or self.transport is None or self.transport.is_closing():
            return
        self._wrote_eof = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._maybe_close()

    def abort(self) -> None:
        self._aborted_by_partner = True
        if self._splice is not None:
            self._splice.abort()
            return
        if self.transport is not None:
            self.transport.abort()
        elif not self._closed:
            self._closed = True
            self.session.end_closed()

    def close(self) -> None:
        """Close without relaying anything (a refused or failed connection).

        A clean refusal, not a reset: closing a socket whose receive queue holds
        bytes makes the kernel send RST, and a client whose request was already
        on its way would see "connection reset" instead of an orderly close. So
        send FIN (after whatever was written, e.g. an error response), then read
        and discard what the client still sends until its EOF, bounded by
        REFUSE_DRAIN_BYTES and REFUSE_DRAIN_S; past either, abort."""
        self._aborted_by_partner = True
        if self._splice is not None:
            self._splice.abort()
            return
        t = self.transport
        if t is None or t.is_closing() or self._refusing is not None:
            return
        if self._read_eof or not t.can_write_eof() or getattr(t, "get_protocol", lambda: self)() is not self:
            t.close()  # nothing more can arrive, or an L7 adapter owns the reading
            return
        self._refusing = asyncio.get_running_loop().call_later(REFUSE_DRAIN_S, self._refuse_timed_out)
        self._wrote_eof = True
        t.write_eof()
        self._reading = True  # _resync_reading (after connection_made) must not pause it again
        t.resume_reading()

    def _discard(self, data: bytes) -> None:
        self._discarded += len(data)
        if self._discarded > REFUSE_DRAIN_BYTES and self.transport is not None:
            log.info("refused connection kept sending (%d bytes): reset", self._discarded)
            self.transport.abort()

    def _refuse_timed_out(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            log.info("refused connection not closed by the client within %.0f s: reset", REFUSE_DRAIN_S)
            self.transport.abort()

    def pause_reading(self) -> None:
        self._want_paused = True
        self._apply_reading()

    def resume_reading(self) -> None:
        self._want_paused = False
        self._apply_reading()

    def _apply_reading(self) -> None:
        if self.transport is None or self.transport.is_closing() or self._splice is not None:
            return
        should = self._refusing is not None or (not self._want_paused and self.partner is not None)
        if should and not self._reading:
            self._reading = True
            self.transport.resume_reading()
        elif not should and self._reading:
            self._reading = False
            self.transport.pause_reading()

    def _resync_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        is_reading = getattr(t, "is_reading", None)
        if is_reading is not None and is_reading() != self._reading:
            if self._reading:
                t.resume_reading()
            else:
                t.pause_reading()

    def _maybe_close(self) -> None:
        if self._read_eof and self._wrote_eof and self.transport is not None:
            self.transport.close()
