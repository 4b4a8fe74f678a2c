"""Rollouts through the full mesh (network namespaces, real agents, a real
control plane): a client on node 1 sends at a steady rate throughout while the
control plane shifts traffic from v1 (node 1) to v2 (node 2), judging v2 by the
source-side metrics the agents report on their heartbeats.

Intervals are short (1-2 s) so each test takes tens of seconds."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodemesh.lab.harness import Lab, LabWorkload
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID

pytestmark = pytest.mark.netns

# A steady client: one keep-alive connection (or one per request with --close),
# a request every 1/rate s, one JSON line per answer. Run by the workload uid with
# Debian's python3 (docs: a workload uid cannot use the root-owned venv).
CLIENT = """\
import http.client, json, sys, time
host, port, rate, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
close = len(sys.argv) > 5 and sys.argv[5] == "--close"
conn = None
f = open(out, "a", buffering=1)
next_t = time.time()
while True:
    t = time.time()
    rec = {"t": t}
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/r", headers={"Connection": "close"} if close else {})
        r = conn.getresponse()
        body = r.read()
        rec["status"] = r.status
        if r.status == 200:
            rec["replica"] = json.loads(body)["replica"]
        if close:
            conn.close(); conn = None
    except Exception as e:
        rec["status"] = 0; rec["error"] = repr(e)
        try:
            conn.close()
        except Exception:
            pass
        conn = None
    rec["ms"] = round((time.time() - t) * 1000, 1)
    f.write(json.dumps(rec) + "\\n")
    next_t += 1.0 / rate
    time.sleep(max(0.0, next_t - time.time()))
"""

SERVICE_DB = """\
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: db, namespace: default}
spec:
  selector: {app: db}
  ports: [{port: 5432, targetPort: 9090, protocol: tcp}]
"""


def rollout_doc(name: str = "web", service: str = "web", steps: tuple[int, ...] = (20, 50, 100), pause: str = "3s",
                interval: str = "1s", p99: str | None = None, **extra: Any) -> str:
    spec: dict[str, Any] = {
        "service": service, "versionLabel": "version", "stable": "v1", "candidate": "v2",
        "strategy": {"type": "Steps", "steps": list(steps), "pause": pause},
        "analysis": {"interval": interval, "minRequests": 3, "successRate": 0.95},
    }
    if p99:  # only where latency is under test: a few cold HBONE handshakes on a busy CI box dominate a small p99
        spec["analysis"]["p99Latency"] = p99
    spec.update(extra)
    return str(yaml.safe_dump({"apiVersion": "nodemesh.io/v1alpha1", "kind": "Rollout",
                               "metadata": {"name": name, "namespace": "default"}, "spec": spec}, sort_keys=False))


def two_versions(lab: Lab, app: str = "web", port: int = 8080, v2_args: tuple[str, ...] = (),
                 extra_config: str = "") -> None:
    """v1 on node 1 (with the client), v2 on node 2, both behind the service."""
    lab.start_controlplane()
    lab.apply(BASE_CONFIG + extra_config)
    lab.add_workload(LabWorkload(f"{app}-v1", node=1, uid=2001, ports=(port,), service_account=app,
                                 labels={"app": app, "version": "v1"}))
    lab.add_workload(LabWorkload(f"{app}-v2", node=2, uid=2002, ports=(port,), service_account=app,
                                 labels={"app": app, "version": "v2"}))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client"))
    lab.start_app(f"{app}-v1")
    lab.start_app(f"{app}-v2", v2_args)
    lab.start_agent(1)
    lab.start_agent(2)


def start_client(lab: Lab, service: str = "web", port: int = 80, rate: float = 40.0, close: bool = False,
                 name: str = "steady", address: tuple[str, int] | None = None) -> Path:
    script = lab.workdir / "steady_client.py"
    script.write_text(CLIENT)
    out = lab.workdir / f"{name}.jsonl"
    out.touch()
    out.chmod(0o666)
    host, port = address or (lab.service_vip(service), port)
    lab.spawn(name, lab.node_ns(1), ["/usr/bin/python3", str(script), host, str(port), str(rate), str(out),
                                     *(["--close"] if close else [])], uid=CLIENT_UID)
    return out


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def status(lab: Lab, name: str = "web") -> dict[str, Any]:
    with lab.config_client() as c:
        r = c.get("Rollout", name, "default")
    return dict(json.loads(r.status_json or "{}"))


def wait_phase(lab: Lab, phases: tuple[str, ...], timeout: float, name: str = "web") -> dict[str, Any]:
    lab.wait_for(lambda: status(lab, name).get("phase") in phases, timeout, f"rollout {name} to reach {phases}",
                 lambda: json.dumps(status(lab, name), indent=1)[-3000:] + lab.log("controlplane")[-2000:])
    return status(lab, name)


def wait_steady(lab: Lab, out: Path, replicas: set[str] | None, timeout: float = 20.0) -> None:
    """Until the client's recent answers are all 200 and (when given) come from exactly these replicas."""
    def ok() -> bool:
        recent = records(out)[-20:]
        return len(recent) == 20 and all(r["status"] == 200 for r in recent) and \
            (replicas is None or {r.get("replica") for r in recent} == replicas)
    lab.wait_for(ok, timeout, f"the client to reach {replicas}", lambda: str(records(out)[-5:]))


