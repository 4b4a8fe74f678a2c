"""Outbound: a captured connection -> source workload (from the kernel) -> plan
-> endpoint -> HBONE tunnel, same-node hop, plain passthrough, or refusal."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from nodeagent.meshview.snapshot import Endpoint, LocalWorkload, Snapshot

from . import authz_l7, netutil, sockdiag
from .errors import (
    ConnectTimeout,
    NoHealthyEndpoint,
    NotReady,
    PolicyDenied,
    ProxyError,
    UnknownSource,
)
from .http.stack import l7_protocol, start_l7
from .idle import idle_timeout_of
from .inbound import connect_local, resolve_inbound
from .plan import OutboundPlan, is_same_node, plan_outbound
from .pool import PoolKey
from .relay import Session, TcpEnd

if TYPE_CHECKING:
    from .proxy import NodeProxy

log = logging.getLogger(__name__)

OriginalDst = Callable[[socket.socket], tuple[str, int]]
# (snapshot, client addr:port, original dst addr:port) -> the workload that opened it
SourceLookup = Callable[[Snapshot, tuple[str, int], tuple[str, int]], LocalWorkload | None]

FAILURE_PENALTY_S = 1.0  # what a failed connect costs an endpoint in the balancer


class KernelSourceLookup:
    """The real source lookup: sock_diag for the client's socket, then uid/cgroup."""

    def __init__(self, redirect_target: tuple[str, int] | None = None) -> None:
        self._index_for: Snapshot | None = None
        self._index: Mapping[int, LocalWorkload] = {}
        # eBPF capture rewrites the connect itself (no NAT): the client's socket
        # is connected to the outbound listener, not to the original destination.
        self._redirect_target = redirect_target

    def __call__(self, snapshot: Snapshot, client: tuple[str, int], dst: tuple[str, int]) -> LocalWorkload | None:
        if self._index_for is not snapshot:
            self._index = sockdiag.cgroup_index(snapshot)  # resolved once per snapshot
            self._index_for = snapshot
        try:
            owner = sockdiag.query_owner(client, dst)
        except OSError as e:
            try:
                if self._redirect_target is None:
                    raise
                owner = sockdiag.query_owner(client, self._redirect_target)
            except OSError:
                log.warning("cannot find the socket for %s:%s -> %s:%s: %s", *client, *dst, e)
                return None
        return sockdiag.identify(snapshot, self._index, owner)


class OutboundConnection(TcpEnd):
    """The application's socket, accepted on the outbound listener."""

    def __init__(self, proxy: NodeProxy, session: Session) -> None:
        super().__init__(session)
        self.proxy = proxy
        session.downstream = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # paused: no partner yet
        self.proxy.outbound_accepted(self)


def refuse(end: TcpEnd, err: ProxyError) -> None:
    end.session.fail(err)
    log.info("outbound refused: %s", err)
    end.close()


def start_outbound(proxy: NodeProxy, end: OutboundConnection) -> None:
    """Runs in connection_made: decide synchronously, connect in a task."""
    assert end.transport is not None
    snapshot = proxy.snapshot
    session = end.session
    peer = end.transport.get_extra_info("peername")
    client = (str(peer[0]), int(peer[1]))
    session.set(src=f"{client[0]}:{client[1]}")
    if snapshot is None:
        return refuse(end, NotReady("no snapshot yet: refusing outbound connection"))
    try:
        dst = proxy.original_dst(end.transport.get_extra_info("socket"))
    except OSError as e:
        return refuse(end, ProxyError(f"cannot read the original destination: {e}",
                                      hint="was this connection redirected by the capture rules?"))
    session.set(dst_addr=f"{dst[0]}:{dst[1]}")
    source = proxy.source_lookup(snapshot, client, dst)
    if source is None:
        return refuse(end, UnknownSource(f"no local workload owns the socket {client[0]}:{client[1]} -> {dst[0]}:{dst[1]}"))
    source_id = snapshot.identity_of(source)
    session.set(source_workload=source.key, source_principal=source_id)
    plan = plan_outbound(snapshot, source, dst[0], dst[1], excluded_cidrs=proxy.settings.excluded_cidrs)
    if plan.service:
        session.set(dst_service=plan.service)
    if plan.kind == "deny":
        err: ProxyError = (NoHealthyEndpoint(plan.detail) if plan.reason == "no_healthy_endpoint"
                           else PolicyDenied(plan.detail))
        return refuse(end, err)
    l7_mode = l7_protocol(snapshot, plan)  # HTTP ports: per-request routing (nodeagent/proxy/http/)
    if l7_mode is not None:
        return start_l7(proxy, end, snapshot, source.key, source_id, plan, l7_mode,
                        lambda: proxy.spawn(carry_out(proxy, end, snapshot, source_id, plan)))
    proxy.spawn(carry_out(proxy, end, snapshot, source_id, plan))


