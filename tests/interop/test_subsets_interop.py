"""Real Envoy and proxyless gRPC follow version subsets: one Service, two versions told apart
by a label; a Rollout's weights reach Envoy as weighted subset clusters
(`outbound|80|version=v2|...`, each with only its version's endpoints), and a
promotion moves all of Envoy's traffic to the candidate; a GRPCRoute naming subsets
splits a proxyless gRPC client's calls between them."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc

from controlplane.xds.listeners import envoy_bootstrap
from nodemesh import xdsnames
from nodemesh.v1 import mesh_pb2
from tests.interop.conftest import ControlPlaneThread, free_port, run_grpc_client


class Backend:
    def __init__(self, name: str, host: str, port: int) -> None:
        me = name

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = json.dumps({"replica": me}).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


CONFIG = """\
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {{name: web}}
spec: {{selector: {{app: web}}, ports: [{{port: 80, targetPort: {port}, protocol: http}}]}}
"""

ROLLOUT = """\
apiVersion: nodemesh.io/v1alpha1
kind: Rollout
metadata: {{name: web}}
spec:
  service: web
  stable: v1
  candidate: v2
  strategy: {{type: Steps, steps: [30, 100], pause: 1h}}
  analysis: {{interval: 1s}}
  promote: {promote}
"""


def _replica(port: int, i: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", f"/r/{i}")
        r = conn.getresponse()
        body = r.read()
        return str(json.loads(body)["replica"]) if r.status == 200 else f"status {r.status}"
    except (OSError, ValueError) as e:
        return repr(e)
    finally:
        conn.close()


def _share(port: int, n: int = 200) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(n):
        r = _replica(port, i)
        counts[r] = counts.get(r, 0) + 1
    return counts


def test_envoy_follows_a_rollout_through_subset_clusters(controlplane: ControlPlaneThread, envoy_factory: Any,
                                                         tmp_path: Path) -> None:
    port = free_port()
    v1, v2 = Backend("web-v1", "127.0.0.1", port), Backend("web-v2", "127.0.0.2", port)
    try:
        controlplane.apply(CONFIG.format(port=port))
        controlplane.register_node("interop-node", [
            mesh_pb2.WorkloadRegistration(name=f"web-{v}", namespace="default", service_account="web",
                                          labels={"app": "web", "version": v}, ip=ip, ports=[port])
            for v, ip in (("v1", "127.0.0.1"), ("v2", "127.0.0.2"))])
        controlplane.apply(ROLLOUT.format(promote="false"))
        listen = free_port()
        route = xdsnames.cluster_name("web", "default", 80, "mesh")
        envoy = envoy_factory(envoy_bootstrap("envoy-subsets", "interop", controlplane.sock, [(listen, route)],
                                              free_port()))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _replica(listen, 0).startswith("web-"):
            if envoy.proc.poll() is not None:
                raise AssertionError(f"Envoy exited with {envoy.proc.returncode}:\n{envoy.logs()}")
            time.sleep(0.2)
        # Wait for the controller's first step (30 %) to reach Envoy, then measure.
        deadline = time.monotonic() + 15
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            counts = _share(listen, 60)
            if counts.get("web-v2", 0) > 5:
                break
            time.sleep(0.3)
        counts = _share(listen)
        assert set(counts) == {"web-v1", "web-v2"}, counts
        assert 0.18 <= counts["web-v2"] / 200 <= 0.42, counts
        clusters = envoy.admin("/clusters")
        v2_cluster = "outbound|80|version=v2|web.default.svc.mesh"
        # The subset cluster holds only v2's endpoint.
        members = {line.split("::")[1] for line in clusters.splitlines() if line.startswith(v2_cluster + "::")
                   and "::cx_total::" in line}
        assert members == {f"127.0.0.2:{port}"}, clusters[-3000:]

        controlplane.apply(ROLLOUT.format(promote="true"))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and set(_share(listen, 40)) != {"web-v2"}:
            time.sleep(0.3)
        assert _share(listen, 100) == {"web-v2": 100}
        stats = controlplane.ads_stats()
        assert stats.nacks == 0, stats.last_nack
    finally:
        v1.stop()
        v2.stop()


GRPC_CONFIG = """\
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {{name: echo}}
spec: {{selector: {{app: echo}}, ports: [{{port: 50051, targetPort: {port}, protocol: grpc}}]}}
---
apiVersion: nodemesh.io/v1alpha1
kind: GRPCRoute
metadata: {{name: echo}}
spec:
  parentRefs: [{{kind: Service, name: echo, port: 50051}}]
  rules:
  - backendRefs:
    - {{name: echo, subset: {{version: v1}}, weight: 70}}
    - {{name: echo, subset: {{version: v2}}, weight: 30}}
"""

GRPC_CLIENT = r"""
import json, sys, grpc
ch = grpc.insecure_channel(sys.argv[1])
call = ch.unary_unary("/test.Echo/Unary", request_serializer=lambda b: b, response_deserializer=lambda b: b)
counts = {}
for i in range(int(sys.argv[2])):
    name = call(b"x", timeout=10, wait_for_ready=True).decode()
    counts[name] = counts.get(name, 0) + 1
print(json.dumps(counts))
"""


def test_proxyless_grpc_splits_between_version_subsets(controlplane: ControlPlaneThread, tmp_path: Path) -> None:
    port = free_port()
    servers = []
    for name, host in (("echo-v1", "127.0.0.1"), ("echo-v2", "127.0.0.2")):
        s = grpc.server(futures.ThreadPoolExecutor(4))
        handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx, n=name: n.encode(), lambda b: b, lambda b: b)
        s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {"Unary": handler}),))
        s.add_insecure_port(f"{host}:{port}")
        s.start()
        servers.append(s)
    try:
        controlplane.apply(GRPC_CONFIG.format(port=port))
        controlplane.register_node("interop-grpc", [
            mesh_pb2.WorkloadRegistration(name=f"echo-{v}", namespace="default", service_account="echo",
                                          labels={"app": "echo", "version": v}, ip=ip, ports=[port])
            for v, ip in (("v1", "127.0.0.1"), ("v2", "127.0.0.2"))])
        bootstrap = {
            "xds_servers": [{"server_uri": f"unix:{controlplane.sock}", "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": "grpc-subsets", "cluster": "interop", "metadata": {"nodemesh.client": "grpc"}},
        }
        res = run_grpc_client(bootstrap, tmp_path, GRPC_CLIENT, "xds:///echo.default.svc.mesh:50051", "300")
        assert res.returncode == 0, res.stderr[-3000:]
        counts = json.loads(res.stdout.strip().splitlines()[-1])
        assert sum(counts.values()) == 300 and 0.2 <= counts.get("echo-v2", 0) / 300 <= 0.4, counts
        assert controlplane.ads_stats().nacks == 0
    finally:
        for s in servers:
            s.stop(0)
