"""Cluster.health_checks (standard Envoy HealthCheck) into the frozen
nodemesh.healthcheckspec.HealthCheck the agent's health monitor runs. A field
nodemesh does not implement is refused by name (that becomes the NACK)."""

from __future__ import annotations

import dataclasses

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from google.protobuf import duration_pb2

from nodemesh.healthcheckspec import HealthCheck


class HealthCheckError(ValueError):
    """A health check the agent cannot run; the message names the field."""


def _secs(d: duration_pb2.Duration) -> float:
    return float(d.seconds) + float(d.nanos) / 1e9


def convert_health_check(hc: health_check_pb2.HealthCheck, what: str = "health_checks[0]") -> HealthCheck:
    kind = hc.WhichOneof("health_checker")
    if kind not in ("http_health_check", "grpc_health_check", "tcp_health_check"):
        raise HealthCheckError(f"{what}: {kind or 'no health checker'} is not supported; "
                               "use http_health_check, grpc_health_check or tcp_health_check")
    interval = _secs(hc.interval)
    timeout = _secs(hc.timeout)
    if interval <= 0 or timeout <= 0:
        raise HealthCheckError(f"{what}: interval and timeout must be positive")
    if hc.HasField("alt_port") or hc.HasField("tls_options"):
        raise HealthCheckError(f"{what}: alt_port and tls_options are not supported")
    healthy = hc.healthy_threshold.value if hc.HasField("healthy_threshold") else 1
    unhealthy = hc.unhealthy_threshold.value if hc.HasField("unhealthy_threshold") else 2
    if healthy < 1 or unhealthy < 1:
        raise HealthCheckError(f"{what}: thresholds must be at least 1")
    base = HealthCheck("tcp", 0, interval, timeout, _secs(hc.interval_jitter) if hc.HasField("interval_jitter")
                       else 0.0, healthy, unhealthy)
    if kind == "http_health_check":
        h = hc.http_health_check
        if h.send.ByteSize() or h.receive or h.method:
            raise HealthCheckError(f"{what}.http_health_check: send, receive and method are not supported")
        path = h.path or "/"
        if not path.startswith("/") or any(ch in path for ch in " \r\n"):
            raise HealthCheckError(f"{what}.http_health_check.path: {path!r} is not a request path")
        statuses = tuple((int(r.start), int(r.end) - 1) for r in h.expected_statuses)
        if any(lo > hi for lo, hi in statuses):
            raise HealthCheckError(f"{what}.http_health_check.expected_statuses: an empty range")
        return dataclasses.replace(base, kind="http", http_path=path,
                                   expected_statuses=statuses or base.expected_statuses)
    if kind == "grpc_health_check":
        return dataclasses.replace(base, kind="grpc", grpc_service=hc.grpc_health_check.service_name)
    t = hc.tcp_health_check
    if t.send.ByteSize() or len(t.receive):
        raise HealthCheckError(f"{what}.tcp_health_check: send and receive payloads are not supported")
    return base


def cluster_health_check(msg: cluster_pb2.Cluster) -> HealthCheck | None:
    """The cluster's health check; a nodemesh cluster (one service port) has at most one."""
    if not msg.health_checks:
        return None
    if len(msg.health_checks) > 1:
        raise HealthCheckError(f"health_checks: {len(msg.health_checks)} given; nodemesh runs one per cluster")
    return convert_health_check(msg.health_checks[0])
