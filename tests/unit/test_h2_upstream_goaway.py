"""A peer's GOAWAY on a pooled h2c upstream connection (nodeagent/proxy/http/
h2upstream.py), per stream: streams up to its last stream ID finish, streams
above it are refused (never processed: the pipeline sends them again on a new
connection), and the connection takes no new stream. The peer is the `h2`
library's server side; the wire between them is in memory."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
from hyperframe.frame import GoAwayFrame

from nodeagent.proxy.http.h2upstream import H2Upstream, StreamHandler

REQ = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "web")]


class Recorder(StreamHandler):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_head(self, headers: list[tuple[str, str]], ended: bool) -> None:
        self.events.append(f"head {dict(headers)[':status']}{' end' if ended else ''}")

    def on_end(self) -> None:
        self.events.append("end")

    def on_reset(self, why: str) -> None:
        self.events.append("reset")

    def on_refused(self, why: str) -> None:
        self.events.append("refused")


class Wire:
    """The upstream's wire: what it sends goes to the server peer."""

    rx = tx = 0

    def __init__(self, server: h2.connection.H2Connection) -> None:
        self.server = server
        self.received: list[h2.events.Event] = []

    def send(self, data: bytes) -> None:
        self.received += self.server.receive_data(data)

    def send_eof(self) -> None: ...
    def abort(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


def _pair() -> tuple[H2Upstream, h2.connection.H2Connection, Wire]:
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    server.initiate_connection()
    up = H2Upstream(("src", "10.0.0.1", "80", "id"), "10.0.0.1:80")
    wire = Wire(server)
    up.start(wire)
    up.send(server.data_to_send())  # the server's SETTINGS
    return up, server, wire


def test_goaway_refuses_streams_above_its_last_stream_id_and_lets_the_others_finish() -> None:
    up, server, wire = _pair()
    first, second = Recorder(), Recorder()
    s1 = up.open_stream(REQ, first, end_stream=True)
    s3 = up.open_stream(REQ, second, end_stream=True)
    opened = [e.stream_id for e in wire.received if isinstance(e, h2.events.RequestReceived)]
    assert (s1, s3) == (1, 3) and opened == [1, 3]
    # The peer's graceful GOAWAY, written by hand: the h2 library would take no more
    # frames of its own after sending one, and stream 1 is still to be answered.
    up.send(GoAwayFrame(0, last_stream_id=1, error_code=0).serialize())
    assert second.events == ["refused"] and first.events == []
    assert up.draining and not up.usable  # no new stream on a connection that said GOAWAY
    server.send_headers(1, [(":status", "200")], end_stream=True)
    up.send(server.data_to_send())
    assert first.events == ["head 200 end", "end"]


def test_refused_stream_reset_is_a_refusal_and_other_resets_are_not() -> None:
    up, server, _ = _pair()
    refused, cancelled = Recorder(), Recorder()
    s1 = up.open_stream(REQ, refused, end_stream=True)
    s3 = up.open_stream(REQ, cancelled, end_stream=True)
    server.reset_stream(s1, h2.errors.ErrorCodes.REFUSED_STREAM)
    server.reset_stream(s3, h2.errors.ErrorCodes.INTERNAL_ERROR)
    up.send(server.data_to_send())
    assert refused.events == ["refused"] and cancelled.events == ["reset"]
    assert up.usable  # a stream reset leaves the connection open for others


def test_goaway_with_an_error_resets_every_stream() -> None:
    up, server, _ = _pair()
    below, above = Recorder(), Recorder()
    up.open_stream(REQ, below, end_stream=True)
    up.open_stream(REQ, above, end_stream=True)
    server.close_connection(error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR, last_stream_id=1)
    up.send(server.data_to_send())
    assert below.events == ["reset"] and above.events == ["refused"]
