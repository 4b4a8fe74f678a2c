"""HBONE core: client and server cores talking to each other in memory."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest

from nodeagent.proxy import hbone
from nodeagent.proxy.hbone import (
    ConnectionClosed,
    ConnectRejected,
    ConnectRequested,
    Data,
    Event,
    HboneConnection,
    PeerHalfClosed,
    SendBlocked,
    SendUnblocked,
    StreamClosed,
    StreamReset,
    TunnelEstablished,
    TunnelRefused,
)


class Pair:
    def __init__(self, **kw: int) -> None:
        self.c = HboneConnection(client=True, **kw)
        self.s = HboneConnection(client=False, **kw)
        self.c.initiate()
        self.s.initiate()
        self.cev: list[Event] = []
        self.sev: list[Event] = []
        self.pump()

    def pump(self) -> None:
        while True:
            a = self.c.data_to_send()
            b = self.s.data_to_send()
            if not a and not b:
                return
            if a:
                self.sev += self.s.receive_data(a)
            if b:
                self.cev += self.c.receive_data(b)

    def take(self, side: str) -> list[Event]:
        evs = self.cev if side == "c" else self.sev
        out = list(evs)
        evs.clear()
        return out

    def tunnel(self) -> int:
        sid = self.c.open_tunnel("10.0.0.5", 8080)
        self.pump()
        (req,) = [e for e in self.take("s") if isinstance(e, ConnectRequested)]
        self.s.accept(req.stream_id)
        self.pump()
        assert TunnelEstablished(sid) in self.take("c")
        return sid


def data_of(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Data))


def test_connect_accepted_and_data_both_ways() -> None:
    p = Pair()
    sid = p.c.open_tunnel("10.0.0.5", 8080)
    p.pump()
    evs = p.take("s")
    req = next(e for e in evs if isinstance(e, ConnectRequested))
    assert (req.host, req.port) == ("10.0.0.5", 8080)
    assert (":method", "CONNECT") in req.headers
    assert not any(k in (":path", ":scheme") for k, _ in req.headers)
    p.s.accept(req.stream_id)
    p.pump()
    assert TunnelEstablished(sid) in p.take("c")
    p.c.send(sid, b"hello")
    p.pump()
    assert data_of(p.take("s")) == b"hello"
    p.s.send(sid, b"world")
    p.pump()
    assert data_of(p.take("c")) == b"world"


def test_connect_refused_with_status_and_reason() -> None:
    p = Pair()
    sid = p.c.open_tunnel("10.0.0.9", 80)
    p.pump()
    req = next(e for e in p.take("s") if isinstance(e, ConnectRequested))
    p.s.refuse(req.stream_id, 404, "no local workload serves 10.0.0.9:80")
    p.pump()
    assert TunnelRefused(sid, 404, "no local workload serves 10.0.0.9:80") in p.take("c")
    assert p.c.open_streams == 0 and p.s.open_streams == 0


def _h2_client_against(server: HboneConnection) -> h2.connection.H2Connection:
    """A real RFC 9113 client (the `h2` library) talking to our server core."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                                             validate_outbound_headers=False))
    c.initiate_connection()
    server.initiate()
    c.receive_data(server.data_to_send())
    server.receive_data(c.data_to_send())
    c.receive_data(server.data_to_send())
    return c


@pytest.mark.parametrize(
    "authority,needle",
    [("10.0.0.1", "not ip:port"), ("web:80", "not an IP"), ("10.0.0.1:0", "port"), ("10.0.0.1:99999", "port")],
)
def test_malformed_authority_gets_400(authority: str, needle: str) -> None:
    s = HboneConnection(client=False)
    c = _h2_client_against(s)
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)])
    rej = [e for e in s.receive_data(c.data_to_send()) if isinstance(e, ConnectRejected)]
    assert rej and rej[0].status == 400 and needle in rej[0].reason
    answers = [e for e in c.receive_data(s.data_to_send()) if isinstance(e, h2.events.ResponseReceived)]
    hdrs: dict[str, str] = dict(answers[0].headers)  # type: ignore[arg-type] # str: the client decodes headers
    assert hdrs[":status"] == "400" and needle in hdrs[hbone.REASON_HEADER]
    assert s.open_streams == 0


def test_non_connect_method_refused() -> None:
    s = HboneConnection(client=False)
    c = _h2_client_against(s)
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "GET"), (":authority", "1.2.3.4:80"), (":scheme", "https"), (":path", "/")],
                   end_stream=True)
    assert any(isinstance(e, ConnectRejected) and e.status == 405 for e in s.receive_data(c.data_to_send()))


def test_half_close_each_way_then_closed() -> None:
    p = Pair()
    sid = p.tunnel()
    p.c.send(sid, b"req")
    assert p.c.end(sid) is False
    p.pump()
    evs = p.take("s")
    assert data_of(evs) == b"req" and PeerHalfClosed(sid) in evs
    # Server can still answer after the client's half-close.
    p.s.send(sid, b"resp")
    assert p.s.end(sid) is True  # both directions done on the server
    p.pump()
    evs = p.take("c")
    assert data_of(evs) == b"resp"
    assert PeerHalfClosed(sid) in evs and StreamClosed(sid) in evs
    assert p.c.open_streams == 0 and p.s.open_streams == 0


def test_reset_propagates() -> None:
    p = Pair()
    sid = p.tunnel()
    p.c.reset(sid)
    p.pump()
    resets = [e for e in p.take("s") if isinstance(e, StreamReset)]
    assert resets == [StreamReset(sid, int(hbone.RST_CANCEL), remote=True)]
    assert p.s.open_streams == 0


