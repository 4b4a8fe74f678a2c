"""The control plane's own metrics: xDS streams, pushes, ACKs and NACKs, the
config version, proxies connected, and the cost of each push: push latency
(from a response being handed to a stream to the client's ACK of it, per type;
controlplane/xds/sync.py keeps the send times), fan-out duration (from a new
snapshot to the last stream's response), bytes per response, and per-node
queue depth (snapshot versions a node's stream has yet to catch up on, and
responses sent and not yet answered). Rendered in the Prometheus
text format on the mesh view's /metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from nodemesh.prom import Registry, render

PUSH_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOOP_LAG_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BYTES_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)


class ControlPlaneMetrics:
    """Observer of the snapshot publisher (changed / published / fanned_out) and
    of the ADS sync tracker (pushed / acked / nacked); the rest is read from the
    control plane's state at scrape time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.registry = Registry()
        self.push_latency = self.registry.histogram(
            "nodemesh_controlplane_push_latency_seconds",
            "From an xDS response handed to a client's stream to the client's ACK of it, by type.",
            ("type",), buckets=PUSH_LATENCY_BUCKETS_S)
        self.build_duration = self.registry.histogram(
            "nodemesh_controlplane_snapshot_build_seconds",
            "From the first change of a burst to its snapshot being built (the debounce included).",
            (), buckets=PUSH_LATENCY_BUCKETS_S)
        self.fanout_duration = self.registry.histogram(
            "nodemesh_controlplane_fanout_seconds",
            "From a snapshot being set to the last waiting stream being answered.", (),
            buckets=PUSH_LATENCY_BUCKETS_S)
        self.push_bytes = self.registry.histogram(
            "nodemesh_controlplane_xds_response_bytes", "Size of each xDS response sent, by type.",
            ("type",), buckets=BYTES_BUCKETS)
        self.bytes_sent = self.registry.counter("nodemesh_controlplane_xds_bytes_sent_total",
                                                "xDS response bytes sent, by type.", ("type",))
        self.pushes = self.registry.counter("nodemesh_controlplane_snapshots_published_total",
                                            "xDS snapshots built and handed to the cache.")
        self.acks = self.registry.counter("nodemesh_controlplane_xds_acks_total", "xDS ACKs by type.", ("type",))
        self.nacks = self.registry.counter("nodemesh_controlplane_xds_nacks_total", "xDS NACKs by node and type.",
                                           ("node", "type"))
        self.loop_lag = self.registry.histogram(
            "nodemesh_controlplane_event_loop_lag_seconds",
            "How late the event loop woke a 100 ms timer (controlplane/looplag.py): new gRPC calls wait "
            "this long or more to be accepted, and gRPC cancels those that wait 30 s.", (),
            buckets=LOOP_LAG_BUCKETS_S)
        self.publish_holds = self.registry.histogram(
            "nodemesh_controlplane_publish_hold_seconds",
            "How long a snapshot rebuild waited for the previous push to be answered by the streams "
            "(SnapshotPublisher: one push in flight at a time).", (), buckets=PUSH_LATENCY_BUCKETS_S)
        self.node_expiries = self.registry.counter(
            "nodemesh_controlplane_node_expiries_total",
            "Nodes this replica expired as the leader because their lease lapsed, by how it knew the lease: "
            "'session' (the node's session was held here) or 'published' (another replica published it). "
            "The log and the audit log name each node and why.", ("cause",))
        self._dirty_since: float | None = None

    @staticmethod
    def _short(type_url: str) -> str:
        return type_url.rsplit(".", 1)[-1]

    # -- publisher hooks --
    def changed(self) -> None:
        if self._dirty_since is None:
            self._dirty_since = self._clock()

    def published(self, snapshot: Any) -> None:
        t0 = self._dirty_since if self._dirty_since is not None else self._clock()
        self._dirty_since = None
        self.pushes.inc()
        self.build_duration.observe(None, max(0.0, self._clock() - t0))

    def fanned_out(self, seconds: float) -> None:
        self.fanout_duration.observe(None, seconds)

    def held(self, seconds: float) -> None:
        self.publish_holds.observe(None, seconds)

    def lagged(self, seconds: float) -> None:
        self.loop_lag.observe(None, seconds)

    # -- sync tracker hooks (controlplane.xds.sync.SyncObserver) --
    def pushed(self, type_url: str, nbytes: int) -> None:
        t = {"type": self._short(type_url)}
        self.push_bytes.observe(t, nbytes)
        self.bytes_sent.inc(t, nbytes)

    def acked(self, node: str, type_url: str, latency_s: float) -> None:
        t = {"type": self._short(type_url)}
        self.acks.inc(t)
        self.push_latency.observe(t, latency_s)

    def nacked(self, node: str, type_url: str) -> None:
        self.nacks.inc({"node": node, "type": self._short(type_url)})

    def node_expired(self, cause: str) -> None:
        self.node_expiries.inc({"cause": cause})

    def forget_node(self, node: str) -> None:
        """The node left the mesh: drop its per-node state and series, so a fleet
        whose nodes come and go does not grow this without bound."""
        for labels in self.nacks.collect().series:
            if labels and labels[0] == node:
                self.nacks.remove(dict(zip(self.nacks.labelnames, labels, strict=True)))

    # -- scrape --
    def render(self, cp: Any) -> str:
        r = self.registry
        stats = cp.ads.stats
        r.gauge("nodemesh_controlplane_xds_streams", "ADS streams open now (proxies connected).").set(
            None, stats.streams_active)
        r.gauge("nodemesh_controlplane_xds_streams_opened", "ADS streams opened since start (a counter).").set(
            None, stats.streams_opened)
        r.gauge("nodemesh_controlplane_xds_responses", "xDS responses sent since start (a counter).").set(
            None, stats.responses)
        r.gauge("nodemesh_controlplane_xds_streams_awaiting_answer",
                "Streams sent a response their client has not answered yet (a rebuild waits for "
                "most of them, see …_publish_hold_seconds).").set(None, cp.ads.sync.awaiting_answers())
        unanswered = r.gauge("nodemesh_controlplane_xds_unanswered_responses",
                             "Responses sent to a node and not yet answered (ACK or NACK).", ("node",))
        unanswered.clear()  # nodes that left must not linger
        for c in cp.ads.sync.clients.values():
            unanswered.set({"node": c.node or f"stream-{c.stream}"}, c.queue_depth)
        depth = r.gauge("nodemesh_controlplane_xds_queue_depth",
                        "Snapshot versions a node's stream has yet to catch up on: 0 in sync, N when a type "
                        "was last delivered and answered N snapshots ago.", ("node",))
        depth.clear()
        for node, behind in cp.ads.sync.versions_behind().items():
            depth.set({"node": node}, behind)
        clients = r.gauge("nodemesh_controlplane_xds_clients", "xDS clients by sync state.", ("state",))
        for state, n in cp.ads.sync.summary().items():
            clients.set({"state": state}, n)
        r.gauge("nodemesh_controlplane_nodes_registered", "Nodes holding a registry lease.").set(
            None, len(cp.registry.nodes()))
        r.gauge("nodemesh_controlplane_workloads_registered", "Workloads on registered nodes.").set(
            None, sum(len(n.workloads) for n in cp.registry.nodes()))
        r.gauge("nodemesh_controlplane_config_revision", "The config store's revision.").set(
            None, cp.store.revision())
        leader = getattr(cp, "leader", None)
        if leader is not None:
            r.gauge("nodemesh_controlplane_leader",
                    "Whether this replica is the elected one running the singleton duties (1) or not (0).").set(
                None, 1.0 if leader.is_leader() else 0.0)
        return render(r.collect())