def cli(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nodemesh", "rollout", *args, "--server", lab.cp_unix],
                          check=False, capture_output=True, text=True, timeout=30)


def shares_per_step(recs: list[dict[str, Any]], decisions: list[dict[str, Any]], settle_s: float = 1.5
                    ) -> list[tuple[int, float, int]]:
    """(candidate weight, observed share of v2, requests) per step, skipping each step's first settle_s."""
    starts = [d for d in decisions if d["decision"] in ("start", "step", "promote")]
    out = []
    for a, b in itertools.pairwise(starts):
        window = [r for r in recs if a["t"] + settle_s <= r["t"] < b["t"] and r["status"] == 200]
        if window:
            share = sum(1 for r in window if r["replica"].endswith("-v2")) / len(window)
            out.append((int(a["weight"]), share, len(window)))
    return out


def share_ok(weight: int, share: float, n: int) -> bool:
    """The observed share is within 4.5 standard deviations of the weight (each request is an
    independent weighted draw, so a fixed tolerance fails by chance at small n; 4.5 sigma is one
    false failure in ~150,000 steps while a share that ignores the weight is still caught)."""
    p = weight / 100
    return abs(share - p) <= max(0.05, 4.5 * math.sqrt(p * (1 - p) / n))


def test_healthy_v2_is_promoted_step_by_step_with_zero_failures(lab: Lab) -> None:
    two_versions(lab)
    out = start_client(lab)
    wait_steady(lab, out, None)  # no Rollout yet: the mesh serves the client
    lab.apply(rollout_doc(pause="4s", expireAfter="1h"))  # ~100 requests per step
    # The live view shows the progress bar and the readings against the thresholds.
    lab.wait_for(lambda: bool(status(lab).get("readings")), 15, "a first reading")
    view = cli(lab, "status", "web", "--once")
    assert view.returncode == 0 and "progress  [" in view.stdout and "success rate >= 0.95" in view.stdout, view
    assert "reading" in view.stdout, view.stdout
    st = wait_phase(lab, ("Promoted", "RolledBack"), 60)
    assert st["phase"] == "Promoted", json.dumps(st, indent=1)
    wait_steady(lab, out, {"web-v2"})
    lab.stop("steady")
    recs = records(out)
    failed = [r for r in recs if r["status"] != 200]
    assert not failed, failed[:5]
    steps = shares_per_step(recs, st["decisions"])
    assert [w for w, _, _ in steps] == [20, 50, 100], steps
    for w, share, n in steps:
        assert n >= 40 and share_ok(w, share, n), steps
    assert all(r["verdict"] == "pass" for r in st["readings"] if r["candidate"]["total"] >= 3), st["readings"]
    js = cli(lab, "status", "web", "-o", "json")
    assert json.loads(js.stdout)["status"]["phase"] == "Promoted"
    # The control plane's mesh view binds 127.0.0.1 in the hub namespace: ask there.
    metrics = lab.ns_exec(lab.hub, ["curl", "-s", "http://127.0.0.1:15014/metrics"], check=False)
    assert 'nodemesh_rollout_decisions_total{decision="promote",reason="steps_complete"} 1' in metrics.stdout, \
        metrics.stdout[-2000:]
    assert 'nodemesh_rollout_step{rollout="default/web"} 0' in metrics.stdout
    # The mesh view lists the rollout with its weights and last reading.
    graph = json.loads(lab.meshview_get("/api/graph"))  # behind the operator login
    (view_ro,) = graph["rollouts"]
    assert (view_ro["phase"], view_ro["weight"]) == ("Promoted", 100)
    assert view_ro["reading"]["verdict"] in ("pass", "inconclusive") and "total" in view_ro["reading"]["candidate"]


