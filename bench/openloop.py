#!/usr/bin/env python3
"""An open-loop HTTP/1.1 load generator: a fixed request rate over N keep-alive
connections, latency measured from each request's *scheduled* send time (so a
slow response delays nothing and hides nothing: no coordinated omission).

Request k is due at start + k/rate on connection k mod N. A connection carries
one request at a time (no pipelining, which not every proxy supports): if the
previous response has not arrived when the next request is due, the request
waits and its wait counts in its latency, as it would for a real client.

Why two threads and not asyncio: an event loop sleeps in epoll_wait, whose
timeout has millisecond granularity, so sends would leave up to 1 ms late, and
that lateness counts as latency (on the direct path that is more than the whole
round trip). Here one thread sleeps with clock_nanosleep to each due time and
sends; another blocks in epoll and timestamps responses as they arrive. The
generator's own delay is reported (`send_lag_p99_ms`: actual minus scheduled
send time of requests whose connection was free) so that it can be told apart
from the path's.

Usage (prints one JSON object):
  openloop.py HOST PORT --rate 1000 --seconds 5 --connections 10 [--path /]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import resource
import select
import socket
import sys
import threading
import time
from collections import deque
from typing import Any

PR_SET_TIMERSLACK = 29


class Conn:
    __slots__ = ("buf", "busy", "due", "need", "sock", "waiting")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.due: deque[float] = deque()  # scheduled times of requests sent, oldest first
        self.waiting: deque[float] = deque()  # scheduled times of requests not yet sent
        self.busy = False
        self.need = -1  # bytes of the current response (head + body) once the head is parsed


class ResponseError(RuntimeError):
    pass


def parse_head(head: bytes) -> tuple[int, int]:
    """(status, content-length) of a response head; chunked or length-less
    responses are refused (nginx and every path here send Content-Length)."""
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError) as e:
        raise ResponseError(f"bad status line {lines[0][:80]!r}") from e
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return status, int(value.strip())
    raise ResponseError(f"response without Content-Length (status {status}): {head[:200]!r}")


def run(host: str, port: int, rate: float, seconds: float, connections: int, path: str,
        drain_seconds: float | None = None) -> dict[str, Any]:
    """Send `rate` req/s for `seconds`, then wait up to `drain_seconds` (default
    max(10, seconds)) for the last responses."""
    with contextlib.suppress(OSError, AttributeError):  # default timer slack (50 us): every sleep would overshoot
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: nodemesh-openloop\r\n\r\n".encode()
    conns: list[Conn] = []
    for _ in range(connections):
        s = socket.create_connection((host, port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        conns.append(Conn(s))
    by_fd = {c.sock.fileno(): c for c in conns}
    lock = threading.Lock()
    latencies: list[float] = []
    lags: list[float] = []
    errors: list[str] = []
    total = int(rate * seconds)
    done = threading.Event()

    def send(c: Conn, due: float) -> None:
        # Called with the lock held; a request line fits any socket buffer.
        c.sock.send(req)
        c.busy = True
        c.due.append(due)

    def receiver() -> None:
        ep = select.epoll()
        for c in conns:
            ep.register(c.sock.fileno(), select.EPOLLIN)
        received = 0
        while received < total and not done.is_set():
            for fd, _ev in ep.poll(0.2):
                c = by_fd[fd]
                try:
                    data = c.sock.recv(262144)
                except BlockingIOError:
                    continue
                now = time.perf_counter()
                if not data:
                    errors.append("connection closed by the server")
                    ep.unregister(fd)
                    continue
                c.buf += data
                with lock:
                    while True:
                        if c.need < 0:
                            end = c.buf.find(b"\r\n\r\n")
                            if end < 0:
                                break
                            try:
                                status, length = parse_head(bytes(c.buf[:end]))
                            except ResponseError as e:
                                errors.append(str(e))
                                done.set()
                                return
                            if status != 200:
                                errors.append(f"status {status}")
                            c.need = end + 4 + length
                        if len(c.buf) < c.need:
                            break
                        del c.buf[:c.need]
                        c.need = -1
                        latencies.append(now - c.due.popleft())
                        received += 1
                        c.busy = False
                        if c.waiting:
                            send(c, c.waiting.popleft())
        ep.close()

    rt = threading.Thread(target=receiver, daemon=True)
    rt.start()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter() + 0.05
    interval = 1.0 / rate
    for k in range(total):
        due = start + k * interval
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if done.is_set():
            break
        c = conns[k % connections]
        with lock:
            if c.busy:
                c.waiting.append(due)
            else:
                send(c, due)
                lags.append(time.perf_counter() - due)
    rt.join(timeout=max(10.0, seconds) if drain_seconds is None else drain_seconds)
    done.set()
    rt.join(timeout=1.0)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    # A path slower than the rate leaves requests unanswered at the end. Dropping them
    # would hide exactly the slowness being measured: count each with the time it
    # has waited so far (a lower bound), and report how many there were.
    now = time.perf_counter()
    unfinished = 0
    with lock:
        for c in conns:
            for due in (*c.due, *c.waiting):
                latencies.append(now - due)
                unfinished += 1
    for c in conns:
        c.sock.close()

    def pct(xs: list[float], p: float) -> float:
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000

    latencies.sort()
    lags.sort()
    return {
        "n": len(latencies) - unfinished, "expected": total, "unfinished": unfinished, "errors": len(errors),
        "error_sample": errors[:3],
        "p50_ms": pct(latencies, 0.50), "p90_ms": pct(latencies, 0.90), "p99_ms": pct(latencies, 0.99),
        "p999_ms": pct(latencies, 0.999), "max_ms": latencies[-1] * 1000 if latencies else float("nan"),
        "send_lag_p50_ms": pct(lags, 0.50), "send_lag_p99_ms": pct(lags, 0.99),
        "client_cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--rate", type=float, default=1000.0, help="requests per second (default 1000)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--path", default="/")
    a = ap.parse_args()
    if a.rate <= 0 or a.seconds <= 0 or a.connections <= 0:
        ap.error("--rate, --seconds and --connections must be positive")
    try:
        out = run(a.host, a.port, a.rate, a.seconds, a.connections, a.path)
    except OSError as e:
        print(json.dumps({"error": f"cannot connect to {a.host}:{a.port}: {e}"}))
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
