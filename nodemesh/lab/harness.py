"""A mesh on one machine: node network namespaces joined by a bridge, a control
plane, one agent per node, and small HTTP workloads. Used by the demo, the
namespace tests and the benchmarks; everything it makes it removes.

Layout (X is the lab's subnet index):
  nmlab-<id>-hub   holds bridge br0 at 10.X.0.1/24; the control plane listens there
  nmlab-<id>-n<k>  node k: eth0 at 10.X.0.(10+k)/24, default route via 10.X.0.1
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NETNS_PREFIX = "nmlab-"
# MeshConfig spec.identityBindings (flow YAML) for labs whose tests add workloads of
# any service account and labels on any node: the bindings the operator declares
# (default deny; nodemesh/bindings.py). Attack tests replace it with narrow ones.
LAB_BINDINGS = ("identityBindings: [{name: lab-nodes, nodes: ['node-*'], serviceAccounts: ['*/*'], "
                "workloadLabels: {'*': ['*']}}]")


class LabError(RuntimeError):
    pass


def cgroup2_root() -> Path:
    """The host's cgroup v2 mount (lab processes start outside `ip netns exec`)."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    raise LabError("no cgroup v2 mount in /proc/self/mounts: cgroup workloads need one")


def _run(argv: Sequence[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


def list_lab_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(NETNS_PREFIX)]


def cleanup_all(lab_id: str | None = None) -> list[str]:
    """Remove every lab namespace (and the processes in it) left by an interrupted run;
    with `lab_id`, only that lab's (other labs may be running beside it)."""
    removed = []
    for ns in list_lab_namespaces():
        if lab_id is not None and not ns.startswith(f"{NETNS_PREFIX}{lab_id}-"):
            continue
        pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run(["ip", "netns", "delete", ns], check=False)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)  # a lab's node_resolv_conf
        removed.append(ns)
    return removed


@dataclass
class LabWorkload:
    name: str
    node: int
    uid: int
    ports: tuple[int, ...] = ()
    namespace: str = "default"
    service_account: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # cgroup v2 path: when set, the agent recognises the workload by it (not
    # by uid) and the lab runs the workload's processes in it.
    cgroup: str | None = None

    def agent_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "serviceAccount": self.service_account or self.name,
            "labels": dict(self.labels),
            "uid": self.uid,
            "ports": list(self.ports),
        }
        if self.cgroup:
            del entry["uid"]
            entry["cgroup"] = self.cgroup
        return entry


