"""HBONE protocol core: HTTP/2 CONNECT tunnels (with `h2`), no I/O.

Feed bytes with receive_data(), act on the returned events, and write
data_to_send() to the connection. Data received is acknowledged (window
credit returned) only when the caller says it was written onward, so a slow
reader pushes back through the HTTP/2 window; data to send beyond the peer's
window is buffered here and SendBlocked/SendUnblocked tell the caller when to
pause and resume reading the application socket.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 256 * 1024
DEFAULT_MAX_CONCURRENT_STREAMS = 1000
REASON_HEADER = "x-nodemesh-reason"

# RST_STREAM codes we use: CANCEL mirrors a TCP reset of the application socket.
RST_CANCEL = h2.errors.ErrorCodes.CANCEL
RST_CONNECT_ERROR = h2.errors.ErrorCodes.CONNECT_ERROR


# --- events -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class ConnectRequested(Event):
    """Server side: the peer asks for a tunnel to `authority` (already validated)."""

    stream_id: int
    host: str
    port: int
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ConnectRejected(Event):
    """Server side: a CONNECT that was answered with an error right away
    (malformed); the caller only logs it."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True)
class TunnelEstablished(Event):
    """Client side: the peer answered 200."""

    stream_id: int


@dataclass(frozen=True)
class TunnelRefused(Event):
    """Client side: the peer answered with a non-200 status."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True)
class Data(Event):
    stream_id: int
    data: bytes
    flow_controlled_length: int  # pass to acknowledge() once the data was written onward


@dataclass(frozen=True)
class PeerHalfClosed(Event):
    """END_STREAM from the peer: the tunnel's far side sent EOF."""

    stream_id: int


@dataclass(frozen=True)
class StreamReset(Event):
    stream_id: int
    error_code: int
    remote: bool  # False: we reset it ourselves (e.g. protocol error on the stream)


@dataclass(frozen=True)
class StreamClosed(Event):
    """Both directions finished cleanly; the stream's slot is free."""

    stream_id: int


@dataclass(frozen=True)
class SendBlocked(Event):
    """The stream has data buffered beyond the peer's window: stop reading its source."""

    stream_id: int


@dataclass(frozen=True)
class SendUnblocked(Event):
    stream_id: int


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """The connection is over (GOAWAY received, or malformed input from the peer).
    Every open stream is dead; the caller should flush data_to_send() and close."""

    error_code: int
    reason: str