async def carry_out(proxy: NodeProxy, end: OutboundConnection, snapshot: Snapshot, source_id: str,
                    plan: OutboundPlan) -> None:
    session = end.session
    session.idle_timeout_s = idle_timeout_of(snapshot, plan)  # armed when the ends join
    try:
        if plan.kind == "passthrough":
            session.set(via="passthrough")
            sock = await netutil.connect(plan.dst_ip, plan.dst_port, proxy.settings.mark,
                                         proxy.settings.connect_timeout_s)
            _, up = await asyncio.get_running_loop().create_connection(lambda: TcpEnd(session, end), sock=sock)
            end.attach(up)
            return
        ep = proxy.balancer.pick(plan.endpoints)
        session.set(endpoint=f"{ep.ip}:{ep.port}", dst_workload=ep.workload, dst_identity=ep.identity)
        proxy.balancer.start(ep)
        session.on_finish.append(lambda: proxy.balancer.finish(ep))
        t0 = time.monotonic()
        try:
            if is_same_node(ep, proxy.settings.node_name):
                await _same_node(proxy, end, snapshot, source_id, ep)
            else:
                await _via_hbone(proxy, end, source_id, ep)
        except ProxyError:
            proxy.balancer.observe(ep, FAILURE_PENALTY_S)
            raise
        proxy.balancer.observe(ep, time.monotonic() - t0)
    except ProxyError as e:
        refuse(end, e)
    except Exception as e:  # a bug must not leave the client hanging
        log.exception("outbound connection failed unexpectedly")
        refuse(end, ProxyError(f"internal error: {e!r}"))


async def _same_node(proxy: NodeProxy, end: OutboundConnection, snapshot: Snapshot, source_id: str,
                     ep: Endpoint) -> None:
    """The inbound path, in process: same checks, no TLS."""
    end.session.set(via="same-node")
    target = resolve_inbound(snapshot, ep.ip, ep.port, ep.identity)
    in_session = proxy.new_session("inbound", src=end.session.fields.get("src", ""),
                                   source_principal=source_id, source_workload=end.session.fields.get("source_workload"),
                                   dst_addr=f"{ep.ip}:{ep.port}", dst_workload=target.workload.key,
                                   dst_identity=target.identity, via="same-node", tls=False)
    try:
        # The receiving side's policy applies to same-node callers too; the
        # source identity comes from the kernel (sock_diag), as good as mTLS here.
        # With HTTP rules, each request is decided by a guard in front of the workload (authz_l7.py).
        l7 = authz_l7.admit(snapshot, target.workload, ep.port, source_id,
                            str(end.session.fields.get("src", "")).rsplit(":", 1)[0], in_session)
        up = await connect_local(target, end.session, proxy.settings.mark, proxy.settings.connect_timeout_s)
    except ProxyError as e:
        in_session.fail(e)
        in_session.finish()
        raise
    end.session.on_finish.append(in_session.finish)
    in_session.downstream = end
    if l7 is not None:
        guard = authz_l7.wrap(l7, up, in_session)
        guard.attach(end)
        end.attach(guard)
    else:
        up.partner = end
        end.attach(up)
        up.attach(end)
    in_session.peer_headers = end.session.connect_headers()  # same trace and baggage as a remote hop
    in_session.connected()


async def _via_hbone(proxy: NodeProxy, end: OutboundConnection, source_id: str, ep: Endpoint) -> None:
    end.session.set(via="hbone", upstream_node=ep.node, upstream_node_address=f"{ep.node_address}:{ep.hbone_port}")
    key = PoolKey(source_id, (ep.node_address, ep.hbone_port), ep.identity)
    timeout = proxy.settings.connect_timeout_s
    try:
        stream, answered, conn = await asyncio.wait_for(proxy.pool.open_stream(key, ep.ip, ep.port, end.session),
                                                        timeout)
    except TimeoutError:
        raise ConnectTimeout(f"HBONE connect to {ep.node_address}:{ep.hbone_port} timed out after {timeout:g}s",
                             hint=f"is port {ep.hbone_port} open between nodes?") from None
    try:
        await asyncio.wait_for(asyncio.shield(answered), timeout)
    except TimeoutError:
        conn.cancel_tunnel(stream)
        raise ConnectTimeout(f"no answer to CONNECT {ep.ip}:{ep.port} from {ep.node_address} within {timeout:g}s",
                             hint="is the destination node's proxy overloaded or the workload slow to accept?")
    except ProxyError:
        stream.on_closed()
        raise
    stream.attach(end)  # with what a server-speaks-first workload sent right behind the 200
    end.attach(stream)
