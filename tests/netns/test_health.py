"""Active health checks through the full mesh: the agent of the node running a
replica checks it, reports to the control plane, and every node stops sending
it requests BEFORE any request fails; it comes back once it recovers."""

from __future__ import annotations

import json
import time

import pytest

from nodemesh.lab.harness import Lab, LabWorkload
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID

pytestmark = pytest.mark.netns

HEALTH_POLICY = """\
---
apiVersion: nodemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {name: web}
spec:
  targetRef: {name: web}
  healthChecks:
  - {port: 80, interval: 200ms, timeout: 150ms, jitter: 50ms, unhealthyThreshold: 2, healthyThreshold: 1,
     http: {path: /healthz}}
"""


def endpoint_health(lab: Lab, k: int, service: str = "default/web") -> dict[str, bool]:
    """workload -> healthy, as node k's proxy sees the service (its admin endpoint)."""
    res = lab.ns_exec(lab.node_ns(k), ["curl", "-sS", "--max-time", "2", "http://127.0.0.1:15000/clusters"],
                      check=False)
    try:
        clusters = json.loads(res.stdout)["clusters"]
    except (ValueError, KeyError):
        return {}
    return {e["workload"]: bool(e["healthy"]) for c in clusters if c["service"] == service for e in c["endpoints"]}


def test_health_check_takes_a_dead_replica_out_before_any_request_fails(lab: Lab) -> None:
    lab.start_controlplane()
    lab.apply(BASE_CONFIG + HEALTH_POLICY)
    lab.add_workload(LabWorkload("web-1", node=1, uid=2001, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    lab.add_workload(LabWorkload("web-2", node=2, uid=2002, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client"))
    lab.start_app("web-1")
    lab.start_app("web-2")
    lab.start_agent(1)
    lab.start_agent(2)
    url = f"http://{lab.service_vip('web')}/h"
    both = {"default/web-1": True, "default/web-2": True}
    lab.wait_for(lambda: endpoint_health(lab, 1) == both, 15, "node-1 to see both replicas")
    # node-2's agent checks web-2 (its own workload) and says so in its status.
    lab.wait_for(lambda: any(v["workload"] == "default/web-2" and v["healthy"]
                             for v in lab.agent_status(2).get("health", [])), 10, "node-2 to check web-2")
    assert not any(v["workload"] == "default/web-1" for v in lab.agent_status(2).get("health", []))

    # Kill web-2's app; no request is sent until the verdict has propagated to node-1.
    lab.stop("app-web-2")
    t0 = time.monotonic()
    lab.wait_for(lambda: endpoint_health(lab, 1).get("default/web-2") is False, 10,
                 "node-1 to learn that web-2 is unhealthy", lambda: lab.log("agent-2"))
    took = time.monotonic() - t0
    res = lab.curl(1, url, uid=CLIENT_UID, timeout=30, extra=[*[url] * 59])
    replicas = [json.loads(line)["replica"] for line in res.stdout.splitlines() if line.strip()]
    assert replicas == ["web-1"] * 60, (res.stdout[-500:], res.stderr[-500:])
    http_log = [e for e in lab.access_log(1) if e.get("protocol") == "http" and e.get("path") == "/h"]
    assert http_log and all(e["status"] == 200 and e.get("attempts", 1) == 1 for e in http_log)
    assert not [e for e in http_log if "web-2" in str(e.get("dst_workload", e.get("endpoint", "")))
                or str(e.get("endpoint", "")).startswith(lab.node_ip(2))]
    assert "is now UNHEALTHY" in lab.log("agent-2") and "connection refused" in lab.log("agent-2")

    # Recovery: the replica is put back and takes traffic again.
    lab.start_app("web-2")
    lab.wait_for(lambda: endpoint_health(lab, 1) == both, 10, "web-2 to be healthy again",
                 lambda: lab.log("agent-2"))
    res = lab.curl(1, url, uid=CLIENT_UID, timeout=30, extra=[*[url] * 79])
    back = {json.loads(line)["replica"] for line in res.stdout.splitlines() if line.strip()}
    assert back == {"web-1", "web-2"}, res.stdout[-500:]
    print(f"dead replica out of every node's endpoint set {took:.2f}s after its app died")
