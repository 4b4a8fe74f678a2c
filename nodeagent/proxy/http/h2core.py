"""HTTP/2 protocol core for the L7 path (h2c toward the client workload and
toward endpoints), built on `h2` and doing no I/O.

What it adds to h2: per-stream send queues that respect the peer's flow
control windows (data beyond the window waits here, followed by END_STREAM or
trailers), a `drained` report naming the streams whose queue emptied (so the
caller can return window credit to the *other* side only once data really
moved on), and gRPC helpers (status parsing, trailers-only replies, the
HTTP-to-gRPC status mapping Envoy uses).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
MAX_FRAME_SIZE = 64 * 1024
MAX_CONCURRENT_STREAMS = 1000
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# A drain's graceful GOAWAY comes in two steps (RFC 9113 6.8): the largest stream ID
# first, the last one taken at most this long later (sooner on a PING's round trip),
# so streams the peer opened before it saw the first are still served. Far more
# than a round trip between nodes. Used for HBONE (proxy.py) and h2c (h2stack.py).
GOAWAY_GRACE_S = 1.0
MAX_STREAM_ID = 2**31 - 1

Headers = list[tuple[str, str]]

# Connection-specific headers HTTP/2 forbids; "te" is allowed only as "trailers" (gRPC needs it).
_CONNECTION_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
                                 "host"})

# gRPC status codes used by the proxy itself.
GRPC_OK, GRPC_CANCELLED, GRPC_UNKNOWN, GRPC_DEADLINE_EXCEEDED = 0, 1, 2, 4
GRPC_NOT_FOUND, GRPC_PERMISSION_DENIED, GRPC_RESOURCE_EXHAUSTED = 5, 7, 8
GRPC_UNIMPLEMENTED, GRPC_INTERNAL, GRPC_UNAVAILABLE, GRPC_UNAUTHENTICATED = 12, 13, 14, 16


def grpc_status_for_http(status: int) -> int:
    """The gRPC status a client should see for a local HTTP error (gRPC's
    http-grpc-status-mapping, as Envoy applies it)."""
    return {400: GRPC_INTERNAL, 401: GRPC_UNAUTHENTICATED, 403: GRPC_PERMISSION_DENIED,
            404: GRPC_UNIMPLEMENTED, 429: GRPC_UNAVAILABLE, 502: GRPC_UNAVAILABLE, 503: GRPC_UNAVAILABLE,
            504: GRPC_UNAVAILABLE}.get(status, GRPC_UNKNOWN)


def grpc_message_escape(text: str) -> str:
    """grpc-message is percent-encoded outside printable ASCII (and '%' itself)."""
    out = []
    for b in text.encode("utf-8"):
        out.append(chr(b) if 0x20 <= b < 0x7F and b != 0x25 else f"%{b:02X}")
    return "".join(out)[:1024]


def header_value(headers: Headers, name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def grpc_status_of(headers: Headers) -> int | None:
    v = header_value(headers, "grpc-status")
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        return None


def is_grpc(headers: Headers) -> bool:
    ct = header_value(headers, "content-type") or ""
    return ct.startswith("application/grpc")


def strip_connection_headers(headers: Headers) -> Headers:
    """Drop what HTTP/2 forbids between hops; keep `te: trailers` (gRPC requires it)."""
    out = []
    for k, v in headers:
        if k in _CONNECTION_HEADERS:
            continue
        if k == "te" and v.strip().lower() != "trailers":
            continue
        out.append((k, v))
    return out


@dataclass
class _Out:
    pending: bytearray = field(default_factory=bytearray)
    tail: Headers | bool | None = None  # True: END_STREAM after pending; a list: trailers after pending
    done: bool = False  # END_STREAM queued into h2


@dataclass(frozen=True)
class Received:
    """What one receive_data() call produced: h2's events and the streams whose send queue drained."""

    events: list[h2.events.Event]
    drained: list[int]
    error: str = ""  # the connection is unusable (protocol error from the peer)


