"""nodemesh installed as systemd services on booted machines: install → join →
traffic across nodes with mTLS, READY only once capture serves, the watchdog,
kill -9 under failurePolicy open and closed, uninstall leaving nothing behind.
The tests share one cluster and run in file order (uninstall last)."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from tests.cluster.conftest import CLIENT_UID, Tier
from tests.conftest import wait_until

# Booting and provisioning the machines is part of the first test's setup, and a
# restart under load takes a while on a shared machine: more than the default 120 s.
pytestmark = pytest.mark.timeout(600)


def _agent_log(t: Tier, host: str, since: str = "") -> str:
    return t.sh(host, f"journalctl -u nodemesh-agent --no-pager -q -o cat {since}")


def test_install_join_and_traffic_across_nodes_with_mtls(tier: Tier) -> None:
    for host in ("node1", "node2"):
        assert tier.prop(host, "ActiveState") == "active"
        assert tier.prop(host, "User") == "nodemesh"  # not root
        st = json.loads(tier.sh(host, "cat /var/lib/nodemesh/status.json"))
        assert st["phase"] == "running" and st["capture_installed"] and st["capture_backend"] == "iptables"
    assert tier.prop("cp", "ActiveState", "nodemesh-controlplane") == "active"
    replicas = set()
    for _ in range(20):
        rc, out = tier.curl("node1", f"http://{tier.vip}/across")
        assert rc == 0, out
        replicas.add(json.loads(out)["replica"])
        if replicas == {"web-node1", "web-node2"}:
            break
    assert replicas == {"web-node1", "web-node2"}
    # The hop to node2 was HBONE with mutual TLS, and only TLS crossed the bridge.
    lines = [json.loads(x) for x in _agent_log(tier, "node1").splitlines() if x.startswith("{")]
    crossed = [x for x in lines if x.get("dst_workload") == "default/web-node2" and x.get("direction") == "outbound"]
    assert crossed and all(x["via"] == "hbone" and x["connection_security_policy"] == "mutual_tls" for x in crossed)
    assert all(x["node"] == "node1" and x["upstream_node"] == "node2" for x in crossed)
    # The node has no default route: the agent routed the VIP range while capturing.
    routes = tier.sh("node1", "ip route")
    assert "default" not in routes and re.search(r"240\.240\.0\.0/16 dev lo proto 151", routes), routes


def test_ready_only_once_capture_serves(tier: Tier) -> None:
    """With the control plane down, an agent started afresh (a stop, then a start:
    nothing carried over, unlike a restart) has no snapshot: it stays
    `activating` with no capture; READY (active) comes with capture, and then
    traffic flows at once. A restart meanwhile serves from the carried snapshot
    and certificates without the control plane."""
    tier.sh("cp", "systemctl stop nodemesh-controlplane")
    try:
        tier.sh("node2", "systemctl restart nodemesh-agent")  # returns at READY, from the carried state
        assert tier.prop("node2", "ActiveState") == "active"
        rc, out = tier.curl("node2", f"http://{tier.vip}/restarted-without-cp")
        assert rc == 0, out
        tier.sh("node2", "systemctl stop nodemesh-agent && systemctl start --no-block nodemesh-agent")
        wait_until(lambda: tier.prop("node2", "ActiveState") == "activating", 60, "the agent to be starting again")
        time.sleep(4)  # and it stays there: no snapshot, no capture, no READY
        assert tier.prop("node2", "ActiveState") == "activating"
        assert "NODEMESH" not in tier.sh("node2", "iptables-save -t nat")
    finally:
        tier.sh("cp", "systemctl start nodemesh-controlplane")
    wait_until(lambda: tier.prop("node2", "ActiveState") == "active", 60, "node2's agent to report READY")
    assert "NODEMESH" in tier.sh("node2", "iptables-save -t nat")
    assert tier.prop("node2", "StatusText").startswith("serving: capture iptables installed")
    rc, out = tier.curl("node2", f"http://{tier.vip}/ready")
    assert rc == 0 and json.loads(out)["replica"].startswith("web-"), out


def test_watchdog_restarts_a_wedged_agent(tier: Tier) -> None:
    """A proxy worker that stops answering (SIGSTOP) withholds the watchdog ping:
    systemd kills and restarts the agent within WatchdogSec."""
    before = int(tier.prop("node1", "NRestarts"))
    main = tier.prop("node1", "MainPID")
    worker = tier.sh("node1", "pgrep -f nodeagent.proxy.worker").split()[0]
    tier.sh("node1", f"kill -STOP {worker}")
    watchdog_s = int(tier.prop("node1", "WatchdogUSec").rstrip("s") or 0) if tier.prop(
        "node1", "WatchdogUSec").endswith("s") else 10
    wait_until(lambda: int(tier.prop("node1", "NRestarts")) > before, watchdog_s + 20, "the watchdog restart")
    wait_until(lambda: tier.prop("node1", "ActiveState") == "active", 60, "the restarted agent to be READY")
    assert tier.prop("node1", "MainPID") != main
    log = tier.sh("node1", "journalctl -u nodemesh-agent --no-pager -q")
    assert "Watchdog timeout" in log and "did not answer" in log
    rc, out = tier.curl("node1", f"http://{tier.vip}/after-watchdog")
    assert rc == 0, out


HOLD = """
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], 80), timeout=20)
def get(path):
    s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: web\\r\\n\\r\\n".encode())
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        head += s.recv(1)
    n = int([h.split(b":")[1] for h in head.split(b"\\r\\n") if h.lower().startswith(b"content-length")][0])
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    return head.split(b" ")[1].decode()
print("first", get("/held-1"), s.getsockname()[1], flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.1)
print("second", get("/held-2"), s.getsockname()[1], flush=True)
"""


def test_reload_applies_workloads_without_touching_connections(tier: Tier) -> None:
    """`systemctl reload` (SIGHUP, RELOADING=1 ... READY=1): a new workload is
    captured, the agent is not restarted, and a keep-alive connection held
    through the mesh meanwhile carries its next request on the same socket."""
    go = "/tmp/nodemesh-held-go"  # noqa: S108 (inside the test machine)
    tier.sh("node1", f"rm -f {go}; id extra >/dev/null 2>&1 || useradd --system --uid 3002 extra")
    main, restarts = tier.prop("node1", "MainPID"), tier.prop("node1", "NRestarts")
    out: list[str] = []
    th = threading.Thread(target=lambda: out.append(tier.c.run(
        "node1", ["setpriv", "--reuid=3001", "python3", "-c", HOLD, tier.vip, go], check=False, timeout=120).stdout))
    th.start()
    try:
        time.sleep(2)
        tier.sh("node1", "cp /etc/nodemesh/agent.yaml /root/agent.yaml.orig && echo '  - {name: extra-node1, "
                         "namespace: default, serviceAccount: extra, uid: 3002}' >> /etc/nodemesh/agent.yaml && "
                         "systemctl reload nodemesh-agent")
        wait_until(lambda: "--uid-owner 3002" in tier.sh("node1", "iptables-save -t nat"), 20,
                   "the new workload's rule")
        # Captured only once the proxy serves it: its first connection right after the
        # reload is answered through the mesh (it hung, then got a 503, before).
        res = tier.c.run("node1", f"setpriv --reuid=3002 curl -s -m 5 -o /dev/null -w '%{{http_code}}' "
                                  f"http://{tier.vip}/after-reload", check=False)
        assert res.stdout == "200", (res.stdout, res.stderr)
        assert tier.prop("node1", "ActiveState") == "active"
        assert (tier.prop("node1", "MainPID"), tier.prop("node1", "NRestarts")) == (main, restarts)
    finally:
        tier.sh("node1", f"touch {go}")
        th.join()
        tier.sh("node1", "cp /root/agent.yaml.orig /etc/nodemesh/agent.yaml && systemctl reload nodemesh-agent")
    lines = out[0].split("\n") if out else []
    assert len(lines) >= 2 and lines[0].startswith("first 200") and lines[1].startswith("second 200"), out
    assert lines[0].split()[2] == lines[1].split()[2], out  # the same connection


PROBE = """
import socket, sys, time
host, port, seconds, path = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
end = time.monotonic() + seconds
while time.monotonic() < end:
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=8) as s:
            s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n".encode())
            s.settimeout(8)
            data = s.recv(65536)
            outcome = "ok" if data.startswith(b"HTTP/1.1 200") else "bad:" + data[:12].decode(errors="replace")
    except OSError as e:
        outcome = type(e).__name__
    print(f"{time.monotonic() - t0:.3f} {outcome}", flush=True)
    time.sleep(0.1)
