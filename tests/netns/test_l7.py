"""L7 through the full mesh: HTTPRoute by header, a 90/10 split measured over
many requests, and a retry that hides a dead replica (connect failure)."""

from __future__ import annotations

import json
import time

import pytest

from nodemesh.lab.harness import Lab, LabWorkload
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID

pytestmark = pytest.mark.netns

VERSIONS = """\
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web-v1}
spec: {selector: {app: web, version: v1}, ports: [{port: 80, targetPort: 8080, protocol: http}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web-v2}
spec: {selector: {app: web, version: v2}, ports: [{port: 80, targetPort: 8081, protocol: http}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: web-v2, port: 80}]
  - backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]
"""


def _replica(lab: Lab, url: str, headers: tuple[str, ...] = ()) -> str:
    extra = [x for h in headers for x in ("-H", h)]
    res = lab.curl(1, url, uid=CLIENT_UID, extra=extra)
    assert res.returncode == 0 and res.stdout.startswith("{"), (
        f"{res.stdout!r} {res.stderr}\n{[e for e in lab.access_log(1) if e.get('protocol') == 'http'][-3:]}")
    return str(json.loads(res.stdout)["replica"])


def _wait_route(lab: Lab, url: str) -> None:
    # Discovery is eventually consistent: until node-1 knows node-2's workloads the
    # service has no endpoints, so early failures are expected; keep asking.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if _replica(lab, url, ("x-canary: yes",)) == "web-v2":
                return
        except AssertionError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the HTTPRoute never took effect\n{lab.log('agent-1')[-3000:]}")


def test_header_route_and_weighted_split(lab: Lab) -> None:
    lab.start_controlplane()
    lab.apply(BASE_CONFIG + VERSIONS)
    lab.add_workload(LabWorkload("web-v1", node=2, uid=2001, ports=(8080,), service_account="web",
                                 labels={"app": "web", "version": "v1"}))
    lab.add_workload(LabWorkload("web-v2", node=2, uid=2002, ports=(8081,), service_account="web",
                                 labels={"app": "web", "version": "v2"}))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client"))
    lab.start_app("web-v1")
    lab.start_app("web-v2")
    lab.start_agent(1)
    lab.start_agent(2)
    url = f"http://{lab.service_vip('web')}/split"
    _wait_route(lab, url)
    counts = {"web-v1": 0, "web-v2": 0}
    # One curl process, 200 requests on one keep-alive connection.
    res = lab.curl(1, url, uid=CLIENT_UID, timeout=30, extra=[*[url] * 199])
    for line in res.stdout.splitlines():
        if line.strip():
            counts[json.loads(line)["replica"]] += 1
    total = sum(counts.values())
    assert total == 200, (total, res.stderr[-500:])
    share = counts["web-v2"] / total
    assert 0.04 <= share <= 0.18, counts
    log = [e for e in lab.access_log(1) if e.get("route", "").startswith("HTTPRoute/default/web/")]
    assert log and all(e["status"] == 200 for e in log)


def test_retry_hides_dead_replica(lab: Lab) -> None:
    lab.start_controlplane()
    lab.apply(BASE_CONFIG + """\
---
apiVersion: nodemesh.io/v1alpha1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{name: web}]
  rules: [{backendRefs: [{name: web, port: 80}],
           retry: {attempts: 3, backoff: 5ms, retryOn: [connect-failure, gateway-error]}}]
""")
    lab.add_workload(LabWorkload("web-1", node=2, uid=2001, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    # Registered on the client's node but never started: every try on it is refused.
    lab.add_workload(LabWorkload("web-dead", node=1, uid=2002, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client"))
    lab.start_app("web-1")
    lab.start_agent(1)
    lab.start_agent(2)
    url = f"http://{lab.service_vip('web')}/r"
    for _ in range(20):
        assert _replica(lab, url) == "web-1"
    # The dead replica was tried and the retry hid it.
    retried = [e for e in lab.access_log(1) if e.get("method") and (e.get("attempts") or 0) > 1]
    assert retried and all(e["status"] == 200 for e in retried)
