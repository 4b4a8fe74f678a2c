"""The passive HTTP/1.1 observer of the destination side (nodeagent/httpwatch.py):
both directions parsed without I/O, one Exchange per request/response, and a
clean stop (never an exception into the relay) when the bytes are not HTTP."""

from __future__ import annotations

from nodeagent.httpwatch import Exchange, Http1Watch


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
    w.response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n0\r\ngrpc-status: 14\r\n\r\n")
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
