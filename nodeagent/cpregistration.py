"""The node's registry session: registers the node and its workloads with the
control plane, then heartbeats at a third of the granted lease; reconnects with
backoff through the agent's one reconnect loop (nodeagent/cpchannel.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

import nodemesh
from nodeagent import cpchannel
from nodeagent.config import AgentConfig
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger(__name__)

# Until the first grant says otherwise; a lease is never shorter than this in practice.
MIN_HEARTBEAT_S = 0.2


def registration_from_config(config: AgentConfig) -> mesh_pb2.NodeRegistration:
    reg = mesh_pb2.NodeRegistration(
        node_name=config.node.name,
        addresses=list(config.node.all_addresses),
        hbone_port=config.proxy.hbone_port,
        zone=config.node.zone,
        agent_version=nodemesh.__version__,
    )
    for wl in config.local_workloads():
        reg.workloads.append(mesh_pb2.WorkloadRegistration(
            name=wl.name, namespace=wl.namespace, service_account=wl.service_account,
            labels=dict(wl.labels), ip=wl.ip, ports=list(wl.ports),
        ))
    return reg


def heartbeat_interval(lease_seconds: int) -> float:
    return max(MIN_HEARTBEAT_S, lease_seconds / 3)


class RegistrySession(cpchannel.KeptSession):
    what = "registry"
    closed_reason = "the control plane closed the session"

    def __init__(self, target: str, registration: mesh_pb2.NodeRegistration, *,
                 on_connection: Callable[[bool], None] | None = None,
                 backoff_initial_s: float = cpchannel.BACKOFF_INITIAL_S,
                 backoff_cap_s: float = cpchannel.BACKOFF_CAP_S) -> None:
        super().__init__(on_connection=on_connection, backoff_initial_s=backoff_initial_s,
                         backoff_cap_s=backoff_cap_s)
        self.target = target
        self.registration = registration
        self.lease: mesh_pb2.LeaseGrant | None = None
        self.heartbeats = 0
        self._outbox: asyncio.Queue[mesh_pb2.NodeReport] | None = None
        # Returns a compact JSON summary of the node's traffic for the control plane's
        # mesh view (nodeagent.supervision.admin.AdminServer.telemetry_json); None = send none.
        self.telemetry: Callable[[], str] | None = None
        # The last health report (nodeagent/observe/healthprober.py); re-sent after every registration.
        self.health: mesh_pb2.HealthReport | None = None
        self.last_refusal = ""  # the control plane's reason when it refused this node's registration

    def _rpc_error(self, e: grpc.aio.AioRpcError) -> None:
        if e.code() == grpc.StatusCode.PERMISSION_DENIED:
            # Shown by `nodemesh status` (e.g. which identity binding is missing).
            self.last_refusal = str(e.details())

    def _ended(self, reason: str, delay: float) -> None:
        self._set_connected(False)
        log.warning("registry session with %s ended (%s): is the control plane at %s reachable? "
                    "node %s may expire from the registry if this lasts past its lease; retrying in %.1fs",
                    self.target, reason, self.target, self.registration.node_name, delay)

    def update(self, registration: mesh_pb2.NodeRegistration) -> None:
        """Re-register with a changed workload set: sent on the open session at
        once, and used for every later reconnect."""
        self.registration = registration
        if self._outbox is not None:
            self._outbox.put_nowait(mesh_pb2.NodeReport(register=registration))

    def set_health(self, report: mesh_pb2.HealthReport) -> None:
        """Send the node's health verdicts now (if connected) and after every reconnect."""
        self.health = report
        if self._outbox is not None:
            self._outbox.put_nowait(mesh_pb2.NodeReport(health=report))

    async def _session(self) -> bool:
        outbox: asyncio.Queue[mesh_pb2.NodeReport] = asyncio.Queue()
        outbox.put_nowait(mesh_pb2.NodeReport(register=self.registration))
        if self.health is not None:
            outbox.put_nowait(mesh_pb2.NodeReport(health=self.health))
        self._outbox = outbox
        periods: asyncio.Queue[float] = asyncio.Queue()

        async def heartbeats() -> None:
            period = await periods.get()
            while True:
                try:
                    # A new grant may change the period; pick it up without waiting out the old one.
                    period = await asyncio.wait_for(periods.get(), timeout=period)
                    continue
                except TimeoutError:
                    pass
                self.heartbeats += 1
                outbox.put_nowait(mesh_pb2.NodeReport(
                    heartbeat=mesh_pb2.Heartbeat(sent_unix_ms=int(time.time() * 1000),
                                                 telemetry_json=self.telemetry() if self.telemetry else "")))

        async def reports() -> AsyncIterator[mesh_pb2.NodeReport]:
            while True:
                yield await outbox.get()

        granted = False
        beat = asyncio.get_running_loop().create_task(heartbeats())
        try:
            async with cpchannel.open_channel(self.target) as channel:
                call = mesh_pb2_grpc.RegistryStub(channel).Session(reports())  # type: ignore[no-untyped-call]
                period: float | None = None
                async for grant in call:
                    if not granted:
                        log.info("registry: node %s registered with %s (lease %ds)",
                                 self.registration.node_name, self.target, grant.lease_seconds)
                    granted = True
                    self.last_refusal = ""
                    self.lease = grant
                    self._set_connected(True)
                    # Only a changed lease resets the timer, so grants answering each
                    # heartbeat cannot postpone the next one forever.
                    new_period = heartbeat_interval(grant.lease_seconds)
                    if new_period != period:
                        period = new_period
                        periods.put_nowait(new_period)
        finally:
            self._outbox = None
            beat.cancel()
        return granted