# --- core ---------------------------------------------------------------------------------------
@dataclass
class _Stream:
    pending: bytearray = field(default_factory=bytearray)
    end_pending: bool = False  # END_STREAM to send once pending drains
    blocked: bool = False
    local_ended: bool = False
    remote_ended: bool = False
    established: bool = False


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
    ) -> None:
        self.client = client
        cfg = h2.config.H2Configuration(client_side=client, header_encoding="utf-8")
        self._h2 = h2.connection.H2Connection(config=cfg)
        self._streams: dict[int, _Stream] = {}
        self._closed = False
        self._settings: dict[h2.settings.SettingCodes | int, int] = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
        }
        self._connection_window = connection_window

    # -- lifecycle --
    def initiate(self) -> None:
        """Queue the preface and SETTINGS; call once, before anything else."""
        self._h2.initiate_connection()
        # Sent as a SETTINGS frame right behind the preface; h2 applies them to its
        # own inbound checks when the peer acknowledges, which precedes any data
        # the peer can send on a tunnel (a tunnel needs a round trip first).
        self._h2.update_settings(self._settings)
        extra = self._connection_window - 65535
        if extra > 0:
            self._h2.increment_flow_control_window(extra)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def peer_max_concurrent_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    def data_to_send(self) -> bytes:
        return bytes(self._h2.data_to_send())

    def close(self, reason: str = "") -> None:
        """Send GOAWAY; no new streams."""
        if not self._closed:
            self._closed = True
            self._h2.close_connection(additional_data=reason.encode()[:256] or None)

    # -- client side --
    def open_tunnel(self, ip: str, port: int, extra_headers: tuple[tuple[str, str], ...] = ()) -> int:
        if not self.client:
            raise RuntimeError("open_tunnel is for the client side")
        if self._closed:
            raise h2.exceptions.ProtocolError("connection is closing")
        sid = int(self._h2.get_next_available_stream_id())
        headers = [(":method", "CONNECT"), (":authority", format_authority(ip, port)), *extra_headers]
        self._h2.send_headers(sid, headers)
        self._streams[sid] = _Stream()
        return sid

    # -- server side --
    def accept(self, stream_id: int) -> None:
        self._h2.send_headers(stream_id, [(":status", "200")])
        st = self._streams.get(stream_id)
        if st is not None:
            st.established = True

    def refuse(self, stream_id: int, status: int, reason: str) -> None:
        if stream_id not in self._streams:
            return
        try:
            self._h2.send_headers(
                stream_id, [(":status", str(status)), (REASON_HEADER, _header_safe(reason))], end_stream=True
            )
        except h2.exceptions.StreamClosedError:
            pass
        self._streams.pop(stream_id, None)

    # -- both --
    def send(self, stream_id: int, data: bytes) -> bool:
        """Queue data on a tunnel; True if the stream is now blocked on the peer's window."""
        st = self._streams.get(stream_id)
        if st is None or st.local_ended or st.end_pending:
            return False
        st.pending += data
        self._flush(stream_id, st)
        if st.pending and not st.blocked:
            st.blocked = True
        return st.blocked

    def end(self, stream_id: int) -> bool:
        """Half-close: END_STREAM after the buffered data. True if this finished
        the stream (the peer had already ended its side)."""
        st = self._streams.get(stream_id)
        if st is None or st.local_ended:
            return False
        st.end_pending = True
        self._flush(stream_id, st)
        if st.local_ended and st.remote_ended:
            self._streams.pop(stream_id, None)
            return True
        return False

    def reset(self, stream_id: int, error_code: int = RST_CANCEL) -> None:
        if self._streams.pop(stream_id, None) is None:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.StreamClosedError:
            pass

    def acknowledge(self, stream_id: int, flow_controlled_length: int) -> None:
        """The data was written onward: give the peer its window back."""
        if flow_controlled_length <= 0 or self._closed:
            return
        try:
            self._h2.acknowledge_received_data(flow_controlled_length, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            # The stream is gone; h2 still credited the connection window if it could.
            pass

    def is_blocked(self, stream_id: int) -> bool:
        st = self._streams.get(stream_id)
        return bool(st and st.blocked)

    # -- input --
    def receive_data(self, data: bytes) -> list[Event]:
        if self._closed and not data:
            return []
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            # Malformed input ends this connection only; h2 queued a GOAWAY.
            self._closed = True
            dead = [StreamReset(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR, remote=False) for sid in self._streams]
            self._streams.clear()
            code = getattr(e, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return [*dead, ConnectionClosed(int(code), f"protocol error from peer: {e}")]
        out: list[Event] = []
        for ev in h2_events:
            self._handle(ev, out)
        return out

    def _handle(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev, out)
        elif isinstance(ev, h2.events.ResponseReceived):
            self._on_response(ev, out)
        elif isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id
            if sid in self._streams and self._streams[sid].established:
                out.append(Data(sid, bytes(ev.data), ev.flow_controlled_length))
            else:
                # Data for a stream we do not relay: credit it back at once so the
                # connection window does not leak.
                self.acknowledge(sid, ev.flow_controlled_length)
        elif isinstance(ev, h2.events.StreamEnded):
            st = self._streams.get(ev.stream_id)
            if st is not None:
                st.remote_ended = True
                out.append(PeerHalfClosed(ev.stream_id))
                self._maybe_closed(ev.stream_id, st, out)
        elif isinstance(ev, h2.events.StreamReset):
            if self._streams.pop(ev.stream_id, None) is not None:
                out.append(StreamReset(ev.stream_id, int(ev.error_code), remote=ev.remote_reset))
        elif isinstance(ev, h2.events.WindowUpdated):
            targets = list(self._streams) if ev.stream_id == 0 else [ev.stream_id]
            for sid in targets:
                st = self._streams.get(sid)
                if st is None:
                    continue
                was_blocked = st.blocked
                self._flush(sid, st)
                if was_blocked and not st.pending:
                    st.blocked = False
                    out.append(SendUnblocked(sid))
                self._maybe_closed(sid, st, out)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            # A larger initial window from the peer also unblocks streams.
            for sid, st in list(self._streams.items()):
                if st.pending:
                    self._flush(sid, st)
                    if st.blocked and not st.pending:
                        st.blocked = False
                        out.append(SendUnblocked(sid))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._closed = True
            dead = [StreamReset(sid, int(ev.error_code or 0), remote=True) for sid in self._streams]
            self._streams.clear()
            extra = (ev.additional_data or b"").decode("utf-8", "replace")
            out.extend(dead)
            out.append(ConnectionClosed(int(ev.error_code or 0), f"GOAWAY from peer {extra}".strip()))

    def _on_request(self, ev: h2.events.RequestReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        hdrs = tuple((str(k), str(v)) for k, v in ev.headers)
        pseudo = {k: v for k, v in hdrs if k.startswith(":")}
        self._streams[sid] = _Stream()
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
        out.append(ConnectRequested(sid, host, port, hdrs))

    def _reject(self, sid: int, status: int, reason: str, out: list[Event]) -> None:
        self.refuse(sid, status, reason)
        out.append(ConnectRejected(sid, status, reason))

    def _on_response(self, ev: h2.events.ResponseReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        st = self._streams.get(sid)
        if st is None:
            return
        hdrs = {str(k): str(v) for k, v in ev.headers}
        status = int(hdrs.get(":status", "0") or 0)
        if status == 200:
            st.established = True
            out.append(TunnelEstablished(sid))
        else:
            self._streams.pop(sid, None)
            if not ev.stream_ended:
                try:
                    self._h2.reset_stream(sid, RST_CANCEL)
                except h2.exceptions.StreamClosedError:
                    pass
            out.append(TunnelRefused(sid, status, hdrs.get(REASON_HEADER, "")))

    def _flush(self, sid: int, st: _Stream) -> None:
        if self._closed:
            return
        try:
            while st.pending:
                window = self._h2.local_flow_control_window(sid)
                if window <= 0:
                    break
                n = min(window, self._h2.max_outbound_frame_size, len(st.pending))
                self._h2.send_data(sid, bytes(st.pending[:n]))
                del st.pending[:n]
            if st.end_pending and not st.pending and not st.local_ended:
                self._h2.end_stream(sid)
                st.local_ended = True
        except (h2.exceptions.StreamClosedError, h2.exceptions.FlowControlError):
            st.pending.clear()

    def _maybe_closed(self, sid: int, st: _Stream, out: list[Event]) -> None:
        if st.local_ended and st.remote_ended:
            self._streams.pop(sid, None)
            out.append(StreamClosed(sid))


def _header_safe(reason: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in reason)[:512]
