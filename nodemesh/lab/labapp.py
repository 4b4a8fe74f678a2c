"""The lab's workload: a small HTTP/1.1 server that says which replica answered.

GET /anything  -> 200 JSON {"replica", "node", "path", "peer"}
GET /bytes/N   -> 200 with N bytes of body (for bulk transfers)
GET /healthz   -> 200 "ok" (for active health checks)
Any path takes `?status=NNN` (answer that status) and `?delay_ms=N` (answer
after N ms); `--fail-rate F` answers a fraction F of requests 503 and
`--delay-ms N` delays every answer (the resilience tests and the slow-replica
bench use these); `--log-requests` prints one line per request.
Keep-alive, Content-Length bodies only. A test workload, not part of the mesh.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import json
import random
import sys
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit


@dataclass
class Behaviour:
    """How the app misbehaves on purpose (all off by default)."""

    fail_rate: float = 0.0
    delay_ms: float = 0.0
    log_requests: bool = False


class _App(asyncio.Protocol):
    def __init__(self, name: str, node: str, behaviour: Behaviour | None = None) -> None:
        self.name, self.node = name, node
        self.behaviour = behaviour or Behaviour()
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a delayed answer is pending: keep later requests queued behind it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._process()

    def _process(self) -> None:
        while not self.busy and self.transport is not None and not self.transport.is_closing():
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                if len(self.buf) > 65536:
                    self._reply(431, b"header too large\n", close=True)
                return
            head = self.buf[:head_end].decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, _version = lines[0].split(" ", 2)
            except ValueError:
                self._reply(400, b"bad request line\n", close=True)
                return
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0") or 0)
            if len(self.buf) < head_end + 4 + length:
                return
            self.buf = self.buf[head_end + 4 + length:]
            close = headers.get("connection", "").lower() == "close"
            b = self.behaviour
            if b.log_requests:
                print(f"{method} {target}", flush=True)
            query = parse_qs(urlsplit(target).query)
            delay_ms = b.delay_ms + float(query.get("delay_ms", ["0"])[0] or 0)
            status = int(query.get("status", ["0"])[0] or 0)
            if not status and b.fail_rate and random.random() < b.fail_rate:
                status = 503
            if status or delay_ms:
                status = status or 200
                body = json.dumps({"replica": self.name, "node": self.node, "path": target,
                                   "status": status}).encode() + b"\n"
                if delay_ms > 0:
                    self.busy = True
                    asyncio.get_running_loop().call_later(delay_ms / 1000.0, self._delayed, status, body, close)
                    return
                self._reply(status, body, close=close)
            elif target.startswith("/healthz"):
                self._reply(200, b"ok\n", close=close, ctype=b"text/plain")
            elif target.startswith("/bytes/"):
                n = int(target[len("/bytes/"):] or 0)
                self._reply(200, b"x" * n, close=close, ctype=b"application/octet-stream")
            elif self.transport is not None:
                peer = self.transport.get_extra_info("peername")
                body = json.dumps({"replica": self.name, "node": self.node, "path": target,
                                   "method": method, "peer": f"{peer[0]}:{peer[1]}"}).encode() + b"\n"
                self._reply(200, body, close=close)
            if close:
                return

    def _delayed(self, status: int, body: bytes, close: bool) -> None:
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            return
        self._reply(status, body, close=close)
        if not close:
            self._process()

    def _reply(self, status: int, body: bytes, close: bool = False,
               ctype: bytes = b"application/json") -> None:
        if self.transport is None:  # the peer went away meanwhile
            return
        try:
            reason = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b"Unknown"
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
                             % (status, reason, ctype, len(body),
                                b"Connection: close\r\n" if close else b"") + body)
        if close:
            self.transport.close()


async def _serve(name: str, node: str, host: str, port: int, behaviour: Behaviour | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _App(name, node, behaviour), host, port, reuse_address=True,
                                      backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--node", default="")
    ap.add_argument("--host", default="0.0.0.0")  # noqa: S104 (a workload in its own namespace or machine)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--fail-rate", type=float, default=0.0, help="fraction of requests answered 503")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="delay every answer by this much")
    ap.add_argument("--log-requests", action="store_true", help="print one line per request")
    a = ap.parse_args()
    if not 0.0 <= a.fail_rate <= 1.0:
        sys.exit("--fail-rate must be between 0 and 1")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(a.name, a.node, a.host, a.port, Behaviour(a.fail_rate, a.delay_ms, a.log_requests)))


if __name__ == "__main__":
    main()
