"""Forwarding to the node's own resolvers: which they are (resolv.conf), and
sending a query to them with timeouts and failover.

Each forwarded query goes out on a fresh socket with a fresh random ID (so
answers cannot be confused between clients, and spoofing needs the port and ID
both), carries the client's bytes otherwise unchanged, and comes back with the
client's ID restored. Sockets are marked with the proxy's SO_MARK so capture
never loops them back to us.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncio_dgram

from nodeagent.dns.message import (
    FLAG_QR,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    DnsFormatError,
    name_key,
    parse_header,
    parse_message,
    with_id,
)

log = logging.getLogger(__name__)

DNS_PORT = 53
RESOLV_CONF_PATHS = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")
MAX_UPSTREAMS = 3  # as glibc's MAXNS: a query never waits on more than three
DOWN_FOR_S = 30.0  # an upstream that timed out is tried last for this long


@dataclass(frozen=True)
class DnsUpstream:
    host: str
    port: int = DNS_PORT

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_upstream(text: str) -> DnsUpstream:
    """"10.0.0.2", "10.0.0.2:5353", "[fd00::2]:53" or "fd00::2"; ValueError says why."""
    s = text.strip()
    host, port = s, DNS_PORT
    if s.startswith("["):
        host, sep, tail = s[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise ValueError(f"{text!r} is not [IPv6]:port")
        if tail:
            port = _port(tail[1:], text)
    elif s.count(":") == 1:
        host, _, p = s.partition(":")
        port = _port(p, text)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address (upstreams are addresses, not names)") from None
    return DnsUpstream(host, port)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{whole!r}: port {text!r} is not a number from 1 to 65535")
    return int(text)


def parse_resolv_conf(text: str) -> tuple[DnsUpstream, ...]:
    """The `nameserver` lines, skipping loopback stubs: those would be a local
    cache in front of the real resolvers, or a workload-facing address we
    capture ourselves."""
    out: list[DnsUpstream] = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(parts) < 2 or parts[0] != "nameserver":
            continue
        try:
            addr = ipaddress.ip_address(parts[1].split("%", 1)[0])
        except ValueError:
            continue
        if addr.is_loopback:
            continue
        up = DnsUpstream(str(addr))
        if up not in out:
            out.append(up)
    return tuple(out)


def default_upstreams(paths: Sequence[str] = RESOLV_CONF_PATHS) -> tuple[DnsUpstream, ...]:
    """The node's resolvers: the first resolv.conf naming a non-loopback one
    (systemd-resolved keeps the real list in /run/systemd/resolve/resolv.conf
    when /etc/resolv.conf names only its 127.0.0.53 stub)."""
    for path in paths:
        try:
            found = parse_resolv_conf(Path(path).read_text())
        except OSError:
            continue
        if found:
            return found
    return ()


# ------------------------------------------------------------------ transports


class UpstreamError(Exception):
    """One upstream did not give a usable answer; `reason` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def _socket(up: DnsUpstream, kind: int, mark: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in up.host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if mark:
            # Not a workload's socket, so capture would not catch it anyway;
            # the mark makes that explicit and survives rule changes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def answers_query(query: bytes, response: bytes) -> bool:
    """A response belongs to a query: same ID, QR set, same question (case-insensitive)."""
    try:
        qid, _, *_ = parse_header(query)
        rid, rflags, rqd, *_ = parse_header(response)
    except DnsFormatError:
        return False
    if rid != qid or not rflags & FLAG_QR:
        return False
    try:
        q = parse_message(query).questions
    except DnsFormatError:
        return False
    if rqd == 0:
        # Some servers answer FORMERR/NOTIMP without the question.
        return True
    try:
        r = parse_message(response).questions
    except DnsFormatError:
        return False
    return [(name_key(x.name), x.qtype, x.qclass) for x in q] == [(name_key(x.name), x.qtype, x.qclass) for x in r]


async def exchange_udp(up: DnsUpstream, query: bytes, timeout_s: float, mark: int) -> bytes:
    """Send over UDP and wait for the matching answer; stray datagrams (wrong ID
    or question) are ignored until the timeout."""
    try:
        # asyncio_dgram.connect rather than from_socket(): the latter fails on
        # uvloop's transports. The mark is set before the first datagram leaves,
        # which is when netfilter looks at it.
        stream = await asyncio_dgram.connect((up.host, up.port))
    except OSError as e:
        raise UpstreamError("upstream_unreachable", f"cannot reach {up}: {e.strerror or e}") from None
    try:
        if mark:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        async with asyncio.timeout(timeout_s):
            await stream.send(query)
            while True:
                data, _ = await stream.recv()
                if answers_query(query, data):
                    return bytes(data)
    except TimeoutError:
        raise UpstreamError("upstream_timeout", f"{up} did not answer over UDP in {timeout_s:g}s") from None
    except OSError as e:
        # ECONNREFUSED arrives as an ICMP port unreachable on the connected socket.
        raise UpstreamError("upstream_refused", f"{up} over UDP: {e.strerror or e}") from None
    except asyncio_dgram.TransportClosed:
        raise UpstreamError("upstream_closed", f"{up}: UDP socket closed") from None
    finally:
        stream.close()


async def exchange_tcp(up: DnsUpstream, query: bytes, timeout_s: float, mark: int) -> bytes:
    """One query on a new TCP connection (2-octet length framing, RFC 1035 4.2.2)."""
    loop = asyncio.get_running_loop()
    sock = _socket(up, socket.SOCK_STREAM, mark)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, (up.host, up.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(length)
                if answers_query(query, data):
                    return data
    except TimeoutError:
        raise UpstreamError("upstream_timeout", f"{up} did not answer over TCP in {timeout_s:g}s") from None
    except asyncio.IncompleteReadError:
        raise UpstreamError("upstream_closed", f"{up} closed the TCP connection before answering") from None
    except OSError as e:
        raise UpstreamError("upstream_refused", f"{up} over TCP: {e.strerror or e}") from None
    finally:
        if writer is not None:
            writer.close()
        else:
            sock.close()


Exchange = Callable[[DnsUpstream, bytes, float, int], Awaitable[bytes]]


# ------------------------------------------------------------------ failover


@dataclass(frozen=True)
class ForwardResult:
    response: bytes | None  # None: no upstream answered (the caller says SERVFAIL)
    upstream: DnsUpstream | None = None
    errors: tuple[str, ...] = ()


class Forwarder:
    """Sends a client's query to the upstreams in order, failing over on
    timeouts, network errors, SERVFAIL and REFUSED. An upstream that timed out
    is tried last for DOWN_FOR_S, so one dead resolver does not add its timeout
    to every query."""

    def __init__(self, upstreams: Sequence[DnsUpstream], timeout_s: float, mark: int = 0, *,
                 udp: Exchange = exchange_udp, tcp: Exchange = exchange_tcp,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.upstreams = tuple(upstreams)
        self.timeout_s = timeout_s
        self.mark = mark
        self._udp = udp
        self._tcp = tcp
        self._clock = clock
        self._down_until: dict[DnsUpstream, float] = {}

    def __repr__(self) -> str:
        now = self._clock()
        down = [str(u) for u, t in self._down_until.items() if t > now]
        return f"Forwarder(upstreams={[str(u) for u in self.upstreams]}, down={down})"

    def order(self) -> tuple[DnsUpstream, ...]:
        now = self._clock()
        up = [u for u in self.upstreams if self._down_until.get(u, 0.0) <= now]
        down = [u for u in self.upstreams if self._down_until.get(u, 0.0) > now]
        return tuple(up + down)[:MAX_UPSTREAMS]

    async def forward(self, query: bytes, tcp: bool = False) -> ForwardResult:
        """The upstream's answer to `query`, carrying the query's own ID."""
        client_id = struct.unpack_from("!H", query)[0]
        fallback: tuple[bytes, DnsUpstream] | None = None
        errors: list[str] = []
        for up in self.order():
            upstream_id = secrets.randbits(16)
            exchange = self._tcp if tcp else self._udp
            try:
                answer = await exchange(up, with_id(query, upstream_id), self.timeout_s, self.mark)
            except UpstreamError as e:
                errors.append(str(e))
                if e.reason == "upstream_timeout":
                    self._down_until[up] = self._clock() + DOWN_FOR_S
                continue
            self._down_until.pop(up, None)
            answer = with_id(answer, client_id)
            rcode = answer[3] & 0xF if len(answer) >= 4 else RCODE_SERVFAIL
            if rcode in (RCODE_SERVFAIL, RCODE_REFUSED):
                # Another resolver may do better; keep this answer in case none does.
                errors.append(f"{up} answered rcode {rcode}")
                fallback = fallback or (answer, up)
                continue
            return ForwardResult(answer, up, tuple(errors))
        if fallback is not None:
            return ForwardResult(fallback[0], fallback[1], tuple(errors))
        return ForwardResult(None, None, tuple(errors) or ("no upstream resolvers configured",))
