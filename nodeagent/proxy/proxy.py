"""One proxy instance (one worker's worth): the three listeners, the current
snapshot and certificates, the balancer and the HBONE pool."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
import weakref
from collections.abc import Coroutine
from typing import Any, cast

from nodeagent.meshview.snapshot import Snapshot
from nodeagent.observe import meshmetrics
from nodeagent.supervision.settings import Certs, ProxySettings
from nodemesh.hbonespec import DEFAULT_HBONE, HboneSettings
from nodemesh.identity import Identity

from . import authz_l7, hbone, netutil, tls
from .accesslog import AccessLog
from .connector import UpstreamConnector
from .errors import NoCertificate, PeerCertificateRevoked, PeerIdentityMismatch, ProxyError, TlsHandshakeFailed
from .http.h2core import GOAWAY_GRACE_S
from .http.pipeline import L7Runtime
from .inbound import InboundRefused, connect_local, resolve_inbound
from .loadbalance import Balancer
from .outbound import KernelSourceLookup, OriginalDst, OutboundConnection, SourceLookup, start_outbound
from .pool import HbonePool, PoolKey
from .relay import End, Session, TcpEnd
from .tunnel import HboneClientProtocol, HboneServerProtocol

log = logging.getLogger(__name__)


class ListenerError(OSError):
    pass


LISTENER_NAMES = ("outbound", "inbound", "hbone")
# A refusal of a revoked peer certificate is logged at most this often per reason (each is counted).
REVOKED_LOG_INTERVAL_S = 10.0
_LABELS = {"outbound": "outbound", "inbound": "inbound plaintext", "hbone": "HBONE"}


def listener_specs(s: ProxySettings) -> list[tuple[str, str, int, bool]]:
    """(name, host, port, transparent) of the proxy's listeners, in LISTENER_NAMES order."""
    return [
        ("outbound", s.outbound_bind, s.outbound_port, False),
        ("inbound", s.inbound_bind, s.inbound_plain_port, s.inbound_mode == "tproxy"),
        # (a comparison: a wildcard inbound bind serves HBONE on the node address)
        ("hbone", s.node_address if s.inbound_bind in ("0.0.0.0", "::") else s.inbound_bind,  # noqa: S104
         s.hbone_port, False),
    ]


def open_listeners(s: ProxySettings) -> list[socket.socket]:
    """The proxy's listening sockets, bound and listening (non-blocking)."""
    socks: list[socket.socket] = []
    try:
        for name, host, port, transparent in listener_specs(s):
            try:
                socks.append(netutil.listen_socket(host, port, s.mark, transparent=transparent))
            except OSError as e:
                raise ListenerError(
                    e.errno, f"cannot bind the {_LABELS[name]} listener on {host}:{port}: {e.strerror or e}"
                    " (is another process using the port, or the address not on this host?)"
                ) from None
    except BaseException:
        for sk in socks:
            sk.close()
        raise
    return socks


