"""eBPF capture's fixed facts, shared with the C in bpf/: the sources and
their order, the ctypes mirrors of bpf/maps.h's structs and maps (tests/unit/
test_ebpf_layout.py compares each with the BTF type bcc derived from the C
when it compiled the programs), the counters' index order, and each
program's type and attach point."""

from __future__ import annotations

import ctypes as ct
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.capture import heartbeat

log = logging.getLogger("nodeagent.capture.ebpf")

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
# maps.h first; each .c's own `#include "maps.h"` is dropped when concatenating
# (bcc only turns functions and maps of its main file into programs and maps).
SOURCES = ("maps.h", "connect4.c", "connect6.c", "sockops.c", "getsockopt.c", "getpeername4.c",
           "getpeername6.c", "sendmsg4.c", "recvmsg4.c")
PROG_PREFIX = "nm_"
BPF_F_ALLOW_MULTI = 2
SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>, Linux 5.14+
# The proxy workers refresh their heartbeat every REFRESH_S (heartbeat.py), the
# agent the DNS proxy's; connect4 treats one older than LIVENESS_TIMEOUT_S as dead.
REFRESH_S = heartbeat.REFRESH_S
LIVENESS_TIMEOUT_S = 2.0
POLICIES = {"open": 0, "closed": 1}


# ------------------------------------------------------------------ layouts
# Mirrors of bpf/maps.h. tests/unit/test_ebpf_layout.py (root) compares each
# with the type bcc derived from the C when it compiled the programs.


class NmConfig(ct.Structure):
    _fields_ = [
        ("netns_cookie", ct.c_uint64),
        ("liveness_timeout_ns", ct.c_uint64),
        ("proxy_ip4", ct.c_uint32),
        ("proxy_mark", ct.c_uint32),
        ("proxy_port", ct.c_uint16),
        ("failure_policy", ct.c_uint8),
        ("enabled", ct.c_uint8),
        ("dns_ip4", ct.c_uint32),
        ("dns_port", ct.c_uint16),
        ("_pad", ct.c_uint16),
        ("_pad2", ct.c_uint32),
    ]


class NmOrigDst(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("ip4", ct.c_uint32), ("port", ct.c_uint16), ("_pad", ct.c_uint16)]


class NmTuple(ct.Structure):
    _fields_ = [("ip4", ct.c_uint32), ("port", ct.c_uint16), ("_pad", ct.c_uint16)]


class NmCidrKey(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("ip4", ct.c_uint32)]


# map name -> (key mirror, leaf mirror, max_entries); ctypes scalars for plain ones.
MAP_LAYOUTS: dict[str, tuple[Any, Any, int]] = {
    "nm_config": (ct.c_int, NmConfig, 1),
    "nm_liveness": (ct.c_int, ct.c_uint64, 2),
    "nm_orig_by_cookie": (ct.c_uint64, NmOrigDst, 65536),
    "nm_orig_by_tuple": (NmTuple, NmOrigDst, 65536),
    "nm_exclusions": (NmCidrKey, ct.c_uint8, 1024),
    "nm_uids": (ct.c_uint32, ct.c_uint8, 1024),
    "nm_counters": (ct.c_int, ct.c_uint64, 14),
}
# Index order of nm_counters (NM_CTR_* in maps.h).
COUNTERS = ("redirected", "bypass_stale", "refused_stale", "skip_excluded", "skip_loopback",
            "origdst_answered", "origdst_miss", "peer_rewritten", "skip_proxy_mark",
            "dns_redirected", "dns_reply_rewritten", "dns_bypass_stale", "dns_refused_stale",
            "v6_native_bypass")


@dataclass(frozen=True)
class ProgSpec:
    function: str
    prog_type: int  # BPFProgType
    attach_type: int  # BPFAttachType
    attach_name: str  # as bpftool prints it


# bcc's BPFProgType / BPFAttachType values (uapi/linux/bpf.h), kept here so the
# plan can be rendered without importing bcc.
PROGRAMS: dict[str, ProgSpec] = {
    "nm_connect4": ProgSpec("nm_connect4", 18, 10, "cgroup_inet4_connect"),
    "nm_connect4_uid": ProgSpec("nm_connect4_uid", 18, 10, "cgroup_inet4_connect"),
    "nm_sockops": ProgSpec("nm_sockops", 13, 3, "cgroup_sock_ops"),
    "nm_getsockopt": ProgSpec("nm_getsockopt", 25, 21, "cgroup_getsockopt"),
    "nm_getpeername4": ProgSpec("nm_getpeername4", 18, 29, "cgroup_inet4_getpeername"),
    # Dual-stack sockets dialling ::ffff:a.b.c.d (bpf/connect6.c, getpeername6.c).
    "nm_connect6": ProgSpec("nm_connect6", 18, 11, "cgroup_inet6_connect"),
    "nm_connect6_uid": ProgSpec("nm_connect6_uid", 18, 11, "cgroup_inet6_connect"),
    "nm_getpeername6": ProgSpec("nm_getpeername6", 18, 30, "cgroup_inet6_getpeername"),
    "nm_sendmsg4": ProgSpec("nm_sendmsg4", 18, 14, "cgroup_udp4_sendmsg"),
    "nm_sendmsg4_uid": ProgSpec("nm_sendmsg4_uid", 18, 14, "cgroup_udp4_sendmsg"),
    "nm_recvmsg4": ProgSpec("nm_recvmsg4", 18, 19, "cgroup_udp4_recvmsg"),
}
ATTACH_NAMES = {spec.attach_name: spec.attach_type for spec in PROGRAMS.values()}
