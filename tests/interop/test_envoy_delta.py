"""A real Envoy 1.40 on Delta (incremental) ADS, `api_type: DELTA_GRPC`:
clusters, endpoints and routes from our control plane, traffic through it to
loopback backends, then a weighted split edit and a service deletion (a CDS
removed_resources) take effect, with every response ACKed."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from controlplane.xds.listeners import envoy_bootstrap
from nodemesh import xdsnames
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc
from tests.conftest import wait_until
from tests.interop.conftest import ControlPlaneThread, free_port


class Backend:
    """HTTP/1.1 on loopback that answers with its name."""

    def __init__(self, name: str) -> None:
        body = json.dumps({"replica": name}).encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


SERVICES = """\
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {{name: web}}
spec: {{selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080, protocol: http}}]}}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {{name: web-v1}}
spec: {{selector: {{app: web, version: v1}}, ports: [{{port: 80, targetPort: {p1}, protocol: http}}]}}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {{name: web-v2}}
spec: {{selector: {{app: web, version: v2}}, ports: [{{port: 80, targetPort: {p2}, protocol: http}}]}}
"""

ROUTE = """\
apiVersion: nodemesh.io/v1alpha1
kind: HTTPRoute
metadata: {{name: web}}
spec:
  parentRefs: [{{kind: Service, name: web, port: 80}}]
  rules:
  - backendRefs: [{{name: web-v1, port: 80, weight: {w1}}}, {{name: web-v2, port: 80, weight: {w2}}}]
"""

V1_CLUSTER = xdsnames.cluster_name("web-v1", "default", 80, "mesh")


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _replica(port: int, path: str) -> str:
    status, body = _get(port, path)
    assert status == 200, (status, body)
    return str(json.loads(body)["replica"])


def _eventually(what: str, pred: Callable[[], bool], envoy: Any, timeout: float = 20) -> None:
    def ready() -> bool:
        if envoy.proc.poll() is not None:
            raise RuntimeError(f"Envoy exited with {envoy.proc.returncode}:\n{envoy.logs()}")
        return pred()

    wait_until(ready, timeout, what, tolerate=(OSError, AssertionError), diag=lambda: f"Envoy log:\n{envoy.logs()}")


def test_envoy_on_delta_ads_follows_split_edit_and_cluster_removal(
        controlplane: ControlPlaneThread, envoy_factory: Any, tmp_path: Path) -> None:
    v1, v2 = Backend("web-v1"), Backend("web-v2")
    try:
        controlplane.apply(SERVICES.format(p1=v1.port, p2=v2.port) + "---\n" + ROUTE.format(w1=50, w2=50))
        controlplane.register_node("interop-node", [
            mesh_pb2.WorkloadRegistration(name="web-v1", namespace="default", service_account="web",
                                          labels={"app": "web", "version": "v1"}, ip="127.0.0.1", ports=[v1.port]),
            mesh_pb2.WorkloadRegistration(name="web-v2", namespace="default", service_account="web",
                                          labels={"app": "web", "version": "v2"}, ip="127.0.0.1", ports=[v2.port]),
        ])
        listen = free_port()
        route = xdsnames.cluster_name("web", "default", 80, "mesh")
        bootstrap = envoy_bootstrap("envoy-delta", "interop", controlplane.sock, [(listen, route)], free_port())
        bootstrap["dynamic_resources"]["ads_config"]["api_type"] = "DELTA_GRPC"
        envoy = envoy_factory(bootstrap)

        # 50/50: both replicas answer.
        seen: set[str] = set()

        def both_seen() -> bool:
            seen.add(_replica(listen, "/probe"))
            return seen == {"web-v1", "web-v2"}

        _eventually("traffic to both replicas", both_seen, envoy)

        # Edit the split to send everything to v2: only the RouteConfiguration changes.
        controlplane.apply(ROUTE.format(w1=0, w2=100))
        _eventually("the split edit", lambda: all(_replica(listen, f"/v2/{i}") == "web-v2" for i in range(20)),
                    envoy)
        assert all(_replica(listen, f"/after/{i}") == "web-v2" for i in range(50))

        # Delete web-v1 (route first, then service): Envoy drops its cluster on a CDS removal.
        controlplane.apply(ROUTE.format(w1=0, w2=100).replace(
            "{name: web-v1, port: 80, weight: 0}, ", ""))
        assert V1_CLUSTER in envoy.admin("/clusters")
        stub = mesh_pb2_grpc.ConfigServiceStub(controlplane.channel)  # type: ignore[no-untyped-call]
        stub.Delete(mesh_pb2.ResourceRef(kind="Service", namespace="default", name="web-v1"), timeout=10)
        _eventually("the removal of the web-v1 cluster", lambda: V1_CLUSTER not in envoy.admin("/clusters"), envoy)
        assert all(_replica(listen, f"/left/{i}") == "web-v2" for i in range(20))

        stats = controlplane.ads_stats()
        assert stats.delta_streams_opened >= 1 and stats.streams_active >= 1, stats
        assert stats.nacks == 0, stats.last_nack
        assert stats.acks >= 5, stats  # CDS, EDS, RDS, then the route edit and the removal
        # Envoy itself saw no rejected update on any xDS type.
        counters = [line for line in envoy.admin("/stats").splitlines() if ".update_rejected: " in line]
        assert any(line.startswith("cluster_manager.cds.") for line in counters), counters
        assert all(line.endswith(": 0") for line in counters), counters
    finally:
        v1.stop()
        v2.stop()
