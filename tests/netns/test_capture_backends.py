"""The same capture scenarios for each backend (iptables, nftables), for real in
network namespaces: outbound to a VIP, inbound TPROXY keeping the caller's
address, exclusions, the proxy's own traffic not looping, fail-open and
fail-closed with the proxy workers killed, verify, and clean removal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from nodemesh.lab.harness import Lab, LabWorkload
from tests.conftest import wait_until
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID, WEB_UID

pytestmark = pytest.mark.netns

BACKENDS = ["iptables", "nftables", "ebpf"]
RESTART_DELAY_S = 4.0  # the pool's restart delay during these tests: an observable proxy-down window


def start(lab: Lab, backend: str, policy: str, monkeypatch: pytest.MonkeyPatch, exclude: list[str]) -> None:
    orig = lab.agent_config

    def agent_config(k: int, capture_mode: str | None = None) -> dict[str, Any]:
        cfg = orig(k)
        cfg["capture"] = {"mode": backend, "failurePolicy": policy, "inbound": "tproxy", "excludeCidrs": exclude}
        return cfg

    lab.agent_config = agent_config  # type: ignore[method-assign]
    monkeypatch.setenv("NODEMESH_TEST_WORKER_RESTART_DELAY_S", str(RESTART_DELAY_S))
    lab.start_controlplane()
    lab.apply(BASE_CONFIG)
    lab.add_workload(LabWorkload("web-1", node=1, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client"))
    lab.start_app("web-1")
    lab.start_agent(1)


def curl_json(lab: Lab, node: int, url: str, uid: int, timeout: float = 5.0) -> dict[str, Any]:
    res = lab.curl(node, url, uid=uid, timeout=timeout)
    assert res.returncode == 0, f"curl {url} from node {node} failed: {res.stderr}\n{lab.log('agent-1')[-3000:]}"
    return dict(json.loads(res.stdout))


def worker_pids(lab: Lab, k: int) -> list[int]:
    pids = subprocess.run(["ip", "netns", "pids", lab.node_ns(k)], capture_output=True, text=True,
                          check=True).stdout.split()
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"nodeagent.proxy.worker" in cmd:
            out.append(int(pid))
    return out


def capture_back_diag(lab: Lab) -> str:
    """What to look at when capture does not come back after the workers were killed:
    the agent's status (proxy state, windows, workers up) and its log tail (the
    restart, the failover's switches, any worker start error)."""
    st = lab.agent_status(1)
    keys = ("proxy_state", "proxy_down_windows", "proxy_down_seconds", "failover_error", "workers_alive", "workers_up")
    return f"status: { {k: st.get(k) for k in keys} }\nagent-1 log:\n{lab.log('agent-1')[-3000:]}"


def kill_workers(lab: Lab, k: int) -> float:
    pids = worker_pids(lab, k)
    assert pids, "no proxy worker process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def nodemesh(lab: Lab, k: int, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.ns_exec(lab.node_ns(k), [sys.executable, "-m", "nodemesh", *args], check=False)


@pytest.fixture(autouse=True)
def _detach_ebpf(lab: Lab) -> Any:
    """eBPF programs of uid workloads sit on the host's cgroup root: detach
    whatever a failed test left before its namespaces go (see test_capture_ebpf)."""
    yield
    for k in range(1, lab.nodes + 1):
        lab.ns_exec(lab.node_ns(k), [sys.executable, "-m", "nodeagent.capture.bpfcli", "remove-leftovers"],
                    check=False)


