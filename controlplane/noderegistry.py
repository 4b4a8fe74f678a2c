"""The node registry: which nodes are alive (leases renewed by heartbeats) and
which workloads they run, plus the Registry/Session gRPC servicer feeding it.

A node whose session ends stays registered until its lease runs out, so a short
disconnect does not make its endpoints flap.

Expiry is a singleton duty (`run_expiry` under controlplane/leader.py): only the
elected replica removes nodes, through the store's fenced `expire_node`, so
it happens once however many replicas share the store. Each replica knows the
leases of the sessions it holds exactly; for the others it reads the liveness
their holders publish (`Store.publish_liveness`), rewritten only once a lease
moved by PUBLISH_FRACTION of its length (at 1,000 nodes, 15 s leases and
heartbeats every 5 s: about 100 writes/s rather than 200). A published lease
is therefore up to that fraction older than the truth, and the leader waits
that much longer before it expires a node held by another replica (or by one
that died): a node is expired between one and one and a half leases after its
last heartbeat, and never while it heartbeats to any replica. With the SQLite
store the one control plane holds every session and always leads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from controlplane.nodes import RegisteredNode, RegistrationError, node_from_proto
from controlplane.store import NodeLiveness, NodeRecord, Store, StoreError
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger("nodemesh.controlplane.noderegistry")

DEFAULT_LEASE_SECONDS = 15.0
# A held node's liveness is published again once its lease moved by this fraction
# of a lease; the leader allows the same fraction on top of a published lease.
PUBLISH_FRACTION = 0.5


@dataclass(frozen=True)
class Lease:
    node: RegisteredNode
    expires_unix: float


@dataclass(frozen=True)
class Lapse:
    """A node whose lease lapsed, as the leader's expiry found it."""

    name: str
    seen: NodeLiveness | None  # the published liveness the decision read: the store's fence
    cause: str  # "session": its session is held here; "published": another replica published its lease
    reason: str  # for the log and the audit line