def test_v2_failing_half_its_requests_is_rolled_back_within_two_intervals(lab: Lab) -> None:
    two_versions(lab, v2_args=("--fail-rate", "0.5"))
    out = start_client(lab)
    time.sleep(3)  # the client runs before the Rollout is applied (v2's failures show, unmanaged)
    lab.apply(rollout_doc(steps=(20, 50, 100), pause="4s", interval="2s"))
    st = wait_phase(lab, ("RolledBack", "Promoted"), 40)
    assert st["phase"] == "RolledBack", json.dumps(st, indent=1)
    time.sleep(3)
    lab.stop("steady")
    started = next(d for d in st["decisions"] if d["decision"] == "start")
    rolled = next(d for d in st["decisions"] if d["decision"] == "rollback")
    assert rolled["reason"] == "success_rate" and "below the floor 0.95" in st["reason"], st["reason"]
    assert rolled["weight"] == 20  # never went past the first step
    # Within two analysis intervals of the first one that could see v2's traffic (data reach
    # the control plane on heartbeats: ~1.3 s here, plus the agent's 1 s summary refresh).
    assert rolled["t"] - started["t"] <= 2 * 2.0 + 2.5, (started, rolled)
    recs = [r for r in records(out) if r["t"] >= started["t"]]
    during = [r for r in recs if r["t"] <= rolled["t"] + 1.0]
    failures = [r for r in during if r["status"] != 200]
    # Bounded by the step's weight: at most 20 % of the requests in that time (v2 fails half of its share).
    assert len(failures) <= 0.2 * len(during) + 3, (len(failures), len(during))
    after = [r for r in recs if r["t"] > rolled["t"] + 1.5]
    assert after and all(r["status"] == 200 and r["replica"] == "web-v1" for r in after), after[-5:]
    hist = cli(lab, "history", "web")
    assert "RolledBack" in hist.stdout and "success rate" in hist.stdout, hist


def test_slow_v2_is_rolled_back_on_p99(lab: Lab) -> None:
    two_versions(lab, v2_args=("--delay-ms", "700"))
    start_client(lab, rate=30)
    lab.apply(rollout_doc(steps=(30, 100), pause="4s", interval="2s", p99="400ms"))
    st = wait_phase(lab, ("RolledBack", "Promoted"), 40)
    assert st["phase"] == "RolledBack" and st["decisions"][-1]["reason"] == "latency", json.dumps(st, indent=1)
    assert "above the ceiling 400 ms" in st["reason"]


def test_invalid_rollouts_are_refused_with_field_paths(lab: Lab) -> None:
    two_versions(lab)
    from controlplane.apiclient import ClientError

    cases = [
        (rollout_doc(service="nope"), "Rollout default/web: spec.service", "no Service default/nope"),
        (rollout_doc(steps=(10, 60)), "Rollout default/web: spec.strategy.steps[1]", "the last step must be 100"),
        (rollout_doc(candidate="v9"), "Rollout default/web: spec.candidate", "version=v9 selects no registered"),
    ]
    # The versions must be registered before the label check can pass: wait for both agents' workloads.
    lab.wait_for(lambda: cli(lab, "status", "web").returncode != 0, 5, "no rollout yet")
    time.sleep(1)
    for doc, path, reason in cases:
        with pytest.raises(ClientError) as e:
            lab.apply(doc)
        assert path in str(e.value) and reason in str(e.value), str(e.value)
    with lab.config_client() as c:
        assert c.list("Rollout") == []


def test_cli_pause_resume_abort_then_a_new_run_promoted(lab: Lab) -> None:
    two_versions(lab)
    out = start_client(lab, rate=20)
    lab.apply(rollout_doc(steps=(10, 20, 30, 40, 100), pause="4s"))
    lab.wait_for(lambda: status(lab).get("weight") == 20, 30, "step 2")
    assert cli(lab, "pause", "web").returncode == 0
    st = wait_phase(lab, ("Paused",), 5)
    held = st["step"]
    time.sleep(4)
    assert status(lab)["phase"] == "Paused" and status(lab)["step"] == held
    assert cli(lab, "resume", "web").returncode == 0
    lab.wait_for(lambda: status(lab).get("step", 0) > held, 15, "a step after resuming")
    r = cli(lab, "abort", "web")
    assert r.returncode == 0, r
    st = wait_phase(lab, ("RolledBack",), 5)
    assert "aborted by the operator" in st["reason"]
    wait_steady(lab, out, {"web-v1"})
    assert cli(lab, "promote", "web").returncode == 1  # already ended
    # Another run (other steps): promoted from the CLI at once.
    lab.apply(rollout_doc(steps=(5, 100), pause="30s"))
    lab.wait_for(lambda: status(lab).get("phase") == "Progressing", 5, "the new run")
    assert cli(lab, "promote", "web").returncode == 0
    st = wait_phase(lab, ("Promoted",), 5)
    wait_steady(lab, out, {"web-v2"})
    hist = json.loads(cli(lab, "history", "web", "-o", "json").stdout)
    assert [h["outcome"] for h in hist] == ["RolledBack", "Promoted"]
    lab.stop("steady")
    assert all(r["status"] == 200 for r in records(out)), [r for r in records(out) if r["status"] != 200][:3]