def leftovers(lab: Lab, k: int) -> list[str]:
    ns = lab.node_ns(k)
    found = []
    if lab.ns_exec(ns, [sys.executable, "-m", "nodeagent.capture.bpfcli", "status"]).stdout.strip():
        found.append("ebpf programs")
    if "NODEMESH" in lab.ns_exec(ns, ["iptables-save"]).stdout:
        found.append("iptables chains")
    if "nodemesh" in lab.ns_exec(ns, ["nft", "list", "ruleset"]).stdout:
        found.append("nft table")
    if "lookup 15006" in lab.ns_exec(ns, ["ip", "rule"]).stdout:
        found.append("ip rule")
    if lab.ns_exec(ns, ["ip", "route", "show", "table", "15006"], check=False).stdout.strip():
        found.append("table 15006 route")
    return found


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_open(lab: Lab, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Node 2 serves a plain listener that node 1 excludes from capture.
    lab.spawn("plain-2", lab.node_ns(2), [sys.executable, "-m", "nodemesh.lab.labapp", "--name", "plain",
                                          "--node", "node-2", "--port", "9090"])
    start(lab, backend, "open", monkeypatch, exclude=[f"{lab.node_ip(2)}/32"])
    st = lab.agent_status(1)
    assert st["capture_backend"] == backend and st["proxy_state"] == "serving", st
    if backend == "ebpf":  # said before bcc's seconds of compiling, and compiled once (probe + install)
        log = lab.log("agent-1")
        assert "compiling BPF programs" in log and log.count("ebpf: compiling and loading bpf/") == 1, log[-3000:]

    # Outbound to a VIP, through the proxy exactly once (its own connection is not captured again).
    vip = lab.service_vip("web")
    assert curl_json(lab, 1, f"http://{vip}/out", CLIENT_UID)["replica"] == "web-1"
    wait_until(lambda: any(e.get("direction") == "outbound" for e in lab.access_log(1)), 5, "outbound log line")
    # One client connection (the L7 layer may add a per-request line for it).
    srcs = {e.get("src") for e in lab.access_log(1) if e.get("direction") == "outbound" and e.get("src")}
    assert len(srcs) == 1, lab.access_log(1)
    assert all(":1500" not in str(e.get("dst_addr", "")) for e in lab.access_log(1)), "the proxy captured itself"

    # Inbound TPROXY: a plaintext caller on node 2 (not a workload) reaches web-1 through
    # node 1's proxy, and the workload sees the caller's real address.
    body = curl_json(lab, 2, f"http://{lab.node_ip(1)}:8080/in", uid=0)
    assert body["peer"].split(":")[0] == lab.node_ip(2), body
    wait_until(lambda: any(e.get("via") == "plaintext" for e in lab.access_log(1)), 5, "inbound log line")
    inbound = [e for e in lab.access_log(1) if e.get("direction") == "inbound" and e.get("via") == "plaintext"]
    assert inbound[-1]["dst_addr"] == f"{lab.node_ip(1)}:8080", inbound
    assert inbound[-1]["src"].startswith(lab.node_ip(2) + ":"), inbound

    # Exclusions: the client reaches node 2's excluded address directly, unlogged.
    n = len(lab.access_log(1))
    assert curl_json(lab, 1, f"http://{lab.node_ip(2)}:9090/x", CLIENT_UID)["replica"] == "plain"
    time.sleep(0.3)
    assert not [e for e in lab.access_log(1)[n:] if "9090" in str(e.get("dst_addr", ""))]

    assert nodemesh(lab, 1, "capture", "verify", "--config", str(lab.workdir / "agent-1.yaml")).returncode == 0

    # Fail open: workers killed -> within ~1 s traffic bypasses the mesh (direct to the
    # workload, unlogged) and the window is counted; then capture comes back.
    t0 = kill_workers(lab, 1)
    wait_until(lambda: lab.agent_status(1).get("proxy_state") == "bypass", 2, "bypass state",
               diag=lambda: lab.log("agent-1")[-2000:])
    assert time.monotonic() - t0 < 1.5
    n = len(lab.access_log(1))
    direct = curl_json(lab, 1, f"http://{lab.node_ip(1)}:8080/bypass", CLIENT_UID, timeout=2)
    assert direct["replica"] == "web-1"
    assert curl_json(lab, 2, f"http://{lab.node_ip(1)}:8080/bypass-in", uid=0, timeout=2)["replica"] == "web-1"
    assert len(lab.access_log(1)) == n, "traffic went through a proxy that was supposed to be down"
    wait_until(lambda: lab.agent_status(1).get("proxy_state") == "serving", RESTART_DELAY_S + 5, "capture back",
               diag=lambda: capture_back_diag(lab))
    st = lab.agent_status(1)
    assert st["proxy_down_windows"] == 1 and st["proxy_down_seconds"] > 1, st
    assert "BYPASSES the mesh" in lab.log("agent-1")
    assert curl_json(lab, 1, f"http://{vip}/again", CLIENT_UID)["replica"] == "web-1"

    # Clean removal on stop.
    assert lab.stop("agent-1") == 0, lab.log("agent-1")[-2000:]
    assert leftovers(lab, 1) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_closed(lab: Lab, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    start(lab, backend, "closed", monkeypatch, exclude=[])
    url = f"http://{lab.node_ip(1)}:8080/"
    assert curl_json(lab, 2, url, uid=0)["replica"] == "web-1"

    # Fail closed: with the workers dead, connections are refused at once, not hung.
    kill_workers(lab, 1)
    wait_until(lambda: lab.agent_status(1).get("proxy_state") == "refuse", 2, "refuse state",
               diag=lambda: lab.log("agent-1")[-2000:])
    for node, uid in ((1, CLIENT_UID), (2, 0)):
        t = time.monotonic()
        res = lab.curl(node, url, uid=uid, timeout=3)
        assert res.returncode == 7, f"node {node}: expected connection refused, got {res.returncode} {res.stderr}"
        assert time.monotonic() - t < 1.0, "refusal took too long (hung?)"
    wait_until(lambda: lab.agent_status(1).get("proxy_state") == "serving", RESTART_DELAY_S + 5, "capture back",
               diag=lambda: capture_back_diag(lab))
    assert curl_json(lab, 2, url, uid=0)["replica"] == "web-1"

    # Stop under closed: capture stays, refusing, so nothing goes unmeshed while the
    # agent is away; a killed agent's leftovers are repaired by the next start.
    assert lab.stop("agent-1") == 0
    assert leftovers(lab, 1), "closed policy must keep capture across a stop"
    assert lab.curl(1, url, uid=CLIENT_UID, timeout=3).returncode == 7
    lab.start_agent(1)
    lab.stop("agent-1", sig=signal.SIGKILL)
    lab.start_agent(1)
    assert nodemesh(lab, 1, "capture", "verify", "--config", str(lab.workdir / "agent-1.yaml")).returncode == 0
    assert curl_json(lab, 1, f"http://{lab.service_vip('web')}/", CLIENT_UID)["replica"] == "web-1"
    status = nodemesh(lab, 1, "capture", "status")
    assert {"ebpf": "nm_connect4"}.get(backend, backend) in status.stdout, status.stdout
    lab.stop("agent-1")
    assert nodemesh(lab, 1, "capture", "remove").returncode == 0
    assert leftovers(lab, 1) == []


# Two sockets of one workload bound to the same local port (SO_REUSEADDR, as Linux
# itself does when it reuses an ephemeral port for another destination), each sends
# one HTTP request and reads the whole answer.
SAME_PORT_CLIENT = r"""
import json, socket, sys
dests = [(sys.argv[1], int(sys.argv[2])), (sys.argv[3], int(sys.argv[4]))]
socks, port = [], 0
for host, p in dests:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(5)
    s.bind(("0.0.0.0", port))
    port = s.getsockname()[1]
    s.connect((host, p))
    socks.append(s)
out = []
for (host, p), s in zip(dests, socks):
    data = b""
    try:
        s.sendall(f"GET /same-port HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        out.append({"dst": f"{host}:{p}", "answer": data.decode(errors="replace")})
    except OSError as e:
        out.append({"dst": f"{host}:{p}", "error": repr(e), "answer": data.decode(errors="replace")})
print(json.dumps({"port": port, "results": out}))
"""


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_capture_same_source_port(lab: Lab, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """REDIRECT rewrites both connections to the proxy's port: the second one's reply
    tuple clashes with the first and conntrack remaps its source port. The proxy must
    still find the client's socket (conntrack's original tuple) and serve both."""
    start(lab, backend, "open", monkeypatch, exclude=[])
    vip, web = lab.service_vip("web"), lab.node_ip(1)
    res = lab.ns_exec(lab.node_ns(1), ["/usr/bin/python3", "-c", SAME_PORT_CLIENT, vip, "80", web, "8080"],
                      uid=CLIENT_UID, check=False, timeout=20)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    out = json.loads(res.stdout)
    port = out["port"]
    for r in out["results"]:
        assert "error" not in r and r["answer"].startswith("HTTP/1.1 200"), \
            f"{r}\nagent-1 log:\n{lab.log('agent-1')[-3000:]}"
        assert json.loads(r["answer"].split("\r\n\r\n", 1)[1])["replica"] == "web-1", r

    # Attributed to the client workload, under the client's real source port (not the remapped one).
    dsts = {f"{vip}:80", f"{web}:8080"}

    def lines() -> list[dict[str, Any]]:
        return [e for e in lab.access_log(1) if e.get("direction") == "outbound" and e.get("dst_addr") in dsts]

    wait_until(lambda: {e["dst_addr"] for e in lines()} == dsts, 5, "an access log line for each connection",
               diag=lambda: json.dumps(lab.access_log(1)[-6:]))
    for e in lines():
        assert e.get("source_workload") == "default/client" and "reason" not in e, e
    assert {e.get("src") for e in lines() if e.get("src")} == {f"{web}:{port}"}, (port, lines())
    assert "cannot find the socket" not in lab.log("agent-1")
