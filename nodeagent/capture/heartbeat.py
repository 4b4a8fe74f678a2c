"""The eBPF liveness entry, without bcc: where it is pinned, and raw bpf(2)
calls to pin, open, write and read it.

In eBPF mode the kernel decides fail-open / fail-closed at connect time from
`nm_liveness` (bpf/maps.h): slot 0 is a CLOCK_MONOTONIC timestamp (what
bpf_ktime_get_ns() reads) that every proxy worker rewrites every REFRESH_S
from its own event loop (`run()`), so a worker whose loop hangs or is stopped
stops refreshing it. The agent loads the programs and pins the map at
`pin_path()`; the workers, which started before capture was installed, find
it there. The path is derived from the network namespace's cookie, so the
agent and its workers (same netns) agree without configuration and two node
namespaces on one machine never share an entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes as ct
import logging
import os
import platform
import socket
import struct
import time

log = logging.getLogger(__name__)

REFRESH_S = 0.5
SLOT_PROXY = 0  # NM_LIVE_PROXY
SLOT_DNS = 1  # NM_LIVE_DNS
PIN_SUBDIR = "nodemesh"
SO_NETNS_COOKIE = 71

# bpf(2) commands (uapi/linux/bpf.h) and the syscall number per architecture.
BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_OBJ_PIN, BPF_OBJ_GET = 1, 2, 6, 7
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}

_libc = ct.CDLL(None, use_errno=True)


class _MapElemAttr(ct.Structure):
    _fields_ = [("map_fd", ct.c_uint32), ("_pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


class _ObjAttr(ct.Structure):
    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32), ("file_flags", ct.c_uint32)]


def _bpf(cmd: int, attr: ct.Structure) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(0, f"bpf(2) syscall number unknown for {platform.machine()}")
    ret = int(_libc.syscall(nr, cmd, ct.byref(attr), ct.sizeof(attr)))
    if ret < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def obj_pin(fd: int, path: str) -> None:
    p = ct.create_string_buffer(path.encode())
    _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ct.addressof(p), bpf_fd=fd))


def obj_get(path: str) -> int:
    p = ct.create_string_buffer(path.encode())
    return _bpf(BPF_OBJ_GET, _ObjAttr(pathname=ct.addressof(p)))


def write_slot(fd: int, slot: int, value: int) -> None:
    key, val = ct.c_uint32(slot), ct.c_uint64(value)
    _bpf(BPF_MAP_UPDATE_ELEM, _MapElemAttr(map_fd=fd, key=ct.addressof(key), value=ct.addressof(val)))


def read_slot(fd: int, slot: int) -> int:
    key, val = ct.c_uint32(slot), ct.c_uint64(0)
    _bpf(BPF_MAP_LOOKUP_ELEM, _MapElemAttr(map_fd=fd, key=ct.addressof(key), value=ct.addressof(val)))
    return int(val.value)


def now_ns() -> int:
    """The kernel's bpf_ktime_get_ns() clock."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def netns_cookie() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int(struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0])


def bpffs_mount(mounts: str = "/proc/self/mounts") -> str | None:
    """Where a BPF filesystem is mounted in this mount namespace, if anywhere."""
    try:
        with open(mounts) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "bpf":
                    return fields[1]
    except OSError:
        return None
    return None


DEFAULT_BPFFS = "/sys/fs/bpf"
RESCAN_S = 30.0


def ensure_bpffs(target: str = DEFAULT_BPFFS) -> str:
    """A BPF filesystem to pin into: the one mounted, or one mounted on an empty,
    unmounted /sys/fs/bpf (the state of a host without one, and of the fresh
    /sys that `ip netns exec` gives its command; there the mount is private to
    that mount namespace, which the proxy workers share, and goes with it)."""
    found = bpffs_mount()
    if found:
        return found
    try:
        empty = os.path.isdir(target) and not os.path.ismount(target) and not os.listdir(target)
    except OSError:
        empty = False
    if not empty or _libc.mount(b"bpf", target.encode(), b"bpf", 0, None) != 0:
        why = os.strerror(ct.get_errno()) if empty else f"{target} is missing, not empty or already mounted"
        raise OSError(0, f"no BPF filesystem to pin the liveness map in ({why}): mount one "
                         "(mount -t bpf bpf /sys/fs/bpf)")
    log.info("ebpf: mounted a BPF filesystem on %s (this mount namespace had none)", target)
    return target


def pin_path(mount: str, cookie: int) -> str:
    return os.path.join(mount, PIN_SUBDIR, f"{cookie:x}", "liveness")


class LivenessWriter:
    """Writes one slot of the pinned liveness map; reopens the pin when the
    agent replaces it (reinstall: new programs, new map), never raises."""

    def __init__(self, slot: int = SLOT_PROXY) -> None:
        self.slot = slot
        self._path: str | None = None
        self._fd: int | None = None
        self._ino: int | None = None
        self._warned = ""
        self._missed: tuple[bool, int] | None = None

    def _target(self) -> str | None:
        if self._path is None:
            # Not in eBPF mode there is no BPF filesystem, and reading /proc/self/mounts
            # twice a second forever was ~3% of a busy worker: look again only when
            # /sys/fs/bpf (where the agent mounts one, ensure_bpffs) changes, or
            # every RESCAN_S for one mounted elsewhere.
            gate = (os.path.ismount(DEFAULT_BPFFS), int(time.monotonic() // RESCAN_S))
            if gate == self._missed:
                return None
            mount = bpffs_mount()
            if mount is None:
                self._missed = gate
                return None
            self._path = pin_path(mount, netns_cookie())
        return self._path

    def beat(self) -> bool:
        """Write now into the slot; False while no pin exists (capture not in eBPF mode or not installed)."""
        try:
            path = self._target()
            if path is None:
                return False
            try:
                ino = os.stat(path).st_ino
            except FileNotFoundError:
                self.close()
                return False
            if self._fd is None or ino != self._ino:
                self.close()
                self._fd, self._ino = obj_get(path), ino
            write_slot(self._fd, self.slot, now_ns())
            return True
        except OSError as e:
            if str(e) != self._warned:  # once per distinct problem, not twice a second
                self._warned = str(e)
                log.warning("cannot refresh the eBPF liveness entry (%s): in eBPF mode the kernel will treat "
                            "this proxy as down; is the worker root or CAP_BPF?", e)
            self.close()
            return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._ino = None


async def run(stop: asyncio.Event, slot: int = SLOT_PROXY, interval: float = REFRESH_S) -> None:
    """A proxy worker's heartbeat: from its event loop, so a hung loop goes stale."""
    writer = LivenessWriter(slot)
    try:
        while not stop.is_set():
            writer.beat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
    finally:
        writer.close()


def age_s(path: str, slot: int) -> float | None:
    """Seconds since the slot was written, None if never or no pin."""
    try:
        fd = obj_get(path)
    except OSError:
        return None
    try:
        beat = read_slot(fd, slot)
    finally:
        os.close(fd)
    return (now_ns() - beat) / 1e9 if beat else None
