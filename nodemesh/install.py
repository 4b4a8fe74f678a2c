"""`nodemesh install` / `nodemesh uninstall`: the agent or the control plane as a
hardened systemd service (docs/quickstart.md, docs/systemd.md).

install: checks the config, makes a dedicated system user, writes the unit
(Type=notify, WatchdogSec, only the capabilities the job needs, systemd's
sandboxing), records what it made in a manifest, and starts the unit (systemctl
returns once the service reported READY). uninstall: stops and removes the unit,
the capture and the VIP route, and, when asked (a prompt, or --purge), the state
holding keys and the store, the config it ran with and the user it made.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UNIT_DIR = "/etc/systemd/system"
AGENT_UNIT = "nodemesh-agent.service"
CP_UNIT = "nodemesh-controlplane.service"
AGENT_USER = "nodemesh"
CP_USER = "nodemesh-cp"
AGENT_STATE = "/var/lib/nodemesh"
CP_STATE = "/var/lib/nodemesh-cp"
MANIFEST_DIR = "/var/lib/nodemesh-install"
DEFAULT_AGENT_CONFIG = "/etc/nodemesh/agent.yaml"
WATCHDOG_SEC = 10

# Each capability the agent keeps, and why (docs/systemd.md repeats this).
CAPS_WHY = {
    "CAP_NET_ADMIN": "install and remove capture (iptables/nftables netlink, TPROXY policy routes, the VIP "
                     "route), SO_MARK on the proxy's own connections so capture skips them, IP_TRANSPARENT "
                     "for TPROXY inbound",
    "CAP_NET_BIND_SERVICE": "the DNS proxy is configured on a port below 1024",
    "CAP_BPF": "eBPF capture: load the cgroup/sockops programs and maps",
    "CAP_PERFMON": "eBPF capture: bcc reads kernel symbols and program info",
    "CAP_SYS_ADMIN": "eBPF capture: attach programs to cgroups, pin and mount bpffs, read programs by id",
    "CAP_SYS_RESOURCE": "eBPF capture: raise RLIMIT_MEMLOCK for maps on kernels that still charge it",
}

# Sandboxing both units share (each line is a systemd directive).
HARDENING = """\
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
DevicePolicy=closed
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
ProtectControlGroups=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallErrorNumber=EPERM
RemoveIPC=yes
UMask=0077"""


class InstallError(RuntimeError):
    pass


@dataclass(frozen=True)
class AgentPlan:
    """What install lays down for an agent config (pure: rendered and tested offline)."""

    unit: str
    user: str  # "" = root (eBPF capture)
    caps: tuple[str, ...]
    state_dir: str
    config_path: str
    token_file: str
    writable: tuple[str, ...]


def agent_caps(config: Any) -> tuple[str, ...]:
    caps = ["CAP_NET_ADMIN"]
    if config.dns.enabled and config.dns.port < 1024:
        caps.append("CAP_NET_BIND_SERVICE")
    if config.capture.mode in ("ebpf", "auto"):
        caps += ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"]
    return tuple(caps)


def plan_agent(config: Any, config_path: str, python: str, watchdog_s: int = WATCHDOG_SEC) -> AgentPlan:
    """The agent's unit for this config. iptables/nftables: a dedicated user with
    CAP_NET_ADMIN (ambient). eBPF (or auto, which may choose it): root with a
    bounded capability set, because bcc needs kernel headers, bpffs and cgroup
    directories a plain user cannot reach reliably (docs/systemd.md)."""
    ebpf = config.capture.mode in ("ebpf", "auto")
    user = "" if ebpf else AGENT_USER
    caps = agent_caps(config)
    writable: list[str] = []
    state_dir = config.state_dir
    if state_dir.rstrip("/") != AGENT_STATE:
        writable.append(state_dir)
    for path in (config.proxy.access_log, config.proxy.tracing):
        if path.startswith("/"):
            writable.append(str(Path(path).parent))
    if ebpf:
        writable.append("/sys/fs/bpf")
    filters = "@system-service bpf @mount" if ebpf else "@system-service"
    cap_lines = "\n".join(f"# {c}: {CAPS_WHY[c]}" for c in caps)
    user_lines = f"User={user}\nGroup={user}\n" if user else "# root: eBPF capture (see the capabilities above)\n"
    ambient = f"AmbientCapabilities={' '.join(caps)}\n" if user else ""
    tunables = "" if ebpf else "ProtectKernelTunables=yes\n"
    mdwe = "" if ebpf else "MemoryDenyWriteExecute=yes\n"  # bcc's LLVM JIT needs W+X pages
    rw = f"ReadWritePaths={' '.join(sorted(set(writable)))}\n" if writable else ""
    q = _quote
    unit = f"""\
