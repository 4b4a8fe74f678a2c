"""L7 resilience through the full mesh (two node namespaces, mTLS HBONE between
them): a retry budget stopping a retry storm, a deadline failing fast, a
breaker opening and closing, an outlier ejected and readmitted, mirroring that
never slows the original, and fault injection measured over many requests.
The backends are the lab app with its failure knobs (nodemesh/lab/labapp.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

from nodemesh.lab.harness import Lab, LabWorkload
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID

pytestmark = pytest.mark.netns


def curl_many(lab: Lab, url: str, n: int, headers: Sequence[str] = (), parallel: bool = False,
              timeout: float = 30.0) -> list[tuple[int, float]]:
    """n requests from the client workload in one curl; (status, seconds) each."""
    args = ["-o", "/dev/null", "-w", "%{http_code} %{time_total}\\n"]
    for h in headers:
        args += ["-H", h]
    if parallel:
        args += ["--parallel", "--parallel-immediate", "--parallel-max", str(n)]
    for _ in range(n - 1):
        args += [url, "-o", "/dev/null"]
    res = lab.curl(1, url, uid=CLIENT_UID, timeout=timeout, extra=args)
    out = []
    for line in res.stdout.splitlines():
        code, secs = line.split()
        out.append((int(code), float(secs)))
    assert len(out) == n, (res.stdout[-300:], res.stderr[-300:])
    return out


def http_log(lab: Lab, path_prefix: str) -> list[dict[str, object]]:
    return [e for e in lab.access_log(1) if e.get("protocol") == "http"
            and str(e.get("path", "")).startswith(path_prefix)]


def wait_l7(lab: Lab, url: str, ok: tuple[int, ...] = (200,)) -> None:
    """Until the route/policy is in force on node-1 (the first requests may race the push)."""
    lab.wait_for(lambda: curl_many(lab, url, 1)[0][0] in ok, 15, f"{url} to answer {ok}",
                 lambda: lab.log("agent-1"))


def start(lab: Lab, config: str, apps: dict[str, tuple[int, int, dict[str, str], tuple[str, ...]]]) -> None:
    """apps: name -> (node, port, labels, labapp options). The client runs on node 1."""
    lab.start_controlplane()
    lab.apply(BASE_CONFIG + config)
    for i, (name, (node, port, labels, _)) in enumerate(apps.items()):
        lab.add_workload(LabWorkload(name, node=node, uid=2001 + i, ports=(port,), service_account="web",
                                     labels=labels))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client"))
    for name, (_, _, _, opts) in apps.items():
        lab.start_app(name, list(opts))
    lab.start_agent(1)
    lab.start_agent(2)


def test_retry_budget_stops_a_retry_storm(lab: Lab) -> None:
    start(lab, """\
---
apiVersion: nodemesh.io/v1alpha1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{name: web, port: 80}]
  rules: [{backendRefs: [{name: web, port: 80}], retry: {attempts: 3, backoff: 1ms, retryOn: [5xx]}}]
---
apiVersion: nodemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {name: web}
spec:
  targetRef: {name: web}
  retryBudget: {ratio: 0.2, minRetriesPerSecond: 1, window: 30s}
  circuitBreaker: {maxRetries: 100}
""", {"web-1": (2, 8080, {"app": "web"}, ("--fail-rate", "1", "--log-requests"))})
    url = f"http://{lab.service_vip('web')}/storm"
    wait_l7(lab, url, ok=(503,))
    # The proxy writes a request's line just after the response's last bytes: a
    # loaded machine can let curl exit first.
    lab.wait_for(lambda: http_log(lab, "/storm"), 5, "the warm-up request's access log line")
    before = sum(int(str(e.get("attempts", 1))) for e in http_log(lab, "/storm"))
    n = 100
    res = curl_many(lab, url, n)
    assert all(code == 503 for code, _ in res)
    log = http_log(lab, "/storm")[-n:]
    attempts = [int(str(e.get("attempts", 1))) for e in log]
    retries = sum(a - 1 for a in attempts)
    # Without a budget: 2 retries each = 200. With it: < min x window + ratio x requests.
    # Every request in the window counts, the warm-up ones too.
    allowed = 1 * 30 + 0.2 * len(http_log(lab, "/storm"))
    assert 0 < retries <= allowed, (retries, allowed)
    assert sum(1 for e in log if e.get("retry_stopped") == "budget") >= n - retries
    # The backend saw exactly the attempts the access log counts: the storm stayed small.
    lab.wait_for(lambda: lab.log("app-web-1").count("GET /storm") >= before + sum(attempts), 5,
                 "the backend log to catch up")
    assert lab.log("app-web-1").count("GET /storm") == before + sum(attempts)
    print(f"retry budget: {n} failing requests -> {retries} retries (cap {allowed:.0f}, unbudgeted {2 * n})")


def test_deadline_fails_fast_and_breaker_opens_and_closes(lab: Lab) -> None:
    start(lab, """\
---
apiVersion: nodemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {name: web}
spec:
  targetRef: {name: web}
  circuitBreaker: {maxRequests: 2, maxPendingRequests: 2}
