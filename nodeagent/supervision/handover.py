"""Restarts and upgrades that drop nothing (docs/systemd.md): what one agent
hands the next through systemd's fd store (FileDescriptorStoreMax=), and how an
agent tells a restart from a stop.

Kept in the store: the proxy's listening sockets (so a connection arriving while
no agent runs waits in the kernel's accept queue instead of being refused) and a
memfd with the last snapshot and certificates (so the next agent serves at once,
before the control plane answers). systemd hands them back in LISTEN_FDS to the
next main process of the same unit, also after a crash; it closes them when the
unit is stopped for good."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nodeagent.meshview.snapshot import Snapshot
from nodeagent.proxy.proxy import LISTENER_NAMES, listener_specs
from nodeagent.supervision.settings import Certs, ProxySettings
from nodemesh.sdnotify import Notifier

log = logging.getLogger(__name__)

STATE_NAME = "state"  # the memfd's name in the fd store
# The old workers keep accepting until the next agent's workers serve (it signals
# them), at most this long: a restart never has a moment with nobody accepting.
HANDOVER_WAIT_S = 30.0
# Then how long they may keep serving their established connections (HTTP/1.1
# ends at the next response with `Connection: close`).
DRAIN_TIMEOUT_S = 20.0
DRAINING_FILE = "draining-workers"  # in stateDir: the old workers' pids, for the next agent
WORKER_MODULE = b"nodeagent.proxy.worker"
_HEADER = struct.Struct("!8sQ32s")  # magic, length, sha256 of the body
_MAGIC = b"NMHAND01"
SYSTEMCTL_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Carried:
    """What the previous agent left: its listeners (by name) and its last state."""

    listeners: dict[str, socket.socket]
    snapshot: Snapshot | None
    certs: Certs | None

    @property
    def serving_state(self) -> bool:
        return self.snapshot is not None and self.certs is not None


def adopt(inherited: dict[str, list[int]], settings: ProxySettings, notifier: Notifier) -> Carried:
    """Take over what systemd handed this process: listeners whose address still
    matches the config (another is closed and dropped from the store: a stale
    socket on the same port would queue connections nobody accepts), and the
    state memfd if it reads back whole."""
    listeners: dict[str, socket.socket] = {}
    specs = {name: (host, port) for name, host, port, _ in listener_specs(settings)}
    for name, fds in inherited.items():
        for fd in fds:
            if name == STATE_NAME:
                continue
            sock = socket.socket(fileno=fd)
            want = specs.get(name)
            try:
                ok = (want is not None and name not in listeners and sock.type == socket.SOCK_STREAM
                      and sock.getsockname()[:2] == want)
            except OSError:
                ok = False
            if ok:
                sock.setblocking(False)
                listeners[name] = sock
            else:
                log.warning("handover: dropping the kept socket %r (%s): it does not match the config", name,
                            _describe(sock))
                notifier.notify("FDSTOREREMOVE=1", f"FDNAME={name}")
                sock.close()
    if listeners and set(listeners) != set(LISTENER_NAMES):
        log.warning("handover: only %s kept; opening all listeners anew", ", ".join(sorted(listeners)))
        for sock in listeners.values():
            sock.close()
        listeners = {}
    snapshot, certs = None, None
    if inherited.get(STATE_NAME):
        # This agent keeps its own memfd (StateStore); the store would fill up with old ones.
        notifier.notify("FDSTOREREMOVE=1", f"FDNAME={STATE_NAME}")
    for fd in inherited.get(STATE_NAME, []):
        try:
            snapshot, certs = _read_state(fd)
        except (OSError, ValueError, pickle.UnpicklingError, AttributeError, ImportError, EOFError) as e:
            # Another version's types, or a write cut short by kill -9: wait for the control plane.
            log.warning("handover: the kept snapshot and certificates are unusable (%s); waiting for the "
                        "control plane", e)
        finally:
            os.close(fd)
    return Carried(listeners, snapshot, certs)


def _describe(sock: socket.socket) -> str:
    try:
        return f"{sock.getsockname()}"
    except OSError as e:
        return str(e)


def _read_state(fd: int) -> tuple[Snapshot, Certs]:
    with os.fdopen(os.dup(fd), "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) != _HEADER.size:
            raise ValueError("truncated header")
        magic, length, digest = _HEADER.unpack(head)
        if magic != _MAGIC:
            raise ValueError("not a nodemesh handover")
        body = f.read(length)
    if len(body) != length or hashlib.sha256(body).digest() != digest:
        raise ValueError("incomplete or corrupt (a write cut short?)")
    snapshot, certs = pickle.loads(body)  # noqa: S301 (written by this unit's previous agent, 0600 memfd)
    if not isinstance(snapshot, Snapshot) or not isinstance(certs, Certs):
        raise ValueError("unexpected contents")
    return snapshot, certs


class StateStore:
    """The last published snapshot and certificates, in a memfd kept in the fd
    store: rewritten in place on each publish (the store holds the same file)."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self._fd = -1

    def save(self, snapshot: Snapshot, certs: Certs) -> None:
        if not self.notifier.enabled:
            return
        body = pickle.dumps((snapshot, certs), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            if self._fd < 0:
                self._fd = os.memfd_create("nodemesh-agent-state", os.MFD_CLOEXEC)
                self.notifier.store_fd(STATE_NAME, self._fd)
            # Header last-but-one: a reader checks length and digest, so a torn write is refused.
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, _HEADER.pack(_MAGIC, len(body), hashlib.sha256(body).digest()) + body, 0)
        except OSError as e:
            log.warning("handover: cannot keep the snapshot for the next agent (%s)", e)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def store_listeners(notifier: Notifier, listeners: list[socket.socket]) -> None:
    """Put the listeners in the fd store (systemd keeps one copy per open file)."""
    for name, sock in zip(LISTENER_NAMES, listeners, strict=True):
        notifier.store_fd(name, sock.fileno())


