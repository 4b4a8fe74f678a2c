"""gRPC at L7 through the full mesh: grpcio servers on both nodes, a grpcio
client on node 1 calling by VIP. Status codes and messages preserved, a
GRPCRoute splitting by method, a retry on UNAVAILABLE hiding a failing
replica, a grpc-timeout deadline failing fast, server streaming; a RequestMirror
copying every call to a slow shadow without slowing the original."""

from __future__ import annotations

import json
import sys

import pytest

from nodemesh.lab.harness import Lab, LabWorkload
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID

pytestmark = pytest.mark.netns

SERVER = r"""
import sys, time, grpc
from concurrent import futures
name, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ident = (lambda b: b, lambda b: b)
def unary(req, ctx):
    if mode == "shadow":  # a slow mirror target: says what it got, then takes its time
        print("MIRRORED", req.decode(), flush=True)
        time.sleep(0.5)
    if mode == "fail":
        ctx.abort(grpc.StatusCode.UNAVAILABLE, f"{name} is failing")
    if req == b"notfound":
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if req == b"unavail":
        ctx.abort(grpc.StatusCode.UNAVAILABLE, f"{name} says try later")
    if req == b"slow":
        time.sleep(2)
    return name.encode()
def stream(req, ctx):
    for i in range(int(req)):
        yield b"%s-%d" % (name.encode(), i)
h = {"Unary": grpc.unary_unary_rpc_method_handler(unary, *ident),
     "Stream": grpc.unary_stream_rpc_method_handler(stream, *ident)}
s = grpc.server(futures.ThreadPoolExecutor(8))
s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", h),))
s.add_insecure_port(f"0.0.0.0:{port}")
s.start()
s.wait_for_termination()
"""

CLIENT = r"""
import json, sys, time, grpc
echo, flaky = sys.argv[1], sys.argv[2]
ident = (lambda b: b, lambda b: b)
def unary(target, req, timeout=5.0):
    with grpc.insecure_channel(target) as ch:
        try:
            return "OK", "", ch.unary_unary("/test.Echo/Unary", *ident)(req, timeout=timeout).decode()
        except grpc.RpcError as e:
            return e.code().name, e.details(), ""
out = {}
ch = grpc.insecure_channel(echo)
stream = ch.unary_stream("/test.Echo/Stream", *ident)
deadline = time.monotonic() + 20
while True:  # until the GRPCRoute reached the node
    try:
        msgs = [m.decode() for m in stream(b"10", timeout=5)]
        if msgs and msgs[0].startswith("echo-2"):
            break
    except grpc.RpcError as e:
        msgs = [f"{e.code().name} {e.details()}"]
    if time.monotonic() > deadline:
        break
    time.sleep(0.3)
out["stream"] = msgs
out["ok"] = [unary(echo, b"hi") for _ in range(6)]
out["notfound"] = unary(echo, b"notfound")
out["unavail"] = unary(echo, b"unavail")
t0 = time.monotonic()
out["deadline"] = unary(echo, b"slow", timeout=0.3)
out["deadline_s"] = time.monotonic() - t0
out["flaky"] = [unary(flaky, b"x") for _ in range(20)]
print(json.dumps(out))
"""

CONFIG = """\
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: echo}
spec: {selector: {app: echo}, ports: [{port: 50051, targetPort: 50051, protocol: grpc}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: echo-v2}
spec: {selector: {app: echo, version: v2}, ports: [{port: 50051, targetPort: 50051, protocol: grpc}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: flaky}
spec: {selector: {app: flaky}, ports: [{port: 50052, targetPort: 50052, protocol: grpc}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: GRPCRoute
metadata: {name: echo}
spec:
  parentRefs: [{kind: Service, name: echo, port: 50051}]
  rules:
  - matches: [{method: {service: test.Echo, method: Stream}}]
    backendRefs: [{name: echo-v2, port: 50051}]
  - backendRefs: [{name: echo, port: 50051}]
---
apiVersion: nodemesh.io/v1alpha1
kind: GRPCRoute
metadata: {name: flaky}
spec:
  parentRefs: [{kind: Service, name: flaky, port: 50052}]
  rules:
  - backendRefs: [{name: flaky, port: 50052}]
    retry: {attempts: 3, backoff: 5ms, maxBackoff: 20ms, grpcRetryOn: [unavailable]}
---
apiVersion: nodemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {name: flaky}
spec:
  targetRef: {kind: Service, name: flaky}
  loadBalancer: {policy: RoundRobin}
"""


def _server(lab: Lab, name: str, port: int, mode: str = "ok") -> None:
    wl = lab.workloads[name]
    lab.spawn(f"app-{name}", lab.node_ns(wl.node), [sys.executable, "-c", SERVER, name, str(port), mode], uid=wl.uid)
    lab.wait_for(lambda: lab._listening(wl.node, port), 15, f"gRPC server {name} to listen on {port}",
                 lambda: lab.log(f"app-{name}"))


