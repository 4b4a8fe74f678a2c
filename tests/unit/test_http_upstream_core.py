"""The upstream HTTP/1.1 core (http/h1upstream.py, httptools) with a fake wire:
framing of every response shape, keep-alive decisions, one send per request,
and header injection refused; plus the per-label-set metric children."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nodeagent.observe import meshmetrics
from nodeagent.proxy.http.h1upstream import (
    UpstreamConn,
    UpstreamExchange,
    UpstreamRequest,
    UpstreamReset,
    request_bytes,
)


class Wire:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.eof = self.aborted = False

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def send_eof(self) -> None:
        self.eof = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def exchange(method: str, response: list[bytes], eof: bool = False) -> tuple[UpstreamConn, UpstreamExchange,
                                                                             bytes, Wire]:
    async def main() -> tuple[UpstreamConn, UpstreamExchange, bytes, Wire]:
        conn, wire = UpstreamConn("k", 0.0), Wire()
        conn.wire = wire  # type: ignore[assignment]
        ex = UpstreamExchange()
        got: list[bytes] = []
        ex.set_sink(got.append)
        conn.begin(ex, UpstreamRequest(method, "/x", [("host", "web")]), b"")
        for piece in response:
            conn.send(piece)
        if eof:
            conn.send_eof()
        return conn, ex, b"".join(got), wire
    return asyncio.run(main())


@pytest.mark.parametrize("method,response,body,reusable", [
    ("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], b"ok", True),
    ("GET", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n", b"0\r\n\r\n"], b"ok", True),
    ("GET", [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!"], b"!", True),
    ("HEAD", [b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"], b"", True),
    ("GET", [b"HTTP/1.1 204 No Content\r\n\r\n"], b"", True),
    ("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"], b"ok", False),
])
def test_response_shapes(method: str, response: list[bytes], body: bytes, reusable: bool) -> None:
    conn, ex, got, wire = exchange(method, response)
    assert ex.finished and got == body and ex.head.result().status_code in (200, 204)
    assert len(wire.sent) == 1  # the request went out in one send
    assert conn.finish_exchange(ex) is reusable and conn.reusable is reusable


def test_read_until_close_ends_at_the_close() -> None:
    conn, ex, got, _ = exchange("GET", [b"HTTP/1.1 200 OK\r\n\r\nab", b"cd"], eof=True)
    assert ex.finished and got == b"abcd" and conn.dead


def test_bad_response_and_out_of_turn_bytes_end_the_conn() -> None:
    conn, ex, _, wire = exchange("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"])
    assert conn.dead and wire.aborted and isinstance(ex.head.exception(), UpstreamReset)
    conn, ex, _, wire = exchange("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"])
    assert ex.finished and not conn.finish_exchange(ex)  # a second response to one request: not reused


def test_request_bytes_frame_and_refuse_injection() -> None:
    out = request_bytes(UpstreamRequest("POST", "/a", [("host", "w"), ("content-length", "9")]), b"hi")
    assert out == b"POST /a HTTP/1.1\r\nhost: w\r\ncontent-length: 2\r\n\r\nhi"
    with pytest.raises(UpstreamReset):
        request_bytes(UpstreamRequest("GET", "/a", [("x", "1\r\nevil: 2")]), b"")


def test_metric_children_match_label_updates() -> None:
    labels = meshmetrics.MeshLabels(reporter="source", destination_service="childtest.default.svc.mesh")
    for _ in range(3):
        meshmetrics.record_request(labels, response_code=200, duration_ms=3.0, request_bytes=10, response_bytes=20)
    d: dict[str, Any] = {**labels.as_dict(), "request_protocol": "http", "response_code": "200",
                         "grpc_response_status": ""}
    assert meshmetrics.REQUESTS.value(d) == 3.0
    buckets, total, count = meshmetrics.REQUEST_DURATION.value(d)
    assert count == 3 and total == 9.0 and sum(buckets) == 3
    meshmetrics.REQUESTS.clear()  # a cleared family comes back on the next update
    meshmetrics.record_request(labels, response_code=200, duration_ms=1.0)
    assert meshmetrics.REQUESTS.value(d) == 1.0
