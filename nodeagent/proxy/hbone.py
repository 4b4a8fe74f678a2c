"""HBONE protocol core: HTTP/2 CONNECT tunnels (RFC 9113 §8.5), sans-I/O.

Feed bytes with receive_data(), act on the returned events, and write
data_to_send() to the connection. Data received is acknowledged (window
credit returned) only when the caller says it was written onward, so a slow
reader pushes back through the HTTP/2 window; data to send beyond the peer's
window is buffered here and send() / SendUnblocked tell the caller when to
pause and resume reading the application socket.

Why not the `h2` library: a tunnel needs HTTP/2 only at its edges (HEADERS to
open and answer it, RST_STREAM, SETTINGS, PING, GOAWAY); in between it is DATA
and WINDOW_UPDATE, and h2's general state machine (event objects, per-frame
validation through `hyperframe`, one WINDOW_UPDATE per acknowledgement) cost
more than the bytes it moves. This core parses frame headers with one
struct.unpack_from, hands DATA payloads on as they are, sends DATA in frames as
large as the peer allows, and returns window credit in batches (a quarter of
the window at a time). HPACK is the `hpack` library (h2's own), used once per
stream each way. tests/unit/test_hbone_oracle.py checks it against `h2` as a
peer with Hypothesis; tests/fuzz/fuzz_hbone.py fuzzes receive_data().

Strictness (connection errors answer GOAWAY with the code, stream errors
RST_STREAM): frame sizes per type, the client preface, SETTINGS first, stream
id rules, CONTINUATION sequencing, header block size, flow-control windows in
both directions (a peer overrunning a window is a FLOW_CONTROL_ERROR), pseudo
headers, and a cap on concurrent streams (REFUSED_STREAM beyond it).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import hpack
import hpack.exceptions

from nodemesh.hbonespec import HboneSettings

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 256 * 1024
DEFAULT_MAX_CONCURRENT_STREAMS = 1000
MAX_HEADER_BLOCK = 64 * 1024  # a CONNECT's headers are a few hundred bytes
REASON_HEADER = "x-nodemesh-reason"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1


@dataclass(frozen=True)
class HboneLimits:
    """Every HBONE limit and timeout, with its default, in one place (the pool,
    the listener and the tunnels read them from here; NodeProxy takes one).

    Buffered bytes per stream are bounded by flow control in both directions:
    towards the peer, a stream whose data exceeds the peer's window pauses
    reading its source (at most one read is queued beyond the window); from the
    peer, credit is returned only for bytes the partner took without pushing
    back, so at most `stream_window` bytes of one stream wait in this process,
    and `connection_window` for all streams of a connection. A peer that sends
    beyond a window gets FLOW_CONTROL_ERROR (stream or connection)."""

    stream_window: int = STREAM_WINDOW  # bytes buffered per stream, at most
    connection_window: int = CONNECTION_WINDOW  # bytes buffered per connection, at most
    max_streams_per_connection: int = DEFAULT_MAX_CONCURRENT_STREAMS  # server: REFUSED_STREAM beyond
    client_max_streams: int = 100  # client: a sibling connection beyond
    client_idle_timeout_s: float = 60.0  # client connection with no stream: closed by the pool
    # Server connection with no stream: GOAWAY and close. Longer than the client's,
    # so the client (which knows when it wants a new stream) normally closes first.
    server_idle_timeout_s: float = 300.0
    # An inbound tunnel moving no byte either way (the outbound side has its
    # destination's idle timeout, nodeagent/proxy/idle.py).
    stream_idle_timeout_s: float = 3600.0
    max_frame_size: int = MAX_FRAME_SIZE  # SETTINGS_MAX_FRAME_SIZE we accept

    @classmethod
    def from_settings(cls, s: HboneSettings) -> HboneLimits:
        """The limits MeshConfig spec.hbone asks for (nodemesh/hbonespec.py)."""
        return cls(stream_window=s.stream_window_bytes, connection_window=s.connection_window_bytes,
                   max_streams_per_connection=s.max_concurrent_streams, client_max_streams=s.streams_per_connection,
                   client_idle_timeout_s=s.idle_timeout_s, server_idle_timeout_s=s.server_idle_timeout_s,
                   stream_idle_timeout_s=s.stream_idle_timeout_s, max_frame_size=s.max_frame_bytes)


DEFAULT_LIMITS = HboneLimits()


class ErrorCodes(IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


# RST_STREAM codes we use: CANCEL mirrors a TCP reset of the application socket.
RST_CANCEL = ErrorCodes.CANCEL
RST_CONNECT_ERROR = ErrorCodes.CONNECT_ERROR

# Frame types and flags (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
F_END_STREAM = 0x1
F_ACK = 0x1
F_END_HEADERS = 0x4
F_PADDED = 0x8
F_PRIORITY = 0x20

S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

_HDR = struct.Struct(">BHBBL")  # length as 8 + 16 bits, type, flags, stream id
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")

# Request headers that make an HTTP/2 message malformed (RFC 9113 §8.2.2).
_CONNECTION_SPECIFIC = frozenset({"connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade"})


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HDR.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


# --- events -------------------------------------------------------------------------------------
# Plain slotted dataclasses (not frozen): one is built per DATA frame on the hot path.
@dataclass(slots=True)
class Event:
    pass


@dataclass(slots=True)
class ConnectRequested(Event):
    """Server side: the peer asks for a tunnel to `authority` (already validated)."""

    stream_id: int
    host: str
    port: int
    headers: tuple[tuple[str, str], ...]


@dataclass(slots=True)
class ConnectRejected(Event):
    """Server side: a CONNECT that was answered with an error right away
    (malformed, or over the stream cap); the caller only logs it."""

    stream_id: int
    status: int
    reason: str
    code: str = "bad_request"  # the access log's reason


@dataclass(slots=True)
class TunnelEstablished(Event):
    """Client side: the peer answered 2xx."""

    stream_id: int


@dataclass(slots=True)
class TunnelRefused(Event):
    """Client side: the peer answered with a non-2xx status."""

    stream_id: int
    status: int
    reason: str


@dataclass(slots=True)
class Data(Event):
    stream_id: int
    data: bytes
    flow_controlled_length: int  # pass to acknowledge() once the data was written onward


@dataclass(slots=True)
class PeerHalfClosed(Event):
    """END_STREAM from the peer: the tunnel's far side sent EOF."""

    stream_id: int


