"""The one way the sending side reaches an endpoint, for L4 relays and both L7
adapters alike: a workload on this node in process (the receiving side's
checks, its own inbound session, no TLS), any other through an HBONE CONNECT
stream on the pooled mTLS connection to the endpoint's node, and a
destination outside the mesh directly (passthrough). The network is
behind a small backend (`NetworkBackend`) that unit tests can replace, as
httpcore's backends are.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from nodeagent.meshview.snapshot import Endpoint, Snapshot

from . import authz_l7, netutil
from .errors import ConnectTimeout, ProxyError
from .inbound import InboundTarget, connect_local, resolve_inbound
from .plan import is_same_node
from .pool import PoolKey
from .relay import End, Session, TcpEnd

if TYPE_CHECKING:
    from .proxy import NodeProxy


class NetworkBackend(Protocol):
    """What the connector needs from the network (tests script it)."""

    async def connect_direct(self, ip: str, port: int, session: Session, partner: End) -> End:
        """A TCP connection to a destination outside the mesh, relaying to `partner`."""

    async def connect_workload(self, target: InboundTarget, session: Session) -> End:
        """A TCP connection to a workload on this node, paused until attached."""

    async def open_hbone_stream(self, key: PoolKey, ip: str, port: int,
                                session: Session) -> tuple[Any, asyncio.Future[None], Any]:
        """(stream end, the CONNECT's answer, its connection) on the pool of HBONE connections."""


class ProxyNetwork:
    """The real backend: sockets from netutil, the proxy's HBONE pool."""

    def __init__(self, proxy: NodeProxy) -> None:
        self.proxy = proxy

    async def connect_direct(self, ip: str, port: int, session: Session, partner: End) -> End:
        s = self.proxy.settings
        sock = await netutil.connect(ip, port, s.mark, s.connect_timeout_s)
        _, end = await asyncio.get_running_loop().create_connection(lambda: TcpEnd(session, partner), sock=sock)
        return end

    async def connect_workload(self, target: InboundTarget, session: Session) -> End:
        s = self.proxy.settings
        return await connect_local(target, session, s.mark, s.connect_timeout_s)

    async def open_hbone_stream(self, key: PoolKey, ip: str, port: int,
                                session: Session) -> tuple[Any, asyncio.Future[None], Any]:
        return await self.proxy.pool.open_stream(key, ip, port, session)


@dataclass
class Upstream:
    """An open path to an endpoint. `wire`: the end to attach the caller's end to (on
    this node, a guard in front of the workload when HTTP rules apply); `inbound`:
    on this node, the receiving side's session (its own log line), else None."""

    wire: Any
    inbound: Session | None
    via: str
    guarded: bool = False  # `wire` is a guard deciding each request (authz_l7.py)


class UpstreamConnector:
    """Opens upstreams for one proxy; `backend` is injectable."""

    def __init__(self, proxy: NodeProxy, backend: NetworkBackend | None = None) -> None:
        self.proxy = proxy
        self.backend: NetworkBackend = backend if backend is not None else ProxyNetwork(proxy)

    async def open_direct(self, ip: str, port: int, session: Session, partner: End) -> End:
        """Passthrough: straight to ip:port (a destination the mesh does not manage)."""
        session.set(via="passthrough")
        return await self.backend.connect_direct(ip, port, session, partner)

    async def open(self, snapshot: Snapshot, ep: Endpoint, source_id: str, session: Session, *,
                   stream_session: Session | None = None, workload_session: Session | None = None,
                   decisions: Session | None = None) -> Upstream:
        """Open a path to `ep` for the caller `session` (whose line describes the hop:
        `via` and the upstream node are set on it; its src and source workload are
        the caller's facts). `stream_session`: the HBONE stream's own session
        (default `session`); on this node, `workload_session` owns the workload
        connection and `decisions` gets the per-request authorization decisions
        (both default to the receiving side's inbound session)."""
        settings = self.proxy.settings
        if is_same_node(ep, settings.node_name):
            session.set(via="same-node")
            target = resolve_inbound(snapshot, ep.ip, ep.port, ep.identity)
            src = str(session.fields.get("src", ""))
            # The destination side of this hop, as on another node: reporter=destination
            # requests and log lines (the observers watch the workload end).
            inbound = self.proxy.new_session(
                "inbound", src=src, source_principal=source_id,
                source_workload=session.fields.get("source_workload", ""), dst_addr=f"{ep.ip}:{ep.port}",
                dst_workload=target.workload.key, dst_identity=target.identity, via="same-node", tls=False)
            inbound.peer_headers = session.connect_headers()  # same trace and baggage as a remote hop
            try:
                # The receiving side's policy applies to same-node callers too; the source
                # identity comes from the kernel (sock_diag), as good as mTLS here. With
                # HTTP rules each request is decided by a guard in front of the workload.
                l7 = authz_l7.admit(snapshot, target.workload, ep.port, source_id, src.rsplit(":", 1)[0], inbound)
                up = await self.backend.connect_workload(target, workload_session or inbound)
            except ProxyError as e:
                inbound.fail(e)
                inbound.finish()
                raise
            wire = authz_l7.wrap(l7, up, decisions or inbound, watched=workload_session or inbound)
            return Upstream(wire, inbound, "same-node", l7 is not None)
        session.set(via="hbone", upstream_node=ep.node, upstream_node_address=f"{ep.node_address}:{ep.hbone_port}")
        key = PoolKey(source_id, (ep.node_address, ep.hbone_port), ep.identity)
        timeout = settings.connect_timeout_s
        try:
            stream, answered, conn = await asyncio.wait_for(
                self.backend.open_hbone_stream(key, ep.ip, ep.port, stream_session or session), timeout)
        except TimeoutError:
            raise ConnectTimeout(f"HBONE connect to {ep.node_address}:{ep.hbone_port} timed out after {timeout:g}s",
                                 hint=f"is port {ep.hbone_port} open between nodes?") from None
        try:
            await asyncio.wait_for(asyncio.shield(answered), timeout)
        except TimeoutError:
            conn.cancel_tunnel(stream)
            raise ConnectTimeout(f"no answer to CONNECT {ep.ip}:{ep.port} from {ep.node_address} within "
                                 f"{timeout:g}s",
                                 hint="is the destination node's proxy overloaded or the workload slow to accept?"
                                 ) from None
        except ProxyError:
            stream.on_closed()
            raise
        return Upstream(stream, None, "hbone")
