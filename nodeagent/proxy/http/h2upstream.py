"""Upstream HTTP/2 (h2c) for the L7 pipeline: an `H2Upstream` is one h2c
connection to an endpoint, carried by one HBONE CONNECT stream or a same-node
TCP connection (opened by the one upstream connector, connector.py), many
requests multiplexed on it; `H2UpstreamPool` keeps them per (source identity,
endpoint) in the runtime (pipeline.L7Runtime), a second connection when one
is at its stream limit, closed after being idle."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import h2.errors
import h2.events

from nodeagent.meshview.snapshot import Endpoint, Snapshot

from ..relay import End, Session
from ..tunnel import StreamEnd
from .h2core import H2Core, Headers
from .pipeline import QuietSession

if TYPE_CHECKING:
    from .pipeline import L7Runtime

UPSTREAM_IDLE_TIMEOUT_S = 60.0
MAX_STREAMS_PER_UPSTREAM = 100  # a busier endpoint gets a second pooled connection


def _never() -> bool:
    return False


class StreamHandler:
    """What an upstream stream reports to (one try of) a call."""

    def on_head(self, headers: Headers, ended: bool) -> None: ...
    def on_data(self, data: bytes, flow_controlled_length: int) -> None: ...
    def on_trailers(self, headers: Headers) -> None: ...
    def on_end(self) -> None: ...
    def on_reset(self, why: str) -> None: ...
    def on_drained(self) -> None: ...

    def on_refused(self, why: str) -> None:
        """The endpoint never processed the stream (above a GOAWAY's last stream ID,
        or REFUSED_STREAM): safe to send again on another connection (RFC 9113 8.7)."""
        self.on_reset(why)


class H2Upstream:
    """An h2c connection to one endpoint, over a relay End (an HBONE CONNECT
    stream or a same-node TCP connection). It is the wire's partner End."""

    def __init__(self, key: tuple[str, ...], label: str) -> None:
        self.key = key
        self.label = label
        self.core = H2Core(client=True)
        self.wire: End | None = None
        self.streams: dict[int, StreamHandler] = {}
        self.rx = 0
        self.tx = 0
        self.write_paused = False
        self.dead = False
        self.draining = False  # GOAWAY received: no new streams
        # The HBONE connection carrying this one got a graceful GOAWAY (the far node's
        # worker is draining at a restart): no new streams here either; closed once idle.
        self.carrier_closing: Callable[[], bool] = _never
        self.last_used = time.monotonic()
        self.on_idle: Callable[[H2Upstream], None] | None = None
        self.on_dead: Callable[[H2Upstream], None] | None = None

    def start(self, wire: End) -> None:
        self.wire = wire
        self.core.initiate()
        self.flush()

    @property
    def usable(self) -> bool:
        return not self.dead and not self.draining and not self.core.closed and not self.core.draining and (
            not self.carrier_closing()) and (
            len(self.streams) < min(MAX_STREAMS_PER_UPSTREAM, self.core.peer_max_concurrent_streams()))

    def flush(self) -> None:
        data = self.core.data_to_send()
        if data and self.wire is not None and not self.dead:
            self.tx += len(data)
            self.wire.send(data)

    def open_stream(self, headers: Headers, handler: StreamHandler, end_stream: bool) -> int:
        sid = self.core.new_request(headers, end_stream)
        self.streams[sid] = handler
        self.last_used = time.monotonic()
        self.flush()
        return sid

    def drained(self, sid: int) -> bool:
        return not self.write_paused and self.core.queued(sid) == 0

    def release(self, sid: int, reset: bool) -> None:
        """The try is over with this stream (finished, or abandoned: reset it)."""
        if self.streams.pop(sid, None) is None:
            return
        st = self.core.h2.streams.get(sid)
        # A stream the endpoint finished while our request side was still open must be
        # reset too, or h2 would count it against the concurrency limit forever.
        if (reset or (st is not None and not st.closed)) and not self.dead:
            self.core.reset(sid, h2.errors.ErrorCodes.CANCEL)
            self.flush()
        self.core.forget(sid)
        self.last_used = time.monotonic()
        if not self.streams and self.on_idle is not None:
            self.on_idle(self)

    def close(self) -> None:
        if self.dead:
            return
        self.core.close()
        self.flush()
        self._die("closed")
        if self.wire is not None:
            self.wire.send_eof()

    # -- End: the wire calls these --
    def send(self, data: bytes) -> None:
        if self.dead:
            return
        self.rx += len(data)
        got = self.core.receive_data(data)
        if got.error:
            self._die(got.error)
            if self.wire is not None:
                self.wire.abort()
            return
        for ev in got.events:
            self._dispatch(ev)
        for sid in got.drained:
            hd = self.streams.get(sid)
            if hd is not None:
                hd.on_drained()
        self.flush()

    def _dispatch(self, ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", 0)
        hd = self.streams.get(sid) if sid else None
        if isinstance(ev, h2.events.ResponseReceived):
            if hd is not None:
                hd.on_head([(str(k), str(v)) for k, v in ev.headers], ev.stream_ended is not None)
        elif isinstance(ev, h2.events.DataReceived):
            if hd is not None:
                hd.on_data(bytes(ev.data), ev.flow_controlled_length)
            else:
                self.core.acknowledge(sid, ev.flow_controlled_length)
        elif isinstance(ev, h2.events.TrailersReceived):
            if hd is not None:
                hd.on_trailers([(str(k), str(v)) for k, v in ev.headers])
        elif isinstance(ev, h2.events.StreamEnded):
            if hd is not None and not isinstance(ev, h2.events.TrailersReceived):
                hd.on_end()
        elif isinstance(ev, h2.events.StreamReset):
            if hd is not None:
                self.streams.pop(sid, None)
                why = f"endpoint reset the stream (code {ev.error_code})"
                if ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                    hd.on_refused(why)
                else:
                    hd.on_reset(why)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            # GOAWAY: no new streams here. Streams up to last_stream_id still complete (unless
            # it carries an error); those above it were never processed: refused, so the call
            # sends them again on a new connection.
            self.draining = True
            last = ev.last_stream_id or 0
            for s, h in list(self.streams.items()):
                if s > last:
                    self.streams.pop(s, None)
                    h.on_refused(f"endpoint sent GOAWAY (code {ev.error_code}, last stream {last})")
                elif ev.error_code:
                    self.streams.pop(s, None)
                    h.on_reset(f"endpoint sent GOAWAY (code {ev.error_code})")
            if self.on_dead is not None:
                self.on_dead(self)

    def send_eof(self) -> None:
        self._die("endpoint closed the connection")

    def abort(self) -> None:
        self._die("connection to the endpoint reset")

    def pause_reading(self) -> None:  # the wire's write side is full: hold acknowledgements
        self.write_paused = True

    def resume_reading(self) -> None:
        self.write_paused = False
        for hd in list(self.streams.values()):
            hd.on_drained()

    def _die(self, why: str) -> None:
        if self.dead:
            return
        self.dead = True
        streams, self.streams = self.streams, {}
        for hd in streams.values():
            hd.on_reset(why)
        if self.on_dead is not None:
            self.on_dead(self)

    def __repr__(self) -> str:
        return f"<H2Upstream {self.label} streams={len(self.streams)}{' dead' if self.dead else ''}>"


class H2UpstreamPool:
    """Pooled h2c connections per (source identity, endpoint). `per_request`:
    one connection (one CONNECT stream) per request instead (for comparison)."""

    def __init__(self, rt: L7Runtime, per_request: bool = False,
                 idle_timeout_s: float = UPSTREAM_IDLE_TIMEOUT_S) -> None:
        self.rt = rt
        self.per_request = per_request
        self.idle_timeout_s = idle_timeout_s
        self.conns: dict[tuple[str, ...], list[H2Upstream]] = {}
        self._connecting: dict[tuple[str, ...], asyncio.Task[H2Upstream]] = {}
        self.opened = 0

    async def get(self, snapshot: Snapshot, ep: Endpoint, source_id: str, session: Session) -> H2Upstream:
        """A connection to `ep` with room for one more stream, opened for the caller
        `session` if none has (one connect per key at a time)."""
        key = (source_id, ep.ip, str(ep.port), ep.identity)
        if self.per_request:
            return await self._connect(key, snapshot, ep, source_id, session)
        while True:
            for c in list(self.conns.get(key, ())):
                if c.usable:
                    return c
                if not c.streams and c.carrier_closing():
                    c.close()  # its tunnel is going away: let the far node's old worker finish
            task = self._connecting.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._connect(key, snapshot, ep, source_id, session))
                self._connecting[key] = task
                task.add_done_callback(functools.partial(self._connect_done, key))
            conn = await asyncio.shield(task)
            if conn.usable:
                return conn

    async def _connect(self, key: tuple[str, ...], snapshot: Snapshot, ep: Endpoint, source_id: str,
                       session: Session) -> H2Upstream:
        proxy = self.rt.proxy
        # The wire's own log line is not wanted: every request has one.
        quiet = QuietSession(proxy.access_log, session)
        conn = H2Upstream(key, f"{ep.ip}:{ep.port}")
        # On this node the guard holds what it says before attach(): start() writes first; its
        # per-request decisions (policy and rule) go into the receiving side's own session.
        up = await proxy.connector.open(snapshot, ep, source_id, session, stream_session=quiet)
        # HBONE: our preface first, then what the endpoint already sent: its SETTINGS often
        # rides right behind the CONNECT's 200 (losing it leaves us on default windows).
        conn.start(up.wire)
        up.wire.attach(conn)
        if isinstance(up.wire, StreamEnd):
            hbone_conn = up.wire.conn
            conn.carrier_closing = lambda: hbone_conn.core.closed
        self.opened += 1
        conn.on_dead = self._forget
        conn.on_idle = self._idle
        if not self.per_request:
            self.conns.setdefault(key, []).append(conn)
        return conn

    def _connect_done(self, key: tuple[str, ...], _task: object) -> None:
        self._connecting.pop(key, None)

    def _forget(self, conn: H2Upstream) -> None:
        lst = self.conns.get(conn.key)
        if lst and conn in lst:
            lst.remove(conn)
            if not lst:
                self.conns.pop(conn.key, None)

    def _idle(self, conn: H2Upstream) -> None:
        if self.per_request or conn.draining or conn.carrier_closing():
            conn.close()
            return
        asyncio.get_running_loop().call_later(self.idle_timeout_s, self._reap, conn)

    def _reap(self, conn: H2Upstream) -> None:
        if not conn.streams and time.monotonic() - conn.last_used >= self.idle_timeout_s - 0.01:
            conn.close()

    def close(self) -> None:
        for lst in list(self.conns.values()):
            for c in list(lst):
                c.close()
        self.conns.clear()

    def __repr__(self) -> str:
        return f"<H2UpstreamPool {sum(len(v) for v in self.conns.values())} conns opened={self.opened}>"