class Lab:
    """A small cluster of node namespaces. Use as a context manager."""

    def __init__(self, nodes: int = 2, lab_id: str | None = None, subnet: int | None = None,
                 workdir: str | None = None, proxy_workers: int = 1, lease_seconds: int = 6,
                 keep_workdir: bool = False, node_resolv_conf: str | None = None) -> None:
        self.lab_id = lab_id or f"{os.getpid() % 10000}{int(time.time() * 1000) % 1000:03d}"
        self.nodes = nodes
        # Each lab has its own hub bridge, so labs never see each other's addresses.
        self.subnet = subnet if subnet is not None else 77
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"nmlab-{self.lab_id}-"))
        # Workload processes run under their own uids and read files kept here.
        os.chmod(self.workdir, 0o755)  # noqa: S103 (readable, not writable, by the workloads' uids)
        self.proxy_workers = proxy_workers
        self.lease_seconds = lease_seconds
        self.keep_workdir = keep_workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.workloads: dict[str, LabWorkload] = {}
        self._created = False
        # agent.yaml's capture section: mode, plus e.g. {"failurePolicy": "closed"}.
        self.capture_mode = "iptables"
        self.capture_extra: dict[str, Any] = {}
        self._cgroups: list[Path] = []  # created by ensure_cgroup, removed by destroy
        # Contents of every node's /etc/resolv.conf: `ip netns exec` bind-mounts
        # /etc/netns/<ns>/resolv.conf over it (the mesh DNS tests use this).
        self.node_resolv_conf = node_resolv_conf
        # Per node: fields merged into agent.yaml's controlPlane (another replica's address, a failover list).
        self.agent_control_plane: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------- topology
    @property
    def hub(self) -> str:
        return f"{NETNS_PREFIX}{self.lab_id}-hub"

    def node_ns(self, k: int) -> str:
        return f"{NETNS_PREFIX}{self.lab_id}-n{k}"

    def node_name(self, k: int) -> str:
        return f"node-{k}"

    def node_ip(self, k: int) -> str:
        return f"10.{self.subnet}.0.{10 + k}"

    @property
    def cp_ip(self) -> str:
        return f"10.{self.subnet}.0.1"

    @property
    def cp_addr(self) -> str:
        return f"{self.cp_ip}:15010"

    @property
    def cp_unix(self) -> str:
        return f"unix:{self.workdir}/controlplane.sock"

    def create(self) -> Lab:
        self._created = True
        _run(["ip", "netns", "add", self.hub])
        self.ns_exec(self.hub, ["ip", "link", "set", "lo", "up"])
        self.ns_exec(self.hub, ["ip", "link", "add", "br0", "type", "bridge"])
        self.ns_exec(self.hub, ["ip", "addr", "add", f"{self.cp_ip}/24", "dev", "br0"])
        self.ns_exec(self.hub, ["ip", "link", "set", "br0", "up"])
        for k in range(1, self.nodes + 1):
            ns = self.node_ns(k)
            _run(["ip", "netns", "add", ns])
            a, b = f"nm{self.lab_id[-6:]}a{k}", f"nm{self.lab_id[-6:]}b{k}"
            _run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
            _run(["ip", "link", "set", a, "netns", ns])
            _run(["ip", "link", "set", b, "netns", self.hub])
            self.ns_exec(ns, ["ip", "link", "set", a, "name", "eth0"])
            self.ns_exec(ns, ["ip", "link", "set", "lo", "up"])
            self.ns_exec(ns, ["ip", "addr", "add", f"{self.node_ip(k)}/24", "dev", "eth0"])
            self.ns_exec(ns, ["ip", "link", "set", "eth0", "up"])
            self.ns_exec(ns, ["ip", "route", "add", "default", "via", self.cp_ip])
            self.ns_exec(self.hub, ["ip", "link", "set", b, "master", "br0"])
            self.ns_exec(self.hub, ["ip", "link", "set", b, "up"])
            if self.node_resolv_conf is not None:
                etc = Path("/etc/netns") / ns
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "resolv.conf").write_text(self.node_resolv_conf)
        return self

    def destroy(self) -> None:
        for name in list(self.procs):
            self.stop(name, timeout=3.0)
        if self._created:
            for ns in [self.hub] + [self.node_ns(k) for k in range(1, self.nodes + 1)]:
                pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                _run(["ip", "netns", "delete", ns], check=False)
                if self.node_resolv_conf is not None:
                    shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        for cg in reversed(self._cgroups):
            for _ in range(50):  # killed processes leave their cgroup asynchronously
                with contextlib.suppress(FileNotFoundError):
                    try:
                        cg.rmdir()
                    except OSError:
                        time.sleep(0.05)
                        continue
                break
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Lab:
        try:
            return self.create()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # ------------------------------------------------------------- processes
    @staticmethod
    def _wrap(ns: str, argv: Sequence[str], uid: int | None, cgroup: str | None = None) -> list[str]:
        cmd = ["ip", "netns", "exec", ns]
        if cgroup:
            # Join the cgroup before `ip netns exec`, whose fresh /sys hides it.
            cmd = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup2_root() / cgroup.strip("/") / "cgroup.procs"),
                   *cmd]
        if uid is not None:
            cmd += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return cmd + list(argv)

    def ns_exec(self, ns: str, argv: Sequence[str], uid: int | None = None, check: bool = True,
                timeout: float = 30.0, cgroup: str | None = None) -> subprocess.CompletedProcess[str]:
        return _run(self._wrap(ns, argv, uid, cgroup), check=check, timeout=timeout)

    def spawn(self, name: str, ns: str, argv: Sequence[str], uid: int | None = None,
              env: dict[str, str] | None = None, cgroup: str | None = None) -> subprocess.Popen[bytes]:
        if name in self.procs and self.procs[name].poll() is None:
            raise LabError(f"process {name} is already running")
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.workdir / f"{name}.log", "ab") as log:  # the child keeps its own copy of the fd
            p = subprocess.Popen(self._wrap(ns, argv, uid, cgroup), stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=full_env, start_new_session=True)
        self.procs[name] = p
        return p

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 8.0) -> int | None:
        p = self.procs.pop(name, None)
        if p is None:
            return None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        return p.returncode

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------- the mesh
    def start_controlplane(self, extra: Sequence[str] = (), replica: str = "", port: int = 15010) -> None:
        """The control plane in the hub. `replica` names a further instance (several
        replicas on one etcd): process controlplane-<replica>, state cp-state-<replica>,
        socket controlplane-<replica>.sock, TCP `port` (and port + 1 for joins)."""
        suffix = f"-{replica}" if replica else ""
        state = self.workdir / f"cp-state{suffix}"
        state.mkdir(exist_ok=True)
        unix = self.cp_unix if not replica else f"unix:{self.workdir}/controlplane{suffix}.sock"
        self.spawn(f"controlplane{suffix}", self.hub, [
            sys.executable, "-m", "nodemesh", "controlplane", "serve",
            "--state-dir", str(state), "--listen", f"{self.cp_ip}:{port}", "--listen", unix,
            "--lease-seconds", str(self.lease_seconds), *extra,
        ])
        self.wait_for(lambda: self._cp_ready(unix), 20, "the control plane to accept calls",
                      lambda: self.log(f"controlplane{suffix}"))
        if replica:
            return
        # The bootstrap operator token (rw) and the CA that verifies the control plane's TLS
        # (docs/security.md): for clients that use the TCP address rather than the local socket.
        self.admin_token_file = state / "admin.token"
        self.cp_ca_file = state / "cp-ca.pem"

    def meshview_get(self, path: str, port: int = 15014) -> str:
        """GET a mesh view path from the hub, logged in with the bootstrap operator's
        token (the view is behind a login: controlplane/web/login.py)."""
        jar = self.workdir / f"meshview-{port}.cookies"
        base = f"http://127.0.0.1:{port}"
        self.ns_exec(self.hub, ["curl", "-sS", "--max-time", "5", "-c", str(jar), "--data-urlencode",
                                f"token={self.admin_token_file.read_text().strip()}", f"{base}/login"])
        return self.ns_exec(self.hub, ["curl", "-sS", "--max-time", "5", "-b", str(jar), f"{base}{path}"]).stdout

    def _cp_ready(self, unix: str = "") -> bool:
        from controlplane.apiclient import ClientError, ConfigClient

        try:
            with ConfigClient(unix or self.cp_unix, timeout_s=1.0) as c:
                c.list("Service")
            return True
        except ClientError:  # not listening yet, or not answering yet
            return False

    def config_client(self) -> Any:
        """Over the unix socket, which is local admin (config and admin APIs). From
        inside a node namespace, TCP needs admin_token_file and cp_ca_file instead."""
        from controlplane.adminclient import AdminClient
        from controlplane.apiclient import Credentials

        return AdminClient(self.cp_unix, timeout_s=10.0, credentials=Credentials())

    def apply(self, docs: str | list[dict[str, Any]]) -> Any:
        text = docs if isinstance(docs, str) else yaml.safe_dump_all(docs)
        with self.config_client() as c:
            return c.apply(text)

    def add_workload(self, wl: LabWorkload) -> None:
        self.workloads[wl.name] = wl

    def agent_config(self, k: int, capture_mode: str | None = None) -> dict[str, Any]:
        return {
            "node": {"name": self.node_name(k), "address": self.node_ip(k), "zone": "lab"},
            "controlPlane": {"address": self.cp_addr, "joinTokenFile": str(self.workdir / f"agent-{k}.token"),
                             **self.agent_control_plane.get(k, {})},
            "capture": {"mode": capture_mode or self.capture_mode, **self.capture_extra},
            "proxy": {"workers": self.proxy_workers,
                      "accessLog": str(self.workdir / f"access-{k}.log")},
            "workloads": [w.agent_entry() for w in self.workloads.values() if w.node == k],
            "stateDir": str(self.workdir / f"agent-{k}"),
        }

    def write_agent_config(self, k: int) -> Path:
        path = self.workdir / f"agent-{k}.yaml"
        path.write_text(yaml.safe_dump(self.agent_config(k), sort_keys=False))
        return path

    def start_agent(self, k: int, wait: bool = True) -> None:
        path = self.write_agent_config(k)
        if not (self.workdir / f"agent-{k}" / "node.pem").exists():
            # First start: a one-time join token for this node (a restart reuses the node certificate).
            with self.config_client() as c:
                token = c.create_join_token(self.node_name(k), 600).token
            tok = self.workdir / f"agent-{k}.token"
            tok.write_text(token + "\n")
            tok.chmod(0o600)
        # A killed agent's status.json must not pass for the new agent's readiness.
        (self.workdir / f"agent-{k}" / "status.json").unlink(missing_ok=True)
        self.spawn(f"agent-{k}", self.node_ns(k), [sys.executable, "-m", "nodemesh", "agent", "run",
                                                  "--config", str(path)])
        if wait:
            self.wait_agent_ready(k)

    def reload_agent(self, k: int) -> None:
        """Rewrite node k's agent config from the lab's workloads and tell the agent (SIGHUP)."""
        self.write_agent_config(k)
        p = self.procs[f"agent-{k}"]
        os.killpg(p.pid, signal.SIGHUP)

    def agent_status(self, k: int) -> dict[str, Any]:
        path = self.workdir / f"agent-{k}" / "status.json"
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {}

    def wait_agent_ready(self, k: int, timeout: float = 30.0) -> None:
        def ready() -> bool:
            p = self.procs.get(f"agent-{k}")
            if p is not None and p.poll() is not None:
                raise LabError(f"agent-{k} exited with {p.returncode}:\n{self.log(f'agent-{k}')[-3000:]}")
            return bool(self.agent_status(k).get("capture_installed"))

        self.wait_for(ready, timeout, f"agent-{k} to install capture", lambda: self.log(f"agent-{k}"))

    def start_app(self, name: str, extra: Sequence[str] = ()) -> None:
        """Run the lab app for workload `name`; `extra`: labapp options (e.g. --delay-ms 50)."""
        wl = self.workloads[name]
        port = wl.ports[0]
        self.spawn(f"app-{name}", self.node_ns(wl.node),
                   [sys.executable, "-m", "nodemesh.lab.labapp", "--name", name, "--node",
                    self.node_name(wl.node), "--port", str(port), *extra], uid=wl.uid,
                   cgroup=self.ensure_cgroup(wl.cgroup) if wl.cgroup else None)
        self.wait_for(lambda: self._listening(wl.node, port), 10, f"app {name} to listen on {port}",
                      lambda: self.log(f"app-{name}"))

    def _listening(self, k: int, port: int) -> bool:
        out = self.ns_exec(self.node_ns(k), ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        return bool(out.strip())

    def curl(self, k: int, url: str, uid: int, timeout: float = 5.0,
             extra: Sequence[str] = (), cgroup: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.ns_exec(self.node_ns(k), ["curl", "-sS", "--max-time", str(timeout), *extra, url],
                            uid=uid, check=False, timeout=timeout + 5, cgroup=cgroup)

    def ensure_cgroup(self, cgroup: str) -> str:
        """Create a cgroup v2 directory (removed again by destroy()); returns the path as given."""
        path = cgroup2_root() / cgroup.strip("/")
        if not path.exists():
            missing = [p for p in [path, *path.parents] if not p.exists()]
            path.mkdir(parents=True)
            self._cgroups += sorted(missing, key=lambda p: len(p.parts))
        return cgroup

    def access_log(self, k: int) -> list[dict[str, Any]]:
        path = self.workdir / f"access-{k}.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def service_vip(self, name: str, namespace: str = "default") -> str:
        with self.config_client() as c:
            res = c.get("Service", name, namespace)
        vip = json.loads(res.status_json or "{}").get("vip", "")
        if not vip:
            raise LabError(f"service {namespace}/{name} has no VIP yet: {res}")
        return str(vip)

    @staticmethod
    def wait_for(cond: Any, timeout: float, what: str, diag: Any = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.1)
        detail = f"\n--- log tail ---\n{diag()[-3000:]}" if diag else ""
        raise LabError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")

    @contextlib.contextmanager
    def capture_bridge(self, path: Path, bpf_filter: str = "tcp") -> Iterator[Path]:
        """tcpdump on every port of the hub bridge while the block runs; yields the pcap path.
        --immediate-mode: without it packets still in the kernel's ring when tcpdump
        is stopped (up to a second's worth) never reach the file."""
        p = subprocess.Popen(self._wrap(self.hub, ["tcpdump", "-Z", "root", "-i", "any", "--immediate-mode", "-U",
                                                    "-s", "0", "-w", str(path), bpf_filter], None),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stderr = p.stderr
        if stderr is None:  # cannot happen with stderr=PIPE; says so to the type checker
            raise LabError("tcpdump started without a stderr pipe")
        try:
            # tcpdump prints "listening on" once the capture is open.
            os.set_blocking(stderr.fileno(), False)
            deadline = time.monotonic() + 5
            buf = b""
            while time.monotonic() < deadline and b"listening on" not in buf:
                time.sleep(0.05)
                chunk = stderr.read()
                if chunk:
                    buf += chunk
            yield path
        finally:
            time.sleep(0.3)
            p.send_signal(signal.SIGINT)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
