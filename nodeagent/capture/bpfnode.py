"""eBPF capture's facts about this node, from the kernel and /proc: the
network namespace's cookie, the cgroup v2 mount (mounted when `ip netns exec`
left none), this process's cgroup, and whether a UDP socket is bound (/proc/net/udp)."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import logging
import os
import socket
import struct

from nodeagent.capture.base import CaptureError
from nodeagent.capture.bpflayout import (
    SO_NETNS_COOKIE,
)

log = logging.getLogger("nodeagent.capture.ebpf")


def netns_cookie() -> int:
    """The kernel's cookie of this process's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError as e:
            raise CaptureError("no_netns_cookie", f"SO_NETNS_COOKIE failed ({e.strerror}): eBPF capture "
                               "needs Linux 5.14 or later") from None
    return int(struct.unpack("=Q", raw)[0])


def _cgroup2_mounts(mounts: str = "/proc/self/mounts") -> list[str]:
    out = []
    with open(mounts) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                out.append(fields[1])
    return out


_libc = ct.CDLL(None, use_errno=True)


def cgroup2_mount() -> str:
    """Where cgroup v2 is mounted in this mount namespace.

    `ip netns exec` gives its command a private mount namespace with a fresh
    /sys, in which the host's cgroup mounts are gone and /sys/fs/cgroup is an
    empty sysfs directory. Only in that state (nothing mounted there, nothing
    in it) we mount cgroup2 on it: the same hierarchy, visible to this process
    and the proxy workers it forks (sock_diag attribution finds it there too),
    and gone with the namespace. A host with cgroups mounted is never changed."""
    mounts = _cgroup2_mounts()
    if mounts:
        return mounts[0]
    target = "/sys/fs/cgroup"
    try:
        empty = os.path.isdir(target) and not os.path.ismount(target) and not os.listdir(target)
    except OSError:
        empty = False
    if not empty:
        raise CaptureError("no_cgroup2", "no cgroup v2 mount found in /proc/self/mounts: eBPF capture "
                           "attaches to cgroup v2; mount it (mount -t cgroup2 none /sys/fs/cgroup/unified)")
    if _libc.mount(b"cgroup2", target.encode(), b"cgroup2", 0, None) != 0:
        err = ct.get_errno()
        raise CaptureError("no_cgroup2", f"mounting cgroup2 on {target} in this private mount namespace "
                           f"failed: {os.strerror(err)}")
    log.info("ebpf: mounted cgroup2 on %s (this mount namespace had none: `ip netns exec`?)", target)
    return target


def own_cgroup(proc_cgroup: str = "/proc/self/cgroup") -> str:
    """This process's cgroup v2 path (the "0::" line)."""
    with open(proc_cgroup) as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip() or "/"
    raise CaptureError("no_cgroup2", f"{proc_cgroup} has no cgroup v2 entry: is cgroup v2 enabled?")


ANY4 = "0.0.0.0"  # noqa: S104 - matched in /proc/net/udp, nothing binds to it here


def udp_bound(ip: str, port: int, proc_net_udp: str = "/proc/net/udp") -> bool:
    """Whether a UDP socket is bound to ip:port (or 0.0.0.0:port) in this netns
    (the DNS proxy's liveness; a TCP listener is liveness.listening's job)."""
    wanted = {f"{struct.unpack('<I', ipaddress.ip_address(a).packed)[0]:08X}:{port:04X}" for a in (ip, ANY4)}
    try:
        with open(proc_net_udp) as f:
            next(f, None)
            return any(len(fields) > 1 and fields[1] in wanted for fields in (line.split() for line in f))
    except OSError:
        return False
