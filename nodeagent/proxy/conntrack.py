"""Where a NATed connection really came from: a ctnetlink (NETLINK_NETFILTER)
get of one conntrack entry by its REPLY tuple, giving its ORIGINAL tuple.

Why: under iptables/nftables REDIRECT capture, two connections a client opens
from one source port to two destinations are both rewritten to the proxy's
port; the second one's reply tuple clashes with the first and conntrack
remaps its source port. The proxy then sees a peer port the client's socket
does not have; the ORIGINAL tuple still holds the real one."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

from .netutil import netlink_ask, netlink_messages

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0  # the kernel answers a get with a NEW message
IPCTNL_MSG_CT_GET = 1
NLM_F_REQUEST = 0x1
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (network order, 0)
_NLA = struct.Struct("=HH")

Addr = tuple[str, int]


class ConntrackError(OSError):
    """The kernel's connection tracking could not answer."""


@dataclass(frozen=True)
class ConnTuple:
    """One direction of a conntrack entry (TCP)."""

    src: Addr
    dst: Addr


def _nla(kind: int, payload: bytes, nested: bool = False) -> bytes:
    n = _NLA.size + len(payload)
    pad = b"\0" * ((4 - n % 4) % 4)
    return _NLA.pack(n, kind | (NLA_F_NESTED if nested else 0)) + payload + pad


def _family(src_ip: str, dst_ip: str) -> int:
    a, b = ipaddress.ip_address(src_ip), ipaddress.ip_address(dst_ip)
    if a.version != b.version:
        raise ValueError(f"address families differ: {src_ip} and {dst_ip}")
    return socket.AF_INET if a.version == 4 else socket.AF_INET6


def build_get_by_reply(reply: ConnTuple, seq: int = 1) -> bytes:
    """IPCTNL_MSG_CT_GET for the TCP entry whose REPLY direction is `reply`."""
    family = _family(reply.src[0], reply.dst[0])
    src_t, dst_t = (CTA_IP_V4_SRC, CTA_IP_V4_DST) if family == socket.AF_INET else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    ip = _nla(src_t, ipaddress.ip_address(reply.src[0]).packed) + _nla(dst_t, ipaddress.ip_address(reply.dst[0]).packed)
    proto = (_nla(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP]))
             + _nla(CTA_PROTO_SRC_PORT, struct.pack("!H", reply.src[1]))
             + _nla(CTA_PROTO_DST_PORT, struct.pack("!H", reply.dst[1])))
    body = _NFGENMSG.pack(family, 0, 0) + _nla(
        CTA_TUPLE_REPLY, _nla(CTA_TUPLE_IP, ip, nested=True) + _nla(CTA_TUPLE_PROTO, proto, nested=True), nested=True)
    msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    p = 0
    while p + _NLA.size <= len(data):
        n, kind = _NLA.unpack_from(data, p)
        if n < _NLA.size or p + n > len(data):
            break
        out[kind & NLA_TYPE_MASK] = data[p + _NLA.size: p + n]
        p += (n + 3) & ~3
    return out


def _tuple(data: bytes) -> ConnTuple:
    top = _attrs(data)
    ip, proto = _attrs(top.get(CTA_TUPLE_IP, b"")), _attrs(top.get(CTA_TUPLE_PROTO, b""))
    if CTA_IP_V4_SRC in ip and CTA_IP_V4_DST in ip:
        s, d = ip[CTA_IP_V4_SRC], ip[CTA_IP_V4_DST]
    elif CTA_IP_V6_SRC in ip and CTA_IP_V6_DST in ip:
        s, d = ip[CTA_IP_V6_SRC], ip[CTA_IP_V6_DST]
    else:
        raise ConntrackError(errno.EPROTO, "conntrack: entry without addresses")
    sport, dport = proto.get(CTA_PROTO_SRC_PORT, b""), proto.get(CTA_PROTO_DST_PORT, b"")
    if len(sport) != 2 or len(dport) != 2:
        raise ConntrackError(errno.EPROTO, "conntrack: entry without TCP ports")
    return ConnTuple((str(ipaddress.ip_address(s)), struct.unpack("!H", sport)[0]),
                     (str(ipaddress.ip_address(d)), struct.unpack("!H", dport)[0]))


def parse_original(data: bytes) -> ConnTuple:
    """The ORIGINAL tuple of the entry in a ctnetlink answer."""
    try:
        for mtype, body in netlink_messages(data):
            if mtype == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW:
                orig = _attrs(body[_NFGENMSG.size:]).get(CTA_TUPLE_ORIG)
                if orig is None:
                    raise ConntrackError(errno.EPROTO, "conntrack: entry without an ORIGINAL tuple")
                return _tuple(orig)
    except ConntrackError:
        raise
    except OSError as e:
        raise ConntrackError(e.errno, f"conntrack: {e.strerror}") from None
    raise ConntrackError(errno.ENOENT, "conntrack: no entry in reply")


def original_of(reply: ConnTuple, timeout_s: float = 0.5) -> ConnTuple:
    """The ORIGINAL tuple of the TCP connection whose REPLY tuple is `reply`
    (for a connection the proxy accepted: its own address -> the peer as seen).
    Needs CAP_NET_ADMIN in the connection's network namespace."""
    where = f"reply tuple {reply.src[0]}:{reply.src[1]} -> {reply.dst[0]}:{reply.dst[1]}"
    try:
        return parse_original(netlink_ask(NETLINK_NETFILTER, build_get_by_reply(reply), timeout_s))
    except TimeoutError as e:
        raise ConntrackError(errno.ETIMEDOUT, f"conntrack: no answer from the kernel ({where})") from e
    except ConntrackError as e:
        raise ConntrackError(e.errno, f"{e.strerror} ({where})") from None