class _GoawayDrains(h2.connection.H2ConnectionStateMachine):
    """h2 closes a connection the moment a GOAWAY arrives, so the streams at or
    below its last stream ID, which the peer still answers (RFC 9113 6.8), would
    fail on their next frame. Here a GOAWAY leaves the connection open; H2Core
    marks it draining (its users open no new stream) or, for a GOAWAY carrying an
    error, closed."""

    _transitions = {  # noqa: RUF012 - h2's table, two entries changed
        **h2.connection.H2ConnectionStateMachine._transitions,
        (h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionInputs.RECV_GOAWAY):
            (None, h2.connection.ConnectionState.CLIENT_OPEN),
        (h2.connection.ConnectionState.SERVER_OPEN, h2.connection.ConnectionInputs.RECV_GOAWAY):
            (None, h2.connection.ConnectionState.SERVER_OPEN),
    }


class H2Core:
    """One HTTP/2 connection, client or server side, with queued sends."""

    def __init__(self, *, client: bool, stream_window: int = STREAM_WINDOW,
                 connection_window: int = CONNECTION_WINDOW,
                 max_concurrent_streams: int = MAX_CONCURRENT_STREAMS) -> None:
        self.client = client
        cfg = h2.config.H2Configuration(client_side=client, header_encoding="utf-8",
                                        validate_inbound_headers=True, normalize_inbound_headers=True)
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.h2.state_machine = _GoawayDrains()
        self._out: dict[int, _Out] = {}
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._max_streams = max_concurrent_streams
        self.closed = False
        self.draining = False  # the peer sent a graceful GOAWAY: open no new stream here
        self.serve_up_to = MAX_STREAM_ID  # our graceful GOAWAY's last stream ID: later peer streams are refused

    def initiate(self) -> None:
        self.h2.initiate_connection()
        self.h2.update_settings({
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self._stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self._max_streams,
        })
        # Accept our announced frame size from the start. h2 sizes its frame parser once
        # per receive_data() call, so a peer's SETTINGS ACK and a big DATA frame arriving
        # in one read would otherwise fail as "overlong frame" (a protocol error that
        # kills the connection). Taking larger frames early is always safe.
        self.h2.max_inbound_frame_size = MAX_FRAME_SIZE
        extra = self._connection_window - 65535
        if extra > 0:
            self.h2.increment_flow_control_window(extra)

    def data_to_send(self) -> bytes:
        return bytes(self.h2.data_to_send())

    @property
    def open_streams(self) -> int:
        return int(self.h2.open_outbound_streams + self.h2.open_inbound_streams)

    def peer_max_concurrent_streams(self) -> int:
        return int(self.h2.remote_settings.max_concurrent_streams)

    # -- sending --
    def new_request(self, headers: Headers, end_stream: bool = False) -> int:
        """Client side: open a stream with the request head; returns its id."""
        sid = int(self.h2.get_next_available_stream_id())
        self.h2.send_headers(sid, headers, end_stream=end_stream)
        self._out[sid] = _Out(done=end_stream)
        return sid

    def send_headers(self, sid: int, headers: Headers, end_stream: bool = False) -> None:
        self.h2.send_headers(sid, headers, end_stream=end_stream)
        o = self._out.setdefault(sid, _Out())
        o.done = o.done or end_stream

    def send_data(self, sid: int, data: bytes) -> bool:
        """Queue data; True when all of it went into h2 (nothing left waiting on a window)."""
        o = self._out.setdefault(sid, _Out())
        if o.done or o.tail is not None:
            return True
        o.pending += data
        self._flush(sid, o)
        return not o.pending

    def end_stream(self, sid: int, trailers: Headers | None = None) -> None:
        """END_STREAM (or trailers) after whatever is still queued."""
        o = self._out.setdefault(sid, _Out())
        if o.done or o.tail is not None:
            return
        o.tail = trailers if trailers else True
        self._flush(sid, o)

    def reset(self, sid: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        self._out.pop(sid, None)
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            self.h2.reset_stream(sid, code)

    def acknowledge(self, sid: int, n: int) -> None:
        """The peer's data was passed on: give it its window back."""
        if n <= 0 or self.closed:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            self.h2.acknowledge_received_data(n, sid)

    def head_in_progress(self) -> bool:
        """A request or response head (HEADERS, CONTINUATION) begun and not complete:
        a header block awaiting its CONTINUATION, or such a frame only partly read.
        (h2 keeps both in its frame buffer; a DATA frame in flight is not a head.)"""
        fb = self.h2.incoming_buffer
        data = fb._data
        return bool(fb._headers_buffer) or (len(data) > 3 and data[3] in (0x1, 0x9))

    def queued(self, sid: int) -> int:
        o = self._out.get(sid)
        return len(o.pending) if o else 0

    def forget(self, sid: int) -> None:
        self._out.pop(sid, None)

    def goaway(self, last_stream_id: int | None = None, reason: str = "") -> None:
        """Graceful GOAWAY (NO_ERROR): the peer opens no new stream; the connection
        stays open so that streams up to `last_stream_id` (default: any) finish.
        Streams the peer opens above it are for the caller to refuse (`refuses`)."""
        if self.closed:
            return
        last = MAX_STREAM_ID if last_stream_id is None else min(last_stream_id, MAX_STREAM_ID)
        self.serve_up_to = min(self.serve_up_to, last)
        # h2 treats any GOAWAY sent as the end of the connection: keep its state open.
        state = self.h2.state_machine.state
        self.h2.close_connection(error_code=0, additional_data=reason.encode()[:256], last_stream_id=self.serve_up_to)
        self.h2.state_machine.state = state

    @property
    def last_peer_stream(self) -> int:
        """The highest stream ID the peer opened so far."""
        return int(self.h2.highest_inbound_stream_id)

    def refuses(self, sid: int) -> bool:
        """A peer stream above our graceful GOAWAY's last stream ID: never processed
        (the peer may send it again elsewhere)."""
        return sid > self.serve_up_to

    def close(self, code: int = 0) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection(error_code=code)

    # -- receiving --
    def receive_data(self, data: bytes) -> Received:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self.closed = True
            return Received([], [], f"HTTP/2 protocol error from peer: {e}")
        drained: list[int] = []
        for ev in events:
            if isinstance(ev, h2.events.WindowUpdated):
                sids = list(self._out) if ev.stream_id == 0 else [ev.stream_id]
                self._flush_many(sids, drained)
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                self._flush_many(list(self._out), drained)
            elif isinstance(ev, h2.events.StreamReset):
                self._out.pop(ev.stream_id, None)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                if ev.error_code:  # an error: nothing more moves on this connection
                    self.closed = True
                    self.h2.state_machine.state = h2.connection.ConnectionState.CLOSED
                else:
                    self.draining = True
        return Received(list(events), drained)

    def _flush_many(self, sids: list[int], drained: list[int]) -> None:
        for sid in sids:
            o = self._out.get(sid)
            if o is None or (not o.pending and o.tail is None):
                continue
            had = bool(o.pending)
            self._flush(sid, o)
            if had and not o.pending:
                drained.append(sid)

    def _flush(self, sid: int, o: _Out) -> None:
        try:
            while o.pending:
                window = self.h2.local_flow_control_window(sid)
                if window <= 0:
                    return
                n = min(window, self.h2.max_outbound_frame_size, len(o.pending))
                self.h2.send_data(sid, bytes(o.pending[:n]))
                del o.pending[:n]
            if o.tail is not None and not o.done:
                if isinstance(o.tail, list):
                    self.h2.send_headers(sid, o.tail, end_stream=True)
                else:
                    self.h2.end_stream(sid)
                o.done = True
                o.tail = None
        except (h2.exceptions.StreamClosedError, h2.exceptions.FlowControlError, h2.exceptions.ProtocolError,
                KeyError):
            o.pending.clear()
            o.done = True
            o.tail = None
