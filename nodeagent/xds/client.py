"""The agent's ADS client: Delta (incremental) by default, state of the world
on request (controlPlane.xdsProtocol). Subscribes to nodemesh's types as
wildcards, ACKs or NACKs each response, and hands every accepted, complete
Snapshot on. With Delta a change carries only the resources that changed, and
a reconnect sends the versions held (initial_resource_versions), so the
control plane sends only what the agent lacks.

The last good snapshot survives stream failures; the client reconnects with
capped exponential backoff and jitter (the agent's one reconnect loop,
nodeagent/cpchannel.py keep_connected).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

import nodemesh
from nodeagent import cpchannel
from nodeagent.meshview.snapshot import LocalWorkload, Snapshot
from nodeagent.xds.convert import ApplyResult, NamedResource, XdsState
from nodemesh import xdsnames

log = logging.getLogger(__name__)

DELTA = "delta"
SOTW = "sotw"
PROTOCOLS = (DELTA, SOTW)
WILDCARD = "*"


def node_proto(node_name: str, zone: str = "") -> base_pb2.Node:
    node = base_pb2.Node(id=node_name, cluster="nodemesh", user_agent_name="nodemesh-agent",
                         user_agent_version=nodemesh.__version__)
    node.metadata.update({"agent_version": nodemesh.__version__, "node_name": node_name})
    if zone:
        node.locality.zone = zone
    return node


def ack(type_url: str, response: discovery_pb2.DiscoveryResponse) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=response.version_info,
                                          response_nonce=response.nonce)


def nack(type_url: str, previous_version: str, response: discovery_pb2.DiscoveryResponse,
         errors: Sequence[str]) -> discovery_pb2.DiscoveryRequest:
    # INVALID_ARGUMENT (3): the resources, not the transport, are at fault.
    detail = status_pb2.Status(code=3, message="; ".join(errors))
    return discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=previous_version,
                                          response_nonce=response.nonce, error_detail=detail)


def delta_ack(response: discovery_pb2.DeltaDiscoveryResponse) -> discovery_pb2.DeltaDiscoveryRequest:
    return discovery_pb2.DeltaDiscoveryRequest(type_url=response.type_url, response_nonce=response.nonce)


def delta_nack(response: discovery_pb2.DeltaDiscoveryResponse,
               errors: Sequence[str]) -> discovery_pb2.DeltaDiscoveryRequest:
    detail = status_pb2.Status(code=3, message="; ".join(errors))
    return discovery_pb2.DeltaDiscoveryRequest(type_url=response.type_url, response_nonce=response.nonce,
                                               error_detail=detail)


class AdsClient(cpchannel.KeptSession):
    what = "xDS"

    def __init__(
        self,
        target: str,
        node_name: str,
        local_workloads: Sequence[LocalWorkload],
        on_snapshot: Callable[[Snapshot], None],
        *,
        zone: str = "",
        on_connection: Callable[[bool], None] | None = None,
        types: Sequence[str] = xdsnames.AGENT_TYPES,
        backoff_initial_s: float = cpchannel.BACKOFF_INITIAL_S,
        backoff_cap_s: float = cpchannel.BACKOFF_CAP_S,
        protocol: str = DELTA,
        depends_on: Sequence[str] | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"xDS protocol {protocol!r} must be one of {', '.join(PROTOCOLS)}")
        super().__init__(on_connection=on_connection, backoff_initial_s=backoff_initial_s,
                         backoff_cap_s=backoff_cap_s)
        self.protocol = protocol
        # Scoped discovery (Delta): endpoints only of these services ("namespace/name");
        # None: of every service the node knows. See docs/architecture.md.
        self.depends_on = frozenset(depends_on) if depends_on is not None else None
        self._eds_globs: set[str] = set()  # endpoint-slice globs subscribed on this stream
        self._eds_sent = False  # an ENDPOINT request went out on this stream
        self._wl_names: set[str] = set()  # Workload names subscribed on this stream (Delta)
        self._wl_sent = False  # a WORKLOAD request went out on this stream
        self._outbox: asyncio.Queue[object] | None = None  # the open stream's requests
        self.target = target
        self.node_name = node_name
        self.zone = zone
        self.types = tuple(types)
        self.state = XdsState(node=node_name, local_workloads=tuple(local_workloads), types=self.types)
        self._on_snapshot = on_snapshot
        self.acks = 0
        self.nacks = 0
        self.last_error = ""

    @property
    def snapshot(self) -> Snapshot | None:
        return self.state.snapshot

    def set_local_workloads(self, local_workloads: Sequence[LocalWorkload]) -> None:
        """Apply a reloaded workload list; publishes a new snapshot if one exists.
        Raises SnapshotError (nothing changes) if the list is inconsistent."""
        snap = self.state.set_local_workloads(local_workloads)
        if snap is not None:
            self._on_snapshot(snap)
        if self._outbox is not None and self.protocol == DELTA:
            follow = self.workload_subscription_update()
            if follow is not None:
                self._outbox.put_nowait(follow)

    def _ended(self, reason: str, delay: float) -> None:
        self._set_connected(False)
        self.last_error = reason
        log.warning("xDS stream to %s ended (%s): is the control plane at %s reachable and serving ADS? "
                    "keeping the last good snapshot (%s); reconnecting in %.1fs",
                    self.target, reason, self.target, self.snapshot.version if self.snapshot else "none yet", delay)

    def initial_requests(self) -> list[discovery_pb2.DiscoveryRequest]:
        """One wildcard subscription per type. On a reconnect the versions we
        hold are sent, so the server can tell what we already have."""
        node = node_proto(self.node_name, self.zone)
        return [
            discovery_pb2.DiscoveryRequest(node=node, type_url=t, version_info=self.state.versions.get(t, ""))
            for t in self.types
        ]

    def initial_delta_requests(self) -> list[discovery_pb2.DeltaDiscoveryRequest]:
        """One explicit wildcard subscription per type, with the version of every
        resource already held (after a reconnect), so that only what changed
        meanwhile is sent again."""
        node = node_proto(self.node_name, self.zone)
        out = []
        self._eds_globs, self._eds_sent = set(), False
        self._wl_names, self._wl_sent = set(), False
        for t in self.types:
            if t == xdsnames.WORKLOAD:
                # Workloads by name: this node's own and those behind the endpoints it
                # holds, never the mesh's (issue 13: every node got every Workload).
                names = self.wanted_workload_names()
                if not names:
                    continue
                self._wl_names, self._wl_sent = set(names), True
                out.append(discovery_pb2.DeltaDiscoveryRequest(
                    node=node, type_url=t, resource_names_subscribe=sorted(names),
                    initial_resource_versions=self.state.resource_versions.get(t, {})))
                continue
            if t == xdsnames.ENDPOINT:
                # Endpoints by slice glob per wanted cluster, never by wildcard; with no
                # cluster known yet the request waits for the first Cluster response.
                globs = self.wanted_slice_globs()
                if not globs:
                    continue
                self._eds_globs, self._eds_sent = set(globs), True
                out.append(discovery_pb2.DeltaDiscoveryRequest(
                    node=node, type_url=t, resource_names_subscribe=sorted(globs),
                    initial_resource_versions=self.state.resource_versions.get(t, {})))
                continue
            out.append(discovery_pb2.DeltaDiscoveryRequest(
                node=node, type_url=t, resource_names_subscribe=[WILDCARD],
                initial_resource_versions=self.state.resource_versions.get(t, {})))
        return out

    def wanted_slice_globs(self) -> set[str]:
        """The endpoint-slice globs for the clusters this node needs: every
        cluster it knows, or only those of its declared dependencies."""
        return {xdsnames.slice_glob(name) for name, c in self.state.resources.clusters.items()
                if self.depends_on is None or f"{c.namespace}/{c.service}" in self.depends_on}

    def wanted_workload_names(self) -> set[str]:
        """The Workload resources this node needs: its own workloads, and the
        workload of every endpoint it holds (so endpoints, subsets, telemetry and
        `nodemesh explain` know their peers) and no other."""
        names = {xdsnames.workload_resource_name(self.node_name, lw.namespace, lw.name)
                 for lw in self.state.local_workloads}
        for la in self.state.resources.assignments.values():
            for ep in la.endpoints:
                namespace, _, name = ep.workload.partition("/")
                if name:
                    names.add(xdsnames.workload_resource_name(ep.node, namespace, name))
        return names

    def workload_subscription_update(self) -> discovery_pb2.DeltaDiscoveryRequest | None:
        """After the endpoints or the local workloads changed: the WORKLOAD
        (un)subscription to send, if any. Workloads no longer wanted are dropped
        here (the server sends no removals for what a client unsubscribes)."""
        if xdsnames.WORKLOAD not in self.types:
            return None
        wanted = self.wanted_workload_names()
        add, drop = wanted - self._wl_names, self._wl_names - wanted
        if drop:
            held = self.state.resources.workloads
            gone = [n for n in drop if n in held]
            if gone:
                self._after_accept(self.state.apply_delta(
                    xdsnames.WORKLOAD, self.state.versions.get(xdsnames.WORKLOAD, ""), [], gone, {}))
        if (not self._wl_sent and not wanted and xdsnames.WORKLOAD not in self.state.versions
                and xdsnames.ENDPOINT in self.state.versions):
            # No own workloads and no endpoints: that is a complete (empty) workload set.
            self._after_accept(self.state.apply_delta(xdsnames.WORKLOAD, "none", [], [], {}))
            return None
        if not add and not drop:
            return None
        self._wl_names = set(wanted)
        first = not self._wl_sent
        self._wl_sent = True
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=xdsnames.WORKLOAD, resource_names_subscribe=sorted(add),
                                                  resource_names_unsubscribe=sorted(drop))
        if first:
            req.initial_resource_versions.update(self.state.resource_versions.get(xdsnames.WORKLOAD, {}))
        return req

    def endpoint_subscription_update(self) -> discovery_pb2.DeltaDiscoveryRequest | None:
        """After the clusters changed: the ENDPOINT (un)subscription to send, if any.
        Slices of clusters no longer wanted are dropped here (the server does not
        send removals for what a client unsubscribes)."""
        if xdsnames.ENDPOINT not in self.types:
            return None
        wanted = self.wanted_slice_globs()
        add, drop = wanted - self._eds_globs, self._eds_globs - wanted
        if drop:
            prefixes = tuple(g[:-1] for g in drop)
            held = self.state.resources.assignments
            gone = [n for n in held if n.startswith(prefixes)]
            if gone:
                self._after_accept(self.state.apply_delta(
                    xdsnames.ENDPOINT, self.state.versions.get(xdsnames.ENDPOINT, ""), [], gone, {}))
        if not self._eds_sent and not wanted and xdsnames.ENDPOINT not in self.state.versions:
            # No cluster needs endpoints: that is a complete (empty) endpoint set.
            self._after_accept(self.state.apply_delta(xdsnames.ENDPOINT, "none", [], [], {}))
            return None
        if not add and not drop:
            return None
        self._eds_globs = set(wanted)
        first = not self._eds_sent
        self._eds_sent = True
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=xdsnames.ENDPOINT, resource_names_subscribe=sorted(add),
                                                  resource_names_unsubscribe=sorted(drop))
        if first:
            req.initial_resource_versions.update(self.state.resource_versions.get(xdsnames.ENDPOINT, {}))
        return req

    async def _session(self) -> bool:
        """One stream; returns whether any response arrived (resets backoff)."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        delta = self.protocol == DELTA
        for r in self.initial_delta_requests() if delta else self.initial_requests():
            queue.put_nowait(r)

        async def requests() -> AsyncIterator[object]:
            while True:
                yield await queue.get()

        self._outbox = queue
        try:
            return await self._stream(queue, requests(), delta)
        finally:
            self._outbox = None

    async def _stream(self, queue: asyncio.Queue[object], requests: AsyncIterator[object], delta: bool) -> bool:
        got_response = False
        async with cpchannel.open_channel(self.target) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = (stub.DeltaAggregatedResources(requests) if delta
                    else stub.StreamAggregatedResources(requests))
            log.info("xDS: connecting to %s as node %s (%s)", self.target, self.node_name,
                     "Delta" if delta else "state of the world")
            async for response in call:
                if not got_response:
                    got_response = True
                    self._set_connected(True)
                    log.info("xDS: connected to %s", self.target)
                if delta:
                    queue.put_nowait(self.handle_delta_response(response))
                    if response.type_url == xdsnames.CLUSTER:
                        follow = self.endpoint_subscription_update()
                        if follow is not None:
                            queue.put_nowait(follow)
                    if response.type_url in (xdsnames.CLUSTER, xdsnames.ENDPOINT):
                        wl_follow = self.workload_subscription_update()
                        if wl_follow is not None:
                            queue.put_nowait(wl_follow)
                else:
                    queue.put_nowait(self.handle_response(response))
        return got_response

    def handle_delta_response(self, response: discovery_pb2.DeltaDiscoveryResponse
                              ) -> discovery_pb2.DeltaDiscoveryRequest:
        """Apply one Delta response and return the ACK or NACK to send."""
        type_url = response.type_url
        if type_url not in self.types:
            self.nacks += 1
            return delta_nack(response, [f"type {type_url} was not subscribed to"])
        result = self.state.apply_delta(
            type_url, response.system_version_info,
            [NamedResource(r.name, r.resource) for r in response.resources],
            list(response.removed_resources), {r.name: r.version for r in response.resources})
        if not result.accepted:
            self.nacks += 1
            self.last_error = result.error_detail
            log.error("xDS: rejected a Delta %s response (%d resources, %d removed): %s; the previous copies "
                      "stay in force", type_url.rsplit(".", 1)[-1], len(response.resources),
                      len(response.removed_resources), result.error_detail)
            return delta_nack(response, result.errors)
        self.acks += 1
        self._after_accept(result)
        return delta_ack(response)

    def handle_response(self, response: discovery_pb2.DiscoveryResponse) -> discovery_pb2.DiscoveryRequest:
        """Apply one response and return the ACK or NACK to send."""
        type_url = response.type_url
        if type_url not in self.types:
            self.nacks += 1
            return nack(type_url, "", response, [f"type {type_url} was not subscribed to"])
        previous = self.state.versions.get(type_url, "")
        result = self.state.apply(type_url, response.version_info,
                                  [NamedResource("", r) for r in response.resources])
        if not result.accepted:
            self.nacks += 1
            self.last_error = result.error_detail
            log.error("xDS: rejected %s version %s: %s; still serving version %s of that type",
                      type_url.rsplit(".", 1)[-1], response.version_info, result.error_detail, previous or "none")
            return nack(type_url, previous, response, result.errors)
        self.acks += 1
        log.debug("xDS: accepted %s version %s (%d resources)", type_url, response.version_info,
                  len(response.resources))
        self._after_accept(result)
        return ack(type_url, response)

    def _after_accept(self, result: ApplyResult) -> None:
        if result.snapshot is not None:
            log.info("xDS: snapshot %s (%d services, %d workloads)", result.snapshot.version,
                     len(result.snapshot.services), len(result.snapshot.workloads))
            self._on_snapshot(result.snapshot)
        elif not self.state.complete:
            waiting = [t.rsplit(".", 1)[-1] for t in self.types if t not in self.state.versions]
            log.info("xDS: waiting for the first %s before publishing a snapshot", ", ".join(waiting))
