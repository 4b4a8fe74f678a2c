"""A real Envoy 1.40 follows our control plane: CDS/EDS/RDS over ADS, an
HTTPRoute's 80/20 split between two services and its retry policy, with
every xDS response ACKed."""

from __future__ import annotations

import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from controlplane.xds.listeners import envoy_bootstrap
from nodemesh import xdsnames
from nodemesh.v1 import mesh_pb2
from tests.interop.conftest import ControlPlaneThread, free_port


class FlakyBackend:
    """HTTP/1.1 on loopback: answers 503 the first time it sees an
    x-request-id, 200 with its name after that."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: set[str] = set()
        self.requests = 0
        self.failed = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                backend.requests += 1
                rid = self.headers.get("x-request-id", "")
                first = rid not in backend.seen
                backend.seen.add(rid)
                status = 503 if first and rid else 200
                backend.failed += status == 503
                body = json.dumps({"replica": backend.name, "rid": rid}).encode()
                self.send_response(status)
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


CONFIG = """\
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
---
apiVersion: nodemesh.io/v1alpha1
kind: HTTPRoute
metadata: {{name: web}}
spec:
  parentRefs: [{{kind: Service, name: web, port: 80}}]
  rules:
  - backendRefs: [{{name: web-v1, port: 80, weight: 80}}, {{name: web-v2, port: 80, weight: 20}}]
    retry: {{attempts: 3, backoff: 10ms, maxBackoff: 50ms, retryOn: [5xx]}}
"""


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_envoy_follows_weighted_split_and_retry_policy(controlplane: ControlPlaneThread, envoy_factory: Any,
                                                       tmp_path: Path) -> None:
    v1, v2 = FlakyBackend("web-v1"), FlakyBackend("web-v2")
    try:
        controlplane.apply(CONFIG.format(p1=v1.port, p2=v2.port))
        controlplane.register_node("interop-node", [
            mesh_pb2.WorkloadRegistration(name="web-v1", namespace="default", service_account="web",
                                          labels={"app": "web", "version": "v1"}, ip="127.0.0.1", ports=[v1.port]),
            mesh_pb2.WorkloadRegistration(name="web-v2", namespace="default", service_account="web",
                                          labels={"app": "web", "version": "v2"}, ip="127.0.0.1", ports=[v2.port]),
        ])
        listen = free_port()
        route = xdsnames.cluster_name("web", "default", 80, "mesh")
        envoy = envoy_factory(envoy_bootstrap("envoy-interop", "interop", controlplane.sock, [(listen, route)],
                                              free_port()))
        # Wait for Envoy to have clusters, endpoints and the route.
        deadline = time.monotonic() + 30
        status, body = 0, b""
        while time.monotonic() < deadline:
            try:
                status, body = _get(listen, "/probe")
                if status == 200:
                    break
            except OSError:
                pass
            if envoy.proc.poll() is not None:
                raise AssertionError(f"Envoy exited with {envoy.proc.returncode}:\n{envoy.logs()}")
            time.sleep(0.2)
        assert status == 200, (status, body, envoy.logs())

        counts = {"web-v1": 0, "web-v2": 0}
        failed_before = v1.failed + v2.failed
        for i in range(200):
            status, body = _get(listen, f"/split/{i}")
            # Each backend fails every request once: only Envoy's retries make this 200.
            assert status == 200, (i, status, body)
            counts[json.loads(body)["replica"]] += 1
        share = counts["web-v2"] / 200
        assert 0.12 <= share <= 0.28, counts
        assert v1.failed + v2.failed - failed_before == 200  # one hidden 503 per request

        stats = controlplane.ads_stats()
        assert stats.nacks == 0, stats.last_nack
        assert stats.acks >= 3, stats  # CDS, EDS and RDS at least
        clusters = envoy.admin("/clusters")
        assert "outbound|80||web-v2.default.svc.mesh" in clusters
    finally:
        v1.stop()
        v2.stop()
