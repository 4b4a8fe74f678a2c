"""Rollout analysis input: the golden metrics the agents already send on every
registry heartbeat (nodeagent.supervision.admin.summarize: cumulative counts per source
workload -> destination service -> destination workload edge, with latency
bucket counts), kept as the latest summary per node. A version's reading is
the sum over the source-side edges into the service whose destination workload
carries the version label; an interval's reading is the difference between
two such sums, taken per node so an agent restart (counters back to zero)
counts as a fresh start rather than negative traffic. Pure, no I/O.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from controlplane.rollout.machine import Stats
from nodemesh.prom import histogram_quantile

log = logging.getLogger(__name__)

MAX_SUMMARY_BYTES = 256 * 1024
STALE_AFTER_S = 60.0


@dataclass(frozen=True)
class VersionCounters:
    """Cumulative counts for one version on one node."""

    requests: float = 0.0
    failures: float = 0.0
    tcp_closed: float = 0.0
    tcp_failed: float = 0.0
    traffic: float = 0.0  # requests + opened connections + bytes, any reporter (retirement)
    hist: tuple[float, ...] = ()
    open_connections: float = 0.0  # opened minus closed now: bytes are only counted at close

    def minus(self, base: VersionCounters | None) -> VersionCounters:
        """This minus an earlier reading; a counter that went down is an agent restart:
        everything counted since then is the interval's."""
        if base is None:
            return self
        fields = (self.requests, self.failures, self.tcp_closed, self.tcp_failed, self.traffic)
        olds = (base.requests, base.failures, base.tcp_closed, base.tcp_failed, base.traffic)
        if any(a < b for a, b in zip(fields, olds, strict=True)) or (base.hist and len(base.hist) != len(self.hist)) \
                or any(a < b for a, b in zip(self.hist, base.hist, strict=False)):  # an empty base.hist: nothing
            return self
        hist = tuple(a - b for a, b in zip(self.hist, base.hist, strict=True)) if base.hist else self.hist
        d = [a - b for a, b in zip(fields, olds, strict=True)]
        return VersionCounters(d[0], d[1], d[2], d[3], d[4], hist, self.open_connections)

    def plus(self, other: VersionCounters) -> VersionCounters:
        if self.hist and other.hist and len(self.hist) == len(other.hist):
            hist = tuple(a + b for a, b in zip(self.hist, other.hist, strict=True))
        else:
            hist = self.hist or other.hist
        return VersionCounters(self.requests + other.requests, self.failures + other.failures,
                        self.tcp_closed + other.tcp_closed, self.tcp_failed + other.tcp_failed,
                        self.traffic + other.traffic, hist, self.open_connections + other.open_connections)


Snapshot = dict[str, VersionCounters]  # node -> cumulative counters of one version


def interval_stats(now: Snapshot, base: Snapshot | None, buckets: tuple[float, ...]) -> tuple[Stats, float]:
    """(Stats over the interval, traffic) from two snapshots of one version; traffic
    counts what moved in the interval plus the connections open now."""
    total = VersionCounters()
    for node, c in now.items():
        total = total.plus(c.minus((base or {}).get(node)))
    p99 = None
    if total.hist and sum(total.hist) > 0 and buckets:
        p99 = histogram_quantile(buckets, list(total.hist), 0.99)
    traffic = total.traffic + total.open_connections
    if total.requests > 0:
        return Stats(total.requests, min(total.failures, total.requests), p99), traffic
    return Stats(total.tcp_closed, total.tcp_failed, None), traffic


class Readings:
    """The latest telemetry summary per node (fed by the registry servicer)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.latest: dict[str, tuple[float, dict[str, object]]] = {}
        self.buckets: tuple[float, ...] = ()

    def ingest(self, node: str, text: str) -> None:
        if len(text) > MAX_SUMMARY_BYTES:
            log.warning("node %s sent a %d-byte telemetry summary (limit %d): ignored for rollouts", node,
                        len(text), MAX_SUMMARY_BYTES)
            return
        try:
            d = json.loads(text)
        except ValueError:
            log.warning("node %s sent a telemetry summary that is not JSON: ignored for rollouts", node)
            return
        if not isinstance(d, dict) or not isinstance(d.get("edges"), list):
            return
        b = d.get("latency_buckets_ms")
        if isinstance(b, list) and b and all(isinstance(x, (int, float)) for x in b):
            self.buckets = tuple(float(x) for x in b)
        self.latest[node] = (self._clock(), d)

    def forget(self, node: str) -> None:
        self.latest.pop(node, None)

    def version(self, service: str, workloads: Collection[str], grpc_failures: Collection[int]) -> Snapshot:
        """Cumulative counters per node for the workloads of one version: requests and
        outcomes through `service` (source side), and all traffic they carried."""
        out: Snapshot = {}
        now = self._clock()
        codes = {str(c) for c in grpc_failures}
        for node, (t, summary) in self.latest.items():
            if now - t > STALE_AFTER_S:
                continue
            c = VersionCounters()
            edges = summary.get("edges")
            for e in edges if isinstance(edges, list) else ():
                if not isinstance(e, dict) or e.get("destination_workload") not in workloads:
                    continue
                # Bytes too: a long-lived connection carries traffic without new requests or connections.
                traffic = _num(e, "requests") + _num(e, "tcp_opened") + _num(e, "bytes_sent") + \
                    _num(e, "bytes_received")
                # Any traffic to the version counts against retiring it (by its workload
                # address too, not only through the service); analysis reads only the
                # service's callers, as their proxies saw them.
                open_now = max(0.0, _num(e, "tcp_opened") - _num(e, "tcp_closed"))
                if e.get("reporter") != "source" or e.get("destination_service_key") != service:
                    c = c.plus(VersionCounters(traffic=traffic, open_connections=open_now))
                    continue
                gs = e.get("grpc_status")
                grpc_failed = sum(_num(gs, k) for k in gs if k in codes) if isinstance(gs, dict) else 0.0
                hist = e.get("latency_hist")
                c = c.plus(VersionCounters(_num(e, "requests"), _num(e, "errors") + grpc_failed, _num(e, "tcp_closed"),
                                    _num(e, "tcp_failed"), traffic,
                                    tuple(float(x) for x in hist) if isinstance(hist, list) else (), open_now))
            out[node] = c
        return out


def _num(d: Mapping[str, object], key: str) -> float:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else 0.0
