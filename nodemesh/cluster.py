"""A nodemesh cluster of booted systemd machines on this host, without a hypervisor:
a control plane and nodes as `systemd-nspawn -b` containers (systemd as PID 1)
on a bridge, provisioned by vagrant/provision.sh exactly as the Vagrantfile's VMs
are. `make cluster` / `make cluster-down` and tests/cluster use it.

The base root filesystem is built once from Debian's packages with mmdebstrap
(+ `provision.sh base` in a chroot: the packages and a venv with nodemesh's
Python dependencies) under /var/cache/nodemesh-cluster, keyed by a hash of what
goes into it, and rebuilt when missing. Each machine is an overlayfs on it; the
checkout is bind-mounted read-only at /opt/nodemesh-src, so machines run the
code of this tree.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[1]
PROVISION = ROOT / "vagrant" / "provision.sh"
CACHE = Path(os.environ.get("NODEMESH_CLUSTER_CACHE", "/var/cache/nodemesh-cluster"))
RUN_DIR = Path("/var/lib/nodemesh-cluster")
SUITE = "bookworm"
CG_V2 = Path("/sys/fs/cgroup/unified")
CG_V1_SYSTEMD = Path("/sys/fs/cgroup/systemd")
# The same hosts and last octets as the Vagrantfile's private network.
HOSTS = (("cp", 10), ("node1", 11), ("node2", 12))
BOOT_TIMEOUT_S = 30.0
NSPAWN_REBOOT = 133  # systemd-nspawn's exit code when the machine rebooted


class ClusterError(RuntimeError):
    pass


def _cgroup_files(cg: Path, name: str) -> list[Path]:
    """`name` in cg and every cgroup below it; os.walk tolerates cgroups that
    vanish while it looks (a stopping machine removes its own)."""
    return [Path(d) / name for d, _, files in os.walk(cg) if name in files]


def _cgroup_dirs(cg: Path) -> list[Path]:
    """cg and every cgroup below it, deepest first (the order rmdir needs)."""
    return [Path(d) for d, _, _ in os.walk(cg, topdown=False)]


def provision_argv(phase: str, *args: str) -> list[str]:
    """A phase of vagrant/provision.sh, as the machines (and the Vagrantfile) run it."""
    return ["bash", "/opt/nodemesh-src/vagrant/provision.sh", phase, *args]


def _run(argv: list[str], check: bool = True, timeout: float | None = None,
         **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-2000:]}")
    return res


def debian_mirror() -> str:
    """The host's Debian mirror (machines use the same; no other network is reachable)."""
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in src.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    with contextlib.suppress(OSError):
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1]
    return "http://deb.debian.org/debian"


def base_key() -> str:
    """What the base root depends on: provision.sh's package list and `base` phase,
    and pyproject.toml's dependency list (its other phases run in each machine, not here)."""
    h = hashlib.sha256()
    text = PROVISION.read_text()
    packages = text[text.index("PACKAGES=("):]
    h.update(packages[:packages.index(")")].encode())
    base = text[text.index("\nbase)"):]
    h.update(base[:base.index("\n  ;;")].encode())
    # Only the dependency list: lint or tool settings in pyproject.toml do not go into the root.
    h.update("\n".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]).encode())
    h.update(SUITE.encode())
    return h.hexdigest()[:12]


def base_dir() -> Path:
    return CACHE / f"base-{base_key()}"


