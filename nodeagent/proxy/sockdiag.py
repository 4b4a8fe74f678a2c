"""Who opened this connection, according to the kernel: a NETLINK_SOCK_DIAG
INET_DIAG lookup of one exact TCP 4-tuple, giving the socket's uid, inode and
cgroup v2 id; and the map from cgroup id to the node's LocalWorkloads."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from nodeagent.meshview.snapshot import LocalWorkload, Snapshot

from .netutil import netlink_ask, netlink_messages

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
INET_DIAG_CGROUP_ID = 21  # u64, kernel >= 5.7
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
TCP_ALL_STATES = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid
_REQ = struct.Struct("=BBBxI")
# inet_diag_sockid: sport, dport (network order), src[16], dst[16], if, cookie[2]
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue, wqueue, uid, inode
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_SOCKID_LEN = _SOCKID.size + _SOCKID_TAIL.size
_RTA = struct.Struct("=HH")


class SockDiagError(OSError):
    """The kernel could not tell who owns a socket."""


@dataclass(frozen=True)
class SocketOwner:
    uid: int
    inode: int
    cgroup_id: int | None  # None when the kernel does not report it


def _addr16(ip: str) -> tuple[int, bytes]:
    a = ipaddress.ip_address(ip)
    if a.version == 4:
        return socket.AF_INET, a.packed + b"\0" * 12
    return socket.AF_INET6, a.packed


def build_request(src: tuple[str, int], dst: tuple[str, int], seq: int = 1) -> bytes:
    fam, s = _addr16(src[0])
    fam2, d = _addr16(dst[0])
    if fam != fam2:
        raise ValueError(f"address families differ: {src[0]} and {dst[0]}")
    body = (
        _REQ.pack(fam, socket.IPPROTO_TCP, 0, TCP_ALL_STATES)
        + _SOCKID.pack(src[1], dst[1], s, d)
        + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + body


def parse_response(data: bytes) -> SocketOwner:
    try:
        for mtype, body in netlink_messages(data):
            if mtype != SOCK_DIAG_BY_FAMILY:
                continue
            p = _MSG_HEAD.size + _SOCKID_LEN
            _exp, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(body, p)
            p += _MSG_TAIL.size
            cgroup_id: int | None = None
            while p + _RTA.size <= len(body):
                rlen, rtype = _RTA.unpack_from(body, p)
                if rlen < _RTA.size:
                    break
                if rtype == INET_DIAG_CGROUP_ID and rlen >= _RTA.size + 8:
                    (cgroup_id,) = struct.unpack_from("=Q", body, p + _RTA.size)
                p += (rlen + 3) & ~3
            return SocketOwner(uid=uid, inode=inode, cgroup_id=cgroup_id)
    except OSError as e:
        raise SockDiagError(e.errno, f"sock_diag: {e.strerror}") from None
    raise SockDiagError(errno.ENOENT, "sock_diag: no socket in reply")


def query_owner(src: tuple[str, int], dst: tuple[str, int], timeout_s: float = 0.5) -> SocketOwner:
    """Owner of the TCP socket whose local address is `src` and peer is `dst`
    (for a redirected connection: client addr:port -> original destination)."""
    try:
        data = netlink_ask(NETLINK_SOCK_DIAG, build_request(src, dst), timeout_s)
    except TimeoutError as e:
        raise SockDiagError(errno.ETIMEDOUT, "sock_diag: no answer from the kernel") from e
    try:
        return parse_response(data)
    except SockDiagError as e:
        if e.errno == errno.ENOENT:
            raise SockDiagError(errno.ENOENT, f"no TCP socket {src[0]}:{src[1]} -> {dst[0]}:{dst[1]}") from None
        raise


# --- cgroup id -> LocalWorkload ---------------------------------------------------------------------
def cgroup2_root() -> str:
    """The cgroup v2 mount: /sys/fs/cgroup/unified on hybrid hosts, else /sys/fs/cgroup."""
    for path in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if _is_cgroup2(path):
            return path
    return ""


def _is_cgroup2(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == path and " - cgroup2 " in line:
                    return True
    except OSError:
        return False
    return False


def cgroup_index(snapshot: Snapshot, root: str | None = None) -> Mapping[int, LocalWorkload]:
    """cgroup id (the inode of the cgroup v2 directory) -> LocalWorkload, resolved
    once per snapshot. A cgroup that does not exist (yet) is logged and skipped."""
    base = cgroup2_root() if root is None else root
    out: dict[int, LocalWorkload] = {}
    if not base:
        if snapshot.local_by_cgroup:
            log.warning("no cgroup v2 mount found: workloads identified by cgroup cannot be recognised")
        return out
    for rel, lw in snapshot.local_by_cgroup.items():
        path = os.path.join(base, rel)
        try:
            out[os.stat(path).st_ino] = lw
        except OSError as e:
            log.warning("local workload %s: cgroup %s not found (%s); check its cgroup path", lw.key, path, e)
    return out


def this_process_cgroup_id() -> int | None:
    """The cgroup v2 id of this process (tests and diagnostics)."""
    root = cgroup2_root()
    if not root:
        return None
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return os.stat(os.path.join(root, line[3:].strip().lstrip("/"))).st_ino
    except OSError:
        return None
    return None


def identify(
    snapshot: Snapshot, by_cgroup: Mapping[int, LocalWorkload], owner: SocketOwner
) -> LocalWorkload | None:
    """cgroup first (more specific than a uid shared by many processes), then uid."""
    if owner.cgroup_id is not None:
        lw = by_cgroup.get(owner.cgroup_id)
        if lw is not None:
            return lw
    return snapshot.local_by_uid.get(owner.uid)
