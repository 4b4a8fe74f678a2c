"""ctnetlink codec of the conntrack fallback (nodeagent/proxy/conntrack.py): the get
request by REPLY tuple, and the ORIGINAL tuple out of the kernel's answer. The
real lookup, with a port remapped by NAT, is tests/netns/test_capture_backends.py
(test_capture_same_source_port)."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from nodeagent.proxy import conntrack
from nodeagent.proxy.conntrack import ConntrackError, ConnTuple

HDR = struct.Struct("=IHHII")
CT_NEW = (conntrack.NFNL_SUBSYS_CTNETLINK << 8) | conntrack.IPCTNL_MSG_CT_NEW


def _tuple_attr(kind: int, t: ConnTuple, v6: bool = False) -> bytes:
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    s, d = (conntrack.CTA_IP_V6_SRC, conntrack.CTA_IP_V6_DST) if v6 else (conntrack.CTA_IP_V4_SRC,
                                                                        conntrack.CTA_IP_V4_DST)
    ip = conntrack._nla(s, socket.inet_pton(fam, t.src[0])) + conntrack._nla(d, socket.inet_pton(fam, t.dst[0]))
    proto = (conntrack._nla(conntrack.CTA_PROTO_NUM, b"\x06")
             + conntrack._nla(conntrack.CTA_PROTO_SRC_PORT, struct.pack("!H", t.src[1]))
             + conntrack._nla(conntrack.CTA_PROTO_DST_PORT, struct.pack("!H", t.dst[1])))
    return conntrack._nla(kind, conntrack._nla(conntrack.CTA_TUPLE_IP, ip, nested=True)
                          + conntrack._nla(conntrack.CTA_TUPLE_PROTO, proto, nested=True), nested=True)


def _answer(orig: ConnTuple, reply: ConnTuple, v6: bool = False) -> bytes:
    body = (struct.pack("=BBH", socket.AF_INET6 if v6 else socket.AF_INET, 0, 0)
            + _tuple_attr(conntrack.CTA_TUPLE_ORIG, orig, v6) + _tuple_attr(conntrack.CTA_TUPLE_REPLY, reply, v6)
            + conntrack._nla(7, struct.pack("!I", 120)))  # CTA_TIMEOUT: skipped
    return HDR.pack(HDR.size + len(body), CT_NEW, 0, 1, 0) + body


def test_request_asks_for_the_reply_tuple() -> None:
    req = conntrack.build_get_by_reply(ConnTuple(("127.0.0.1", 15001), ("10.0.0.11", 9677)))
    length, mtype, flags, _seq, _pid = HDR.unpack_from(req)
    assert length == len(req) and mtype == (1 << 8) | 1 and flags == conntrack.NLM_F_REQUEST
    family, version, res_id = struct.unpack_from("=BBH", req, HDR.size)
    assert (family, version, res_id) == (socket.AF_INET, 0, 0)
    (_n, kind), = [struct.unpack_from("=HH", req, HDR.size + 4)]
    assert kind == conntrack.CTA_TUPLE_REPLY | conntrack.NLA_F_NESTED
    assert socket.inet_aton("127.0.0.1") in req and socket.inet_aton("10.0.0.11") in req
    assert struct.pack("!H", 15001) in req and struct.pack("!H", 9677) in req


def test_original_tuple_gives_the_real_source_port() -> None:
    orig = ConnTuple(("10.0.0.11", 41000), ("240.240.0.1", 9090))
    reply = ConnTuple(("127.0.0.1", 15001), ("10.0.0.11", 9677))  # remapped by NAT
    assert conntrack.parse_original(_answer(orig, reply)) == orig


def test_original_tuple_ipv6() -> None:
    orig = ConnTuple(("fd00::11", 41000), ("fd00:ffff::1", 80))
    assert conntrack.parse_original(_answer(orig, ConnTuple(("::1", 15001), ("fd00::11", 2000)), v6=True)) == orig


def test_kernel_error_and_empty_answers() -> None:
    err = HDR.pack(HDR.size + 4 + HDR.size, 2, 0, 1, 0) + struct.pack("=i", -errno.ENOENT) + b"\0" * HDR.size
    with pytest.raises(ConntrackError) as e:
        conntrack.parse_original(err)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(ConntrackError) as e:
        conntrack.parse_original(b"")
    assert e.value.errno == errno.ENOENT


def test_mixed_families_rejected() -> None:
    with pytest.raises(ValueError, match="families differ"):
        conntrack.build_get_by_reply(ConnTuple(("127.0.0.1", 15001), ("fd00::1", 1)))