def own_unit() -> str:
    """This process's systemd unit, from its cgroup ("" outside a service)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            path = line.split(":", 2)[-1]
            for part in reversed(path.split("/")):
                if part.endswith(".service"):
                    return part
    except OSError:
        pass
    return ""


def restart_pending(unit: str) -> tuple[bool, str]:
    """(True, why) when systemd is restarting `unit` (systemctl restart, or
    try-restart/reload-or-restart: the job running now is a restart) and the unit
    has an fd store, so the listeners outlive this process. Anything else (a
    stop, no systemd, no D-Bus to ask) is a stop."""
    systemctl = shutil.which("systemctl")
    if not unit or systemctl is None:
        return False, "not a systemd service"
    try:
        store = subprocess.run([systemctl, "show", "-p", "FileDescriptorStoreMax", "--value", unit],  # noqa: S603
                               capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S, check=False)
        jobs = subprocess.run([systemctl, "list-jobs", "--no-legend", "--plain", unit],  # noqa: S603
                              capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot ask systemd ({e})"
    if store.returncode != 0 or jobs.returncode != 0:
        return False, f"cannot ask systemd: {(store.stderr or jobs.stderr).strip()}"
    if not store.stdout.strip().isdigit() or int(store.stdout.strip()) < len(LISTENER_NAMES) + 1:
        return False, f"{unit} has no fd store (FileDescriptorStoreMax={store.stdout.strip()})"
    job = restart_job(jobs.stdout, unit)
    return (True, f"systemd job {job}") if job else (False, "no restart job")


def restart_job(list_jobs: str, unit: str) -> str:
    """The restart job of `unit` in `systemctl list-jobs --no-legend --plain`
    output ("ID TYPE"), or "" (a stop job, or none)."""
    for line in list_jobs.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == unit and parts[2] in ("restart", "try-restart", "reload-or-restart"):
            return f"{parts[0]} {parts[2]}"
    return ""


def note_draining(state_dir: Path, pids: list[int]) -> None:
    """Tell the next agent which workers to signal once its own serve."""
    try:
        (state_dir / DRAINING_FILE).write_text("".join(f"{p}\n" for p in pids))
    except OSError as e:
        log.warning("handover: cannot record the draining workers (%s); they stop accepting after %gs",
                    e, HANDOVER_WAIT_S)


def release_draining(state_dir: Path) -> list[int]:
    """This agent's workers serve: the previous agent's stop accepting (SIGUSR2)
    and drain. Only live proxy workers are signalled (a pid may have been reused)."""
    path = state_dir / DRAINING_FILE
    try:
        pids = [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return []
    done = []
    for pid in pids:
        try:
            if WORKER_MODULE in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGUSR2)
                done.append(pid)
        except (OSError, ProcessLookupError):
            continue
    with contextlib.suppress(OSError):
        path.unlink()
    return done