def test_flow_control_back_pressure_until_acknowledged() -> None:
    window = 65536
    p = Pair(stream_window=window, connection_window=1 << 20)
    sid = p.tunnel()
    blob = bytes(range(256)) * 1024  # 256 KiB, four windows
    assert p.c.send(sid, blob) is True  # blocked: more than one window
    p.pump()
    assert SendBlocked not in [type(e) for e in p.take("c")]
    got = p.take("s")
    assert len(data_of(got)) == window  # the peer's window is exactly what flowed
    # Nothing more flows while the server has not acknowledged.
    p.pump()
    assert data_of(p.take("s")) == b""
    received = data_of(got)
    unblocked = False
    for _ in range(20):
        for e in got:
            if isinstance(e, Data):
                p.s.acknowledge(sid, e.flow_controlled_length)
        p.pump()
        cev = p.take("c")
        unblocked = unblocked or SendUnblocked(sid) in cev
        got = p.take("s")
        received += data_of(got)
        if len(received) == len(blob):
            break
    assert received == blob
    assert unblocked and not p.c.is_blocked(sid)


def test_default_windows_are_large() -> None:
    p = Pair()
    sid = p.tunnel()
    assert p.c.send(sid, b"x" * (3 * 1024 * 1024)) is False  # fits in a 4 MiB stream window
    assert p.c._streams[sid].send_window == hbone.STREAM_WINDOW - 3 * 1024 * 1024


def test_malformed_preface_closes_only_that_connection() -> None:
    good = Pair()
    sid = good.tunnel()
    bad = HboneConnection(client=False)
    bad.initiate()
    evs = bad.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert any(isinstance(e, ConnectionClosed) for e in evs)
    assert bad.closed
    assert bad.data_to_send() != b""  # GOAWAY queued
    good.c.send(sid, b"still fine")
    good.pump()
    assert data_of(good.take("s")) == b"still fine"


def test_goaway_with_an_error_kills_open_streams() -> None:
    p = Pair()
    sid = p.tunnel()
    p.s.close("broken", error_code=hbone.ErrorCodes.INTERNAL_ERROR)
    p.pump()
    evs = p.take("c")
    assert any(isinstance(e, StreamReset) and e.stream_id == sid for e in evs)
    assert any(isinstance(e, ConnectionClosed) for e in evs)


def test_graceful_goaway_lets_open_streams_finish() -> None:
    """RFC 9113 §6.8: streams up to the GOAWAY's last stream id still finish; the
    connection takes no new ones (the pool then opens another), and a stream the
    peer opened after the final GOAWAY is refused (REFUSED_STREAM: safe to retry)."""
    p = Pair()
    sid = p.tunnel()
    p.s.goaway(reason="proxy restarting")  # step one: any stream the client opened so far is served
    p.pump()
    evs = p.take("c")
    assert [type(e) for e in evs] == [hbone.GoingAway] and p.c.closed and not p.c.can_open()
    with pytest.raises(hbone.HboneProtocolError):
        p.c.open_tunnel("10.0.0.5", 8080)
    p.c.send(sid, b"still flowing")
    p.s.send(sid, b"both ways")
    p.pump()
    assert data_of(p.take("s")) == b"still flowing" and data_of(p.take("c")) == b"both ways"
    # Step two names the last stream served; one the client opened meanwhile is refused.
    late = Pair()
    first = late.tunnel()
    second = late.c.open_tunnel("10.0.0.5", 8080)  # in flight when the server says goodbye
    late.s.goaway(first, "proxy restarting")
    late.pump()
    evs = late.take("c")
    assert any(isinstance(e, StreamReset) and e.stream_id == second and e.error_code == hbone.ErrorCodes.REFUSED_STREAM
               for e in evs)
    assert not any(isinstance(e, ConnectRequested) and e.stream_id == second for e in late.take("s"))
    late.c.send(first, b"first goes on")
    late.pump()
    assert data_of(late.take("s")) == b"first goes on"


def test_parse_authority() -> None:
    assert hbone.parse_authority("10.1.2.3:80") == ("10.1.2.3", 80)
    assert hbone.parse_authority("[fd00::1]:443") == ("fd00::1", 443)
    assert hbone.format_authority("fd00::1", 443) == "[fd00::1]:443"


def test_data_sent_ahead_of_the_200_is_held_then_handed_over() -> None:
    """A CONNECT peer that sends optimistically (before our answer) loses nothing:
    the server core holds the bytes, unacknowledged, and accept() returns them."""
    s = HboneConnection(client=False)
    c = _h2_client_against(s)
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.1:25")])
    c.send_data(sid, b"EHLO early\r\n")
    evs = s.receive_data(c.data_to_send())
    assert [type(e) for e in evs] == [ConnectRequested]
    early = s.accept(sid)
    assert [(e.data, e.flow_controlled_length) for e in early] == [(b"EHLO early\r\n", 12)]
    assert s.accept(sid) == []  # handed over once


def test_output_chunks_gather_small_frames_and_keep_big_payloads() -> None:
    p = Pair()
    sid = p.tunnel()
    big = b"b" * 100_000
    p.c.send(sid, b"small")
    p.c.send(sid, big)
    p.c.send(sid, b"tail")
    chunks = p.c.output_chunks()
    assert len(chunks) == 3 and chunks[1] is big  # header+small+header | payload | header+tail
    assert b"".join(chunks).endswith(b"tail") and not p.c.has_output()
