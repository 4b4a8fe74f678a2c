"""The agent's DNS proxy: UDP (asyncio-dgram) and TCP (an asyncio Protocol) on
one address, answering mesh service names from the current snapshot and
forwarding every other query to the node's resolvers.

`DnsResponder.respond()` holds the whole per-query logic and takes bytes to
bytes, so it is tested without sockets; `DnsServer` only moves datagrams and
TCP frames. One malformed or slow query never holds up another: each is
handled in its own task, with a cap on how many are in flight.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import asyncio_dgram

from nodeagent.dns.forwarder import DnsUpstream, Forwarder, default_upstreams, parse_upstream
from nodeagent.dns.message import (
    FLAG_QR,
    OPCODE_QUERY,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    RCODE_SERVFAIL,
    DnsFormatError,
    Message,
    Record,
    a_record,
    build_message,
    error_response,
    make_response,
    name_to_text,
    parse_header,
    parse_message,
    soa_record,
    truncated,
)
from nodeagent.dns.zone import ANSWER_TTL, NEGATIVE_TTL, DnsDecision, MeshZone, decide
from nodeagent.meshview.snapshot import Snapshot

if TYPE_CHECKING:
    from nodeagent.config import DnsConfig

log = logging.getLogger(__name__)

DEFAULT_DNS_PORT = 15053
MAX_INFLIGHT = 1024  # queries being answered at once; more are dropped (the client retries)
TCP_IDLE_S = 10.0  # RFC 7766 suggests closing idle connections after seconds
TCP_MAX_PENDING = 16  # per connection; reading pauses beyond this


@dataclass(frozen=True)
class DnsSettings:
    address: str = "127.0.0.1"
    port: int = DEFAULT_DNS_PORT
    upstreams: tuple[DnsUpstream, ...] = ()
    upstream_timeout_s: float = 2.0
    mark: int = 0


class DnsResponder:
    """Bytes in, bytes out (or None: drop). Reads the zone once per query."""

    def __init__(self, forwarder: Forwarder, zone: MeshZone | None = None) -> None:
        self.forwarder = forwarder
        self.zone = zone
        self.stats: Counter[str] = Counter()

    def set_snapshot(self, snapshot: Snapshot) -> None:
        # Indexed once here, swapped whole: a query in flight keeps the zone it read.
        self.zone = MeshZone.from_snapshot(snapshot)

    async def respond(self, data: bytes, *, tcp: bool) -> bytes | None:
        self.stats["queries"] += 1
        try:
            _, flags, *_ = parse_header(data)
        except DnsFormatError:
            self.stats["dropped_short"] += 1
            return None
        if flags & FLAG_QR:
            # Never answer a response: that is how reflection loops start.
            self.stats["dropped_response"] += 1
            return None
        try:
            query = parse_message(data)
        except DnsFormatError as e:
            self.stats["formerr"] += 1
            log.debug("dns: malformed query (%s): FORMERR", e.reason)
            return error_response(data, RCODE_FORMERR)
        if query.opcode != OPCODE_QUERY:
            # NOTIFY, UPDATE and the like are not ours to judge: forward as is.
            return await self._forward(query, data, tcp)
        if len(query.questions) != 1:
            self.stats["formerr"] += 1
            return build_message(make_response(query, RCODE_FORMERR))
        zone = self.zone
        decision = decide(zone, query.questions[0]) if zone is not None else DnsDecision("forward")
        if decision.kind == "forward":
            return await self._forward(query, data, tcp)
        self.stats[f"mesh_{decision.kind}"] += 1
        return self._fit(query, build_message(self._mesh_answer(query, decision, zone)), tcp,
                         authoritative=True)

    def _mesh_answer(self, query: Message, decision: DnsDecision, zone: MeshZone | None) -> Message:
        q = query.questions[0]
        if decision.kind == "answer":
            answers = tuple(a_record(q.name, ip, ANSWER_TTL) for ip in decision.addresses)
            return make_response(query, RCODE_NOERROR, answers, authoritative=True)
        authority: tuple[Record, ...] = ()
        if decision.zone is not None:
            serial = abs(hash(zone.version)) & 0xFFFFFFFF if zone is not None else 1
            authority = (soa_record(decision.zone, NEGATIVE_TTL, serial, NEGATIVE_TTL),)
        rcode = RCODE_NXDOMAIN if decision.kind == "nxdomain" else RCODE_NOERROR
        return make_response(query, rcode, (), authority, authoritative=True)

    async def _forward(self, query: Message, data: bytes, tcp: bool) -> bytes | None:
        self.stats["forwarded"] += 1
        result = await self.forwarder.forward(data, tcp=tcp)
        if result.response is None:
            self.stats["servfail"] += 1
            q = name_to_text(query.questions[0].name) if query.questions else "(no question)"
            log.warning("dns: no upstream answered %s: %s; SERVFAIL (are the node's resolvers reachable? "
                        "see dns.upstreams)", q, "; ".join(result.errors))
            return build_message(make_response(query, RCODE_SERVFAIL))
        return self._fit(query, result.response, tcp)

    def _fit(self, query: Message, wire: bytes, tcp: bool, authoritative: bool = False) -> bytes:
        """Over UDP an answer larger than the client accepts becomes a TC answer."""
        if tcp or len(wire) <= query.udp_payload_limit:
            return wire
        self.stats["truncated"] += 1
        rcode = wire[3] & 0xF
        return build_message(truncated(query, rcode, authoritative))


class _TcpDns(asyncio.Protocol):
    """One client connection: 2-octet length framing, several queries in flight,
    answers written as they are ready (RFC 7766 allows any order)."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.pending: set[asyncio.Task[None]] = set()
        self.paused = False
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.tcp_conns.add(self)
        self._arm_idle()

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        loop = asyncio.get_running_loop()
        self.idle = loop.call_later(TCP_IDLE_S, self._idle_close)

    def _idle_close(self) -> None:
        if self.transport is not None and not self.pending:
            self.transport.close()
        else:
            self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._arm_idle()
        while len(self.buf) >= 2:
            (length,) = struct.unpack_from("!H", self.buf)
            if len(self.buf) < 2 + length:
                break
            msg = bytes(self.buf[2:2 + length])
            del self.buf[:2 + length]
            task = asyncio.get_running_loop().create_task(self._answer(msg))
            self.pending.add(task)
            task.add_done_callback(self._done)
        if len(self.pending) >= TCP_MAX_PENDING and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.pending.discard(task)
        if self.paused and len(self.pending) < TCP_MAX_PENDING and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    async def _answer(self, msg: bytes) -> None:
        try:
            reply = await self.server.responder.respond(msg, tcp=True)
        except Exception:
            log.exception("dns: answering a TCP query failed")
            reply = error_response(msg, RCODE_SERVFAIL)
        if self.transport is None or self.transport.is_closing():
            return
        if reply is None:
            # A message we will not answer (no header, or a response): the
            # stream is not trustworthy any more.
            self.transport.close()
            return
        self.transport.write(struct.pack("!H", len(reply)) + reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.tcp_conns.discard(self)
        if self.idle is not None:
            self.idle.cancel()
        for t in self.pending:
            t.cancel()
        self.transport = None


class DnsServer:
    """Binds UDP and TCP on settings.address:port and serves until stopped."""

    def __init__(self, settings: DnsSettings, forwarder: Forwarder | None = None) -> None:
        self.settings = settings
        fwd = forwarder or Forwarder(settings.upstreams, settings.upstream_timeout_s, settings.mark)
        self.responder = DnsResponder(fwd)
        self.tcp_conns: set[_TcpDns] = set()
        self._udp: asyncio_dgram.aio.DatagramServer | None = None
        self._tcp: asyncio.Server | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    def set_snapshot(self, snapshot: Snapshot) -> None:
        self.responder.set_snapshot(snapshot)

    @property
    def listening(self) -> bool:
        return self._udp is not None and self._tcp is not None

    @property
    def udp_address(self) -> tuple[str, int]:
        if self._udp is None:
            raise RuntimeError("the DNS proxy's UDP socket is not open: start() it first")
        host, port = self._udp.sockname[:2]
        return host, port

    @property
    def tcp_address(self) -> tuple[str, int]:
        if self._tcp is None:
            raise RuntimeError("the DNS proxy's TCP listener is not open: start() it first")
        host, port = self._tcp.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        """Bind both; an error names the address and what to check."""
        addr = (self.settings.address, self.settings.port)
        where = f"{addr[0]}:{addr[1]}"
        try:
            self._udp = await asyncio_dgram.bind(addr)
        except OSError as e:
            raise OSError(e.errno, f"DNS proxy cannot bind UDP {where}: {e.strerror}; is another DNS server "
                                   "using that port (see dns.address and dns.port)?") from None
        port = self.udp_address[1]  # the same port for TCP, also when 0 asked for any
        loop = asyncio.get_running_loop()
        try:
            family = socket.AF_INET6 if ":" in self.settings.address else socket.AF_INET
            self._tcp = await loop.create_server(lambda: _TcpDns(self), self.settings.address, port,
                                                 family=family, reuse_address=True)
        except OSError as e:
            self._udp.close()
            self._udp = None
            raise OSError(e.errno, f"DNS proxy cannot bind TCP {self.settings.address}:{port}: {e.strerror}; "
                                   "is another DNS server using that port (see dns.port)?") from None
        self._loop_task = loop.create_task(self._udp_loop(), name="dns-udp")
        log.info("DNS proxy listening on %s:%d (udp, tcp); upstreams %s", self.settings.address, port,
                 ", ".join(str(u) for u in self.settings.upstreams) or "none (non-mesh names get SERVFAIL)")

    async def _udp_loop(self) -> None:
        udp = self._udp
        if udp is None:
            raise RuntimeError("the DNS proxy's UDP socket is not open: start() it first")
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, addr = await udp.recv()
            except asyncio_dgram.TransportClosed:
                return
            except OSError as e:
                # An ICMP error for an earlier reply (client gone): not fatal.
                log.debug("dns: udp socket error %s", e)
                continue
            if len(self._inflight) >= MAX_INFLIGHT:
                self.responder.stats["dropped_overload"] += 1
                continue
            task = loop.create_task(self._udp_answer(udp, bytes(data), cast(tuple[str, int], addr)))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _udp_answer(self, udp: asyncio_dgram.aio.DatagramServer, data: bytes,
                          addr: tuple[str, int]) -> None:
        try:
            reply = await self.responder.respond(data, tcp=False)
        except Exception:
            log.exception("dns: answering a UDP query failed")
            reply = error_response(data, RCODE_SERVFAIL)
        if reply is None:
            return
        try:
            await udp.send(reply, addr)
        except (OSError, asyncio_dgram.TransportClosed) as e:
            log.debug("dns: cannot reply to %s: %s", addr, e)

    async def stop(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
            for conn in list(self.tcp_conns):
                if conn.transport is not None:
                    conn.transport.close()
        if self._udp is not None:
            self._udp.close()
        tasks = [t for t in (self._loop_task, *self._inflight) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()
        self._udp = None
        self._tcp = None
        self._loop_task = None



def dns_server_for(config: DnsConfig, mark: int) -> DnsServer:
    """The agent's DNS server from its config: the configured upstreams, or
    else the node's resolv.conf (read once, at start)."""
    if config.upstreams:
        upstreams = tuple(parse_upstream(u) for u in config.upstreams)
    else:
        upstreams = default_upstreams()
        if not upstreams:
            log.warning("dns: no upstream resolvers (resolv.conf names none besides loopback stubs, and "
                        "dns.upstreams is empty): names outside the mesh will get SERVFAIL")
    return DnsServer(DnsSettings(address=config.address, port=config.port, upstreams=upstreams,
                                 upstream_timeout_s=config.upstream_timeout_s, mark=mark))