def build_base(log: Any = print) -> Path:
    """The base root, built if missing (mmdebstrap ~30 s, the venv ~1 min)."""
    final = base_dir()
    if (final / ".nodemesh-base-ok").exists():
        return final
    for tool in ("mmdebstrap", "systemd-nspawn"):
        if shutil.which(tool) is None:
            raise ClusterError(f"{tool} is missing: run scripts/setup.sh (Debian packages mmdebstrap, "
                               "systemd-container)")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f"building-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    packages = _run(["bash", str(PROVISION), "packages"]).stdout.split()
    log(f"cluster: building the base root {final} from Debian {SUITE} ({len(packages)} packages)")
    _run(["mmdebstrap", "--variant=minbase", "--include=" + ",".join(packages), SUITE, str(tmp),
          f"deb {debian_mirror()} {SUITE} main"], timeout=900)
    src = tmp / "opt" / "nodemesh-src"
    src.mkdir(parents=True, exist_ok=True)
    bundle = tmp / "etc" / "ssl" / "certs" / "ca-certificates.crt"
    mounts = [src, tmp / "proc", bundle]
    try:
        shutil.copy("/etc/resolv.conf", tmp / "etc" / "resolv.conf")
        _run(["mount", "--bind", "-o", "ro", str(ROOT), str(src)])
        _run(["mount", "-t", "proc", "proc", str(tmp / "proc")])
        # pip reaches PyPI as the host does: through the host's CA bundle (a
        # TLS-inspecting proxy has its own CA), lent for the build only.
        bundle.parent.mkdir(parents=True, exist_ok=True)
        bundle.touch()
        _run(["mount", "--bind", "-o", "ro", "/etc/ssl/certs/ca-certificates.crt", str(bundle)])
        log("cluster: provision.sh base (the packages and /opt/nodemesh/venv) in the base root")
        _run(["chroot", str(tmp), *provision_argv("base")], timeout=900)
        _run(["chroot", str(tmp), "systemctl", "enable", "systemd-networkd"])
    finally:
        for m in reversed(mounts):
            _run(["umount", str(m)], check=False)
    (tmp / "etc" / "resolv.conf").write_text("")  # machines resolve by /etc/hosts only
    (tmp / "etc" / "machine-id").write_text("")  # each machine gets its own at first boot
    (tmp / ".nodemesh-base-ok").write_text(base_key() + "\n")
    for old in CACHE.glob("base-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, final)
    return final


@dataclass
class Machine:
    host: str
    ip: str
    name: str  # the nspawn machine name (unique on this host)
    root: Path
    launcher: subprocess.Popen[bytes] | None = None
    leader: int = 0

    def cgroups(self) -> list[Path]:
        return [CG_V2 / f"nsp-{self.name}", CG_V1_SYSTEMD / f"nsp-{self.name}"]


@dataclass
class Cluster:
    """cp, node1, node2 on bridge `nmc-<id>`, subnet 10.213.<net>.0/24."""

    cluster_id: str = "demo"
    net: int = 56
    src: Path = ROOT
    machines: dict[str, Machine] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.cluster_id.isalnum() or len(self.cluster_id) > 10:
            raise ClusterError(f"cluster id {self.cluster_id!r}: letters and digits, at most 10")
        self.bridge = f"nmc-{self.cluster_id}"
        self.workdir = RUN_DIR / self.cluster_id
        for host, octet in HOSTS:
            name = f"nmc-{self.cluster_id}-{host}"
            self.machines[host] = Machine(host, self.ip(octet), name, self.workdir / host / "root")

    def ip(self, octet: int) -> str:
        return f"10.213.{self.net}.{octet}"

    # ------------------------------------------------------------ up / down

    def up(self, log: Any = print) -> None:
        base = build_base(log)
        self.down()
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.ip(1)}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for m in self.machines.values():
            self._prepare(m, base)
            self._launch(m)
        for m in self.machines.values():
            self._wait_running(m)
        log(f"cluster: {', '.join(f'{m.host} {m.ip}' for m in self.machines.values())} booted "
            f"(bridge {self.bridge})")

    def _prepare(self, m: Machine, base: Path) -> None:
        top = m.root.parent
        for d in ("upper", "work", "root"):
            (top / d).mkdir(parents=True, exist_ok=True)
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={base},upperdir={top / 'upper'},workdir={top / 'work'}", str(m.root)])
        net = m.root / "etc" / "systemd" / "network"
        net.mkdir(parents=True, exist_ok=True)
        # Sorts before systemd's 80-container-host0.network (DHCP), which would win.
        (net / "10-nodemesh-host0.network").write_text(
            f"[Match]\nName=host0\n\n[Network]\nAddress={m.ip}/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n")
        (m.root / "etc" / "hostname").write_text(m.host + "\n")

    def _launch(self, m: Machine) -> None:
        cgroups = m.cgroups()
        for cg in cgroups:
            cg.mkdir(exist_ok=True)
        argv = ["systemd-nspawn", "-D", str(m.root), "-b", f"--machine={m.name}", f"--hostname={m.host}",
                "--register=no", "--keep-unit", f"--network-bridge={self.bridge}", "--system-call-filter=bpf",
                "--console=passive", f"--bind-ro={self.src}:/opt/nodemesh-src", "--tmpfs=/sys/fs/bpf"]
        # The launcher moves itself into the machine's own cgroups (nspawn --keep-unit
        # runs the machine there); a reboot inside ends nspawn with 133: start it again.
        enter = "".join(f"echo $$ > {cg / 'cgroup.procs'}; " for cg in cgroups)
        script = f'{enter}while :; do "$@"; rc=$?; [ $rc = {NSPAWN_REBOOT} ] || exit $rc; done'
        log = open(m.root.parent / "console.log", "ab")  # noqa: SIM115 (the launcher owns it)
        m.launcher = subprocess.Popen(["bash", "-c", script, "nspawn", *argv], stdout=log, stderr=log,
                                      stdin=subprocess.DEVNULL,
                                      env=dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1"),
                                      start_new_session=True)
        (m.root.parent / "launcher.pid").write_text(f"{m.launcher.pid}\n")
        log.close()

    def find_leader(self, m: Machine) -> int:
        """The machine's PID 1 as seen from the host (it changes when the machine reboots)."""
        pids: set[int] = set()
        for cg in m.cgroups()[:1]:
            for procs in _cgroup_files(cg, "cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids |= {int(p) for p in procs.read_text().split()}
        for pid in sorted(pids):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("NSpid:"):
                        ns = line.split()[1:]
                        if len(ns) == 2 and ns[1] == "1":
                            m.leader = pid
                            return pid
        raise ClusterError(f"machine {m.name} has no init process (see {m.root.parent / 'console.log'})")

    def _wait_running(self, m: Machine) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        state = ""
        while time.monotonic() < deadline:
            if m.launcher is not None and m.launcher.poll() is not None:
                raise ClusterError(f"machine {m.name} exited ({m.launcher.returncode}): "
                                   f"{(m.root.parent / 'console.log').read_text()[-2000:]}")
            with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
                leader = self.find_leader(m)
                state = _run(["nsenter", "-t", str(leader), "-a", "systemctl", "is-system-running"],
                             check=False, timeout=10).stdout.strip()
                addrs = _run(["nsenter", "-t", str(leader), "-n", "ip", "-4", "-br", "addr", "show", "host0"],
                             check=False, timeout=10).stdout
                if state in ("running", "degraded") and f" {m.ip}/" in addrs:
                    return
            time.sleep(0.2)
        raise ClusterError(f"machine {m.name} did not reach running in {BOOT_TIMEOUT_S:g}s (state {state!r})")

    def down(self) -> None:
        """Stop every machine of this cluster and remove the bridge and files (idempotent)."""
        for m in self.machines.values():
            self._stop(m)
        if Path(f"/sys/class/net/{self.bridge}").exists():
            _run(["ip", "link", "delete", self.bridge], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop(self, m: Machine) -> None:
        launcher = m.launcher.pid if m.launcher is not None else 0
        pidfile = m.root.parent / "launcher.pid"
        if not launcher and pidfile.exists():
            with contextlib.suppress(ValueError):
                launcher = int(pidfile.read_text())
        with contextlib.suppress(ClusterError):
            leader = self.find_leader(m)
            if launcher:  # no more reboot loop
                with contextlib.suppress(ProcessLookupError):
                    os.kill(launcher, signal.SIGKILL)
            os.kill(leader, signal.SIGRTMIN + 4)  # systemd: halt
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self._cgroup_pids(m):
            time.sleep(0.1)
        for pid in self._cgroup_pids(m):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if m.launcher is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                m.launcher.wait(5)
        time.sleep(0.1)
        if os.path.ismount(m.root):
            _run(["umount", "-R", str(m.root)], check=False)
        for cg in m.cgroups():
            for d in _cgroup_dirs(cg):
                with contextlib.suppress(OSError):
                    d.rmdir()
        m.launcher, m.leader = None, 0

    def _cgroup_pids(self, m: Machine) -> list[int]:
        pids: list[int] = []
        for cg in m.cgroups():
            for procs in _cgroup_files(cg, "cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids += [int(p) for p in procs.read_text().split()]
        return pids

    # ------------------------------------------------------------ inside a machine

    def run(self, host: str, cmd: str | list[str], check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in a machine as a transient systemd service (its real
        capabilities and seccomp, not the host's), stdin/stdout piped."""
        m = self.machines[host]
        leader = self.find_leader(m)
        argv = cmd if isinstance(cmd, list) else ["bash", "-c", cmd]
        res = subprocess.run(["nsenter", "-t", str(leader), "-a", "systemd-run", "--wait", "--pipe", "-q",
                              "--collect", "-E", "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", *argv],
                             check=False, capture_output=True, text=True, timeout=timeout, input=input or "")
        if check and res.returncode != 0:
            raise ClusterError(f"{host}: {' '.join(argv)} failed ({res.returncode}): "
                               f"{(res.stderr + res.stdout).strip()[-3000:]}")
        return res

    def provision(self, log: Any = print) -> None:
        """vagrant/provision.sh's phases, in the order the Vagrantfile runs them."""
        cp = self.machines["cp"]
        names = [f"{m.host}={m.ip}" for m in self.machines.values()]
        for host in self.machines:
            self.run(host, provision_argv("hosts", *names))
        log("cluster: provisioning cp (control plane, sample config)")
        self.run("cp", provision_argv("controlplane", cp.ip), timeout=180)
        for host in ("node1", "node2"):
            token = self.run("cp", provision_argv("token", host)).stdout.strip().splitlines()[-1]
            m = self.machines[host]
            (m.root / "root" / "join.token").write_text(token + "\n")
            log(f"cluster: provisioning {host} (sample workloads, agent joined with a one-time token)")
            self.run(host, provision_argv("node", host, m.ip, cp.ip, "/root/join.token"), timeout=180)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


TRY = """\
The cluster is up: control plane `cp` ({cp}) and nodes `node1`, `node2` as booted
systemd machines on bridge {bridge}, provisioned by vagrant/provision.sh.

Things to try (a shell in a machine: `nsenter -t $(python -m nodemesh.cluster leader node1) -a bash`):
  python -m nodemesh.cluster exec node1 systemctl status nodemesh-agent
  python -m nodemesh.cluster exec node1 nodemesh status
  python -m nodemesh.cluster exec node1 -- setpriv --reuid=3001 curl -s http://$VIP/    (VIP: see below)
  python -m nodemesh.cluster exec cp nodemesh get service
  python -m nodemesh.cluster exec node2 journalctl -u nodemesh-agent -n 20
  make cluster-down        # removes the machines, the bridge and their files
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nodemesh.cluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("--id", default=os.environ.get("NODEMESH_CLUSTER_ID", "demo"), help="cluster name")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("base", help="build the base root filesystem if missing")
    sub.add_parser("up", help="boot and provision cp, node1, node2")
    sub.add_parser("down", help="stop the machines, remove the bridge and files")
    ex = sub.add_parser("exec", help="run a command in a machine")
    ex.add_argument("host")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    ld = sub.add_parser("leader", help="print a machine's PID 1 (for nsenter)")
    ld.add_argument("host")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("nodemesh.cluster: run as root", file=sys.stderr)
        return 1
    c = Cluster(args.id)
    try:
        if args.cmd == "base":
            print(build_base())
        elif args.cmd == "up":
            c.up()
            c.provision()
            vip = c.run("cp", "nodemesh get service web -o json 2>/dev/null | python3 -c "
                        "'import json,sys; print(json.load(sys.stdin)[\"status\"][\"vip\"])' || true",
                        check=False).stdout.strip()
            print(TRY.format(cp=c.machines["cp"].ip, bridge=c.bridge) + (f"  (web's VIP is {vip})\n" if vip else ""))
        elif args.cmd == "down":
            c.down()
        elif args.cmd == "exec":
            cmd = [a for a in args.argv if a != "--"] if args.argv[:1] == ["--"] else args.argv
            res = c.run(args.host, cmd, check=False)
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
            return res.returncode
        elif args.cmd == "leader":
            print(c.find_leader(c.machines[args.host]))
    except ClusterError as e:
        print(f"cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
