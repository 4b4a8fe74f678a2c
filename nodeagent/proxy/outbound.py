"""Outbound: a captured connection -> source workload (from the kernel) -> plan
-> endpoint -> HBONE tunnel, same-node hop, plain passthrough, or refusal."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from nodeagent.meshview.snapshot import LocalWorkload, Snapshot

from . import conntrack, sockdiag
from .connector import Upstream
from .errors import (
    NoHealthyEndpoint,
    NotReady,
    PolicyDenied,
    ProxyError,
    UnknownSource,
)
from .http.h1stack import l7_protocol, start_l7
from .idle import idle_timeout_of
from .plan import OutboundPlan, plan_outbound
from .relay import Session, TcpEnd

if TYPE_CHECKING:
    from .proxy import NodeProxy

log = logging.getLogger(__name__)

OriginalDst = Callable[[socket.socket], tuple[str, int]]
Addr = tuple[str, int]


@dataclass(frozen=True)
class SourceMatch:
    """The workload that opened a captured connection, and the client address
    its socket really has (not always the peer the proxy sees: see conntrack.py)."""

    workload: LocalWorkload
    client: Addr


# (snapshot, peer as accepted, original dst, the accepting socket's address) -> who opened it.
# The address is asked for (a getsockname) only by a lookup that needs it: on a miss.
SourceLookup = Callable[[Snapshot, Addr, Addr, Callable[[], Addr]], SourceMatch | None]

FAILURE_PENALTY_S = 1.0  # what a failed connect costs an endpoint in the balancer


def by_uid(uid: int) -> SourceLookup:
    """A lookup that gives every connection to the workload declared with `uid`
    (in-process tests and benchmarks, where nothing is captured)."""
    def lookup(snapshot: Snapshot, client: Addr, _dst: Addr, _local: Callable[[], Addr]) -> SourceMatch | None:
        lw = snapshot.local_by_uid.get(uid)
        return None if lw is None else SourceMatch(lw, client)
    return lookup


class KernelSourceLookup:
    """The real source lookup: sock_diag for the client's socket, then uid/cgroup.

    The common path is one sock_diag query keyed by (peer as accepted -> original
    dst). When the kernel has no such socket, the peer port may have been remapped
    by NAT (REDIRECT capture, two connections from one source port): conntrack's
    entry for the accepted connection then gives the client's real address, and the
    socket is looked up again with it. Only misses pay for the second lookup."""

    def __init__(self, redirect_target: Addr | None = None) -> None:
        self._index_for: Snapshot | None = None
        self._index: Mapping[int, LocalWorkload] = {}
        # eBPF capture rewrites the connect itself (no NAT): the client's socket
        # is connected to the outbound listener, not to the original destination.
        self._redirect_target = redirect_target

    def __call__(self, snapshot: Snapshot, client: Addr, dst: Addr, local: Callable[[], Addr]) -> SourceMatch | None:
        if self._index_for is not snapshot:
            self._index = sockdiag.cgroup_index(snapshot)  # resolved once per snapshot
            self._index_for = snapshot
        found = self._owner(client, dst, local)
        if found is None:
            return None
        owner, real_client = found
        lw = sockdiag.identify(snapshot, self._index, owner)
        if lw is None:
            log.warning("the socket %s:%s -> %s:%s belongs to uid %s, cgroup id %s: no local workload has "
                        "that uid or cgroup; check the workload's declaration on this node",
                        *real_client, *dst, owner.uid, owner.cgroup_id)
            return None
        return SourceMatch(lw, real_client)

    def _owner(self, client: Addr, dst: Addr, local: Callable[[], Addr]) -> tuple[sockdiag.SocketOwner, Addr] | None:
        try:
            return sockdiag.query_owner(client, dst), client
        except OSError as first:
            miss = first
        if self._redirect_target is not None:
            try:
                return sockdiag.query_owner(client, self._redirect_target), client
            except OSError:
                pass
        try:
            orig = conntrack.original_of(conntrack.ConnTuple(local(), client))
        except OSError as e:
            log.warning("cannot find the socket for %s:%s -> %s:%s: %s; conntrack has no entry for it either (%s): "
                        "was the client gone already, or is the proxy missing CAP_NET_ADMIN?",
                        *client, *dst, miss, e)
            return None
        if orig.src == client:
            log.warning("cannot find the socket for %s:%s -> %s:%s: %s (conntrack shows no remapped source port)",
                        *client, *dst, miss)
            return None
        try:
            owner = sockdiag.query_owner(orig.src, orig.dst)
        except OSError as e:
            log.warning("cannot find the socket for %s:%s -> %s:%s, seen as %s:%s after NAT remapped its port: %s",
                        *orig.src, *orig.dst, *client, e)
            return None
        log.debug("client %s:%s is %s:%s (source port remapped by NAT)", *client, *orig.src)
        return owner, orig.src


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


def _sockname(transport: asyncio.BaseTransport) -> Addr:
    name = transport.get_extra_info("sockname")
    return str(name[0]), int(name[1])


def start_outbound(proxy: NodeProxy, end: OutboundConnection) -> None:
    """Runs in connection_made: decide synchronously, connect in a task."""
    transport = cast(asyncio.Transport, end.transport)  # set: connection_made ran
    snapshot = proxy.snapshot
    session = end.session
    peer = transport.get_extra_info("peername")
    client = (str(peer[0]), int(peer[1]))
    session.set(src=f"{client[0]}:{client[1]}")
    if snapshot is None:
        return refuse(end, NotReady("no snapshot yet: refusing outbound connection"))
    try:
        dst = proxy.original_dst(transport.get_extra_info("socket"))
    except OSError as e:
        return refuse(end, ProxyError(f"cannot read the original destination: {e}",
                                      hint="was this connection redirected by the capture rules?"))
    session.set(dst_addr=f"{dst[0]}:{dst[1]}")
    match = proxy.source_lookup(snapshot, client, dst, lambda: _sockname(transport))
    if match is None:
        return refuse(end, UnknownSource(f"no local workload owns the socket {client[0]}:{client[1]} -> "
                                         f"{dst[0]}:{dst[1]} (looked up by sock_diag, then conntrack)"))
    source = match.workload
    if match.client != client:  # NAT remapped the source port: log the client's real one
        session.set(src=f"{match.client[0]}:{match.client[1]}")
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
            end.attach(await proxy.connector.open_direct(plan.dst_ip, plan.dst_port, session, end))
            return
        ep = proxy.balancer.pick(plan.endpoints)
        session.set(endpoint=f"{ep.ip}:{ep.port}", dst_workload=ep.workload, dst_identity=ep.identity)
        proxy.balancer.start(ep)
        session.on_finish.append(lambda: proxy.balancer.finish(ep))
        t0 = time.monotonic()
        try:
            _join(end, await proxy.connector.open(snapshot, ep, source_id, end.session,
                                                  workload_session=end.session))
        except ProxyError:
            proxy.balancer.observe(ep, FAILURE_PENALTY_S)
            raise
        proxy.balancer.observe(ep, time.monotonic() - t0)
    except ProxyError as e:
        refuse(end, e)
    except Exception as e:  # a bug must not leave the client hanging
        log.exception("outbound connection failed unexpectedly")
        refuse(end, ProxyError(f"internal error: {e!r}"))


def _join(end: OutboundConnection, up: Upstream) -> None:
    """Relay between the client's end and the opened upstream."""
    wire = up.wire
    if up.inbound is not None:  # same node: the receiving side's session ends with ours
        end.session.on_finish.append(up.inbound.finish)
        up.inbound.downstream = end
    if isinstance(wire, TcpEnd):  # the workload itself (no guard): splice-capable on both sides
        wire.partner = end
        end.attach(wire)
        wire.attach(end)
    else:
        wire.attach(end)  # HBONE: with what a server-speaks-first workload sent right behind the 200
        end.attach(wire)
    if up.inbound is not None:
        up.inbound.connected()