"""


def _probe_during(t: Tier, host: str, vip: str, path: str, seconds: float) -> list[tuple[float, str]]:
    """(duration, outcome) of a connection attempt + request every 0.1 s, as the client workload."""
    out = t.c.run(host, ["setpriv", "--reuid=3001", "python3", "-c", PROBE, vip, "80", str(seconds), path],
                  check=False, timeout=seconds + 60).stdout
    return [(float(d), o) for d, o in (line.split(" ", 1) for line in out.splitlines() if line.strip())]


def _kill9_and_probe(t: Tier, host: str, path: str) -> tuple[list[tuple[float, str]], float]:
    """(probe results, seconds from the kill until the restarted agent was READY)."""
    main = t.prop(host, "MainPID")
    wait_until(lambda: t.curl(host, f"http://{t.vip}/before")[0] == 0, 30, "the mesh to serve before the kill")
    results: list[list[tuple[float, str]]] = []
    th = threading.Thread(target=lambda: results.append(_probe_during(t, host, t.vip, path, 8)))
    th.start()
    time.sleep(1.5)
    t.sh(host, f"kill -9 {main}")
    killed = time.monotonic()
    def restarted() -> bool:
        # One `systemctl show` for both: two calls could pair one agent's state with another's pid.
        props = dict(line.split("=", 1) for line in t.sh(
            host, "systemctl show -p ActiveState -p MainPID nodemesh-agent").split())
        return props["ActiveState"] == "active" and props["MainPID"] not in (main, "0")

    wait_until(restarted, 60, "the agent to restart after kill -9")
    restart_s = time.monotonic() - killed
    th.join()
    return results[0], restart_s


def test_kill9_failure_policy_open_nothing_hangs(tier: Tier) -> None:
    """kill -9 under failurePolicy open: ExecStopPost removes the capture left
    behind; no connection attempt waits longer than the restart (one queued in
    the kept listener at the kill is served by the restarted agent), and the
    mesh is back after the restart."""
    results, restart_s = _kill9_and_probe(tier, "node1", "/k9open")
    assert len(results) > 10, results
    slowest = max(d for d, _ in results)
    assert slowest < restart_s + 1.0, f"a connection attempt hung {slowest:.1f}s (restart {restart_s:.1f}s): {results}"
    assert results[0][1] == "ok", results
    # Meanwhile plain connections failed at once (refused, then unroutable VIP), never waited.
    assert {o for _, o in results} <= {"ok", "ConnectionRefusedError", "ConnectionResetError", "OSError"}, results
    assert "failurePolicy open: removing its capture" in tier.sh("node1", "journalctl -u nodemesh-agent -q -o cat")
    rc, out = tier.curl("node1", f"http://{tier.vip}/k9open-after")
    assert rc == 0, out  # meshed again after the restart


def test_kill9_failure_policy_closed_refuses_fast(tier: Tier) -> None:
    tier.sh("node1", "sed -i 's/failurePolicy: open/failurePolicy: closed/' /etc/nodemesh/agent.yaml && "
                     "systemctl restart nodemesh-agent")
    try:
        results, restart_s = _kill9_and_probe(tier, "node1", "/k9closed")
        assert len(results) > 10, results
        slowest = max(d for d, _ in results)
        assert slowest < restart_s + 1.0, f"a connection attempt hung {slowest:.1f}s (restart {restart_s:.1f}s): " \
            f"{results}"
        assert results[0][1] == "ok", results
        # Closed: during the gap a connection waits in the kept listener for the restarted
        # agent (or is refused at once), never sent around the mesh; it is not accepted by
        # workers that have no snapshot yet (that was an EOF, "bad:").
        assert {o for _, o in results} <= {"ok", "ConnectionRefusedError", "ConnectionResetError"}, results
        assert "failurePolicy closed: capture stays" in tier.sh("node1", "journalctl -u nodemesh-agent -q -o cat")
        rc, out = tier.curl("node1", f"http://{tier.vip}/k9closed-after")
        assert rc == 0, out
    finally:
        tier.sh("node1", "sed -i 's/failurePolicy: closed/failurePolicy: open/' /etc/nodemesh/agent.yaml && "
                         "systemctl restart nodemesh-agent")


LOAD_RATE, LOAD_HELD = 200, 50  # the numbers: new connections per second, long-lived connections
UPGRADED = "0.1.0+tier-upgrade"


def test_restarts_and_upgrade_drop_nothing(tier: Tier) -> None:
    """Five `systemctl restart`s of the agents (node1, the calling side, and node2,
    the HBONE receiving side, in turn) and one upgrade of node1's (a second copy
    of the code with a bumped version, applied with provision.sh's documented
    `systemctl restart`) while a client on node1 keeps 50 keep-alive connections
    busy and opens 200 new ones per second through the mesh (to both nodes'
    replicas): no failed connect, no reset, no unanswered or failed request. The
    held connections end only gracefully (`Connection: close` at a response)."""
    stop = "/tmp/nodemesh-load-stop"  # noqa: S108 (inside the test machine)
    tier.sh("node1", f"rm -f {stop}")
    versions: list[str] = []
    out: list[str] = []
    load = threading.Thread(target=lambda: out.append(tier.c.run(
        "node1", ["setpriv", f"--reuid={CLIENT_UID}", "/usr/bin/python3",
                  "/opt/nodemesh-src/tests/cluster/restart_load.py", tier.vip, "80", str(LOAD_RATE), str(LOAD_HELD),
                  "0.5", stop], check=False, timeout=400).stdout))
    resumed = re.compile(r"serving [0-9.]+s after start with the previous agent's listeners")
    restarted = ["node1", "node2", "node1", "node2", "node1"]
    before = {h: len(_agent_log(tier, h)) for h in ("node1", "node2")}  # the journal so far, to skip
    load.start()
    try:
        time.sleep(3)
        for host in restarted:
            main = tier.prop(host, "MainPID")
            tier.sh(host, "systemctl restart nodemesh-agent")  # returns at READY (Type=notify)
            assert tier.prop(host, "MainPID") != main and tier.prop(host, "ActiveState") == "active"
            time.sleep(2)
        tier.sh("node1", "rm -rf /opt/nodemesh-next && mkdir -p /opt/nodemesh-next && cd /opt/nodemesh-src && "
                         "cp -a nodemesh nodeagent controlplane bpf pyproject.toml /opt/nodemesh-next/ && "
                         f"sed -i 's/^__version__ = .*/__version__ = \"{UPGRADED}\"/' "
                         "/opt/nodemesh-next/nodemesh/__init__.py && "
                         "bash /opt/nodemesh-src/vagrant/provision.sh upgrade /opt/nodemesh-next")
        time.sleep(3)
        versions.append(json.loads(tier.sh("node1", "cat /var/lib/nodemesh/status.json"))["agent_version"])
    finally:
        tier.sh("node1", f"touch {stop}")
        load.join()
    assert versions == [UPGRADED]
    assert out and out[0].strip(), "the load generator printed nothing"
    counts = json.loads(out[0].strip().splitlines()[-1])
    failures = {k: v for k, v in counts.items() if k.endswith(("failed_connects", "reset", "timeout", "error",
                                                               "bad_status")) and v}
    assert not failures, json.dumps(counts)
    # The load really ran at rate across the restarts, and each of node1's restarts (and
    # the upgrade) closed the held connections gracefully, at a response.
    assert counts["new_ok"] >= 0.9 * LOAD_RATE * counts["seconds"], counts
    assert counts["held_graceful_closes"] >= LOAD_HELD * (restarted.count("node1") + 1), counts
    for host, n in (("node1", restarted.count("node1") + 1), ("node2", restarted.count("node2"))):
        log = _agent_log(tier, host)[before[host]:]
        assert len(resumed.findall(log)) == n, (host, log[-3000:])
        assert "replacing leftover" not in log


def test_uninstall_leaves_nothing_behind(tier: Tier) -> None:
    out = tier.sh("node2", "nodemesh uninstall agent --purge")
    assert "unit" in out and "capture" in out
    leftovers = tier.sh("node2", "ls /etc/systemd/system/nodemesh-agent.service /var/lib/nodemesh "
                                 "/var/lib/nodemesh-install /etc/nodemesh/agent.yaml "
                                 "/sys/fs/cgroup/system.slice/nodemesh-agent.service 2>/dev/null; "
                                 "iptables-save | grep -i nodemesh; nft list ruleset | grep -i nodemesh; "
                                 "ip route | grep 'proto 151'; ip rule | grep -v -E '^(0|32766|32767):'; "
                                 "getent passwd nodemesh; pgrep -f '[n]odemesh agent|[n]odeagent.proxy'; true")
    assert leftovers.strip() == "", leftovers
    assert tier.prop("node2", "LoadState") == "not-found"
    out = tier.sh("cp", "nodemesh uninstall controlplane --purge")
    leftovers = tier.sh("cp", "ls /etc/systemd/system/nodemesh-controlplane.service /var/lib/nodemesh-cp "
                              "/run/nodemesh 2>/dev/null; getent passwd nodemesh-cp; "
                              "pgrep -f '[c]ontrolplane serve'; true")
    assert leftovers.strip() == "", leftovers
