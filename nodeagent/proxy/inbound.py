"""Inbound: which local workload a tunnel (or a plaintext connection) is for,
as a pure check, and the code that connects to that workload."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nodeagent.meshview.snapshot import LocalWorkload, Snapshot

from . import netutil
from .errors import ProxyError, UnknownDestination
from .relay import Session, TcpEnd


class InboundRefused(ProxyError):
    """A CONNECT the node refuses; status is the HTTP answer."""

    reason = "inbound_refused"

    def __init__(self, status: int, reason: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class InboundTarget:
    workload: LocalWorkload
    identity: str
    ip: str
    port: int


def resolve_inbound(
    snapshot: Snapshot, ip: str, port: int, presented_identity: str | None
) -> InboundTarget:
    """Pure: the local workload serving ip:port, checked against the identity this
    node presented to the caller (None: plaintext, no identity to check)."""
    lw = snapshot.local_by_port.get(port)
    if lw is not None and lw.ip and lw.ip not in (ip, "0.0.0.0", "::"):  # noqa: S104 (a wildcard bind, compared)
        lw = None
    if lw is None:
        wl = snapshot.by_workload_addr.get((ip, port))
        if wl is not None and wl.node == snapshot.node:
            lw = next((x for x in snapshot.local_workloads if x.key == wl.key), None)
    if lw is None:
        raise InboundRefused(
            404, "unknown_destination", f"no local workload serves {ip}:{port} on node {snapshot.node}",
            hint=UnknownDestination.hint,
        )
    identity = snapshot.identity_of(lw)
    if presented_identity is not None and presented_identity != identity:
        raise InboundRefused(
            403, "identity_mismatch",
            f"{ip}:{port} is workload {lw.key} ({identity}) but the caller asked for {presented_identity or 'nothing'}",
            hint="the caller's endpoint record names another identity: check the registry",
        )
    return InboundTarget(lw, identity, ip, port)


async def connect_local(target: InboundTarget, session: Session, mark: int, timeout_s: float,
                        source_ip: str = "") -> TcpEnd:
    """Connect to the local workload; the returned end is paused until attached.
    source_ip: the plaintext caller's address, kept in TPROXY mode."""
    try:
        sock = await netutil.connect(target.ip, target.port, mark, timeout_s, source_ip)
    except ProxyError as e:
        raise InboundRefused(
            503, "upstream_connect_failed", f"workload {target.workload.key} at {target.ip}:{target.port}: {e.message}",
            hint="the destination node's proxy could not reach the workload: is it listening?",
        ) from None
    loop = asyncio.get_running_loop()
    _, end = await loop.create_connection(lambda: TcpEnd(session), sock=sock)
    if session.observer is not None:  # telemetry: HTTP ports are observed per request (nodeagent/observe/httpwatch.py)
        session.observer.workload_end(session, end, target)
    return end
