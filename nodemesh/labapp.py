"""The lab's workload: a small HTTP/1.1 server that says which replica answered.

GET /anything  -> 200 JSON {"replica", "node", "path", "peer"}
GET /bytes/N   -> 200 with N bytes of body (for bulk transfers)
Keep-alive, Content-Length bodies only. A test workload, not part of the mesh.
"""

from __future__ import annotations

import argparse
import asyncio
import json


class _App(asyncio.Protocol):
    def __init__(self, name: str, node: str) -> None:
        self.name, self.node = name, node
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
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
            if target.startswith("/bytes/"):
                n = int(target[len("/bytes/"):] or 0)
                self._reply(200, b"x" * n, close=close, ctype=b"application/octet-stream")
            else:
                assert self.transport is not None
                peer = self.transport.get_extra_info("peername")
                body = json.dumps({"replica": self.name, "node": self.node, "path": target,
                                   "method": method, "peer": f"{peer[0]}:{peer[1]}"}).encode() + b"\n"
                self._reply(200, body, close=close)
            if close:
                return

    def _reply(self, status: int, body: bytes, close: bool = False,
               ctype: bytes = b"application/json") -> None:
        assert self.transport is not None
        reason = {200: b"OK", 400: b"Bad Request", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
                             % (status, reason, ctype, len(body),
                                b"Connection: close\r\n" if close else b"") + body)
        if close:
            self.transport.close()


async def _serve(name: str, node: str, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _App(name, node), host, port, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--node", default="")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(a.name, a.node, a.host, a.port))


if __name__ == "__main__":
    main()