@dataclass(slots=True)
class StreamReset(Event):
    stream_id: int
    error_code: int
    remote: bool  # False: we reset it ourselves (e.g. protocol error on the stream)


@dataclass(slots=True)
class StreamClosed(Event):
    """Both directions finished cleanly; the stream's slot is free."""

    stream_id: int


@dataclass(slots=True)
class SendBlocked(Event):
    """The stream has data buffered beyond the peer's window: stop reading its source."""

    stream_id: int


@dataclass(slots=True)
class SendUnblocked(Event):
    stream_id: int


@dataclass(slots=True)
class GoingAway(Event):
    """The peer sent a graceful GOAWAY (NO_ERROR) while streams it will still
    serve are open: no new stream on this connection, the open ones finish
    (RFC 9113 §6.8). Streams above `last_stream_id` came as StreamReset."""

    last_stream_id: int
    reason: str


@dataclass(slots=True)
class ConnectionClosed(Event):
    """The connection is over (GOAWAY received, or malformed input from the peer).
    Every open stream is dead; the caller should flush data_to_send() and close."""

    error_code: int
    reason: str


class HboneProtocolError(Exception):
    """A local misuse (open_tunnel on a closing connection, or past the peer's cap)."""


class _ConnError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# --- core ---------------------------------------------------------------------------------------
class _Stream:
    __slots__ = ("blocked", "credit", "early", "end_pending", "established", "local_ended", "pending",
                 "recv_window", "remote_ended", "send_window")

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.pending: list[bytes] = []  # data beyond the peer's window, oldest first
        self.end_pending = False  # END_STREAM to send once pending drains
        self.blocked = False
        self.local_ended = False
        self.remote_ended = False
        self.established = False
        self.send_window = send_window
        self.recv_window = recv_window  # what the peer may still send us
        self.credit = 0  # acknowledged bytes not yet returned in a WINDOW_UPDATE
        self.early: list[Data] = []  # server: data the caller sent before our 200 (unacknowledged)


def parse_authority(authority: str) -> tuple[str, int]:
    """'ip:port' or '[v6]:port' -> (ip, port); ValueError naming what is wrong."""
    if authority.startswith("["):
        host, sep, port_s = authority[1:].partition("]:")
    else:
        host, sep, port_s = authority.rpartition(":")
    if not sep or not host:
        raise ValueError(f"authority {authority!r} is not ip:port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"authority {authority!r}: {host!r} is not an IP address") from None
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"authority {authority!r}: port {port_s!r} is not in 1..65535")
    return str(ip), int(port_s)


