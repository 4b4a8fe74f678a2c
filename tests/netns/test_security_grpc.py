"""AuthorizationPolicy per gRPC method, enforced on the receiving node: a
grpcio server on node 2, a grpcio client on node 1 calling through the mesh.
Get* is allowed, Delete is denied with PERMISSION_DENIED naming the policy,
and node 2's access log names the policy and rule that decided each call."""

from __future__ import annotations

import json
import sys

import pytest

from nodemesh.lab.harness import Lab, LabWorkload
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID

pytestmark = pytest.mark.netns

SERVER = r"""
import sys, grpc
from concurrent import futures
port = int(sys.argv[1])
ident = (lambda b: b, lambda b: b)
def get(req, ctx):
    return b"got " + req
def delete(req, ctx):
    print("DELETE REACHED THE SERVER", flush=True)
    return b"deleted"
h = {"GetItem": grpc.unary_unary_rpc_method_handler(get, *ident),
     "Delete": grpc.unary_unary_rpc_method_handler(delete, *ident)}
s = grpc.server(futures.ThreadPoolExecutor(4))
s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", h),))
s.add_insecure_port(f"0.0.0.0:{port}")
s.start()
s.wait_for_termination()
"""

CLIENT = r"""
import json, sys, time, grpc
ident = (lambda b: b, lambda b: b)
ch = grpc.insecure_channel(sys.argv[1])
def call(method, req=b"x"):
    try:
        return "OK", "", ch.unary_unary(method, *ident)(req, timeout=5).decode()
    except grpc.RpcError as e:
        return e.code().name, e.details(), ""
deadline = time.monotonic() + 20
while True:  # until the DENY policy reached node 2
    out = {"delete": call("/echo.Echo/Delete")}
    if out["delete"][0] == "PERMISSION_DENIED" or time.monotonic() > deadline:
        break
    time.sleep(0.3)
out["get"] = call("/echo.Echo/GetItem", b"42")
out["big"] = call("/echo.Echo/GetItem", b"z" * (3 << 20))[0]
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
kind: AuthorizationPolicy
metadata: {name: echo-get, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
    to: [{operation: {paths: ["/echo.Echo/Get*", "/echo.Echo/Delete"]}}]
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-no-delete, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/echo.Echo/Delete"]}}]
"""


def test_grpc_method_policy_on_the_receiving_node(lab: Lab) -> None:
    lab.start_controlplane()
    lab.apply(BASE_CONFIG + CONFIG)
    lab.add_workload(LabWorkload("echo-2", node=2, uid=2002, ports=(50051,), service_account="echo",
                                 labels={"app": "echo"}))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client"))
    wl = lab.workloads["echo-2"]
    lab.spawn("app-echo-2", lab.node_ns(2), [sys.executable, "-c", SERVER, "50051"], uid=wl.uid)
    lab.wait_for(lambda: lab._listening(2, 50051), 15, "gRPC server to listen", lambda: lab.log("app-echo-2"))
    lab.start_agent(1)
    lab.start_agent(2)
    res = lab.ns_exec(lab.node_ns(1), [sys.executable, "-c", CLIENT, f"{lab.service_vip('echo')}:50051"],
                      uid=CLIENT_UID, check=False, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    inbound = [e for e in lab.access_log(2) if e.get("direction") == "inbound" and e.get("event") == "authz_request"]
    diag = f"{out}\n{inbound[-3:]}"
    assert out["get"] == ["OK", "", "got 42"], diag
    assert out["big"] == "OK", diag  # 3 MiB through the guard, under flow control
    code, details, _ = out["delete"]
    assert code == "PERMISSION_DENIED", diag
    assert details == "RBAC: access denied (policy AuthorizationPolicy/default/echo-no-delete, rule 0)", diag
    assert "DELETE REACHED THE SERVER" not in lab.log("app-echo-2")
    denied = [e for e in inbound if e.get("http_path") == "/echo.Echo/Delete" and e.get("authz") == "deny"]
    assert denied, diag
    assert denied[-1]["authz_policy"] == "AuthorizationPolicy/default/echo-no-delete" and denied[-1]["authz_rule"] == 0
    assert denied[-1]["grpc_status"] == 7 and denied[-1]["authz_layer"] == "L7", diag
    assert denied[-1]["source_principal"] == "spiffe://cluster.local/ns/default/sa/client", diag
    allowed = [e for e in inbound if e.get("http_path") == "/echo.Echo/GetItem" and e.get("authz") == "allow"]
    assert allowed and allowed[-1]["authz_policy"] == "AuthorizationPolicy/default/echo-get", diag
    assert allowed[-1]["authz_rule"] == 0, diag


def test_grpc_method_policy_for_a_same_node_caller(lab: Lab) -> None:
    """The same policy, decided per call, for a caller on the workload's own node
    (no HBONE hop: the outbound HTTP/2 stack hands its connection to the guard)."""
    lab.start_controlplane()
    lab.apply(BASE_CONFIG + CONFIG)
    lab.add_workload(LabWorkload("echo-2", node=2, uid=2002, ports=(50051,), service_account="echo",
                                 labels={"app": "echo"}))
    lab.add_workload(LabWorkload("client-2", node=2, uid=CLIENT_UID, service_account="client"))
    wl = lab.workloads["echo-2"]
    lab.spawn("app-echo-2", lab.node_ns(2), [sys.executable, "-c", SERVER, "50051"], uid=wl.uid)
    lab.wait_for(lambda: lab._listening(2, 50051), 15, "gRPC server to listen", lambda: lab.log("app-echo-2"))
    lab.start_agent(2)
    res = lab.ns_exec(lab.node_ns(2), [sys.executable, "-c", CLIENT, f"{lab.service_vip('echo')}:50051"],
                      uid=CLIENT_UID, check=False, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["get"] == ["OK", "", "got 42"], out
    assert out["big"] == "OK", out
    assert out["delete"][0] == "PERMISSION_DENIED", out
    assert "DELETE REACHED THE SERVER" not in lab.log("app-echo-2")
    # The receiving side of the same-node hop logs each decision with policy and rule.
    lab.wait_for(lambda: any(e.get("http_path") == "/echo.Echo/Delete" and e.get("authz") == "deny"
                             for e in lab.access_log(2) if e.get("direction") == "inbound"), 5,
                 "the same-node deny decision in node-2's access log")
    denied = [e for e in lab.access_log(2) if e.get("direction") == "inbound"
              and e.get("http_path") == "/echo.Echo/Delete" and e.get("authz") == "deny"]
    assert denied[-1]["authz_policy"] == "AuthorizationPolicy/default/echo-no-delete", denied[-1]
    assert denied[-1]["authz_rule"] == 0 and denied[-1]["via"] == "same-node", denied[-1]
