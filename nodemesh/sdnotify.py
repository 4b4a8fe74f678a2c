"""sd_notify(3) over $NOTIFY_SOCKET: the service manager protocol of Type=notify
units (READY=1, RELOADING=1, STOPPING=1, WATCHDOG=1, STATUS=..., FDSTORE=1 with
file descriptors attached). A datagram per message on an AF_UNIX socket (an
abstract one when the path starts with '@'). Outside systemd (no NOTIFY_SOCKET)
every call is a no-op returning False. listen_fds() is sd_listen_fds(3): the
descriptors the service manager handed this process (its fd store, on restart)."""

from __future__ import annotations

import array
import os
import socket
import time
from collections.abc import Sequence

MAX_MESSAGE = 4096  # systemd reads at most a page of state per datagram


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        self.address = env.get("NOTIFY_SOCKET", "")
        self.watchdog_s = 0.0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # The watchdog is ours only if WATCHDOG_PID is unset or names this process.
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str, fds: Sequence[int] = ()) -> bool:
        """Send `KEY=value` fields in one datagram (with `fds` attached as
        SCM_RIGHTS); False when not under systemd. An error (the manager went
        away) is swallowed: notification is advisory."""
        if not self.address:
            return False
        msg = "\n".join(fields).encode()
        if len(msg) > MAX_MESSAGE or any("\n" in f for f in fields):
            raise ValueError("sd_notify: a field may not contain a newline; at most 4096 bytes in all")
        addr = self.address
        target = "\0" + addr[1:] if addr.startswith("@") else addr
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            if fds:
                self._sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))], 0, target)
            else:
                self._sock.sendto(msg, target)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd ≥ 253 (Type=notify-reload) match the reload to its request.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def store_fd(self, name: str, fd: int) -> bool:
        """Keep `fd` in the unit's fd store under `name` (FileDescriptorStoreMax=):
        systemd holds it while the service restarts and hands it to the next main
        process in LISTEN_FDS/LISTEN_FDNAMES. The same open file stored twice is
        kept once."""
        if not name or len(name) > 255 or not all(c.isalnum() or c in "_-." for c in name):
            raise ValueError(f"fd store name {name!r}: letters, digits, '_', '-', '.', at most 255")
        return self.notify("FDSTORE=1", f"FDNAME={name}", fds=[fd])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START


def listen_fds(env: dict[str, str] | None = None, unset: bool = True) -> dict[str, list[int]]:
    """sd_listen_fds(3) with names: {name: [fd, ...]} for the descriptors passed
    to this process (LISTEN_PID must be ours), each made close-on-exec. Unnamed
    ones are under "unknown". With `unset`, the LISTEN_* variables are removed so
    that child processes do not take the descriptors for theirs."""
    env_ = os.environ if env is None else env
    out: dict[str, list[int]] = {}
    try:
        pid, count = int(env_.get("LISTEN_PID", "")), int(env_.get("LISTEN_FDS", ""))
    except ValueError:
        return out
    names = env_.get("LISTEN_FDNAMES", "").split(":")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env_.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return out
    for i in range(count):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out.setdefault(names[i] if i < len(names) and names[i] else "unknown", []).append(fd)
    return out