def format_authority(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class HboneConnection:
    """One HTTP/2 connection carrying CONNECT tunnels, client or server side."""

    def __init__(
        self,
        *,
        client: bool,
        stream_window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        max_frame_size: int = MAX_FRAME_SIZE,
    ) -> None:
        self.client = client
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._max_streams = max_concurrent_streams
        self._max_frame = max_frame_size
        self._streams: dict[int, _Stream] = {}
        self._closed = False
        # A graceful GOAWAY sent or received: no new stream; the open ones finish.
        self._draining = False
        self._serve_up_to = 2**31 - 1  # the last peer stream we still serve (our GOAWAY's)
        self._out: list[bytes] = []
        self._inbuf = bytearray()
        self._preface_pending = not client  # the server waits for the client's magic
        self._settings_seen = False  # the peer's first frame must be SETTINGS
        self._continuation: tuple[int, int, bytearray] | None = None  # (sid, flags of HEADERS, block)
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = MAX_HEADER_BLOCK
        # Peer's settings (RFC defaults until its SETTINGS frame).
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = 16384
        self._peer_max_streams = 2**31 - 1
        self._send_window = DEFAULT_WINDOW  # connection-level, what we may still send
        self._recv_window = connection_window  # connection-level, what the peer may still send
        self._conn_credit = 0
        self._credit_threshold = max(1, connection_window // 4)
        self._stream_credit_threshold = max(1, stream_window // 4)
        self._next_sid = 1 if client else 2
        self._last_peer_sid = 0  # highest stream id the peer opened
        self._local_open = 0  # streams we opened that are still in _streams (client side)
        self._blocked: dict[int, _Stream] = {}  # streams with pending data, for window updates
        self._cut_sid = 0  # a DATA frame being passed on as it arrives (see _parse)
        self._cut_left = 0

    # -- lifecycle --
    def initiate(self) -> None:
        """Queue the preface and SETTINGS; call once, before anything else."""
        settings = [(S_INITIAL_WINDOW_SIZE, self._stream_window), (S_MAX_FRAME_SIZE, self._max_frame),
                    (S_MAX_CONCURRENT_STREAMS, self._max_streams), (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK)]
        if self.client:
            settings.insert(0, (S_ENABLE_PUSH, 0))
            self._out.append(PREFACE)
        self._out.append(_frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings)))
        extra = self._connection_window - DEFAULT_WINDOW
        if extra > 0:
            self._out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(extra)))
        else:
            self._recv_window = DEFAULT_WINDOW

    @property
    def closed(self) -> bool:
        """No new stream may be opened here: closed, or draining after a graceful GOAWAY."""
        return self._closed or self._draining

    @property
    def last_peer_stream(self) -> int:
        return self._last_peer_sid

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def peer_max_concurrent_streams(self) -> int:
        return self._peer_max_streams

    def can_open(self) -> bool:
        """A new tunnel fits under the peer's MAX_CONCURRENT_STREAMS and the id space."""
        return (not self._closed and not self._draining and self._local_open < self._peer_max_streams
                and self._next_sid < MAX_WINDOW)

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def output_chunks(self) -> list[bytes]:
        """What data_to_send() would return, as pieces for a gathered write:
        runs of small frames joined, large DATA payloads left as they are (no
        copy here; each becomes its own TLS records in the same write)."""
        out = self._out
        self._out = []
        if len(out) <= 1:
            return out
        res: list[bytes] = []
        small: list[bytes] = []
        for c in out:
            if len(c) >= 16384:
                if small:
                    res.append(small[0] if len(small) == 1 else b"".join(small))
                    small = []
                res.append(c)
            else:
                small.append(c)
        if small:
            res.append(small[0] if len(small) == 1 else b"".join(small))
        return res

    def has_output(self) -> bool:
        return bool(self._out)

    def goaway(self, last_stream_id: int | None = None, reason: str = "") -> None:
        """Graceful shutdown (RFC 9113 §6.8): GOAWAY with NO_ERROR; the streams up to
        last_stream_id still finish, later ones are refused. First without an id
        (any stream the peer opened before it saw this one is still served), then,
        a round trip later, with last_peer_stream: a shutdown that refuses nothing."""
        if self._closed:
            return
        self._draining = True
        last = 2**31 - 1 if last_stream_id is None else last_stream_id
        self._serve_up_to = min(self._serve_up_to, last)
        self._out.append(_frame(GOAWAY, 0, 0, _GOAWAY.pack(last, ErrorCodes.NO_ERROR) + reason.encode()[:256]))

    def close(self, reason: str = "", error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Send GOAWAY; no new streams, no more data."""
        if not self._closed:
            self._closed = True
            debug = reason.encode()[:256]
            self._out.append(_frame(GOAWAY, 0, 0, _GOAWAY.pack(self._last_peer_sid, int(error_code)) + debug))

    # -- client side --
    def open_tunnel(self, ip: str, port: int, extra_headers: tuple[tuple[str, str], ...] = ()) -> int:
        if not self.client:
            raise RuntimeError("open_tunnel is for the client side")
        if self._closed:
            raise HboneProtocolError("connection is closing")
        if not self.can_open():
            raise HboneProtocolError(f"peer allows {self._peer_max_streams} concurrent streams; all are in use")
        sid = self._next_sid
        self._next_sid += 2
        headers = [(":method", "CONNECT"), (":authority", format_authority(ip, port)), *extra_headers]
        self._send_headers(sid, headers, end_stream=False)
        self._streams[sid] = _Stream(self._peer_initial_window, self._stream_window)
        self._local_open += 1
        return sid

    # -- server side --
    def accept(self, stream_id: int) -> list[Data]:
        """Answer 200; returns the data the caller sent ahead of it (to relay
        first, and acknowledge like any other)."""
        st = self._streams.get(stream_id)
        if st is None:
            raise HboneProtocolError(f"stream {stream_id} is gone")
        self._send_headers(stream_id, [(":status", "200")], end_stream=False)
        st.established = True
        early, st.early = st.early, []
        return early

    def refuse(self, stream_id: int, status: int, reason: str) -> None:
        if self._forget(stream_id) is None or self._closed:
            return
        self._send_headers(stream_id, [(":status", str(status)), (REASON_HEADER, _header_safe(reason))],
                           end_stream=True)
        # The answer is complete: ask the caller to stop sending (RFC 9113 §8.1).
        self._out.append(_frame(RST_STREAM, 0, stream_id, _U32.pack(ErrorCodes.NO_ERROR)))

    # -- both --
    def send(self, stream_id: int, data: bytes) -> bool:
        """Queue data on a tunnel; True if the stream is now blocked on the peer's window."""
        st = self._streams.get(stream_id)
        if st is None or st.local_ended or st.end_pending or self._closed:
            return False
        if st.pending:
            st.pending.append(data)
            return True
        n = len(data)
        if n <= st.send_window and n <= self._send_window and n <= self._peer_max_frame:
            # The common case: one frame, no slicing.
            st.send_window -= n
            self._send_window -= n
            self._out.append(_HDR.pack(n >> 16, n & 0xFFFF, DATA, 0, stream_id))
            self._out.append(data)
            return False
        st.pending.append(data)
        self._flush(stream_id, st)
        if st.pending:
            st.blocked = True
            self._blocked[stream_id] = st
        return st.blocked

    def end(self, stream_id: int) -> bool:
        """Half-close: END_STREAM after the buffered data. True if this finished
        the stream (the peer had already ended its side)."""
        st = self._streams.get(stream_id)
        if st is None or st.local_ended or self._closed:
            return False
        st.end_pending = True
        self._flush(stream_id, st)  # sends END_STREAM if nothing is queued ahead of it
        if _both_ended(st):
            self._forget(stream_id)
            return True
        return False

    def reset(self, stream_id: int, error_code: int = RST_CANCEL) -> None:
        if self._forget(stream_id) is None or self._closed:
            return
        self._out.append(_frame(RST_STREAM, 0, stream_id, _U32.pack(int(error_code))))

    def acknowledge(self, stream_id: int, flow_controlled_length: int) -> None:
        """The data was written onward: give the peer its window back, in batches."""
        if flow_controlled_length <= 0 or self._closed:
            return
        self._conn_credit += flow_controlled_length
        if self._conn_credit >= self._credit_threshold:
            self._recv_window += self._conn_credit
            self._out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._conn_credit)))
            self._conn_credit = 0
        st = self._streams.get(stream_id)
        if st is None or st.remote_ended:
            return  # the peer sends no more on it: no stream credit needed
        st.credit += flow_controlled_length
        if st.credit >= self._stream_credit_threshold:
            st.recv_window += st.credit
            self._out.append(_frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(st.credit)))
            st.credit = 0

    def is_blocked(self, stream_id: int) -> bool:
        st = self._streams.get(stream_id)
        return bool(st and st.blocked)

    def peer_ended(self, stream_id: int) -> bool:
        """The peer already sent END_STREAM on this stream."""
        st = self._streams.get(stream_id)
        return bool(st and st.remote_ended)

    def buffered(self, stream_id: int) -> int:
        """Bytes queued on the stream beyond the peer's window."""
        st = self._streams.get(stream_id)
        return sum(len(b) for b in st.pending) if st is not None else 0

    # -- input --
    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        out: list[Event] = []
        if self._closed:
            return out
        buf = self._inbuf
        if buf:
            buf += data
            view = memoryview(buf)
        else:
            view = memoryview(data)
        try:
            used = self._parse(view, out)
        except _ConnError as e:
            view.release()
            self._inbuf = bytearray()
            self._fail(e.code, e.reason, out)
            return out
        if buf:
            view.release()
            del buf[:used]
        elif used < len(view):
            self._inbuf = bytearray(view[used:])
            view.release()
        return out

    def _cut_through(self, chunk: memoryview, out: list[Event]) -> None:
        sid = self._cut_sid
        if sid in self._streams:
            out.append(Data(sid, bytes(chunk), len(chunk)))
        else:  # reset meanwhile: give the connection window back
            self.acknowledge(sid, len(chunk))

    def _fail(self, code: int, reason: str, out: list[Event]) -> None:
        """A connection error: GOAWAY with the code; every stream is dead."""
        self.close(reason, code)
        out.extend(StreamReset(sid, int(code), remote=False) for sid in self._streams)
        self._streams.clear()
        self._blocked.clear()
        out.append(ConnectionClosed(int(code), f"protocol error from peer: {reason}"))

    def _parse(self, view: memoryview, out: list[Event]) -> int:
        pos = 0
        end = len(view)
        if self._preface_pending:
            if end < len(PREFACE):
                if bytes(view[:end]) != PREFACE[:end]:
                    raise _ConnError(ErrorCodes.PROTOCOL_ERROR, "invalid HTTP/2 client preface")
                return 0
            if bytes(view[:len(PREFACE)]) != PREFACE:
                raise _ConnError(ErrorCodes.PROTOCOL_ERROR, "invalid HTTP/2 client preface")
            self._preface_pending = False
            pos = len(PREFACE)
        unpack = _HDR.unpack_from
        max_frame = self._max_frame
        streams = self._streams
        while not self._closed:
            if self._cut_left:
                # The rest of a DATA frame already accounted for: pass on what arrived.
                take = min(self._cut_left, end - pos)
                if not take:
                    break
                self._cut_through(view[pos:pos + take], out)
                pos += take
                self._cut_left -= take
                continue
            if end - pos < 9:
                break
            hi, lo, ftype, flags, sid = unpack(view, pos)
            length = (hi << 16) | lo
            sid &= 0x7FFFFFFF
            if length > max_frame:
                raise _ConnError(ErrorCodes.FRAME_SIZE_ERROR, f"frame of {length} bytes over our {max_frame}")
            if not self._settings_seen:
                if ftype != SETTINGS or flags & F_ACK:
                    raise _ConnError(ErrorCodes.PROTOCOL_ERROR, "the first frame must be SETTINGS")
                if end - pos - 9 >= length:
                    self._settings_seen = True
            if self._continuation is not None and ftype != CONTINUATION:
                raise _ConnError(ErrorCodes.PROTOCOL_ERROR, "expected CONTINUATION")
            if end - pos - 9 < length:
                # Incomplete. A large DATA frame of an established stream is passed on
                # as it arrives (cut-through): its bytes are never buffered here, and a
                # 256 KiB frame spanning reads costs no extra copies.
                if ftype == DATA and not flags & (F_PADDED | F_END_STREAM):
                    st = streams.get(sid)
                    if st is not None and st.established and not st.remote_ended and (
                            length <= st.recv_window and length <= self._recv_window):
                        st.recv_window -= length
                        self._recv_window -= length
                        self._cut_sid = sid
                        self._cut_left = length
                        pos += 9
                        continue
                break
            start = pos + 9
            pos = start + length
            if ftype == DATA:
                # Hot path: established streams, no padding.
                st = streams.get(sid)
                if st is not None and st.established and not flags & (F_PADDED | F_END_STREAM) and (
                        not st.remote_ended) and length <= st.recv_window and length <= self._recv_window:
                    st.recv_window -= length
                    self._recv_window -= length
                    if length:
                        out.append(Data(sid, bytes(view[start:pos]), length))
                    continue
                self._on_data(sid, flags, view[start:pos], out)
            elif ftype == WINDOW_UPDATE:
                self._on_window_update(sid, view[start:pos], out)
            elif ftype == HEADERS:
                self._on_headers(sid, flags, view[start:pos], out)
            elif ftype == CONTINUATION:
                self._on_continuation(sid, flags, view[start:pos], out)
            elif ftype == RST_STREAM:
                self._on_rst(sid, view[start:pos], out)
            elif ftype == SETTINGS:
                self._on_settings(sid, flags, view[start:pos], out)
            elif ftype == PING:
                if length != 8:
                    raise _ConnError(ErrorCodes.FRAME_SIZE_ERROR, "PING must carry 8 bytes")
                if sid:
                    raise _ConnError(ErrorCodes.PROTOCOL_ERROR, "PING on a stream")
                if not flags & F_ACK:
                    self._out.append(_frame(PING, F_ACK, 0, bytes(view[start:pos])))
            elif ftype == GOAWAY:
                self._on_goaway(sid, view[start:pos], out)
            elif ftype == PRIORITY:
                if not sid:
                    raise _ConnError(ErrorCodes.PROTOCOL_ERROR, "PRIORITY on stream 0")
                if length != 5:
                    self._stream_error(sid, ErrorCodes.FRAME_SIZE_ERROR, out)
            elif ftype == PUSH_PROMISE:
                raise _ConnError(ErrorCodes.PROTOCOL_ERROR, "PUSH_PROMISE: push is not enabled")
            # Unknown frame types are ignored (RFC 9113 §4.1).
        return pos

    # -- frame handlers (connection errors raise _ConnError) --
    def _check_stream_id(self, sid: int) -> None:
        if not sid:
            raise _ConnError(ErrorCodes.PROTOCOL_ERROR, "frame needs a stream")

    def _is_idle(self, sid: int) -> bool:
        """A stream id neither side has opened yet."""
        if (sid & 1) == (1 if self.client else 0):  # ours
            return sid >= self._next_sid
        return sid > self._last_peer_sid

    def _on_data(self, sid: int, flags: int, payload: memoryview, out: list[Event]) -> None:
        self._check_stream_id(sid)
        length = len(payload)
        if self._is_idle(sid):
            raise _ConnError(ErrorCodes.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
        if length > self._recv_window:
            raise _ConnError(ErrorCodes.FLOW_CONTROL_ERROR, "peer overran the connection window")
        self._recv_window -= length
        body = payload
        if flags & F_PADDED:
            if not length or payload[0] >= length:
                raise _ConnError(ErrorCodes.PROTOCOL_ERROR, "DATA padding exceeds the frame")
            body = payload[1:length - payload[0]]
        st = self._streams.get(sid)
        if st is None:
            # A stream we already finished or reset: credit the connection window
            # back at once so it does not leak.
            self.acknowledge(sid, length)
            return
        if st.remote_ended:
            self.acknowledge(sid, length)
            self._stream_error(sid, ErrorCodes.STREAM_CLOSED, out)
            return
        if length > st.recv_window:
            self.acknowledge(sid, length)
            self._stream_error(sid, ErrorCodes.FLOW_CONTROL_ERROR, out)
            return
        st.recv_window -= length
        if st.established:
            if len(body):
                out.append(Data(sid, bytes(body), length))
            elif length:
                self.acknowledge(sid, length)  # padding only
        elif not self.client and len(body):
            # A caller that sends before our 200 (optimistic data): held, without
            # credit back, so the stream window bounds it; accept() hands it over.
            st.early.append(Data(sid, bytes(body), length))
        else:
            self.acknowledge(sid, length)  # nothing to relay (client side: before the 2xx)
        if flags & F_END_STREAM:
            self._remote_end(sid, st, out)

    def _remote_end(self, sid: int, st: _Stream, out: list[Event]) -> None:
        st.remote_ended = True
        out.append(PeerHalfClosed(sid))
        self._maybe_closed(sid, st, out)

    def _on_window_update(self, sid: int, payload: memoryview, out: list[Event]) -> None:
        if len(payload) != 4:
            raise _ConnError(ErrorCodes.FRAME_SIZE_ERROR, "WINDOW_UPDATE must carry 4 bytes")
        inc = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise _ConnError(ErrorCodes.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self._send_window += inc
            if self._send_window > MAX_WINDOW:
                raise _ConnError(ErrorCodes.FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            self._flush_blocked(out)
            return
        if self._is_idle(sid):
            raise _ConnError(ErrorCodes.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
        st = self._streams.get(sid)
        if st is None:
            return
        if inc == 0:
            self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR, out)
            return
        st.send_window += inc
        if st.send_window > MAX_WINDOW:
            self._stream_error(sid, ErrorCodes.FLOW_CONTROL_ERROR, out)
            return
        if st.pending or st.end_pending:
            self._drain(sid, st, out)

    def _drain(self, sid: int, st: _Stream, out: list[Event]) -> None:
        self._flush(sid, st)
        if st.blocked and not st.pending:
            st.blocked = False
            self._blocked.pop(sid, None)
            out.append(SendUnblocked(sid))
        self._maybe_closed(sid, st, out)

    def _flush_blocked(self, out: list[Event]) -> None:
        for sid, st in list(self._blocked.items()):
            if self._send_window <= 0:
                break
            self._drain(sid, st, out)

    def _on_headers(self, sid: int, flags: int, payload: memoryview, out: list[Event]) -> None:
        self._check_stream_id(sid)
        block = payload
        if flags & F_PADDED:
            if not len(payload) or payload[0] >= len(payload):
                raise _ConnError(ErrorCodes.PROTOCOL_ERROR, "HEADERS padding exceeds the frame")
            block = payload[1:len(payload) - payload[0]]
        if flags & F_PRIORITY:
            if len(block) < 5:
                raise _ConnError(ErrorCodes.FRAME_SIZE_ERROR, "HEADERS priority fields missing")
            block = block[5:]
        if flags & F_END_HEADERS:
            self._on_header_block(sid, flags, bytes(block), out)
        else:
            self._continuation = (sid, flags, bytearray(block))

    def _on_continuation(self, sid: int, flags: int, payload: memoryview, out: list[Event]) -> None:
        cont = self._continuation
        if cont is None or cont[0] != sid:
            raise _ConnError(ErrorCodes.PROTOCOL_ERROR, "CONTINUATION without HEADERS on that stream")
        cont[2].extend(payload)
        if len(cont[2]) > MAX_HEADER_BLOCK:
            raise _ConnError(ErrorCodes.ENHANCE_YOUR_CALM, f"header block over {MAX_HEADER_BLOCK} bytes")
        if flags & F_END_HEADERS:
            self._continuation = None
            self._on_header_block(sid, cont[1], bytes(cont[2]), out)

    def _decode(self, block: bytes) -> list[tuple[str, str]]:
        if len(block) > MAX_HEADER_BLOCK:
            raise _ConnError(ErrorCodes.ENHANCE_YOUR_CALM, f"header block over {MAX_HEADER_BLOCK} bytes")
        try:
            # hpack types decode() as bytes pairs; with raw=False they are str (mypyc checks
            # annotations at run time, so the declared type must not be trusted here).
            pairs: Any = self._decoder.decode(block, raw=False)
            return [(str(k), str(v)) for k, v in pairs]
        except (hpack.exceptions.HPACKError, UnicodeDecodeError, ValueError, IndexError) as e:
            # The class, not hpack's message: that one embeds a memoryview's address.
            raise _ConnError(ErrorCodes.COMPRESSION_ERROR,
                             f"header block does not decode ({type(e).__name__})") from None

    def _on_header_block(self, sid: int, flags: int, block: bytes, out: list[Event]) -> None:
        # Decode every block, even for streams we refuse: HPACK state is per connection.
        headers = self._decode(block)
        end_stream = bool(flags & F_END_STREAM)
        st = self._streams.get(sid)
        peer_opens = (sid & 1) == (0 if self.client else 1)
        if st is None:
            if not peer_opens or self.client:
                if self._is_idle(sid):
                    raise _ConnError(ErrorCodes.PROTOCOL_ERROR, f"HEADERS on idle stream {sid} we did not open")
                return  # an answer for a stream we already gave up on
            if sid <= self._last_peer_sid:
                # A stream we reset or finished (the peer may not have seen it yet).
                self._out.append(_frame(RST_STREAM, 0, sid, _U32.pack(ErrorCodes.STREAM_CLOSED)))
                return
            self._last_peer_sid = sid
            if sid > self._serve_up_to:  # opened after our final GOAWAY: never processed, safe to retry
                self._out.append(_frame(RST_STREAM, 0, sid, _U32.pack(ErrorCodes.REFUSED_STREAM)))
                return
            self._on_request(sid, headers, end_stream, out)
            return
        if self.client and not st.established:
            self._on_response(sid, st, headers, end_stream, out)
            return
        # Trailers: only as the end of the stream.
        if not end_stream or st.remote_ended:
            self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR, out)
            return
        self._remote_end(sid, st, out)

    def _on_request(self, sid: int, headers: list[tuple[str, str]], end_stream: bool, out: list[Event]) -> None:
        if len(self._streams) >= self._max_streams:
            self._out.append(_frame(RST_STREAM, 0, sid, _U32.pack(ErrorCodes.REFUSED_STREAM)))
            out.append(ConnectRejected(sid, 503, f"over {self._max_streams} concurrent streams on this connection",
                                       "hbone_stream_limit"))
            return
        problem = _malformed(headers)
        if problem:
            self._out.append(_frame(RST_STREAM, 0, sid, _U32.pack(ErrorCodes.PROTOCOL_ERROR)))
            out.append(ConnectRejected(sid, 400, problem))
            return
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        self._streams[sid] = st = _Stream(self._peer_initial_window, self._stream_window)
        st.remote_ended = end_stream
        if pseudo.get(":method") != "CONNECT":
            self._reject(sid, 405, f"method {pseudo.get(':method')!r} not allowed: HBONE accepts CONNECT only", out)
            return
        if ":path" in pseudo or ":scheme" in pseudo or ":protocol" in pseudo:
            self._reject(sid, 400, "CONNECT must carry only :method and :authority", out)
            return
        try:
            host, port = parse_authority(pseudo.get(":authority", ""))
        except ValueError as e:
            self._reject(sid, 400, str(e), out)
            return
        out.append(ConnectRequested(sid, host, port, tuple(headers)))
        if end_stream:
            out.append(PeerHalfClosed(sid))

    def _reject(self, sid: int, status: int, reason: str, out: list[Event]) -> None:
        self.refuse(sid, status, reason)
        out.append(ConnectRejected(sid, status, reason))

    def _on_response(self, sid: int, st: _Stream, headers: list[tuple[str, str]], end_stream: bool,
                     out: list[Event]) -> None:
        hdrs = dict(headers)
        try:
            status = int(hdrs.get(":status", "0") or 0)
        except ValueError:
            status = 0
        if 100 <= status < 200 and not end_stream:
            return  # informational; the final answer follows
        if 200 <= status < 300:
            st.established = True
            out.append(TunnelEstablished(sid))
            if end_stream:
                self._remote_end(sid, st, out)
            return
        self._forget(sid)
        if not end_stream:
            self._out.append(_frame(RST_STREAM, 0, sid, _U32.pack(RST_CANCEL)))
        out.append(TunnelRefused(sid, status, hdrs.get(REASON_HEADER, "")))

    def _on_rst(self, sid: int, payload: memoryview, out: list[Event]) -> None:
        self._check_stream_id(sid)
        if len(payload) != 4:
            raise _ConnError(ErrorCodes.FRAME_SIZE_ERROR, "RST_STREAM must carry 4 bytes")
        if self._is_idle(sid):
            raise _ConnError(ErrorCodes.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        if self._forget(sid) is not None:
            out.append(StreamReset(sid, _U32.unpack_from(payload)[0], remote=True))

    def _on_settings(self, sid: int, flags: int, payload: memoryview, out: list[Event]) -> None:
        if sid:
            raise _ConnError(ErrorCodes.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & F_ACK:
            if len(payload):
                raise _ConnError(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnError(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        for off in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, off)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnError(ErrorCodes.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE over 2^31-1")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for st in self._streams.values():
                    st.send_window += delta
                    if st.send_window > MAX_WINDOW:
                        raise _ConnError(ErrorCodes.FLOW_CONTROL_ERROR, "a stream window over 2^31-1")
            elif key == S_MAX_FRAME_SIZE:
                if not 16384 <= value <= 2**24 - 1:
                    raise _ConnError(ErrorCodes.PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value} out of range")
                self._peer_max_frame = value
            elif key == S_MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
            elif key == S_ENABLE_PUSH:
                if value > 1 or (value == 1 and self.client):  # only a client may advertise push
                    raise _ConnError(ErrorCodes.PROTOCOL_ERROR, f"ENABLE_PUSH {value} not allowed")
            elif key == S_HEADER_TABLE_SIZE:
                self._encoder.header_table_size = min(value, 4096)
        self._out.append(_frame(SETTINGS, F_ACK, 0))
        # A larger initial window may unblock streams.
        self._flush_blocked(out)

    def _on_goaway(self, sid: int, payload: memoryview, out: list[Event]) -> None:
        if sid:
            raise _ConnError(ErrorCodes.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise _ConnError(ErrorCodes.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        _last, code = _GOAWAY.unpack_from(payload)
        _last &= 0x7FFFFFFF
        extra = bytes(payload[8:]).decode("utf-8", "replace")
        ours = 1 if self.client else 0
        if code == ErrorCodes.NO_ERROR and any((s & 1) == ours and s <= _last for s in self._streams):
            # Graceful: the streams it will still serve finish; the others were never processed.
            self._draining = True
            for s in [s for s in self._streams if (s & 1) == ours and s > _last]:
                self._forget(s)
                out.append(StreamReset(s, ErrorCodes.REFUSED_STREAM, remote=True))
            out.append(GoingAway(_last, f"GOAWAY from peer {extra}".strip()))
            return
        self._closed = True
        out.extend(StreamReset(s, code, remote=True) for s in self._streams)
        self._streams.clear()
        self._blocked.clear()
        out.append(ConnectionClosed(code, f"GOAWAY from peer {extra}".strip()))

    # -- helpers --
    def _stream_error(self, sid: int, code: int, out: list[Event]) -> None:
        if self._forget(sid) is not None:
            out.append(StreamReset(sid, int(code), remote=False))
        self._out.append(_frame(RST_STREAM, 0, sid, _U32.pack(int(code))))

    def _forget(self, sid: int) -> _Stream | None:
        st = self._streams.pop(sid, None)
        if st is not None:
            self._blocked.pop(sid, None)
            if (sid & 1) == (1 if self.client else 0):
                self._local_open -= 1
            if st.early:
                # Data held before our 200 was never handed to the caller, so nobody
                # else will acknowledge it: give the connection window back here, or
                # every refused or reset CONNECT that carried early data shrinks it
                # for good (the stream's own window dies with the stream).
                self.acknowledge(sid, sum(d.flow_controlled_length for d in st.early))
                st.early = []
        return st

    def _send_headers(self, sid: int, headers: list[tuple[str, str]], end_stream: bool) -> None:
        block = self._encoder.encode(headers)
        limit = self._peer_max_frame
        flags = F_END_STREAM if end_stream else 0
        if len(block) <= limit:
            self._out.append(_frame(HEADERS, flags | F_END_HEADERS, sid, block))
            return
        self._out.append(_frame(HEADERS, flags, sid, block[:limit]))
        rest = block[limit:]
        while rest:
            chunk, rest = rest[:limit], rest[limit:]
            self._out.append(_frame(CONTINUATION, 0 if rest else F_END_HEADERS, sid, chunk))

    def _flush(self, sid: int, st: _Stream) -> None:
        """Send what the windows allow, in frames as large as the peer accepts."""
        if self._closed:
            return
        pending = st.pending
        while pending:
            room = min(st.send_window, self._send_window, self._peer_max_frame)
            if room <= 0:
                break
            head = pending[0]
            if len(head) <= room:
                pending.pop(0)
                chunk = head
            else:
                mv = memoryview(head)
                chunk, pending[0] = bytes(mv[:room]), bytes(mv[room:])
            n = len(chunk)
            st.send_window -= n
            self._send_window -= n
            self._out.append(_HDR.pack(n >> 16, n & 0xFFFF, DATA, 0, sid))
            self._out.append(chunk)
        if st.end_pending and not pending and not st.local_ended:
            self._out.append(_frame(DATA, F_END_STREAM, sid))
            st.local_ended = True

    def _maybe_closed(self, sid: int, st: _Stream, out: list[Event]) -> None:
        if st.local_ended and st.remote_ended and self._forget(sid) is not None:
            out.append(StreamClosed(sid))


def _malformed(headers: list[tuple[str, str]]) -> str:
    """Why a request header list is malformed (RFC 9113 §8.2-8.3), or ""."""
    seen_regular = False
    pseudo: set[str] = set()
    for k, v in headers:
        if not k:
            return "empty header name"
        if k.startswith(":"):
            if seen_regular:
                return f"pseudo-header {k} after a regular header"
            if k in pseudo:
                return f"duplicate pseudo-header {k}"
            if k not in (":method", ":authority", ":scheme", ":path", ":protocol"):
                return f"unknown pseudo-header {k}"
            pseudo.add(k)
            continue
        seen_regular = True
        if k != k.lower():
            return f"header name {k!r} is not lowercase"
        if k in _CONNECTION_SPECIFIC or (k == "te" and v != "trailers"):
            return f"connection-specific header {k!r}"
        if any(c in v for c in "\r\n\0"):
            return f"header {k!r} has a forbidden character"
    if ":method" not in pseudo:
        return "no :method"
    return ""


def _header_safe(reason: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in reason)[:512]


def _both_ended(st: _Stream) -> bool:
    """(A call, not an inline test: the type checker would keep `local_ended` narrowed
    to what it was before `_flush` changed it.)"""
    return bool(st.local_ended and st.remote_ended)
