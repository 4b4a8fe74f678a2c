"""A DestinationPolicy's active health checks as the standard Cluster.health_checks
field (envoy.config.core.v3.HealthCheck). Envoy runs them itself; the nodemesh
agent reads the same field (nodeagent/xds/healthconvert.py) and runs the check
only on the endpoints of its own node, reporting the verdicts back.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from google.protobuf import duration_pb2

from nodemesh import healthcheckspec, routespec


def _dur(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def to_proto(hc: healthcheckspec.HealthCheck) -> health_check_pb2.HealthCheck:
    out = health_check_pb2.HealthCheck(timeout=_dur(hc.timeout_s), interval=_dur(hc.interval_s))
    if hc.jitter_s:
        out.interval_jitter.CopyFrom(_dur(hc.jitter_s))
    out.healthy_threshold.value = hc.healthy_threshold
    out.unhealthy_threshold.value = hc.unhealthy_threshold
    if hc.kind == "http":
        out.http_health_check.path = hc.http_path
        for lo, hi in hc.expected_statuses:
            # Envoy's Int64Range is half open: [start, end).
            out.http_health_check.expected_statuses.add(start=lo, end=hi + 1)
    elif hc.kind == "grpc":
        out.grpc_health_check.service_name = hc.grpc_service
    else:
        out.tcp_health_check.SetInParent()  # no payload: a connect is the check
    return out


def apply_health_checks(cluster: cluster_pb2.Cluster, policy: routespec.DestinationPolicy | None,
                        service_port: int) -> None:
    """Add the policy's check for this service port (if any) to the port's Cluster."""
    if policy is None:
        return
    hc = healthcheckspec.for_port(policy.health_checks, service_port)
    if hc is not None:
        cluster.health_checks.append(to_proto(hc))