""", {"web-1": (2, 8080, {"app": "web"}, ("--delay-ms", "400"))})
    vip = lab.service_vip("web")
    wait_l7(lab, f"http://{vip}/warm")
    # Deadline: 120 ms against a backend that answers after 400 ms.
    for header in ("x-nodemesh-deadline-ms: 120", "grpc-timeout: 120m"):
        (code, secs), = curl_many(lab, f"http://{vip}/deadline", 1, headers=[header])
        assert code == 504 and secs < 0.3, (header, code, secs)
    reasons = {e.get("reason") for e in http_log(lab, "/deadline")}
    assert reasons <= {"deadline_exceeded", "upstream_timeout"} and reasons, reasons
    # Breaker: 8 at once against maxRequests 2; the excess is refused at once.
    res = curl_many(lab, f"http://{vip}/burst", 8, parallel=True)
    ok = [s for c, s in res if c == 200]
    refused = [s for c, s in res if c == 503]
    assert len(ok) >= 2 and len(refused) >= 4 and len(ok) + len(refused) == 8, res
    assert max(refused) < 0.3 and min(ok) >= 0.4, res
    log = http_log(lab, "/burst")
    assert sum(1 for e in log if e.get("reason") == "overflow") == len(refused)
    # Load gone: the breaker closes.
    after = curl_many(lab, f"http://{vip}/after", 3)
    assert [c for c, _ in after] == [200, 200, 200]


def test_outlier_ejected_and_readmitted(lab: Lab) -> None:
    start(lab, """\
---
apiVersion: nodemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {name: web}
spec:
  targetRef: {name: web}
  loadBalancer: {policy: RoundRobin}
  outlierDetection: {consecutive5xx: 3, baseEjectionTime: 1500ms, maxEjectionPercent: 50}
""", {"web-good": (1, 8080, {"app": "web"}, ()),
      "web-bad": (2, 8080, {"app": "web"}, ("--fail-rate", "1"))})
    url = f"http://{lab.service_vip('web')}/o"
    # Both replicas in rotation once two requests in a row meet one 200 (good) and one 503 (bad).
    lab.wait_for(lambda: {c for c, _ in curl_many(lab, f"http://{lab.service_vip('web')}/w", 2)} == {200, 503},
                 15, "both replicas in rotation")
    time.sleep(1.6)  # the warm-up may already have counted 5xx; start from a clean slate
    first = curl_many(lab, url, 30)
    bad_first = [i for i, (c, _) in enumerate(first) if c == 503]
    # Round robin sends every other request to web-bad until its third 5xx in a row ejects it.
    assert len(bad_first) <= 3 and bad_first and max(bad_first) <= 8, bad_first
    assert all(c == 200 for c, _ in first[max(bad_first) + 1:])
    time.sleep(1.6)  # base ejection time: readmitted, and failing again
    second = curl_many(lab, url, 10)
    assert any(c == 503 for c, _ in second), second
    bad_log = [e for e in http_log(lab, "/o") if e.get("dst_workload") == "default/web-bad"]
    assert bad_log and all(e["status"] == 503 for e in bad_log)


def test_mirror_does_not_slow_the_original_and_faults_by_percentage(lab: Lab) -> None:
    start(lab, """\
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: shadow}
spec: {selector: {app: shadow}, ports: [{port: 80, targetPort: 8081, protocol: http}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /abort}}]
    backendRefs: [{name: web, port: 80}]
    filters: [{type: Fault, fault: {abort: {httpStatus: 503, percent: 30}}}]
  - matches: [{path: {type: PathPrefix, value: /delay}}]
    backendRefs: [{name: web, port: 80}]
    filters: [{type: Fault, fault: {delay: {fixedDelay: 200ms, percent: 100}}}]
  - backendRefs: [{name: web, port: 80}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}]
""", {"web-1": (2, 8080, {"app": "web"}, ()),
      "shadow-1": (2, 8081, {"app": "shadow"}, ("--delay-ms", "500", "--log-requests"))})
    vip = lab.service_vip("web")
    wait_l7(lab, f"http://{vip}/warm")
    # Mirror: the shadow answers after 500 ms; the original must not wait for it.
    res = curl_many(lab, f"http://{vip}/m", 20)
    assert all(c == 200 for c, _ in res) and max(s for _, s in res) < 0.3, res
    lab.wait_for(lambda: lab.log("app-shadow-1").count("GET /m") == 20, 10, "the shadow to get 20 copies",
                 lambda: lab.log("app-shadow-1"))
    # Abort 30%, measured over 300 requests (binomial sd ~8: 60..120 is > 3 sd either way).
    res = curl_many(lab, f"http://{vip}/abort", 300)
    aborted = sum(1 for c, _ in res if c == 503)
    assert 60 <= aborted <= 120 and aborted + sum(1 for c, _ in res if c == 200) == 300, aborted
    assert sum(1 for e in http_log(lab, "/abort") if e.get("reason") == "fault_injected") == aborted
    # Delay 200 ms on every request of /delay.
    res = curl_many(lab, f"http://{vip}/delay", 3)
    assert all(c == 200 and 0.2 <= s < 0.6 for c, s in res), res
    print(f"fault abort: {aborted}/300 = {aborted / 3:.1f}% (configured 30%)")