def test_control_plane_restart_mid_rollout_resumes_from_its_step(lab: Lab) -> None:
    two_versions(lab)
    out = start_client(lab, rate=20)
    lab.apply(rollout_doc(steps=(10, 30, 60, 100), pause="3s"))
    lab.wait_for(lambda: status(lab).get("step", 0) >= 1, 30, "step 2")
    before = status(lab)
    lab.stop("controlplane")
    time.sleep(1)
    lab.start_controlplane()
    st = wait_phase(lab, ("Promoted", "RolledBack"), 60)
    assert st["phase"] == "Promoted" and st["startedAt"] == before["startedAt"]
    steps = [d["weight"] for d in st["decisions"] if d["decision"] in ("start", "step")]
    assert steps == [10, 30, 60, 100], steps  # no step repeated or restarted from the first
    lab.stop("steady")
    failed = [r for r in records(out) if r["t"] > before["startedAt"] and r["status"] != 200]
    assert not failed, (len(failed), failed[:3], failed[-3:], [e for e in lab.access_log(1)
                                                                if e.get("status", 200) != 200][:3])


def test_expiry_retires_the_old_version_only_once_it_gets_no_traffic(lab: Lab) -> None:
    two_versions(lab)
    lab.apply(rollout_doc(steps=(100,), pause="1s", expireAfter="1s", expiryGrace="3s"))
    start_client(lab, rate=20)
    st = wait_phase(lab, ("Promoted",), 30)
    # Something still calls web-v1 directly (its workload address): it must not retire.
    start_client(lab, rate=10, name="direct", address=(lab.node_ip(1), 8080))
    time.sleep(6)
    st = status(lab)
    assert st["retirement"]["version"] == "v1" and st["retirement"]["state"] == "Waiting", st["retirement"]
    assert "still receives traffic" in st["retirement"]["reason"], st["retirement"]
    lab.stop("direct")
    lab.wait_for(lambda: status(lab)["retirement"]["state"] == "Retired", 20, "v1 retired",
                 lambda: json.dumps(status(lab)["retirement"]))
    st = status(lab)
    assert "can be shut down" in st["retirement"]["reason"]

    def web_endpoints() -> set[str]:
        token = (lab.workdir / "agent-1" / "admin.token").read_text().strip()  # /config_dump needs it
        dump = lab.ns_exec(lab.node_ns(1), ["curl", "-s", "-H", f"Authorization: Bearer {token}",
                                            "http://127.0.0.1:15000/config_dump"], check=False).stdout
        web = next(s for s in json.loads(dump)["services"] if s["name"] == "web")
        return {e["workload"] for sp in (web["ports"][0], *web["ports"][0]["subsets"]) for e in sp["endpoints"]}

    # Withdrawn from every cluster of the service on the node (one xDS push after the decision).
    lab.wait_for(lambda: web_endpoints() == {"default/web-v2"}, 5, "v1's endpoints withdrawn on node-1",
                 lambda: str(web_endpoints()))


def test_tcp_service_is_shifted_per_connection(lab: Lab) -> None:
    two_versions(lab, app="db", port=9090, extra_config=SERVICE_DB)
    out = start_client(lab, service="db", port=5432, rate=30, close=True)
    lab.apply(rollout_doc(service="db", steps=(50, 100), pause="5s", interval="1s"))
    st = wait_phase(lab, ("Promoted", "RolledBack"), 40)
    assert st["phase"] == "Promoted", json.dumps(st, indent=1)
    wait_steady(lab, out, {"db-v2"})
    lab.stop("steady")
    recs = records(out)
    assert all(r["status"] == 200 for r in recs if r["t"] > st["startedAt"])
    steps = shares_per_step(recs, st["decisions"])
    assert steps and steps[0][0] == 50 and share_ok(50, steps[0][1], steps[0][2]), steps