def test_grpc_through_the_mesh(lab: Lab) -> None:
    lab.start_controlplane()
    lab.apply(BASE_CONFIG + CONFIG)
    for wl in (LabWorkload("echo-1", node=1, uid=2001, ports=(50051,), service_account="echo",
                           labels={"app": "echo", "version": "v1"}),
               LabWorkload("echo-2", node=2, uid=2002, ports=(50051,), service_account="echo",
                           labels={"app": "echo", "version": "v2"}),
               LabWorkload("flaky-bad", node=2, uid=2003, ports=(50052,), service_account="flaky",
                           labels={"app": "flaky"}),
               LabWorkload("flaky-good", node=1, uid=2004, ports=(50052,), service_account="flaky",
                           labels={"app": "flaky"}),
               LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client")):
        lab.add_workload(wl)
    _server(lab, "echo-1", 50051)
    _server(lab, "echo-2", 50051)
    _server(lab, "flaky-bad", 50052, "fail")
    _server(lab, "flaky-good", 50052)
    lab.start_agent(1)
    lab.start_agent(2)
    echo = f"{lab.service_vip('echo')}:50051"
    flaky = f"{lab.service_vip('flaky')}:50052"
    res = lab.ns_exec(lab.node_ns(1), [sys.executable, "-c", CLIENT, echo, flaky], uid=CLIENT_UID, check=False,
                      timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    grpc_log = [e for e in lab.access_log(1) if e.get("protocol") == "grpc"]
    diag = f"{out}\n{grpc_log[-4:]}"
    # Server streaming, routed by method (GRPCRoute) to v2 on node 2.
    assert out["stream"] == [f"echo-2-{i}" for i in range(10)], diag
    # Unary calls balanced over both nodes' replicas; codes and messages preserved.
    assert all(code == "OK" and body in ("echo-1", "echo-2") for code, _, body in out["ok"]), diag
    assert out["notfound"][:2] == ["NOT_FOUND", "no such thing"], diag
    assert out["unavail"][0] == "UNAVAILABLE" and out["unavail"][1].endswith("says try later"), diag
    # grpc-timeout bounds the call: DEADLINE_EXCEEDED fast, not after the server's 2 s.
    assert out["deadline"][0] == "DEADLINE_EXCEEDED" and out["deadline_s"] < 1.0, diag
    # Round robin sends half the calls to the failing replica; the retry on UNAVAILABLE hides it.
    assert all(code == "OK" and body == "flaky-good" for code, _, body in out["flaky"]), diag
    assert any(e.get("attempts", 1) > 1 and e.get("dst_service") == "default/flaky" for e in grpc_log), diag
    assert any(e.get("grpc_status") == 5 for e in grpc_log), diag


MIRROR_CONFIG = """\
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: api}
spec: {selector: {app: api}, ports: [{port: 50053, targetPort: 50053, protocol: grpc}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: api-shadow}
spec: {selector: {app: api-shadow}, ports: [{port: 50054, targetPort: 50054, protocol: grpc}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: GRPCRoute
metadata: {name: api}
spec:
  parentRefs: [{kind: Service, name: api, port: 50053}]
  rules:
  - backendRefs: [{name: api, port: 50053}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: api-shadow, port: 50054}}}]
"""

MIRROR_CLIENT = r"""
import json, sys, time, grpc
ident = (lambda b: b, lambda b: b)
ch = grpc.insecure_channel(sys.argv[1])
call = ch.unary_unary("/test.Echo/Unary", *ident)
deadline = time.monotonic() + 20
while True:  # until the route (with its mirror) reached the node
    try:
        call(b"warmup", timeout=5)
        break
    except grpc.RpcError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.3)
took, bodies = [], []
for i in range(10):
    t0 = time.monotonic()
    bodies.append(call(b"m%d" % i, timeout=5).decode())
    took.append(time.monotonic() - t0)
print(json.dumps({"took": took, "bodies": bodies}))
"""


def test_grpc_request_mirror_never_slows_the_original(lab: Lab) -> None:
    lab.start_controlplane()
    lab.apply(BASE_CONFIG + MIRROR_CONFIG)
    for wl in (LabWorkload("api-1", node=2, uid=2011, ports=(50053,), service_account="api", labels={"app": "api"}),
               LabWorkload("shadow-1", node=2, uid=2012, ports=(50054,), service_account="api",
                           labels={"app": "api-shadow"}),
               LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client")):
        lab.add_workload(wl)
    _server(lab, "api-1", 50053)
    _server(lab, "shadow-1", 50054, "shadow")
    lab.start_agent(1)
    lab.start_agent(2)
    res = lab.ns_exec(lab.node_ns(1), [sys.executable, "-c", MIRROR_CLIENT, f"{lab.service_vip('api')}:50053"],
                      uid=CLIENT_UID, check=False, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["bodies"] == ["api-1"] * 10, out
    # The shadow sleeps 500 ms per call; the originals never wait for it.
    assert max(out["took"]) < 0.3, out
    want = {f"m{i}" for i in range(10)}
    lab.wait_for(lambda: want <= {ln.split()[1] for ln in lab.log("app-shadow-1").splitlines()
                                  if ln.startswith("MIRRORED ")}, 10, "the shadow to get every mirrored call",
                 lambda: lab.log("app-shadow-1"))
    grpc_log = [e for e in lab.access_log(1) if e.get("protocol") == "grpc" and e.get("path") == "/test.Echo/Unary"]
    assert grpc_log and all("api-shadow" in e.get("mirror", "") for e in grpc_log), \
        grpc_log[-2:]
