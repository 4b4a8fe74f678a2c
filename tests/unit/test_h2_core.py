"""The h2c core (no I/O): sends queue behind the peer's flow-control window
and report when a stream drained; END_STREAM and trailers wait for the queue;
gRPC helpers."""

from __future__ import annotations

import h2.events

from nodeagent.proxy.http.h2core import (
    MAX_STREAM_ID,
    H2Core,
    grpc_message_escape,
    grpc_status_for_http,
    grpc_status_of,
    strip_connection_headers,
)

REQ = [(":method", "POST"), (":scheme", "http"), (":path", "/a.B/C"), (":authority", "x"),
       ("content-type", "application/grpc"), ("te", "trailers")]


def pair(server_window: int = 65535) -> tuple[H2Core, H2Core]:
    c = H2Core(client=True)
    s = H2Core(client=False, stream_window=server_window)
    c.initiate()
    s.initiate()
    pump(c, s)
    return c, s


def pump(a: H2Core, b: H2Core) -> tuple[list[h2.events.Event], list[h2.events.Event], list[int], list[int]]:
    """Exchange bytes until quiet; events seen by a and b, streams drained on a and b."""
    ea: list[h2.events.Event] = []
    eb: list[h2.events.Event] = []
    da: list[int] = []
    db: list[int] = []
    for _ in range(20):
        x, y = a.data_to_send(), b.data_to_send()
        if not x and not y:
            break
        if x:
            r = b.receive_data(x)
            eb += r.events
            db += r.drained
        if y:
            r = a.receive_data(y)
            ea += r.events
            da += r.drained
    return ea, eb, da, db


def test_data_waits_for_window_and_drains_when_acknowledged() -> None:
    c, s = pair(server_window=65535)
    sid = c.new_request(REQ)
    assert c.send_data(sid, b"x" * 100_000) is False  # beyond the 64 KiB window: queued
    c.end_stream(sid)
    assert c.queued(sid) > 0
    _, ev, _, _ = pump(c, s)
    got = sum(len(e.data) for e in ev if isinstance(e, h2.events.DataReceived))
    assert got == 65535 and not any(isinstance(e, h2.events.StreamEnded) for e in ev)
    # The server passes the data on and gives the window back: the rest flows, then END_STREAM.
    s.acknowledge(sid, got)
    ev2 = pump(c, s)[1]
    rest = sum(len(e.data) for e in ev2 if isinstance(e, h2.events.DataReceived))
    assert got + rest == 100_000 and any(isinstance(e, h2.events.StreamEnded) for e in ev2)


def test_trailers_follow_queued_data() -> None:
    c, s = pair()
    sid = c.new_request(REQ, end_stream=True)
    pump(c, s)
    s.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
    s.send_data(sid, b"y" * 200_000)  # client window is 1 MiB: fits
    s.end_stream(sid, [("grpc-status", "0")])
    ev, _, _, _ = pump(c, s)
    kinds = [type(e).__name__ for e in ev if not isinstance(e, (h2.events.WindowUpdated,
                                                                 h2.events.RemoteSettingsChanged,
                                                                 h2.events.SettingsAcknowledged))]
    assert kinds[0] == "ResponseReceived" and "TrailersReceived" in kinds
    assert kinds.index("TrailersReceived") > max(i for i, k in enumerate(kinds) if k == "DataReceived")


def test_drained_reported_after_window_update() -> None:
    c, s = pair(server_window=65535)
    sid = c.new_request(REQ)
    c.send_data(sid, b"z" * 70_000)
    ev = pump(c, s)[1]
    n = sum(e.flow_controlled_length for e in ev if isinstance(e, h2.events.DataReceived))
    s.acknowledge(sid, n)
    r = c.receive_data(s.data_to_send())
    assert sid in r.drained and c.queued(sid) == 0


def test_big_frame_in_the_same_read_as_the_settings_ack() -> None:
    # The peer acknowledges our SETTINGS (MAX_FRAME_SIZE 64 KiB) and uses the new size
    # right away; both arrive in one read, before we ever processed the ACK.
    c, s = H2Core(client=True), H2Core(client=False)
    c.initiate()
    s.initiate()
    sid = c.new_request(REQ, end_stream=True)
    s.receive_data(c.data_to_send())
    s.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
    s.send_data(sid, b"f" * 200_000)
    assert s.h2.max_outbound_frame_size > 16384  # the server does send frames over the 16 KiB default
    r = c.receive_data(s.data_to_send())
    assert r.error == ""
    assert sum(len(e.data) for e in r.events if isinstance(e, h2.events.DataReceived)) == 200_000


def test_grpc_helpers() -> None:
    assert grpc_status_for_http(503) == 14 and grpc_status_for_http(404) == 12 and grpc_status_for_http(418) == 2
    assert grpc_message_escape("a b%ü") == "a b%25%C3%BC"
    assert grpc_status_of([("grpc-status", "5")]) == 5 and grpc_status_of([("grpc-status", "x")]) is None
    assert strip_connection_headers([("te", "trailers"), ("te", "gzip"), ("connection", "close"), ("a", "1")]) == [
        ("te", "trailers"), ("a", "1")]


def test_graceful_goaway_keeps_the_connection_for_the_streams_it_still_serves() -> None:
    """goaway(): NO_ERROR GOAWAY, the largest stream ID first, then the last one
    taken; our side can still answer streams up to it (h2 alone would refuse any
    frame after a GOAWAY it sent), and refuses() names the later ones."""
    c, s = pair()
    sid = c.new_request(REQ, end_stream=True)
    pump(c, s)
    s.goaway(None, "restarting")
    ec, _, _, _ = pump(c, s)
    first = [e for e in ec if isinstance(e, h2.events.ConnectionTerminated)]
    assert [(e.error_code, e.last_stream_id, e.additional_data) for e in first] == [(0, MAX_STREAM_ID, b"restarting")]
    assert c.draining and not c.closed and not s.refuses(sid + 2)
    s.goaway(s.last_peer_stream)
    late = c.new_request(REQ, end_stream=True)  # crossed the final GOAWAY
    ec, _, _, _ = pump(c, s)
    assert [e.last_stream_id for e in ec if isinstance(e, h2.events.ConnectionTerminated)] == [sid]
    assert s.refuses(late) and not s.refuses(sid)
    s.send_headers(sid, [(":status", "200")])
    s.end_stream(sid, [("grpc-status", "0")])
    ec, _, _, _ = pump(c, s)
    assert any(isinstance(e, h2.events.TrailersReceived) and e.stream_id == sid for e in ec)
    s.goaway(MAX_STREAM_ID)  # a later GOAWAY never raises the last stream ID again
    assert s.serve_up_to == sid
