"""`nodemesh install`'s units (rendered offline), sd_notify over a real socket,
and the worker ping the agent's systemd watchdog depends on."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import uvloop

from nodeagent.config import load_config
from nodemesh.install import AGENT_USER, plan_agent, plan_controlplane
from nodemesh.sdnotify import Notifier
from tests.unit.test_proxy_loopback import _worker_settings

BASE = """\
node: {name: n1, address: 10.0.0.2}
controlPlane: {address: "10.0.0.1:15010", joinTokenFile: /etc/nodemesh/join.token}
workloads:
  - {name: web, namespace: default, serviceAccount: web, uid: 2001, ports: [8080]}
"""


def _config(tmp_path: Path, extra: str = "") -> Any:
    p = tmp_path / "agent.yaml"
    p.write_text(BASE + extra)
    return load_config(str(p))


def _directives(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out.setdefault(k, []).append(v)
    return out


def test_agent_unit_iptables_runs_as_its_user_with_net_admin_only(tmp_path: Path) -> None:
    plan = plan_agent(_config(tmp_path, "capture: {mode: iptables}\n"), "/etc/nodemesh/agent.yaml", "/usr/bin/python3")
    d = _directives(plan.unit)
    assert plan.user == AGENT_USER and d["User"] == [AGENT_USER]
    assert d["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"] and d["AmbientCapabilities"] == ["CAP_NET_ADMIN"]
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"] and int(d["WatchdogSec"][0]) > 0
    assert d["ExecStopPost"] == ["/usr/bin/python3 -m nodeagent.supervision.stoppost --config /etc/nodemesh/agent.yaml"]
    for k in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "MemoryDenyWriteExecute",
              "RestrictSUIDSGID", "ProtectControlGroups"):
        assert d[k] == ["yes"], k
    assert d["ProtectSystem"] == ["strict"]
    assert d["SystemCallFilter"] == ["@system-service"]  # no bpf() without eBPF capture
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    # Each kept capability is explained in the unit itself.
    assert "# CAP_NET_ADMIN: install and remove capture" in plan.unit
    assert "ReadWritePaths" not in d  # the default stateDir is the unit's StateDirectory


def test_agent_unit_ebpf_allows_bpf_and_keeps_root(tmp_path: Path) -> None:
    plan = plan_agent(_config(tmp_path, "capture: {mode: ebpf}\n"), "/etc/nodemesh/agent.yaml", "/usr/bin/python3")
    d = _directives(plan.unit)
    assert plan.user == "" and "User" not in d
    assert "bpf" in d["SystemCallFilter"][0].split()
    assert {"CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"} <= set(d["CapabilityBoundingSet"][0].split())
    assert "/sys/fs/bpf" in d["ReadWritePaths"][0].split()
    assert "MemoryDenyWriteExecute" not in d  # bcc's JIT


def test_agent_unit_follows_config_paths_and_ports(tmp_path: Path) -> None:
    extra = ("capture: {mode: nftables}\nstateDir: /srv/nm-state\ndns: {port: 53}\n"
             "proxy: {accessLog: /var/log/nodemesh/access.log}\n")
    plan = plan_agent(_config(tmp_path, extra), "/etc/nodemesh/agent yaml", "/usr/bin/python3")
    d = _directives(plan.unit)
    assert set(d["ReadWritePaths"][0].split()) == {"/srv/nm-state", "/var/log/nodemesh"}
    assert "CAP_NET_BIND_SERVICE" in d["AmbientCapabilities"][0].split()
    assert d["ExecStart"] == ['/usr/bin/python3 -m nodemesh agent run --config "/etc/nodemesh/agent yaml"']


def test_controlplane_unit_has_no_capabilities() -> None:
    d = _directives(plan_controlplane("/usr/bin/python3", ["0.0.0.0:15010"], ["10.0.0.1"], []))
    assert d["User"] == ["nodemesh-cp"] and d["CapabilityBoundingSet"] == [""] and d["Type"] == ["notify"]
    assert "--listen 0.0.0.0:15010 --san 10.0.0.1" in d["ExecStart"][0]
    assert "unix:/run/nodemesh/controlplane.sock" in d["ExecStart"][0]


def _listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    return s


def test_sdnotify_sends_datagrams(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with _listen(path) as s:
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "6000000"})
        assert n.enabled and n.watchdog_s == 6.0
        assert n.ready("serving")
        assert s.recv(4096) == b"READY=1\nSTATUS=serving"
        assert n.reloading()
        msg = s.recv(4096).decode().split("\n")
        assert msg[0] == "RELOADING=1" and msg[1].startswith("MONOTONIC_USEC=") and int(msg[1].split("=")[1]) > 0
        assert n.watchdog() and s.recv(4096) == b"WATCHDOG=1"
        assert n.stopping() and s.recv(4096) == b"STOPPING=1"
        n.close()


def test_sdnotify_abstract_socket_and_outside_systemd() -> None:
    name = f"nodemesh-test-{os.getpid()}"
    with _listen("\0" + name) as s:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert s.recv(4096) == b"READY=1"
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.ready() and quiet.watchdog_s == 0
    # A watchdog meant for another process (WATCHDOG_PID) is not ours to feed.
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s == 0


def test_watchdog_ping_finds_a_stopped_worker(tmp_path: Any) -> None:
    """The agent feeds systemd's watchdog only while every worker's loop answers:
    a SIGSTOPped worker must show up as unresponsive, and recover after SIGCONT."""
    from nodeagent.proxy.worker import WorkerPool

    async def go() -> None:
        pool = WorkerPool(_worker_settings(tmp_path))
        await pool.start()
        try:
            assert await pool.unresponsive(timeout=2.0) == []
            victim = pool.pids()[1]
            os.kill(victim, signal.SIGSTOP)
            try:
                assert await pool.unresponsive(timeout=0.5) == [1]
            finally:
                os.kill(victim, signal.SIGCONT)
            assert await pool.unresponsive(timeout=2.0) == []
        finally:
            await pool.stop()

    uvloop.run(go())  # on uvloop, like the agent
