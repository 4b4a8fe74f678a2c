"""The control plane's own metrics: xDS streams, pushes, ACKs and NACKs, the
config version, proxies connected, and push latency (the time from a change,
such as an apply or a node joining, to each node's ACK of the snapshot built
from it). Rendered in the Prometheus text format on the mesh view's /metrics.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from nodemesh.prom import Registry, render

PUSH_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
MAX_TRACKED_VERSIONS = 256


class ControlPlaneMetrics:
    """Observer of the snapshot publisher (changed / published) and of the ADS
    servicer's ACKs; the rest is read from the control plane's state at scrape time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.registry = Registry()
        self.push_latency = self.registry.histogram(
            "nodemesh_controlplane_push_latency_seconds",
            "From a config or registry change to a node's ACK of the snapshot built from it.",
            ("type",), buckets=PUSH_LATENCY_BUCKETS_S)
        self.pushes = self.registry.counter("nodemesh_controlplane_snapshots_published_total",
                                            "xDS snapshots built and handed to the cache.")
        self.acks = self.registry.counter("nodemesh_controlplane_xds_acks_total", "xDS ACKs by type.", ("type",))
        self.nacks = self.registry.counter("nodemesh_controlplane_xds_nacks_total", "xDS NACKs by node and type.",
                                           ("node", "type"))
        self._dirty_since: float | None = None
        self._version_time: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._acked: dict[tuple[str, str], str] = {}

    @staticmethod
    def _short(type_url: str) -> str:
        return type_url.rsplit(".", 1)[-1]

    # -- hooks --
    def changed(self) -> None:
        if self._dirty_since is None:
            self._dirty_since = self._clock()

    def published(self, snapshot: Any) -> None:
        """`snapshot` is an xds.cache.XdsSnapshot: remember when each new version's change began."""
        t0 = self._dirty_since if self._dirty_since is not None else self._clock()
        self._dirty_since = None
        self.pushes.inc()
        for type_url, tr in getattr(snapshot, "types", {}).items():
            key = (type_url, tr.version)
            if key not in self._version_time:
                self._version_time[key] = t0
        while len(self._version_time) > MAX_TRACKED_VERSIONS:
            self._version_time.popitem(last=False)

    def acked(self, node: str, type_url: str, version: str) -> None:
        self.acks.inc({"type": self._short(type_url)})
        if self._acked.get((node, type_url)) == version:
            return  # a re-ACK of what the node already had: no push happened
        self._acked[(node, type_url)] = version
        t0 = self._version_time.get((type_url, version))
        if t0 is not None:
            self.push_latency.observe({"type": self._short(type_url)}, max(0.0, self._clock() - t0))

    def nacked(self, node: str, type_url: str) -> None:
        self.nacks.inc({"node": node, "type": self._short(type_url)})

    def forget_node(self, node: str) -> None:
        """The node left the mesh: drop its per-node state and series, so a fleet
        whose nodes come and go does not grow this without bound."""
        for key in [k for k in self._acked if k[0] == node]:
            del self._acked[key]
        for labels in self.nacks.collect().series:
            if labels and labels[0] == node:
                self.nacks.remove(dict(zip(self.nacks.labelnames, labels)))

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
        r.gauge("nodemesh_controlplane_nodes_registered", "Nodes holding a registry lease.").set(
            None, len(cp.registry.nodes()))
        r.gauge("nodemesh_controlplane_workloads_registered", "Workloads on registered nodes.").set(
            None, sum(len(n.workloads) for n in cp.registry.nodes()))
        r.gauge("nodemesh_controlplane_config_revision", "The config store's revision.").set(
            None, cp.store.revision())
        return render(r.collect())
