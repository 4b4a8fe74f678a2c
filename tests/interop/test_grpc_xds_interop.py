"""A real proxyless gRPC client (grpcio, GRPC_XDS_BOOTSTRAP, target
xds:///echo.default.svc.mesh:50051) follows our control plane: LDS (API
listener) -> RDS -> CDS -> EDS, a GRPCRoute's 80/20 split and its retry policy
on UNAVAILABLE, with every xDS response ACKed."""

from __future__ import annotations

import json
import threading
from concurrent import futures
from pathlib import Path

import grpc

from nodemesh.v1 import mesh_pb2
from tests.interop.conftest import ControlPlaneThread, run_grpc_client

_ident = (lambda b: b, lambda b: b)


class FlakyGrpcBackend:
    """gRPC on loopback: fails each distinct request payload once with
    UNAVAILABLE, then answers `<name>`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: set[bytes] = set()
        self.failed = 0
        self._lock = threading.Lock()
        handler = grpc.unary_unary_rpc_method_handler(self._call, *_ident)
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Echo", {"Unary": handler}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _call(self, req: bytes, ctx: grpc.ServicerContext) -> bytes:
        with self._lock:
            first = req not in self.seen
            self.seen.add(req)
            self.failed += first
        if first:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} fails {req!r} once")
        return self.name.encode()


CONFIG = """\
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {{name: echo}}
spec: {{selector: {{app: echo}}, ports: [{{port: 50051, targetPort: 50051, protocol: grpc}}]}}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {{name: echo-v1}}
spec: {{selector: {{app: echo, version: v1}}, ports: [{{port: 50051, targetPort: {p1}, protocol: grpc}}]}}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {{name: echo-v2}}
spec: {{selector: {{app: echo, version: v2}}, ports: [{{port: 50051, targetPort: {p2}, protocol: grpc}}]}}
---
apiVersion: nodemesh.io/v1alpha1
kind: GRPCRoute
metadata: {{name: echo}}
spec:
  parentRefs: [{{kind: Service, name: echo, port: 50051}}]
  rules:
  - backendRefs: [{{name: echo-v1, port: 50051, weight: 80}}, {{name: echo-v2, port: 50051, weight: 20}}]
    retry: {{attempts: 3, backoff: 10ms, maxBackoff: 50ms, grpcRetryOn: [unavailable]}}
"""

CLIENT = r"""
import json, sys, grpc
ch = grpc.insecure_channel(sys.argv[1])
call = ch.unary_unary("/test.Echo/Unary", request_serializer=lambda b: b, response_deserializer=lambda b: b)
counts, errors = {}, []
for i in range(int(sys.argv[2])):
    try:
        name = call(b"req-%d" % i, timeout=10, wait_for_ready=True).decode()
        counts[name] = counts.get(name, 0) + 1
    except grpc.RpcError as e:
        errors.append(f"{i}: {e.code()} {e.details()}")
print(json.dumps({"counts": counts, "errors": errors[:5], "n_errors": len(errors)}))
"""


def test_proxyless_grpc_follows_weighted_split_and_retry(controlplane: ControlPlaneThread, tmp_path: Path) -> None:
    v1, v2 = FlakyGrpcBackend("echo-v1"), FlakyGrpcBackend("echo-v2")
    try:
        controlplane.apply(CONFIG.format(p1=v1.port, p2=v2.port))
        controlplane.register_node("interop-node", [
            mesh_pb2.WorkloadRegistration(name="echo-v1", namespace="default", service_account="echo",
                                          labels={"app": "echo", "version": "v1"}, ip="127.0.0.1", ports=[v1.port]),
            mesh_pb2.WorkloadRegistration(name="echo-v2", namespace="default", service_account="echo",
                                          labels={"app": "echo", "version": "v2"}, ip="127.0.0.1", ports=[v2.port]),
        ])
        bootstrap = {
            "xds_servers": [{"server_uri": f"unix:{controlplane.sock}", "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": "grpc-interop-client", "cluster": "interop", "metadata": {"nodemesh.client": "grpc"}},
        }
        res = run_grpc_client(bootstrap, tmp_path, CLIENT, "xds:///echo.default.svc.mesh:50051", "200")
        assert res.returncode == 0, res.stderr[-3000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
        # Each backend fails every payload once: only the retry policy makes them all succeed.
        assert out["n_errors"] == 0, out
        counts = out["counts"]
        assert sum(counts.values()) == 200
        share = counts.get("echo-v2", 0) / 200
        assert 0.12 <= share <= 0.28, counts
        assert v1.failed + v2.failed == 200
        stats = controlplane.ads_stats()
        assert stats.nacks == 0, stats.last_nack
        assert stats.acks >= 4, stats  # LDS, RDS, CDS, EDS
    finally:
        v1.server.stop(0)
        v2.server.stop(0)