GRPC_SERVER = r"""
import random, sys, grpc
from concurrent import futures
name, port, fail = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def unary(req, ctx):
    if fail and random.random() < fail:
        ctx.abort(grpc.StatusCode.UNAVAILABLE, f"{name} is failing")
    return name.encode()
h = {"Unary": grpc.unary_unary_rpc_method_handler(unary, lambda b: b, lambda b: b)}
s = grpc.server(futures.ThreadPoolExecutor(8))
s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", h),))
s.add_insecure_port(f"0.0.0.0:{port}")
s.start()
s.wait_for_termination()
"""

GRPC_CLIENT = r"""
import json, sys, time, grpc
target, rate, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
f = open(out, "a", buffering=1)
ch = grpc.insecure_channel(target)  # one HTTP/2 connection: the split is per request
call = ch.unary_unary("/test.Echo/Unary", lambda b: b, lambda b: b)
next_t = time.time()
while True:
    t = time.time()
    rec = {"t": t}
    try:
        rec["replica"] = call(b"x", timeout=5).decode(); rec["status"] = 200
    except grpc.RpcError as e:
        rec["status"] = 0; rec["error"] = e.code().name
    f.write(json.dumps(rec) + "\n")
    next_t += 1.0 / rate
    time.sleep(max(0.0, next_t - time.time()))
"""

SERVICE_ECHO = """\
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: echo, namespace: default}
spec: {selector: {app: echo}, ports: [{port: 50051, targetPort: 50051, protocol: grpc}]}
"""


@pytest.mark.parametrize("v2_fail", [0.0, 0.5], ids=["healthy", "unavailable"])
def test_grpc_service_is_shifted_per_request_and_judged_by_status(lab: Lab, v2_fail: float) -> None:
    lab.start_controlplane()
    lab.apply(BASE_CONFIG + SERVICE_ECHO)
    for wl in (LabWorkload("echo-v1", node=1, uid=2001, ports=(50051,), service_account="echo",
                           labels={"app": "echo", "version": "v1"}),
               LabWorkload("echo-v2", node=2, uid=2002, ports=(50051,), service_account="echo",
                           labels={"app": "echo", "version": "v2"}),
               LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client")):
        lab.add_workload(wl)
    for name, fail in (("echo-v1", 0.0), ("echo-v2", v2_fail)):
        wl = lab.workloads[name]
        lab.spawn(f"app-{name}", lab.node_ns(wl.node), [sys.executable, "-c", GRPC_SERVER, name, "50051", str(fail)],
                  uid=wl.uid)
        lab.wait_for(lambda wl=wl: lab._listening(wl.node, 50051), 15, f"{name} to listen")
    lab.start_agent(1)
    lab.start_agent(2)
    out = lab.workdir / "grpc.jsonl"
    out.touch()
    out.chmod(0o666)
    lab.spawn("steady", lab.node_ns(1), [sys.executable, "-c", GRPC_CLIENT, f"{lab.service_vip('echo')}:50051",
                                         "30", str(out)], uid=CLIENT_UID)
    lab.wait_for(lambda: any(r["status"] == 200 for r in records(out)[-5:]), 20, "the gRPC client to get answers")
    lab.apply(rollout_doc(service="echo", steps=(40, 100), pause="5s", interval="1s",
                          analysis={"interval": "1s", "minRequests": 3, "successRate": 0.95,
                                    "grpcFailureClasses": ["unavailable"]}))
    st = wait_phase(lab, ("Promoted", "RolledBack"), 40)
    lab.stop("steady")
    recs = [r for r in records(out) if r["t"] >= st["startedAt"]]
    if v2_fail:
        assert st["phase"] == "RolledBack" and st["decisions"][-1]["reason"] == "success_rate", json.dumps(st)
        failed = [r for r in recs if r["status"] != 200]
        assert failed and {r["error"] for r in failed} == {"UNAVAILABLE"}
        return
    assert st["phase"] == "Promoted", json.dumps(st, indent=1)
    assert all(r["status"] == 200 for r in recs), [r for r in recs if r["status"] != 200][:3]
    steps = shares_per_step(recs, st["decisions"])
    assert steps and steps[0][0] == 40 and share_ok(40, steps[0][1], steps[0][2]), steps
