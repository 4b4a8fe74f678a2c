"""Version subsets of a service in xDS: a Cluster (and its ClusterLoadAssignment)
per (service port, label subset) that a route or a Rollout needs, and the
weighted split a Rollout puts on the service's routes.

A subset cluster is the service port's cluster under another name
(`outbound|<port>|version=v2|<host>`, nodemesh.xdsnames) with metadata
"subset"; Envoy and proxyless gRPC read it as an ordinary EDS cluster, the node
agent attaches it to its service port (nodeagent/xds/convert.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2

from nodemesh import model, routespec, xdsnames

Subset = tuple[tuple[str, str], ...]  # sorted (label, value) pairs


@dataclass(frozen=True)
class VersionSplit:
    """What a Rollout asks of the data plane for one service: the share of each
    version (percent, summing to 100) and the versions withdrawn from routing."""

    service: str  # "<namespace>/<name>"
    label: str  # the version label
    weights: tuple[tuple[str, int], ...]  # (version, percent); zero weights included (warm, routable)
    retired: tuple[str, ...] = ()

    def subsets(self) -> list[Subset]:
        return [((self.label, v),) for v, _ in self.weights]

    def excludes(self, labels: Mapping[str, str]) -> bool:
        """Whether a workload belongs to a retired version (its endpoints are withdrawn)."""
        return labels.get(self.label) in self.retired


def split_for(splits: Sequence[VersionSplit], svc: model.ServiceSpec) -> VersionSplit | None:
    return next((s for s in splits if s.service == svc.key), None)


def matches(subset: Subset, labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in subset)


def needed_subsets(services: Sequence[model.ServiceSpec], stored_routes: Iterable[Any],
                   splits: Sequence[VersionSplit]) -> dict[str, set[Subset]]:
    """Service key -> subsets some route's backendRef or some Rollout refers to."""
    out: dict[str, set[Subset]] = {}
    known = {s.key for s in services}
    for sr in stored_routes:
        r = getattr(sr, "route", sr)
        for rule in r.rules:
            for b in rule.backends:
                key = f"{r.namespace}/{b.service}"
                if b.subset and key in known:
                    out.setdefault(key, set()).add(b.subset)
    for sp in splits:
        if sp.service in known:
            out.setdefault(sp.service, set()).update(sp.subsets())
    return out


def subset_cluster(base: cluster_pb2.Cluster, svc: model.ServiceSpec, port: model.ServicePortSpec, subset: Subset,
                   dns_domain: str) -> cluster_pb2.Cluster:
    """The port's cluster (policy and all) renamed for one subset."""
    c = cluster_pb2.Cluster()
    c.CopyFrom(base)
    name = routespec.subset_name(subset)
    c.name = xdsnames.cluster_name(svc.name, svc.namespace, port.port, dns_domain, name)
    c.metadata.filter_metadata[xdsnames.METADATA_KEY].update({"subset": name})
    return c


def split_targets(split: VersionSplit, svc: model.ServiceSpec, port: int, dns_domain: str,
                  scale: int = 1) -> list[tuple[str, int]]:
    """The weighted subset clusters that replace the whole service in a route."""
    return [(xdsnames.cluster_name(svc.name, svc.namespace, port, dns_domain,
                                   routespec.subset_name(((split.label, v),))),
             w * scale) for v, w in split.weights if w > 0]
