"""The passive HTTP/1.1 observer of the destination side (nodeagent/observe/httpwatch.py):
both directions parsed without I/O, one Exchange per request/response, and a
clean stop (never an exception into the relay) when the bytes are not HTTP."""

from __future__ import annotations

from nodeagent.observe.httpwatch import Exchange, Http1Watch


def _watch() -> tuple[Http1Watch, list[Exchange], list[Exchange]]:
    started: list[Exchange] = []
    done: list[Exchange] = []
    t = iter(float(i) for i in range(1000))
    return Http1Watch(started.append, done.append, clock=lambda: next(t)), started, done


def test_pipelined_requests_bodies_head_and_chunked() -> None:
    w, started, done = _watch()
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    w.request(f"POST /a HTTP/1.1\r\nHost: x\r\ntraceparent: {tp}\r\nContent-Length: 5\r\n\r\nhel".encode())
    assert [e.method for e in started] == ["POST"] and not done
    w.request(b"loGET /b HTTP/1.1\r\nHost: x\r\n\r\nHEAD /c HTTP/1.1\r\nHost: x\r\n\r\n")
    w.response(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 3\r\n\r\nabc")
    w.response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n")
    w.response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")  # HEAD: no body follows
    assert [(e.method, e.target, e.status, e.request_bytes, e.response_bytes, e.complete) for e in done] == [
        ("POST", "/a", 503, 5, 3, True), ("GET", "/b", 200, 0, 4, True), ("HEAD", "/c", 200, 0, 0, True)]
    assert done[0].trace_headers == (("traceparent", tp),)
    assert done[0].duration_ms > 0 and w.exchanges == 3 and not w.stopped


def test_close_reports_a_request_left_without_response() -> None:
    w, _, done = _watch()
    w.request(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    w.response(b"HTTP/1.1 200 OK\r\nContent-Len")  # the workload died mid-head
    last = w.close()
    assert last is not None and last.status == 0 and not last.complete and done == [last]
    assert w.stopped == "closed"


def test_not_http_or_upgrade_stops_quietly() -> None:
    w, _, done = _watch()
    w.request(b"\x16\x03\x01\x02\x00 tls hello\r\n\r\n")
    assert w.stopped.startswith("request:") and not done
    w.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # ignored from now on
    assert not done
    u, _, _ = _watch()
    u.request(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert u.stopped == "upgrade"


def test_grpc_status_from_trailers_and_early_response() -> None:
    w, _, done = _watch()
    w.request(b"POST /svc/M HTTP/1.1\r\nHost: x\r\ncontent-type: application/grpc\r\nContent-Length: 4\r\n\r\nab")
    # The server answers before the request body ended (allowed), with a trailer.
    w.response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
               b"0\r\ngrpc-status: 14\r\n\r\n")
    assert not done  # reported once the request has ended too
    w.request(b"cd")  # the rest of the body, then the next request on the same connection
    assert done and done[0].grpc and done[0].grpc_status == "14"
    w.request(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    w.response(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert [e.status for e in done] == [200, 204] and done[0].request_bytes == 4 and not w.stopped


def test_a_failing_callback_stops_the_watch_not_the_relay() -> None:
    def boom(_e: Exchange) -> None:
        raise RuntimeError("bug in telemetry")

    w = Http1Watch(boom, boom)
    w.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # must not raise
    assert w.stopped.startswith("internal error")


# -- the framing parser: chunked, bodiless responses, pipelining, byte-by-byte, fuzz --

_CONVERSATION_REQ = (
    b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1\r\n\r\n"
    b"5;name=val;q=\"a b\"\r\nhello\r\n1A\r\n" + b"z" * 26 + b"\r\n0;last\r\nx-checksum: 9\r\nx-more: y\r\n\r\n"
    b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n"
    b"PUT /c HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc"
    b"GET /n HTTP/1.1\r\nHost: x\r\n\r\n"
    b"GET /m HTTP/1.1\r\nHost: x\r\n\r\n"
    b"GET /last HTTP/1.1\r\nHost: x\r\n\r\n")
_CONVERSATION_RESP = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-t: 1\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"  # HEAD: no body despite the length
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
    b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n"
    b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
_EXPECTED = [("POST", "/up", 200, 31, 3, True), ("HEAD", "/h", 200, 0, 0, True), ("PUT", "/c", 201, 3, 2, True),
             ("GET", "/n", 204, 0, 0, True), ("GET", "/m", 304, 0, 0, True), ("GET", "/last", 200, 0, 13, True)]


def _summary(done: list[Exchange]) -> list[tuple[str, str, int, int, int, bool]]:
    return [(e.method, e.target, e.status, e.request_bytes, e.response_bytes, e.complete) for e in done]


def test_chunked_extensions_trailers_head_1xx_204_304_pipelined_and_until_close() -> None:
    w, started, done = _watch()
    w.request(_CONVERSATION_REQ)
    assert [e.target for e in started] == ["/up", "/h", "/c", "/n", "/m", "/last"]  # pipelined: all queued
    w.response(_CONVERSATION_RESP)
    assert not w.stopped and len(done) == 5  # the last response runs until the connection closes
    w.response(b" (more)")
    w.close()
    assert _summary(done) == _EXPECTED[:5] + [("GET", "/last", 200, 0, 20, True)]
    assert done[0].grpc_status == "0" and done[0].trace_headers[0][0] == "b3" and w.exchanges == 5


def test_every_byte_boundary() -> None:
    """The same conversation fed one byte at a time, and split in two at every offset."""
    w, _, done = _watch()
    for i in range(len(_CONVERSATION_REQ)):
        w.request(_CONVERSATION_REQ[i:i + 1])
    for i in range(len(_CONVERSATION_RESP)):
        w.response(_CONVERSATION_RESP[i:i + 1])
    w.close()
    assert _summary(done) == _EXPECTED and done[0].grpc_status == "0"
    for data, feed in ((_CONVERSATION_REQ, "request"), (_CONVERSATION_RESP, "response")):
        for cut in range(1, len(data)):
            w, _, done = _watch()
            for part in ((data[:cut], data[cut:]) if feed == "request" else (_CONVERSATION_REQ,)):
                w.request(part)
            for part in ((data[:cut], data[cut:]) if feed == "response" else (_CONVERSATION_RESP,)):
                w.response(part)
            w.close()
            assert _summary(done) == _EXPECTED, (feed, cut)


def test_malformed_framing_stops_the_watch() -> None:
    cases = [
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", None, "request: bad chunk size"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX", None, "request: chunk data not followed"),
        (b"POST / HTTP/1.1\r\nContent-Length: 2, 3\r\n\r\n", None, "request: conflicting Content-Length"),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", None, "request: bad Content-Length"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", None, "request: request Transfer-Encoding"),
        (b"GET / HTTP/1.1\r\n folded: x\r\n\r\n", None, "request: bad header line"),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", None, "request: bad header line"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * (64 * 1024), None, "request: head larger"),
        (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n", "response: bad status line"),
        (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "upgrade"),
        (b"CONNECT h:443 HTTP/1.1\r\n\r\n", None, "upgrade"),
    ]
    for req, resp, why in cases:
        w, _, _ = _watch()
        w.request(req)
        if resp is not None:
            w.response(resp)
        assert w.stopped.startswith(why), (req, resp, w.stopped)
    w, _, _ = _watch()
    w.response(b"HTTP/1.1 408 Request Timeout\r\n\r\n")  # nothing was asked
    assert w.stopped.startswith("response: a response with no request")


def test_bytes_after_connection_close_are_ignored() -> None:
    w, started, done = _watch()
    w.request(b"GET / HTTP/1.0\r\n\r\nGET /late HTTP/1.1\r\n\r\n")  # HTTP/1.0 without keep-alive: the last request
    w.response(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nxjunk")
    assert [e.target for e in started] == ["/"] and _summary(done) == [("GET", "/", 200, 0, 1, True)]
    assert not w.stopped


def test_fuzz_never_raises() -> None:
    import random

    rng = random.Random(1234)
    pieces = [_CONVERSATION_REQ, _CONVERSATION_RESP, b"\r\n", b"0\r\n", b"GET / HTTP/1.1\r\n", b"Content-Length: ",
              b"Transfer-Encoding: chunked\r\n", b"ffffffffffffffff\r\n", b";", b":", b" ", b"\x00\xff", b"HTTP/1.1 "]
    for _ in range(400):
        w, _, _ = _watch()
        for _ in range(rng.randrange(1, 12)):
            blob = rng.choice(pieces)
            if rng.random() < 0.5:  # mutate: flip, cut, or random bytes
                i = rng.randrange(len(blob))
                blob = blob[:i] + bytes([rng.randrange(256)]) + blob[i + 1:] if rng.random() < 0.5 else blob[i:]
            if rng.random() < 0.2:
                blob = rng.randbytes(rng.randrange(1, 64))
            (w.request if rng.random() < 0.5 else w.response)(blob)
        w.close()  # must not raise either
        assert not w.stopped.startswith("internal error"), w.stopped
