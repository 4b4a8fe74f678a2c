"""Micro-benchmark of the passive HTTP/1.1 observer (nodeagent/observe/httpwatch.py):
the time to observe N request/response pairs on one keep-alive connection, fed
as the relay feeds it (one read per message).

    .venv/bin/python bench/httpwatch_parse.py [N]
"""

from __future__ import annotations

import sys
import time

from nodeagent.observe.httpwatch import Http1Watch

REQ = (b"GET /api/v1/items?page=3 HTTP/1.1\r\nHost: reviews.default.svc:9080\r\nUser-Agent: curl/8.5.0\r\n"
       b"Accept: */*\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
       b"x-request-id: 6c1f3c2e-8d7a-4b7e-9f0e-2a1b3c4d5e6f\r\n\r\n")
POST = (b"POST /api/v1/items HTTP/1.1\r\nHost: reviews.default.svc:9080\r\nContent-Type: application/json\r\n"
        b"Content-Length: 27\r\n\r\n{\"name\": \"x\", \"count\": 12}\n")
RESP = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nServer: uvicorn\r\n"
        b"Date: Fri, 27 Nov 2026 05:41:28 GMT\r\nContent-Length: 512\r\n\r\n" + b"x" * 512)
CHUNKED = (b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"100\r\n" + b"y" * 256 + b"\r\n10\r\n" + b"z" * 16 + b"\r\n0\r\n\r\n")


def run(n: int) -> float:
    done: list[int] = []
    w = Http1Watch(lambda ex: None, lambda ex: done.append(ex.status))
    t = time.perf_counter()
    for i in range(n):
        if i % 2:
            w.request(POST)
            w.response(CHUNKED)
        else:
            w.request(REQ)
            w.response(RESP)
    elapsed = time.perf_counter() - t
    if len(done) != n or w.stopped:
        raise SystemExit(f"the watch saw {len(done)} of {n} exchanges (stopped: {w.stopped!r}): not a valid run")
    return elapsed


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    best = min(run(n) for _ in range(5))
    print(f"{n} request/response pairs: {best * 1000:.1f} ms (best of 5), {best / n * 1e6:.1f} us/pair")
