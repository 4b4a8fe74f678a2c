"""sd_notify(3) over $NOTIFY_SOCKET: the service manager protocol of Type=notify
units (READY=1, RELOADING=1, STOPPING=1, WATCHDOG=1, STATUS=...). A datagram per
message on an AF_UNIX socket (an abstract one when the path starts with '@').
Outside systemd (no NOTIFY_SOCKET) every call is a no-op returning False."""

from __future__ import annotations

import os
import socket
import time

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

    def notify(self, *fields: str) -> bool:
        """Send `KEY=value` fields in one datagram; False when not under systemd.
        An error (the manager went away) is swallowed: notification is advisory."""
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

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
