"""Socket plumbing for the proxy: marked sockets, SO_REUSEPORT listeners,
upstream connects with a timeout, and SO_ORIGINAL_DST."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

from .errors import ConnectRefused, ConnectTimeout, NetworkError

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19  # linux/in.h; needs CAP_NET_ADMIN


def _family(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def set_mark(sock: socket.socket, mark: int) -> None:
    """Mark our own traffic so capture rules let it through. mark 0 = off (tests without root)."""
    if not mark:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    except PermissionError as e:
        raise PermissionError(
            e.errno, f"cannot set SO_MARK {mark:#x}: the proxy needs CAP_NET_ADMIN (run as root or grant it)"
        ) from None


def set_transparent(sock: socket.socket) -> None:
    """IP_TRANSPARENT: accept TPROXY'd connections / bind a non-local source address."""
    try:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    except PermissionError as e:
        raise PermissionError(
            e.errno, "cannot set IP_TRANSPARENT: TPROXY inbound needs CAP_NET_ADMIN "
            "(run the agent as root, or set capture.inbound: redirect)") from None


# Connections the kernel queues per listener while the workers are busy; capped
# by net.core.somaxconn.
LISTEN_BACKLOG = 4096


def listen_socket(host: str, port: int, mark: int, backlog: int = LISTEN_BACKLOG,
                  transparent: bool = False) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        if transparent:
            set_transparent(sock)  # inherited by accepted sockets
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Every worker binds the same port; the kernel spreads connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        set_mark(sock, mark)  # inherited by accepted sockets
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def connect(ip: str, port: int, mark: int, timeout_s: float, source_ip: str = "") -> socket.socket:
    """A connected, non-blocking, marked TCP socket, or ConnectTimeout/ConnectRefused.
    source_ip: connect from that (non-local) address with IP_TRANSPARENT, so the
    peer sees the original caller (TPROXY inbound); the port is ephemeral."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(_family(ip), socket.SOCK_STREAM)
    try:
        set_mark(sock, mark)
        if source_ip:
            set_transparent(sock)
            sock.bind((source_ip, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), timeout_s)
        return sock
    except TimeoutError:
        sock.close()
        raise ConnectTimeout(f"connect to {ip}:{port} timed out after {timeout_s:g}s") from None
    except ConnectionRefusedError:
        sock.close()
        raise ConnectRefused(f"connect to {ip}:{port} refused") from None
    except OSError as e:
        sock.close()
        if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            raise NetworkError(f"connect to {ip}:{port}: {e.strerror}",
                               hint="is there a route to that address?") from None
        raise NetworkError(f"connect to {ip}:{port}: {e}") from None
    except BaseException:
        sock.close()
        raise


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed connection was going (iptables/nft nat, or the BPF getsockopt hook)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return str(ipaddress.IPv6Address(raw[8:24])), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def local_dst(sock: socket.socket) -> tuple[str, int]:
    """For TPROXY listeners: the accepted socket's own address is the original destination."""
    name = sock.getsockname()
    return str(name[0]), int(name[1])


# --- one netlink question, one answer (sock_diag, conntrack) ----------------------------------------
NLMSG_ERROR = 2
NLMSG_DONE = 3
_NLMSGHDR = struct.Struct("=IHHII")


def netlink_ask(protocol: int, request: bytes, timeout_s: float) -> bytes:
    """Send one request on a fresh netlink socket of `protocol` and return the
    kernel's answer (TimeoutError if there is none within timeout_s)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol) as s:
        s.settimeout(timeout_s)
        s.sendto(request, (0, 0))
        return s.recv(65536)


def netlink_messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, body) of each netlink message in an answer, up to NLMSG_DONE; an
    NLMSG_ERROR with an error code raises OSError with it."""
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size:
            return
        body = data[off + _NLMSGHDR.size: off + length]
        if mtype == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", body, 0)
            if err:
                raise OSError(-err, os.strerror(-err))
        elif mtype == NLMSG_DONE:
            return
        else:
            yield mtype, body
        off += (length + 3) & ~3