class NodeRegistry:
    """Registered nodes with leases. Time comes from `clock` (unix seconds) so
    tests can drive expiry; persistence goes to `store` when one is given."""

    def __init__(self, store: Store | None = None, lease_seconds: float = DEFAULT_LEASE_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.lease_seconds = lease_seconds
        self._store = store
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._listeners: list[Callable[[], None]] = []
        # Told the name of every node that leaves (lease expired, or another replica's
        # record is gone), so per-node state elsewhere (mesh view, metrics) is dropped.
        self._departure_listeners: list[Callable[[str], None]] = []
        self.version = 0  # bumps on every change of the node or workload set
        # node -> {(workload key, port): detail} of endpoints its health checks fail (in memory only).
        self._unhealthy: dict[str, dict[tuple[str, int], str]] = {}
        # Nodes whose agents hold their session with another control plane replica
        # sharing the store (controlplane/store_etcd.py): they count while the store
        # keeps their record, and this replica never expires them itself.
        self._remote: dict[str, RegisteredNode] = {}
        # Told (name, unhealthy endpoints) when a node held here reports a new set, so
        # replicas sharing the store see it (controlplane/store_etcd.py share_registry).
        self.on_health: Callable[[str, dict[tuple[str, int], str]], None] | None = None
        self._health_unshared: set[str] = set()  # nodes just taken over: share their next report
        # Held nodes: the lease end last published to the store (publish_liveness).
        self._published: dict[str, float] = {}
        # Published leases older than this replica get a lease from its start (as restore() does):
        # the agents may have had no replica to heartbeat to.
        self._started = clock()
        # Told each Lapse this replica expired (metrics, the audit log).
        self.on_expiry: Callable[[Lapse], None] | None = None

    # ------------------------------------------------------------ reads

    def nodes(self) -> tuple[RegisteredNode, ...]:
        """Registered nodes, each with the unhealthy endpoints its agent last reported."""
        merged = {**self._remote, **{n: lease.node for n, lease in self._leases.items()}}
        return tuple(self._with_health(merged[n]) for n in sorted(merged))

    def _with_health(self, node: RegisteredNode) -> RegisteredNode:
        bad = self._unhealthy.get(node.name)
        return dataclasses.replace(node, unhealthy=frozenset(bad)) if bad else node

    def unhealthy(self, name: str) -> dict[tuple[str, int], str]:
        return dict(self._unhealthy.get(name, {}))

    def set_health(self, name: str, report: mesh_pb2.HealthReport) -> bool:
        """Replace a node's health report (agent's active checks on its own
        workloads). Only endpoints of that node's own workloads count. Returns
        True when the unhealthy set changed (and listeners were told)."""
        lease = self._leases.get(name)
        if lease is None:
            return False
        own = {w.key for w in lease.node.workloads}
        bad = {(e.workload, e.port): e.detail for e in report.endpoints
               if not e.healthy and e.workload in own}
        old = self._unhealthy.get(name, {})
        if bad:
            self._unhealthy[name] = bad
        else:
            self._unhealthy.pop(name, None)
        if self.on_health is not None and (bad != old or name in self._health_unshared):
            self._health_unshared.discard(name)
            self.on_health(name, bad)
        if set(bad) == set(old):
            return False
        for key in sorted(set(bad) - set(old)):
            log.info("node %s reports endpoint %s:%d unhealthy (%s)", name, key[0], key[1], bad[key])
        for key in sorted(set(old) - set(bad)):
            log.info("node %s reports endpoint %s:%d healthy again", name, key[0], key[1])
        self._changed()
        return True

    def set_remote_health(self, name: str, bad: dict[tuple[str, int], str]) -> None:
        """A health report another replica shared for a node whose session it holds."""
        if name in self._leases:
            return  # its agent is with this replica: its own reports count
        old = self._unhealthy.get(name, {})
        if bad:
            self._unhealthy[name] = dict(bad)
        else:
            self._unhealthy.pop(name, None)
        if set(bad) != set(old):
            log.info("node %s has %d unhealthy endpoints (reported through another replica)", name, len(bad))
            self._changed()

    def get(self, name: str) -> RegisteredNode | None:
        lease = self._leases.get(name)
        return lease.node if lease else self._remote.get(name)

    def lease(self, name: str) -> Lease | None:
        return self._leases.get(name)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every change to the registered set."""
        self._listeners.append(listener)

    def on_departure(self, listener: Callable[[str], None]) -> None:
        """Call `listener(name)` when a node leaves the registered set."""
        self._departure_listeners.append(listener)

    def _departed(self, name: str) -> None:
        for listener in list(self._departure_listeners):
            try:
                listener(name)
            except Exception:
                log.exception("registry departure listener failed")

    def _changed(self) -> None:
        self.version += 1
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                log.exception("registry listener failed")

    # ------------------------------------------------------------ writes

    def restore(self) -> int:
        """Reload registrations persisted before a restart. Each gets a fresh
        lease from now: the agents have had no chance to heartbeat meanwhile."""
        if self._store is None:
            return 0
        expires = self._clock() + self.lease_seconds
        restored = 0
        for rec in self._store.load_nodes():
            reg = mesh_pb2.NodeRegistration()
            try:
                reg.ParseFromString(rec.registration)
                node = node_from_proto(reg)
            except Exception as e:  # noqa: BLE001 - a bad row must not stop the control plane
                log.warning("dropping stored registration of node %s: %s", rec.name, e)
                self._store.delete_node(rec.name)
                continue
            self._leases[node.name] = Lease(node, expires)
            restored += 1
        if restored:
            self._changed()
        return restored

    def set_remote(self, name: str, node: RegisteredNode | None) -> None:
        """A registration another replica wrote to the shared store, or None: the
        record is gone (the leader expired it, or a revocation withdrew it), for
        every replica, a node held here too: its agent's next heartbeat is told to
        register again. A node held here whose agent re-registered with another
        replica moves to the remote set."""
        moved = self._leases.pop(name, None)
        if moved is not None:
            self._published.pop(name, None)
        old = self._remote.pop(name, None)
        if node is not None:
            self._remote[name] = node
        if moved is not None or old != node:
            log.info("node %s %s through another control plane replica", name,
                     "is registered" if node is not None else "is no longer registered")
            self._changed()
        if node is None and (old is not None or moved is not None):
            self._unhealthy.pop(name, None)
            self._health_unshared.discard(name)
            self._departed(name)

    def register(self, reg: mesh_pb2.NodeRegistration) -> Lease:
        """Register or re-register a node (its workload set is replaced).
        Raises RegistrationError when the registration is invalid."""
        node = node_from_proto(reg)
        now = self._clock()
        expires = now + self.lease_seconds
        old = self._leases.get(node.name)
        if self._remote.pop(node.name, None) is not None or old is None:
            self._health_unshared.add(node.name)  # its agent is with this replica now: re-share its health
        self._leases[node.name] = lease = Lease(node, expires)
        # A lapsed lease is written again with the registration: the leader may be expiring it.
        if self._store is not None and (old is None or old.node != node or old.expires_unix <= now):
            self._store.save_node(NodeRecord(node.name, reg.SerializeToString(deterministic=True),
                                             int(expires * 1000)))
            self._published[node.name] = expires
        if old is None or old.node != node:
            log.info("node %s registered with %d workloads at %s", node.name, len(node.workloads),
                     node.address)
            self._changed()
        return lease

    def withdraw(self, name: str, reason: str) -> bool:
        """Remove a node now (it was revoked): its workloads leave every node's
        endpoints with the next push. True when it was registered."""
        had = self._leases.pop(name, None) is not None
        had = self._remote.pop(name, None) is not None or had
        self._unhealthy.pop(name, None)
        self._published.pop(name, None)
        if self._store is not None:
            self._store.delete_node(name)
        if had:
            log.warning("node %s removed from the registry: %s", name, reason)
            self._changed()
        return had

    def renew(self, name: str) -> Lease | None:
        """Extend a node's lease; None when the node is not (or no longer) registered.
        A lapsed lease is renewed too until the leader expires the node. The new end
        is published once it moved by PUBLISH_FRACTION of a lease since the last."""
        old = self._leases.get(name)
        if old is None:
            return None
        self._leases[name] = lease = Lease(old.node, self._clock() + self.lease_seconds)
        if (self._store is not None
                and lease.expires_unix - self._published.get(name, 0.0) >= self.lease_seconds * PUBLISH_FRACTION):
            self._published[name] = lease.expires_unix
            self._store.publish_liveness(name, int(lease.expires_unix * 1000))
        return lease

    def lapsed(self) -> list[Lapse]:
        """The nodes whose lease lapsed, each with the liveness the decision read (the
        store's fence) and why. A node held here lapses
        with its lease; one held by another replica PUBLISH_FRACTION of a lease
        after its published lease (how stale a publication may be), and never
        before a lease from this replica's start or the store's last outage."""
        now = self._clock()
        published = self._store.node_liveness() if self._store is not None else {}
        out: list[Lapse] = []
        for name, lease in self._leases.items():
            if lease.expires_unix <= now:
                out.append(Lapse(name, published.get(name), "session",
                                 f"no heartbeat on its session with this replica for {self.lease_seconds:g} s "
                                 f"(lease ended {_iso(lease.expires_unix)})"))
        slack = self.lease_seconds * PUBLISH_FRACTION
        # A lease from this replica's start, or from the store's last break, before any
        # published lease counts as stale: the holders may have had no way to publish.
        floor = max(self._started, self._store.liveness_view_since() if self._store is not None else 0.0)
        for name in self._remote:
            live = published.get(name)
            if live is None or name in self._leases:
                continue  # nothing published (written by a replica without shared liveness)
            until = live.until_unix_ms / 1000
            if max(until + slack, floor + self.lease_seconds) <= now:
                out.append(Lapse(name, live, "published",
                                 f"no heartbeat reached any replica: replica {live.replica or '?'} last published "
                                 f"its lease until {_iso(until)}, and {slack:g} s more (how stale a published "
                                 "lease may be) have passed"))
        return sorted(out, key=lambda lapse: lapse.name)

    async def expire(self) -> list[str]:
        """The leader's duty: remove every node whose lease lapsed (lapsed()), each
        through the store's fenced expire_node, so a replica that is no longer the
        leader, or a node renewed meanwhile, expires nothing. Returns their names."""
        gone = []
        for lapse in self.lapsed():
            name = lapse.name
            try:
                done = await self._store.expire_node(name, lapse.seen) if self._store is not None else True
            except StoreError as e:
                log.warning("cannot expire node %s now (%s); trying again", name, e)
                continue
            if not done:
                log.info("node %s was not expired: its liveness was published again, or this replica no "
                         "longer leads", name)
                continue
            lease = self._leases.get(name)
            if lease is not None and lease.expires_unix > self._clock():
                continue  # it registered here while the expiry was written: that write puts it back
            self._leases.pop(name, None)
            self._remote.pop(name, None)
            self._unhealthy.pop(name, None)
            self._health_unshared.discard(name)
            self._published.pop(name, None)
            log.warning("node %s expired: %s; its workloads are removed", name, lapse.reason)
            if self.on_expiry is not None:
                try:
                    self.on_expiry(lapse)
                except Exception:
                    log.exception("registry expiry listener failed")
            gone.append(name)
        if gone:
            self._changed()
        for n in gone:
            self._departed(n)
        return gone

    async def run_expiry(self, interval: float = 1.0) -> None:
        """expire() every `interval` seconds: run it while leading (controlplane/leader.py)."""
        while True:
            await asyncio.sleep(interval)
            await self.expire()


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def _grant(lease: Lease, lease_seconds: float) -> mesh_pb2.LeaseGrant:
    return mesh_pb2.LeaseGrant(node_name=lease.node.name, lease_seconds=int(lease_seconds),
                               expires_unix_ms=int(lease.expires_unix * 1000))


class RegistryServicer(mesh_pb2_grpc.RegistryServicer):
    """nodemesh.v1.Registry: one Session stream per node agent."""

    def __init__(self, registry: NodeRegistry) -> None:
        self._registry = registry
        # (node, telemetry JSON) from heartbeats, for the mesh view (controlplane/web).
        self.on_telemetry: Callable[[str, str], None] | None = None
        # Registration admission (controlplane/auth.py): '' accepts, else the reason it is
        # refused (the node certificate names another node; a service account the mesh
        # config does not allow on this node).
        self.admit: Callable[[mesh_pb2.NodeRegistration], str] | None = None

    async def Session(self, request_iterator: AsyncIterator[mesh_pb2.NodeReport],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[mesh_pb2.LeaseGrant]:
        node_name = ""
        async for report in request_iterator:
            which = report.WhichOneof("report")
            if which == "register":
                refused = self.admit(report.register) if self.admit is not None else ""
                if refused:
                    # Logged (at a bounded rate) and counted by the admission check (controlplane/audit.py).
                    log.debug("refused the registration of node %s: %s", report.register.node_name, refused)
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"registration refused: {refused}")
                try:
                    lease = self._registry.register(report.register)
                except RegistrationError as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"registration refused: {e}; check the agent's node and "
                                        "workload configuration")
                if node_name and node_name != lease.node.name:
                    log.warning("session of node %s re-registered as %s", node_name, lease.node.name)
                node_name = lease.node.name
                yield _grant(lease, self._registry.lease_seconds)
            elif which == "heartbeat":
                if not node_name:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                        "the first message of a registry session must be a registration")
                renewed = self._registry.renew(node_name)
                if self.on_telemetry is not None and report.heartbeat.telemetry_json:
                    self.on_telemetry(node_name, report.heartbeat.telemetry_json)
                if renewed is None:
                    # The lease ran out while the stream stayed open; the agent must re-register.
                    await context.abort(grpc.StatusCode.NOT_FOUND,
                                        f"node {node_name} is no longer registered (its lease expired); "
                                        "re-register with a full NodeRegistration")
                    return
                yield _grant(renewed, self._registry.lease_seconds)
            elif which == "health":
                if not node_name:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                        "the first message of a registry session must be a registration")
                self._registry.set_health(node_name, report.health)
            else:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "empty NodeReport: set register or heartbeat")
        if node_name:
            log.info("registry session of node %s ended; registration kept until its lease expires",
                     node_name)