class NodeProxy:
    def __init__(
        self,
        settings: ProxySettings,
        *,
        access_log: AccessLog | None = None,
        original_dst: OriginalDst = netutil.original_dst,
        inbound_original_dst: OriginalDst | None = None,
        source_lookup: SourceLookup | None = None,
        balancer: Balancer | None = None,
        hbone_limits: hbone.HboneLimits = hbone.DEFAULT_LIMITS,
    ) -> None:
        self.hbone_limits = hbone_limits
        self._hbone_base = hbone_limits  # what the agent was started with; MeshConfig spec.hbone overrides
        self.settings = settings
        self.access_log = access_log if access_log is not None else AccessLog(settings.access_log)
        self.original_dst = original_dst
        # TPROXY does no NAT: the accepted socket's own address is the original destination.
        self.inbound_original_dst: OriginalDst = inbound_original_dst or (
            netutil.local_dst if settings.inbound_mode == "tproxy" else netutil.original_dst)
        self.source_lookup: SourceLookup = source_lookup if source_lookup is not None else KernelSourceLookup(
            (settings.outbound_bind, settings.outbound_port))
        self.balancer = balancer if balancer is not None else Balancer()
        self.snapshot: Snapshot | None = None
        self.certs: Certs | None = None
        self.server_tls = tls.ServerTls()
        self.pool: HbonePool[HboneClientProtocol] = HbonePool(
            self._connect_hbone, max_streams=hbone_limits.client_max_streams,
            idle_timeout_s=hbone_limits.client_idle_timeout_s,
        )
        self._client_ctx: dict[str, ssl.SSLContext] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        # Open connections, for drain(): the sessions the listeners started, and HBONE connections.
        self.draining = False
        self._conns: set[Session] = set()
        self._hbone_conns: weakref.WeakSet[HboneServerProtocol] = weakref.WeakSet()
        self._idle = hbone_limits.client_idle_timeout_s
        self._revoked_logged: dict[str, tuple[float, int]] = {}  # reason -> (last logged, refused since)
        self.connector = UpstreamConnector(self)  # same node or HBONE, for L4 and L7 alike
        self.l7 = L7Runtime(self)  # the L7 pipeline's per-proxy state (http/pipeline.py)
        from nodeagent.observe.telemetry import ProxyTelemetry  # metrics, traces, log sampling
        self.telemetry = ProxyTelemetry(self)

    # -- configuration --
    def update(self, snapshot: Snapshot | None = None, certs: Certs | None = None) -> list[str]:
        """Swap in new config for new connections; returns per-item errors (the rest applies)."""
        errors: list[str] = []
        if snapshot is not None:
            old = self.snapshot
            self.snapshot = snapshot
            self._apply_hbone(snapshot.security.mesh.hbone)
            if old is not None and old.mesh.revocations != snapshot.mesh.revocations:
                self._cut_revoked_peers()
        if certs is not None:
            errors += self.server_tls.update(certs)
            self.certs = certs
            self._client_ctx.clear()
            self.pool.retire_all()  # new streams use the new SVIDs; old streams drain
        for e in errors:
            log.warning("certificate not usable: %s", e)
        return errors

    # -- revoked peers (nodemesh/revocation.py): refused both ways, counted and logged --
    def revoked_peer(self, direction: str, serial: str, identity: str, peer: str,
                     snapshot: Snapshot | None = None) -> str:
        """'' unless the peer's certificate was issued to a revoked node; then the
        reason, logged (at most every REVOKED_LOG_INTERVAL_S per reason).
        Connection-level refusals count themselves (`count`); a session's failure is
        counted by its telemetry."""
        snapshot = snapshot if snapshot is not None else self.snapshot
        why = snapshot.mesh.revocations.refusal(serial, identity) if snapshot is not None else ""
        if why:
            now = time.monotonic()
            last, since = self._revoked_logged.get(why, (-REVOKED_LOG_INTERVAL_S, 0))
            if now - last >= REVOKED_LOG_INTERVAL_S:
                if len(self._revoked_logged) >= 1024:
                    self._revoked_logged.clear()
                self._revoked_logged[why] = (now, 0)
                log.warning("refused HBONE peer %s (%s): %s%s", peer or "?", direction, why,
                            f" ({since} more refused since the last line)" if since else "")
            else:
                self._revoked_logged[why] = (last, since + 1)
        return why

    def _admit_hbone_peer(self, conn: HboneServerProtocol) -> str:
        peer = f"{conn.peer_addr[0]}:{conn.peer_addr[1]}" if conn.peer_addr else ""
        why = self.revoked_peer("inbound", conn.peer_serial, conn.peer_identity, peer)
        if why:
            meshmetrics.PROXY_ERRORS.inc({"direction": "inbound", "reason": PeerCertificateRevoked.reason})
        return why

    def _cut_revoked_peers(self) -> None:
        """A new revocation list: close accepted connections whose peer it revokes
        (their tunnels end now), and retire client connections so that the next
        stream dials again and checks the peer."""
        for conn in list(self._hbone_conns):
            if not conn.lost and self._admit_hbone_peer(conn):  # self.snapshot is the new one here
                conn.close("peer certificate revoked")
        self.pool.retire_all()

    def _apply_hbone(self, spec: HboneSettings) -> None:
        """MeshConfig spec.hbone, for connections opened from now on (open ones keep theirs)."""
        limits = self._hbone_base if spec == DEFAULT_HBONE else hbone.HboneLimits.from_settings(spec)
        if limits == self.hbone_limits:
            return
        self.hbone_limits = limits
        self.pool.book.max_streams = limits.client_max_streams
        self.pool.book.idle_timeout_s = limits.client_idle_timeout_s
        self._idle = limits.client_idle_timeout_s
        log.info("HBONE limits from MeshConfig spec.hbone: %s", limits)

    # -- lifecycle --
    async def start(self, listeners: list[socket.socket] | None = None) -> None:
        """Serve on `listeners` (outbound, inbound plaintext, HBONE: open_listeners'
        order; the agent opens them once and keeps them across restarts), or on
        listeners of its own."""
        loop = asyncio.get_running_loop()
        s = self.settings
        socks = listeners if listeners is not None else open_listeners(s)
        # create_server(sock=...) calls listen() again, with 100 unless told: keep netutil's backlog.
        backlog = netutil.LISTEN_BACKLOG
        self._servers = [
            await loop.create_server(self._outbound_factory, sock=socks[0], backlog=backlog),
            await loop.create_server(self._inbound_plain_factory, sock=socks[1], backlog=backlog),
            await loop.create_server(self._hbone_factory, sock=socks[2], ssl=self.server_tls.context,
                                     ssl_handshake_timeout=s.connect_timeout_s, backlog=backlog),
        ]
        self._reaper = loop.create_task(self._reap_loop())

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting and let the connections end, up to timeout_s: the
        listening sockets stay open wherever else they are held (the next agent's
        workers, systemd's fd store), so no connection is refused meanwhile;
        HTTP/1.1 responses now carry `Connection: close` (http/h1stack.py); HBONE
        callers and HTTP/2 clients (h2c, gRPC: http/h2stack.py) get a graceful
        GOAWAY in two steps (any stream, then the last one seen, GOAWAY_GRACE_S or
        a PING's round trip later), so they open their next connections to the new
        workers and no stream is refused. Returns how many connections were still
        open at the deadline."""
        self.draining = True
        for srv in self._servers:
            srv.close()  # our descriptors only: the socket and its queue live on
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + timeout_s
        self._goaway(final=False)
        h2_clients = self.l7.drain_h2_clients()  # each takes its own two steps (h2stack.py)
        if h2_clients:
            log.info("draining: GOAWAY to %d HTTP/2 client connection(s)", h2_clients)
        final_at = 0.0
        while loop.time() < deadline:
            now = loop.time()
            if not final_at and now >= start + GOAWAY_GRACE_S:
                self._goaway(final=True)
                final_at = now
            callers = any(not c.lost for c in self._hbone_conns)
            if not self.open_connections() and (not callers or (final_at and now >= final_at + GOAWAY_GRACE_S)):
                break
            await asyncio.sleep(0.05)
        left = self.open_connections()
        for conn in list(self._hbone_conns):
            if not conn.lost:
                conn.close("drained")
        return left

    def _goaway(self, final: bool) -> None:
        for conn in list(self._hbone_conns):
            if not conn.lost:
                conn.core.goaway(conn.core.last_peer_stream if final else None, "proxy restarting")
                conn.flush_now()

    def open_connections(self) -> int:
        return len(self._conns) + sum(1 for c in self._hbone_conns if not c.lost and c.core.open_streams)

    def addresses(self) -> list[tuple[str, int]]:
        return [srv.sockets[0].getsockname()[:2] for srv in self._servers]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        for srv in self._servers:
            srv.close()
        if self._reaper is not None:
            self._reaper.cancel()
        self.pool.close()
        self.l7.close()
        self.telemetry.close()
        for t in list(self._tasks):
            t.cancel()
        for srv in self._servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 1.0)
            except Exception:
                log.exception("a listener did not close cleanly")  # stopping goes on regardless
        self._servers = []

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self._idle / 2))
            self.pool.reap()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def new_session(self, direction: str, **fields: Any) -> Session:
        session = Session(self.access_log, direction, node=self.settings.node_name, **fields)
        session.observer = self.telemetry
        self.telemetry.begin(session)
        return session

    # -- outbound --
    def _tracked(self, session: Session) -> Session:
        self._conns.add(session)
        session.on_finish.append(lambda: self._conns.discard(session))
        return session

    def _outbound_factory(self) -> OutboundConnection:
        return OutboundConnection(self, self._tracked(self.new_session("outbound")))

    def outbound_accepted(self, end: OutboundConnection) -> None:
        start_outbound(self, end)

    def _client_context(self, source_identity: str) -> ssl.SSLContext:
        ctx = self._client_ctx.get(source_identity)
        if ctx is None:
            if self.certs is None:
                raise NoCertificate("no certificates yet: cannot open mTLS connections")
            ctx = self._client_ctx[source_identity] = tls.client_context(self.certs, source_identity)
        return ctx

    async def _connect_hbone(self, key: PoolKey) -> HboneClientProtocol:
        ctx = self._client_context(key.source_identity)
        host, port = key.peer
        timeout = self.settings.connect_timeout_s
        sock = await netutil.connect(host, port, self.settings.mark, timeout)
        loop = asyncio.get_running_loop()
        try:
            transport, proto = await loop.create_connection(
                lambda: HboneClientProtocol(self.hbone_limits), sock=sock, ssl=ctx,
                server_hostname=Identity.parse(key.expected_identity).sni(),
                ssl_handshake_timeout=timeout,
            )
        except (TimeoutError, ssl.SSLError, ConnectionError) as e:
            sock.close()
            raise TlsHandshakeFailed(f"TLS handshake with {host}:{port} for {key.expected_identity} "
                                     f"failed: {e}") from None
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            tls.check_peer_identity(ssl_object, key.expected_identity)
        except PeerIdentityMismatch as e:
            transport.abort()
            raise PeerIdentityMismatch(f"node {host}:{port}: {e.message}") from None
        # The peer node's SVID was issued to a node revoked since: refuse it as the HBONE server would.
        why = self.revoked_peer("outbound", tls.peer_serial(ssl_object), key.expected_identity, f"{host}:{port}")
        if why:
            transport.abort()
            raise PeerCertificateRevoked(f"node {host}:{port}: {why}")
        return proto

    # -- inbound: HBONE --
    def _hbone_factory(self) -> HboneServerProtocol:
        conn = HboneServerProtocol(self._on_connect, self._hbone_session, self._describe_tls, self.hbone_limits,
                                   self._hbone_idle_closed, admit_peer=self._admit_hbone_peer)
        self._hbone_conns.add(conn)
        return conn

    def _hbone_idle_closed(self) -> None:
        meshmetrics.PROXY_ERRORS.inc({"direction": "inbound", "reason": "hbone_connection_idle_timeout"})

    def _describe_tls(self, ssl_object: Any) -> tuple[str, str]:
        return tls.peer_spiffe_id(ssl_object), self.server_tls.presented_identity(ssl_object)

    def _hbone_session(self, conn: HboneServerProtocol, ev: hbone.ConnectRequested) -> Session:
        peer = conn.peer_addr
        session = self.new_session(
            "inbound", src=f"{peer[0]}:{peer[1]}" if peer else "", source_principal=conn.peer_identity,
            dst_addr=hbone.format_authority(ev.host, ev.port) if ev.port else "", dst_identity=conn.presented_identity,
            via="hbone", tls=True,
        )
        session.peer_headers = ev.headers  # trace context and baggage from the calling node
        # A tunnel moving no byte either way for this long is closed (reason idle_timeout).
        session.idle_timeout_s = self.hbone_limits.stream_idle_timeout_s
        return session

    async def _on_connect(self, conn: HboneServerProtocol, sid: int, host: str, port: int, session: Session) -> End:
        snapshot = self.snapshot
        if snapshot is None:
            raise InboundRefused(503, "not_ready", "node proxy has no configuration yet")
        if not conn.peer_identity:
            raise InboundRefused(403, "no_peer_identity", "caller presented no SPIFFE ID")
        # A connection accepted before the revocation list named its certificate (counted as the session's reason).
        why = self.revoked_peer("inbound", conn.peer_serial, conn.peer_identity, session.fields.get("src", ""),
                                snapshot)
        if why:
            raise InboundRefused(403, PeerCertificateRevoked.reason, why, PeerCertificateRevoked.hint)
        target = resolve_inbound(snapshot, host, port, conn.presented_identity)
        session.set(dst_workload=target.workload.key)
        # mTLS mode and AuthorizationPolicy (nodeagent/proxy/authz.py); raises InboundRefused (403).
        # With HTTP rules, each request is decided by a guard in front of the workload (authz_l7.py).
        l7 = authz_l7.admit(snapshot, target.workload, port, conn.peer_identity,
                            conn.peer_addr[0] if conn.peer_addr else "", session)
        up = await connect_local(target, session, self.settings.mark, self.settings.connect_timeout_s)
        return authz_l7.wrap(l7, up, session)  # type: ignore[no-any-return]

    # -- inbound: plaintext --
    def _inbound_plain_factory(self) -> TcpEnd:
        return _PlainInbound(self, self._tracked(self.new_session("inbound", via="plaintext", tls=False)))

    def plain_accepted(self, end: _PlainInbound) -> None:
        transport = cast(asyncio.Transport, end.transport)  # set: connection_made ran
        peer = transport.get_extra_info("peername")
        end.session.set(src=f"{peer[0]}:{peer[1]}", source_principal="")
        end.peer_ip = str(peer[0])
        snapshot = self.snapshot
        if snapshot is None:
            end.session.fail("not_ready", "no snapshot yet")
            end.close()
            return
        try:
            ip, port = self.inbound_original_dst(transport.get_extra_info("socket"))
            end.session.set(dst_addr=f"{ip}:{port}")
            target = resolve_inbound(snapshot, ip, port, None)
            # Plaintext: refused if the port is STRICT, else counted; then AuthorizationPolicy
            # (per request when HTTP rules apply: authz_l7.py).
            end.l7 = authz_l7.admit(snapshot, target.workload, port, "", str(peer[0]), end.session)
        except (OSError, ProxyError) as e:
            end.session.fail(e if isinstance(e, ProxyError) else ProxyError(f"original destination: {e}"))
            end.close()
            return
        end.session.set(dst_workload=target.workload.key, dst_identity=target.identity)
        self.spawn(self._plain_connect(end, target))

    async def _plain_connect(self, end: _PlainInbound, target: Any) -> None:
        try:
            # TPROXY mode: connect from the caller's address so the workload sees it.
            source_ip = end.peer_ip if self.settings.inbound_mode == "tproxy" else ""
            up = await connect_local(target, end.session, self.settings.mark, self.settings.connect_timeout_s,
                                     source_ip)
        except ProxyError as e:
            end.session.fail(e)
            end.close()
            return
        if end.l7 is not None:
            guard = authz_l7.wrap(end.l7, up, end.session)
            guard.attach(end)
            end.attach(guard)
            return
        end.attach(up)
        up.attach(end)


class _PlainInbound(TcpEnd):
    def __init__(self, proxy: NodeProxy, session: Session) -> None:
        super().__init__(session)
        self.proxy = proxy
        self.peer_ip = ""
        self.l7: authz_l7.L7Check | None = None  # set when requests are decided one by one
        session.downstream = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.proxy.plain_accepted(self)