# Laid down by `nodemesh install agent` (do not edit: rerun install; `nodemesh uninstall agent` removes it).
[Unit]
Description=nodemesh node agent (traffic capture and the node's shared proxy)
Documentation=https://github.com/nodemesh/nodemesh/blob/main/docs/systemd.md
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=60
StartLimitBurst=20

[Service]
# READY=1 once the proxy serves the first snapshot AND capture is installed;
# RELOADING=1/READY=1 around SIGHUP; STOPPING=1; WATCHDOG=1 while every proxy
# worker answers its ping.
Type=notify
NotifyAccess=main
ExecStart={q(python)} -m nodemesh agent run --config {q(config_path)}
ExecReload=/bin/kill -HUP $MAINPID
# After kill -9, a crash or the watchdog: under failurePolicy open, remove the
# capture left behind so nothing points at a dead proxy until the restart.
ExecStopPost={q(python)} -m nodeagent.supervision.stoppost --config {q(config_path)}
# SIGTERM to the agent only. On a stop it removes capture, then stops its workers;
# on a restart (or an upgrade: the same restart) capture and the listening sockets
# stay (kept here, in the fd store) and its workers drain their connections while
# the next agent serves: they must outlive it, hence KillMode=process.
KillMode=process
FileDescriptorStoreMax=16
TimeoutStartSec=120
TimeoutStopSec=30
WatchdogSec={watchdog_s}
Restart=on-failure
RestartSec=1
LimitNOFILE=1048576
{user_lines}StateDirectory=nodemesh
StateDirectoryMode=0700
RuntimeDirectory=nodemesh-agent
# Capabilities (and why):
{cap_lines}
CapabilityBoundingSet={' '.join(caps)}
{ambient}{HARDENING}
{tunables}{mdwe}RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallFilter={filters}
{rw}
[Install]
WantedBy=multi-user.target
"""
    return AgentPlan(unit=unit, user=user, caps=caps, state_dir=state_dir, config_path=config_path,
                     token_file=config.control_plane.join_token_file, writable=tuple(writable))


def plan_controlplane(python: str, listen: list[str], sans: list[str], extra: list[str],
                      watchdog_s: int = WATCHDOG_SEC) -> str:
    q = _quote
    args = " ".join([f"--listen {q(a)}" for a in listen] + [f"--san {q(s)}" for s in sans] + [q(e) for e in extra])
    return f"""\
# Laid down by `nodemesh install controlplane` (rerun install to change it; `nodemesh uninstall controlplane`).
[Unit]
Description=nodemesh control plane (config API, registry, CA, xDS)
Documentation=https://github.com/nodemesh/nodemesh/blob/main/docs/systemd.md
After=network-online.target
Wants=network-online.target

[Service]
# READY=1 once every listener serves; WATCHDOG=1 from its event loop.
Type=notify
NotifyAccess=main
ExecStart={q(python)} -m nodemesh controlplane serve --state-dir {CP_STATE} \
--listen unix:/run/nodemesh/controlplane.sock {args}
TimeoutStartSec=60
WatchdogSec={watchdog_s}
Restart=on-failure
RestartSec=1
LimitNOFILE=1048576
User={CP_USER}
Group={CP_USER}
StateDirectory=nodemesh-cp
StateDirectoryMode=0700
# The local admin socket: only root (and this user) may connect.
RuntimeDirectory=nodemesh
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=no
# No capabilities at all: ports 15010/15011/15014 are unprivileged.
CapabilityBoundingSet=
AmbientCapabilities=
{HARDENING}
ProtectKernelTunables=yes
MemoryDenyWriteExecute=yes
ProcSubset=pid
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources

[Install]
WantedBy=multi-user.target
"""


def _quote(s: str) -> str:
    """A systemd command-line word (quotes only when needed)."""
    if s and all(c.isalnum() or c in "/._-:=@+," for c in s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------ doing it


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, check=False, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise InstallError(f"{' '.join(argv)} failed ({res.returncode}): {(res.stderr or res.stdout).strip()}")
    return res


def _ensure_user(name: str, home: str) -> bool:
    """A system user and group of that name; True if we made it."""
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        pass
    _run(["useradd", "--system", "--user-group", "--home-dir", home, "--no-create-home",
          "--shell", "/usr/sbin/nologin", "--comment", "nodemesh service", name])
    return True


def _manifest_path(kind: str) -> Path:
    return Path(MANIFEST_DIR) / f"{kind}.json"


def _write_manifest(kind: str, data: dict[str, Any]) -> None:
    p = _manifest_path(kind)
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _start(unit: str, start: bool) -> None:
    _run(["systemctl", "daemon-reload"])
    _run(["systemctl", "enable", unit])
    if start:
        # Type=notify: this returns once the service sent READY=1 (or failed).
        res = _run(["systemctl", "restart", unit], check=False)
        if res.returncode != 0:
            journal = _run(["journalctl", "-u", unit, "-n", "30", "--no-pager", "-q"], check=False).stdout
            raise InstallError(f"{unit} did not become ready: {res.stderr.strip()}\n{journal}")


def install_agent(config_path: str, python: str, start: bool = True, unit_dir: str = UNIT_DIR) -> AgentPlan:
    from nodeagent.config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as e:
        raise InstallError(f"invalid agent config {config_path}: {e}") from None
    config_path = str(Path(config_path).resolve())
    plan = plan_agent(config, config_path, python)
    made_user = _ensure_user(plan.user, AGENT_STATE) if plan.user else False
    if plan.user:
        # The agent reads its config and (once, to join) the token as its own user.
        pw = pwd.getpwnam(plan.user)
        os.chown(config_path, 0, pw.pw_gid)
        os.chmod(config_path, 0o640)
        if plan.token_file and Path(plan.token_file).exists():
            os.chown(plan.token_file, pw.pw_uid, pw.pw_gid)
            os.chmod(plan.token_file, 0o600)
        for d in plan.writable:
            Path(d).mkdir(parents=True, exist_ok=True)
            os.chown(d, pw.pw_uid, pw.pw_gid)
    unit_path = Path(unit_dir) / AGENT_UNIT
    unit_path.write_text(plan.unit)
    _write_manifest("agent", {"unit": str(unit_path), "user": plan.user, "made_user": made_user,
                              "state_dir": plan.state_dir, "config": config_path, "token_file": plan.token_file})
    _start(AGENT_UNIT, start)
    return plan


def install_controlplane(python: str, listen: list[str], sans: list[str], extra: list[str],
                         start: bool = True, unit_dir: str = UNIT_DIR) -> str:
    unit = plan_controlplane(python, listen, sans, extra)
    made_user = _ensure_user(CP_USER, CP_STATE)
    unit_path = Path(unit_dir) / CP_UNIT
    unit_path.write_text(unit)
    _write_manifest("controlplane", {"unit": str(unit_path), "user": CP_USER, "made_user": made_user,
                                     "state_dir": CP_STATE})
    _start(CP_UNIT, start)
    return unit


def _confirm(question: str, assume: bool | None) -> bool:
    if assume is not None:
        return assume
    if not sys.stdin.isatty():
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _end_leftover_processes(cgroup: str, timeout_s: float = 5.0) -> None:
    """After the stop: the agent's workers still draining the connections of a
    recent restart (KillMode=process lets them outlive the agent) are cut short."""
    if not cgroup:
        return
    root = Path("/sys/fs/cgroup") / cgroup.lstrip("/")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = [int(p) for f in root.rglob("cgroup.procs") for p in _read(f).split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def uninstall(kind: str, purge: bool | None, python: str) -> list[str]:
    """Remove what install made; the state (keys, store) only if purge (or the
    operator says yes). Returns what was removed, for the report."""
    p = _manifest_path(kind)
    try:
        manifest = json.loads(p.read_text())
    except (OSError, ValueError):
        manifest = {"unit": str(Path(UNIT_DIR) / (AGENT_UNIT if kind == "agent" else CP_UNIT)),
                    "user": AGENT_USER if kind == "agent" else CP_USER, "made_user": False,
                    "state_dir": AGENT_STATE if kind == "agent" else CP_STATE}
    unit = Path(manifest["unit"]).name
    done = []
    if Path(manifest["unit"]).exists():
        cgroup = _run(["systemctl", "show", "-p", "ControlGroup", "--value", unit], check=False).stdout.strip()
        _run(["systemctl", "disable", "--now", unit], check=False)
        _end_leftover_processes(cgroup)
        Path(manifest["unit"]).unlink()
        _run(["systemctl", "daemon-reload"], check=False)
        _run(["systemctl", "reset-failed", unit], check=False)
        done.append(f"unit {manifest['unit']}")
    if kind == "agent":
        # A stop under failurePolicy closed leaves capture refusing on purpose: remove it too.
        res = _run([python, "-m", "nodemesh", "capture", "remove"], check=False)
        if res.returncode != 0:
            raise InstallError(f"cannot remove capture: {res.stderr.strip() or res.stdout.strip()}")
        done.append("capture and the VIP route")
    state = manifest["state_dir"]
    what = "the node key and certificates" if kind == "agent" else "the CA keys and the config store"
    if Path(state).exists():
        if _confirm(f"delete {state} ({what})?", purge):
            shutil.rmtree(state)
            done.append(f"state {state}")
            if kind == "agent":
                for f in (manifest.get("config", ""), manifest.get("token_file", "")):
                    if f and Path(f).exists():
                        Path(f).unlink()
                        done.append(f"file {f}")
                for d in {str(Path(f).parent) for f in (manifest.get("config", ""),) if f}:
                    if Path(d).is_dir() and not any(Path(d).iterdir()):
                        Path(d).rmdir()
            if manifest.get("made_user"):
                _run(["userdel", manifest["user"]], check=False)
                done.append(f"user {manifest['user']}")
        else:
            print(f"kept {state} ({what}) and user {manifest['user']}: `nodemesh uninstall {kind} --purge` "
                  "deletes them", file=sys.stderr)
    elif manifest.get("made_user"):
        _run(["userdel", manifest["user"]], check=False)
        done.append(f"user {manifest['user']}")
    if p.exists() and (not Path(state).exists()):
        p.unlink()
        if Path(MANIFEST_DIR).is_dir() and not any(Path(MANIFEST_DIR).iterdir()):
            Path(MANIFEST_DIR).rmdir()
    return done


# ------------------------------------------------------------------ deploy/systemd (the shipped copies)

DEPLOY_PYTHON = "/opt/nodemesh/venv/bin/python"  # where vagrant/provision.sh puts the venv


def deploy_units(root: Path) -> dict[str, str]:
    """The units deploy/systemd/ ships: what install lays down for
    deploy/agent.example.yaml and a control plane dialled as 192.168.56.10."""
    from nodeagent.config import load_config

    config = load_config(str(root / "deploy" / "agent.example.yaml"))
    agent = plan_agent(config, DEFAULT_AGENT_CONFIG, DEPLOY_PYTHON).unit
    cp = plan_controlplane(DEPLOY_PYTHON, ["0.0.0.0:15010"], ["192.168.56.10"], [])
    return {AGENT_UNIT: agent, CP_UNIT: cp}


if __name__ == "__main__":  # regenerate deploy/systemd/
    _root = Path(__file__).resolve().parents[1]
    for _name, _text in deploy_units(_root).items():
        (_root / "deploy" / "systemd" / _name).write_text(_text)
        print(f"wrote deploy/systemd/{_name}")
