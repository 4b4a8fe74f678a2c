"""Active health check config: the `healthChecks` list of a DestinationPolicy,
one entry per service port, parsed into frozen HealthCheck values. Shared by
the control plane (validation, xDS translation) and the agent (which runs the
checks on its own node's endpoints, nodeagent/observe/healthprober.py).

```yaml
healthChecks:
- port: 80                 # a service port; omitted: every port of the service
  interval: 1s
  timeout: 500ms
  jitter: 100ms            # each wait is interval + uniform(0, jitter)
  healthyThreshold: 1      # consecutive passes to come back
  unhealthyThreshold: 2    # consecutive failures to be taken out
  http: {path: /healthz, expectedStatuses: [200, "300-399"]}   # or grpc: {service: ""} or tcp: {}
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from nodemesh.fieldcheck import FieldChecker

KINDS = ("http", "grpc", "tcp")
DEFAULT_STATUSES = ((200, 399),)  # inclusive ranges; Kubernetes probes accept 200..399 too
_RANGE = re.compile(r"^(\d{3})-(\d{3})$")
_GRPC_SERVICE = re.compile(r"^[A-Za-z0-9_.]*$")


@dataclass(frozen=True)
class HealthCheck:
    kind: str  # http | grpc | tcp
    port: int = 0  # service port it applies to; 0 = every port
    interval_s: float = 1.0
    timeout_s: float = 0.5
    jitter_s: float = 0.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 2
    http_path: str = "/"
    expected_statuses: tuple[tuple[int, int], ...] = DEFAULT_STATUSES  # inclusive (lo, hi)
    grpc_service: str = ""  # grpc.health.v1 HealthCheckRequest.service; "" = the whole server

    def status_ok(self, status: int) -> bool:
        return any(lo <= status <= hi for lo, hi in self.expected_statuses)


def _statuses(c: FieldChecker, raw: Any, path: str) -> tuple[tuple[int, int], ...]:
    if raw is None:
        return DEFAULT_STATUSES
    out: list[tuple[int, int]] = []
    items = c.entries(raw, path)
    if isinstance(raw, list) and not raw:
        c.add(path, "must not be empty; omit it for the default 200-399")
    for i, v in enumerate(items):
        p = f"{path}[{i}]"
        if isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599:
            out.append((v, v))
            continue
        m = _RANGE.match(v) if isinstance(v, str) else None
        if m is None:
            c.add(p, "must be a status code (100..599) or an inclusive range like \"200-299\"")
            continue
        lo, hi = int(m.group(1)), int(m.group(2))
        if not 100 <= lo <= hi <= 599:
            c.add(p, f"range {v!r} must satisfy 100 <= low <= high <= 599")
            continue
        out.append((lo, hi))
    return tuple(out) or DEFAULT_STATUSES


def parse_health_checks(c: FieldChecker, raw: Any, path: str = "spec.healthChecks") -> tuple[HealthCheck, ...]:
    """Validate a DestinationPolicy's healthChecks list; every problem names its field path."""
    out: list[HealthCheck] = []
    seen: dict[int, int] = {}
    for i, item in enumerate(c.entries(raw, path)):
        p = f"{path}[{i}]"
        d = c.mapping(item, p, ("port", "interval", "timeout", "jitter", "healthyThreshold", "unhealthyThreshold",
                            *KINDS), required=True) or {}
        port = c.integer(d.get("port"), f"{p}.port", 1, 65535, 0)
        if port in seen:
            what = f"port {port}" if port else "every port (no port)"
            c.add(f"{p}.port", f"{what} already has a health check at {path}[{seen[port]}]; give one per port")
        seen[port] = i
        interval = c.duration(d.get("interval"), f"{p}.interval", 1.0)
        timeout = c.duration(d.get("timeout"), f"{p}.timeout", min(0.5, interval))
        jitter = c.duration(d.get("jitter"), f"{p}.jitter", 0.0)
        if interval < 0.05:
            c.add(f"{p}.interval", "must be at least 50ms")
        if timeout <= 0:
            c.add(f"{p}.timeout", "must be positive")
        elif timeout > interval:
            c.add(f"{p}.timeout", "must not exceed interval (checks of one endpoint never overlap)")
        if jitter > interval:
            c.add(f"{p}.jitter", "must not exceed interval")
        healthy = c.integer(d.get("healthyThreshold"), f"{p}.healthyThreshold", 1, 100, 1)
        unhealthy = c.integer(d.get("unhealthyThreshold"), f"{p}.unhealthyThreshold", 1, 100, 2)
        kinds = [k for k in KINDS if k in d]
        if len(kinds) != 1:
            c.add(p, f"give exactly one of http, grpc, tcp (got {', '.join(kinds) or 'none'})")
            continue
        kind = kinds[0]
        hc = HealthCheck(kind, port, interval, timeout, jitter, healthy, unhealthy)
        if kind == "http":
            hd = c.mapping(d["http"], f"{p}.http", ("path", "expectedStatuses"), required=True) or {}
            hpath = c.text(hd.get("path", "/"), f"{p}.http.path") or "/"
            if not hpath.startswith("/") or any(ch in hpath for ch in " \r\n"):
                c.add(f"{p}.http.path", "must start with '/' and contain no spaces or line breaks")
            hc = HealthCheck(kind, port, interval, timeout, jitter, healthy, unhealthy, hpath,
                             _statuses(c, hd.get("expectedStatuses"), f"{p}.http.expectedStatuses"))
        elif kind == "grpc":
            gd = c.mapping(d["grpc"] if d["grpc"] is not None else {}, f"{p}.grpc", ("service",)) or {}
            svc = c.text(gd.get("service"), f"{p}.grpc.service")
            if not _GRPC_SERVICE.match(svc):
                c.add(f"{p}.grpc.service", f"{svc!r} is not a gRPC service name")
            hc = HealthCheck(kind, port, interval, timeout, jitter, healthy, unhealthy, grpc_service=svc)
        else:
            c.mapping(d["tcp"] if d["tcp"] is not None else {}, f"{p}.tcp", ())
        out.append(hc)
    return tuple(out)


def for_port(checks: tuple[HealthCheck, ...], port: int) -> HealthCheck | None:
    """The check that applies to a service port: its own entry, else the portless one."""
    exact = [h for h in checks if h.port == port]
    if exact:
        return exact[0]
    generic = [h for h in checks if h.port == 0]
    return generic[0] if generic else None
