"""Traffic capture with eBPF (Debian's bcc): cgroup programs redirect workload
connects to the proxy, answer SO_ORIGINAL_DST for it, and decide fail-open or
fail-closed in the kernel from a liveness entry the agent keeps fresh.

The C sources are bpf/*.c (one per attach point) and bpf/maps.h; this module
renders the attachment plan and map contents (pure functions), and a thin
executor loads, attaches and detaches. Only programs named ``nm_*`` whose
config map holds this network namespace's cookie are ever detached, so other
agents on the same machine (other node namespaces) are left alone.

Where programs go (cgroup v2):
- workloads declared by ``cgroup``: nm_connect4, nm_connect6 (dual-stack
  sockets dialling IPv4-mapped addresses), nm_sockops, nm_getpeername4 and
  nm_getpeername6 on the workload's cgroup (and so its descendants);
- workloads declared by ``uid``: a cgroup attach cannot select a uid, so
  nm_connect4_uid and nm_connect6_uid (same bodies, filtered by the nm_uids
  map), nm_sockops and nm_getpeername4/6 go on the cgroup v2 root, node-wide,
  filtered by netns cookie;
- nm_getsockopt on the agent's own cgroup, where the proxy's accepted sockets
  live (a socket belongs to the cgroup of the process that created it).
All attachments use BPF_F_ALLOW_MULTI, so nothing else's programs are displaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes as ct
import dataclasses
import ipaddress
import json
import logging
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.capture import heartbeat
from nodeagent.capture.base import CaptureDiff, CaptureError, CaptureStatus, ProxyState
from nodeagent.capture.bpfheaders import HeadersError, ensure_bcc_headers
from nodeagent.meshview.snapshot import LocalWorkload
from nodeagent.supervision.settings import ProxySettings

log = logging.getLogger(__name__)

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


# ------------------------------------------------------------------ rendering (pure)


@dataclass(frozen=True, order=True)
class Attachment:
    cgroup: str  # path relative to the cgroup v2 mount, "/" = root
    attach_name: str  # bpftool's name of the attach type
    function: str  # nm_* program

    def describe(self) -> str:
        return f"{self.cgroup} {self.attach_name} {self.function}"


def plan_attachments(workloads: Sequence[LocalWorkload], agent_cgroup: str,
                     dns: bool = False) -> tuple[Attachment, ...]:
    """Which program goes on which cgroup for these workloads (see the module
    doc); dns: port 53 is captured too (sendmsg4 and recvmsg4 attached)."""
    plan: set[Attachment] = set()
    per_workload = ("nm_sockops", "nm_getpeername4", "nm_getpeername6") + (("nm_recvmsg4",) if dns else ())
    for wl in workloads:
        if wl.cgroup:
            cg = "/" + wl.cgroup.strip("/")
            plan.add(Attachment(cg, PROGRAMS["nm_connect4"].attach_name, "nm_connect4"))
            plan.add(Attachment(cg, PROGRAMS["nm_connect6"].attach_name, "nm_connect6"))
            plan.update(Attachment(cg, PROGRAMS[f].attach_name, f) for f in per_workload)
            if dns:
                plan.add(Attachment(cg, PROGRAMS["nm_sendmsg4"].attach_name, "nm_sendmsg4"))
    if any(wl.uid is not None and not wl.cgroup for wl in workloads):
        plan.add(Attachment("/", PROGRAMS["nm_connect4_uid"].attach_name, "nm_connect4_uid"))
        plan.add(Attachment("/", PROGRAMS["nm_connect6_uid"].attach_name, "nm_connect6_uid"))
        plan.update(Attachment("/", PROGRAMS[f].attach_name, f) for f in per_workload)
        if dns:
            plan.add(Attachment("/", PROGRAMS["nm_sendmsg4_uid"].attach_name, "nm_sendmsg4_uid"))
    if plan:
        plan.add(Attachment("/" + agent_cgroup.strip("/"), PROGRAMS["nm_getsockopt"].attach_name,
                            "nm_getsockopt"))
    return tuple(sorted(plan))


def render_config(settings: ProxySettings, netns_cookie: int, failure_policy: str,
                  liveness_timeout_s: float = LIVENESS_TIMEOUT_S, dns_port: int | None = None,
                  dns_ip: str = "127.0.0.1") -> NmConfig:
    if failure_policy not in POLICIES:
        raise CaptureError("bad_failure_policy",
                           f"capture.failurePolicy must be one of {', '.join(POLICIES)}, got {failure_policy!r}")
    proxy_ip = ipaddress.ip_address(settings.outbound_bind)
    if proxy_ip.version != 4:
        raise CaptureError("bad_outbound_bind", f"eBPF capture redirects to an IPv4 listener; "
                                                f"outbound_bind is {settings.outbound_bind}")
    dns = ipaddress.ip_address(dns_ip)
    if dns_port is not None and (dns.version != 4 or not 0 < dns_port < 65536):
        raise CaptureError("bad_dns_address", f"eBPF capture sends port 53 to an IPv4 DNS proxy; "
                                              f"dns.address:port is {dns_ip}:{dns_port}")
    return NmConfig(
        netns_cookie=netns_cookie,
        dns_ip4=struct.unpack("=I", dns.packed)[0] if dns_port else 0,
        dns_port=dns_port or 0,
        liveness_timeout_ns=int(liveness_timeout_s * 1e9),
        proxy_ip4=struct.unpack("=I", proxy_ip.packed)[0],  # network order, as the kernel stores it
        proxy_mark=settings.mark,
        proxy_port=settings.outbound_port,
        failure_policy=POLICIES[failure_policy],
        enabled=1,
    )


def render_exclusions(cidrs: Iterable[str]) -> tuple[NmCidrKey, ...]:
    """LPM keys for the IPv4 exclusions (control plane, excludeCidrs); loopback
    is tested in the program itself."""
    keys: dict[tuple[int, int], NmCidrKey] = {}
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        if net.version != 4:
            continue  # connect4 sees IPv4 only
        ip4 = struct.unpack("=I", net.network_address.packed)[0]
        keys[(net.prefixlen, ip4)] = NmCidrKey(prefixlen=net.prefixlen, ip4=ip4)
    return tuple(keys.values())


def render_uids(workloads: Sequence[LocalWorkload]) -> tuple[int, ...]:
    return tuple(sorted({wl.uid for wl in workloads if wl.uid is not None and not wl.cgroup}))


def load_source(bpf_dir: Path = BPF_DIR) -> str:
    parts = []
    for name in SOURCES:
        path = bpf_dir / name
        try:
            text = path.read_text()
        except OSError as e:
            raise CaptureError("bpf_source_missing", f"cannot read {path} ({e.strerror}): "
                               "the bpf/ directory ships with nodemesh; is the installation complete?") from None
        # #line keeps compiler errors pointing at the real file and line.
        parts.append(f'#line 1 "bpf/{name}"\n' + text.replace('#include "maps.h"', ""))
    return "\n".join(parts)


# ------------------------------------------------------------------ the node


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


def proxy_listening(ip: str, port: int, proc_net_tcp: str = "/proc/net/tcp") -> bool:
    """Whether a LISTEN socket is bound to ip:port (or 0.0.0.0:port) in this netns."""
    wanted = {f"{struct.unpack('<I', ipaddress.ip_address(a).packed)[0]:08X}:{port:04X}"
              for a in (ip, "0.0.0.0")}
    try:
        with open(proc_net_tcp) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[3] == "0A" and fields[1] in wanted:
                    return True
    except OSError:
        return False
    return False


# ------------------------------------------------------------------ bpftool


def _bpftool(*args: str) -> Any:
    try:
        proc = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise CaptureError("bpftool_missing", "bpftool not found: install it (apt-get install bpftool; "
                           "scripts/setup.sh does)") from None
    if proc.returncode != 0:
        raise CaptureError("bpftool_failed", f"bpftool {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return json.loads(proc.stdout) if proc.stdout.strip() else None


@dataclass(frozen=True)
class Attached:
    """One nm_* program attached somewhere, as the kernel reports it."""

    cgroup: str  # relative to the cgroup2 mount
    attach_name: str
    function: str
    prog_id: int
    netns_cookie: int | None  # from the program's nm_config map; None if unreadable

    def describe(self) -> str:
        return f"{self.cgroup} {self.attach_name} {self.function} (prog id {self.prog_id})"


def _config_of_prog(prog_id: int) -> NmConfig | None:
    info = _bpftool("prog", "show", "id", str(prog_id))
    for map_id in info.get("map_ids", []):
        minfo = _bpftool("map", "show", "id", str(map_id))
        if minfo.get("name") != "nm_config":
            continue
        value = _bpftool("map", "lookup", "id", str(map_id), "key", "0", "0", "0", "0")
        raw = bytes(int(b, 16) for b in value.get("value", []))
        if len(raw) != ct.sizeof(NmConfig):
            return None
        return NmConfig.from_buffer_copy(raw)
    return None


def list_attached(mount: str) -> list[Attached]:
    """Every nm_* cgroup program on the node, with the netns it serves."""
    tree = _bpftool("cgroup", "tree", mount) or []
    out: list[Attached] = []
    cookies: dict[int, int | None] = {}
    for entry in tree:
        path = entry.get("cgroup", "")
        relpath = os.path.relpath(path, mount)
        rel = "/" if relpath == "." else "/" + relpath
        for prog in entry.get("programs", []):
            name = prog.get("name", "")
            if not name.startswith(PROG_PREFIX) or prog.get("attach_type") not in ATTACH_NAMES:
                continue
            pid = int(prog["id"])
            if pid not in cookies:
                try:
                    cfg = _config_of_prog(pid)
                except CaptureError:
                    cfg = None
                cookies[pid] = int(cfg.netns_cookie) if cfg is not None else None
            out.append(Attached(rel, prog["attach_type"], name, pid, cookies[pid]))
    return out


def _detach(mount: str, a: Attached) -> None:
    path = mount if a.cgroup == "/" else os.path.join(mount, a.cgroup.lstrip("/"))
    _bpftool("cgroup", "detach", path, a.attach_name, "id", str(a.prog_id))


def remove_leftovers(mount: str | None = None, cookie: int | None = None) -> int:
    """Detach every nm_* program serving this network namespace; how many."""
    mount = mount or cgroup2_mount()
    cookie = netns_cookie() if cookie is None else cookie
    ours = [a for a in list_attached(mount) if a.netns_cookie == cookie]
    for a in ours:
        _detach(mount, a)
    if ours:
        log.info("ebpf: detached %d program(s) serving this netns: %s", len(ours),
                 "; ".join(a.describe() for a in ours))
    return len(ours)


# ------------------------------------------------------------------ availability

_available: tuple[bool, str] | None = None


def _load_bpf() -> Any:
    """Compile bpf/ with bcc and load every program (not attached)."""
    try:
        ensure_bcc_headers()
    except HeadersError as e:
        raise CaptureError("no_kernel_headers", str(e)) from None
    try:
        from bcc import BPF  # Debian's python3-bpfcc, via the venv's system site packages
    except ImportError:
        raise CaptureError("no_bcc", "cannot import bcc: install python3-bpfcc and run the agent with a "
                           "Python that sees /usr/lib/python3/dist-packages (scripts/setup.sh's .venv does)") from None
    try:
        bpf = BPF(text=load_source().encode(), cflags=["-Wno-macro-redefined"])
        for spec in PROGRAMS.values():
            bpf.load_func(spec.function.encode(), spec.prog_type, attach_type=spec.attach_type)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - bcc raises bare Exception (verifier log on stderr)
        raise CaptureError("bpf_load_failed", f"compiling or loading bpf/ failed: {e}; "
                           "is the agent root (CAP_BPF, CAP_NET_ADMIN) and the kernel 5.15 or later?") from None
    return bpf


def available() -> tuple[bool, str]:
    """Can eBPF capture load here, and why not: a real compile and load of bpf/
    (nothing attached). Cached: the answer does not change while the agent runs."""
    global _available
    if _available is not None:
        return _available
    try:
        if os.geteuid() != 0:
            raise CaptureError("not_root", "eBPF capture needs root (CAP_BPF and CAP_NET_ADMIN)")
        cgroup2_mount()
        netns_cookie()
        bpf = _load_bpf()
        bpf.cleanup()
        _available = (True, "bcc compiled and the kernel loaded every program in bpf/")
    except CaptureError as e:
        _available = (False, str(e))
    return _available


# ------------------------------------------------------------------ reading maps of attached programs


def _maps_of_prog(prog_id: int) -> dict[str, int]:
    """name -> map id of the maps an attached program uses (bpftool)."""
    info = _bpftool("prog", "show", "id", str(prog_id))
    out: dict[str, int] = {}
    for map_id in info.get("map_ids", []):
        minfo = _bpftool("map", "show", "id", str(map_id))
        out[str(minfo.get("name", ""))] = int(map_id)
    return out


def _u64(raw: Sequence[str]) -> int:
    return int.from_bytes(bytes(int(b, 16) for b in raw), "little")


def read_maps_by_id(maps: dict[str, int]) -> tuple[dict[str, int], dict[int, float | None]]:
    """Counters and liveness ages from the kernel's maps (no bcc; the CLI uses this)."""
    counters: dict[str, int] = {}
    ages: dict[int, float | None] = {}
    if "nm_counters" in maps:
        for entry in _bpftool("map", "dump", "id", str(maps["nm_counters"])) or []:
            idx = _u64(entry.get("key", []))
            if idx < len(COUNTERS):
                counters[COUNTERS[idx]] = sum(_u64(v.get("value", [])) for v in entry.get("values", []))
    if "nm_liveness" in maps:
        now = heartbeat.now_ns()
        for entry in _bpftool("map", "dump", "id", str(maps["nm_liveness"])) or []:
            beat = _u64(entry.get("value", []))
            ages[_u64(entry.get("key", []))] = (now - beat) / 1e9 if beat else None
    return counters, ages


def proxy_probe(timeout_s: float = LIVENESS_TIMEOUT_S) -> Any:
    """The agent watchdog's probe in eBPF mode: the outbound port has a listener
    AND the workers' heartbeat is fresh, the same test the kernel applies, so a
    hung (not dead) proxy also switches inbound capture to bypass/refuse."""
    from nodeagent.capture import liveness

    def probe(port: int) -> bool:
        if not liveness.listening(port):
            return False
        mount = heartbeat.bpffs_mount()
        if mount is None:
            return True  # nothing pinned (not installed yet): the listener decides
        age = heartbeat.age_s(heartbeat.pin_path(mount, heartbeat.netns_cookie()), heartbeat.SLOT_PROXY)
        return age is not None and age <= timeout_s

    return probe


def udp_bound(ip: str, port: int, proc_net_udp: str = "/proc/net/udp") -> bool:
    """Whether a UDP socket is bound to ip:port (or 0.0.0.0:port) in this netns."""
    wanted = {f"{struct.unpack('<I', ipaddress.ip_address(a).packed)[0]:08X}:{port:04X}" for a in (ip, "0.0.0.0")}
    try:
        with open(proc_net_udp) as f:
            next(f, None)
            return any(len(p) > 1 and p[1] in wanted for p in (line.split() for line in f))
    except OSError:
        return False


# ------------------------------------------------------------------ executor


@dataclass(frozen=True)
class EbpfState:
    mount: str
    attached: tuple[Attached, ...]  # ours (this netns) only
    counters: dict[str, int]
    liveness_age_s: float | None  # the proxy workers' heartbeat
    dns_liveness_age_s: float | None = None
    maps: tuple[str, ...] = ()  # "name id N" of the maps in use


def _inbound_backend(settings: ProxySettings, workloads: Sequence[LocalWorkload]) -> Any:
    """The nftables backend's inbound part only (TPROXY or REDIRECT to 15006),
    for workloads' ports: eBPF sock_addr hooks cannot see packets arriving from
    other hosts, so inbound plaintext capture stays in netfilter (docs/capture-ebpf.md)."""
    from nodeagent.capture.nftables import NftablesCapture, Ruleset

    class InboundNftables(NftablesCapture):
        def expected(self) -> Ruleset:
            full = super().expected()
            return Ruleset(tuple(c for c in full.chains if c.name != "output"),
                           tuple(r for r in full.rules if r.chain != "output"))

    # Outbound is eBPF's: the nft workloads only contribute their ports (no uid,
    # no cgroup, so no output rule and no refusal for cgroup workloads).
    inbound = [dataclasses.replace(wl, uid=None, cgroup=None) for wl in workloads]
    return InboundNftables(settings, inbound)


class EbpfCapture:
    """Loads bpf/ once per install, attaches the plan, pins the liveness map the
    proxy workers keep fresh, keeps the DNS proxy's entry fresh from the agent's
    event loop, composes the nftables inbound part, and detaches exactly what
    serves this netns."""

    name = "ebpf"
    _refreshing: EbpfCapture | None = None  # one DNS heartbeat writer per process

    def __init__(self, settings: ProxySettings, workloads: Sequence[LocalWorkload],
                 exclusions: Sequence[str] = (), control_plane: Sequence[str] = (),
                 failure_policy: str = "open", liveness_timeout_s: float = LIVENESS_TIMEOUT_S,
                 dns_port: int | None = None, dns_ip: str = "127.0.0.1") -> None:
        self.settings = settings
        self.workloads = tuple(workloads)
        self.exclusions = tuple(exclusions)
        self.control_plane = tuple(control_plane)
        self.failure_policy = failure_policy
        self.liveness_timeout_s = liveness_timeout_s
        self.dns_port = dns_port
        self.dns_ip = dns_ip
        # Resolved now, before any worker forks: a private cgroup2 mount made
        # here is inherited by them (sock_diag attribution needs it too).
        self.mount = cgroup2_mount()
        self.agent_cgroup = own_cgroup()
        has_ports = any(wl.ports and ipaddress.ip_address(wl.ip).version == 4 for wl in self.workloads)
        self.inbound: Any = _inbound_backend(settings, self.workloads) if has_ports else None
        self.components = ("ebpf", "nftables") if self.inbound is not None else ("ebpf",)
        self._state = ProxyState.SERVING
        self._bpf: Any = None
        self._pin: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            # The DNS heartbeat is written from the agent's loop (where the DNS proxy runs).
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    # -- proxy state (the watchdog's view; the kernel decides on its own too)
    @property
    def state(self) -> ProxyState:
        return self._state

    @state.setter
    def state(self, value: ProxyState) -> None:
        self._state = value
        if self.inbound is not None:
            self.inbound.state = value

    def set_proxy_state(self, state: ProxyState) -> None:
        """The watchdog saw the proxy go down or come back. Inbound (nftables)
        follows it; for outbound, down = the heartbeat is cleared so the kernel
        applies failurePolicy at once (not only once it ages out), and serving =
        a fresh beat so capture resumes before the first worker beat."""
        if self.inbound is not None:
            self.inbound.set_proxy_state(state)
        self._state = state
        if self._bpf is not None:
            self._write_slot(heartbeat.SLOT_PROXY, heartbeat.now_ns() if state is ProxyState.SERVING else 0)

    # -- plan
    def expected(self) -> tuple[Attachment, ...]:
        return plan_attachments(self.workloads, self.agent_cgroup, dns=self.dns_port is not None)

    def _cgroup_path(self, rel: str) -> str:
        return self.mount if rel == "/" else os.path.join(self.mount, rel.lstrip("/"))

    # -- maps
    def _fill_maps(self, bpf: Any, cookie: int) -> None:
        cfg = render_config(self.settings, cookie, self.failure_policy, self.liveness_timeout_s,
                            self.dns_port, self.dns_ip)
        excl = bpf[b"nm_exclusions"]
        for key in render_exclusions(list(self.control_plane) + list(self.exclusions)):
            excl[excl.Key(key.prefixlen, key.ip4)] = ct.c_uint8(1)
        uids = bpf[b"nm_uids"]
        for uid in render_uids(self.workloads):
            uids[uids.Key(uid)] = ct.c_uint8(1)
        # install() runs once the workers listen (and the DNS proxy, when it is
        # captured): seed both entries; from now on the workers keep slot 0 fresh.
        live = bpf[b"nm_liveness"]
        now = heartbeat.now_ns()
        live[live.Key(heartbeat.SLOT_PROXY)] = live.Leaf(now)
        live[live.Key(heartbeat.SLOT_DNS)] = live.Leaf(now if self.dns_port is not None else 0)
        table = bpf[b"nm_config"]
        table[table.Key(0)] = table.Leaf.from_buffer_copy(bytes(cfg))

    def _write_slot(self, slot: int, value: int) -> None:
        bpf = self._bpf
        if bpf is None:
            return
        try:
            table = bpf[b"nm_liveness"]
            table[table.Key(slot)] = table.Leaf(value)
        except Exception as e:  # noqa: BLE001 - bcc raises bare Exception; the log says why
            log.warning("ebpf: cannot write liveness slot %d: %s", slot, e)

    def _pin_liveness(self, bpf: Any, cookie: int) -> str:
        """Pin the new liveness map where the workers look (heartbeat.pin_path),
        replacing a previous install's pin in one rename."""
        try:
            path = heartbeat.pin_path(heartbeat.ensure_bpffs(), cookie)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + "_new"  # bpffs refuses names with a dot
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            heartbeat.obj_pin(bpf[b"nm_liveness"].map_fd, tmp)
            os.rename(tmp, path)
        except OSError as e:
            raise CaptureError("bpf_pin_failed", f"cannot pin the liveness map for the proxy workers: {e}") from None
        return path

    @staticmethod
    def _unpin(path: str | None) -> bool:
        if not path:
            mount = heartbeat.bpffs_mount()
            if mount is None:
                return False
            try:
                path = heartbeat.pin_path(mount, netns_cookie())
            except CaptureError:
                return False
        removed = False
        for p in (path, path + "_new"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
                removed = True
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))
        return removed

    def _dns_beat(self) -> None:
        """Runs on the agent's event loop: fresh while the DNS proxy is bound there."""
        if self.dns_port is not None and udp_bound(self.dns_ip, self.dns_port):
            self._write_slot(heartbeat.SLOT_DNS, heartbeat.now_ns())

    def _refresh_loop(self) -> None:
        loop = self._loop
        while not self._stop.wait(REFRESH_S):
            if loop is not None and not loop.is_closed():
                # Scheduled on the agent's loop: if that loop hangs, so does DNS,
                # and the entry goes stale (the kernel then applies failurePolicy).
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._dns_beat)
            else:
                self._dns_beat()

    def _start_refresh(self) -> None:
        prev = EbpfCapture._refreshing
        if prev is not None and prev is not self:
            prev._stop_refresh()
        if self.dns_port is None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh_loop, name="ebpf-dns-liveness", daemon=True)
        self._thread.start()
        EbpfCapture._refreshing = self

    def _stop_refresh(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if EbpfCapture._refreshing is self:
            EbpfCapture._refreshing = None

    # -- backend interface
    def install(self) -> None:
        """Load, fill maps, pin the liveness map, attach the plan, then detach
        whatever else served this netns (a killed agent's leftovers, a previous
        install): attach first, so a reinstall never leaves a window without
        capture. Then the nftables inbound part, in one transaction."""
        plan = self.expected()
        for a in plan:
            path = self._cgroup_path(a.cgroup)
            if not os.path.isdir(path):
                raise CaptureError("cgroup_missing", f"cgroup {a.cgroup} does not exist under {self.mount}: "
                                   "create it and place the workload's processes in it before the agent installs capture")
        cookie = netns_cookie()
        bpf = _load_bpf()
        from bcc import BPF

        self._fill_maps(bpf, cookie)
        pin = self._pin_liveness(bpf, cookie)
        fds: dict[str, int] = {}
        try:
            for a in plan:
                fn = bpf.funcs[a.function.encode()]
                fd = fds.get(a.cgroup)
                if fd is None:
                    fd = fds[a.cgroup] = os.open(self._cgroup_path(a.cgroup), os.O_RDONLY | os.O_DIRECTORY)
                try:
                    BPF.attach_func(fn, fd, ATTACH_NAMES[a.attach_name], BPF_F_ALLOW_MULTI)
                except Exception as e:  # noqa: BLE001 - bcc raises bare Exception
                    raise CaptureError("bpf_attach_failed", f"attaching {a.function} to cgroup {a.cgroup} failed: {e}; "
                                       "did another tool attach a non-multi program there?") from None
        finally:
            for fd in fds.values():
                os.close(fd)
        mine = {self._prog_id(bpf, f) for f in PROGRAMS}
        stale = [x for x in list_attached(self.mount) if x.netns_cookie == cookie and x.prog_id not in mine]
        for x in stale:
            _detach(self.mount, x)
        if stale:
            log.info("ebpf: detached %d leftover program(s) of this netns: %s", len(stale),
                     "; ".join(x.describe() for x in stale))
        old, self._bpf, self._pin = self._bpf, bpf, pin
        if old is not None:
            old.cleanup()
        self._start_refresh()
        if self.inbound is not None:
            self.inbound.install()
        else:
            self._remove_inbound_leftovers()
        diff = self.verify()
        if not diff.ok:
            raise CaptureError("capture_mismatch", f"eBPF capture differs right after install: {diff.describe()}")

    def _remove_inbound_leftovers(self) -> bool:
        from nodeagent.capture.nftables import remove_leftovers as nft_remove

        try:
            return bool(nft_remove(self.settings))
        except CaptureError as e:
            if self.inbound is not None:
                raise
            log.debug("ebpf: no nftables inbound leftovers to check: %s", e)
            return False

    @staticmethod
    def _prog_id(bpf: Any, function: str) -> int:
        fd = bpf.funcs[function.encode()].fd
        # /proc/self/fdinfo of a BPF program fd names its id.
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("prog_id:"):
                    return int(line.split()[1])
        return -1

    def remove(self) -> bool:
        """Stop the DNS heartbeat, detach every nm_* program serving this netns,
        unpin the liveness map, and delete the nftables inbound part."""
        self._stop_refresh()
        n = remove_leftovers(self.mount, netns_cookie())
        unpinned = self._unpin(self._pin)
        self._pin = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        inbound = self._remove_inbound_leftovers()
        return n > 0 or unpinned or inbound

    def counters(self) -> dict[str, int]:
        """The kernel's per-reason counts (nm_counters), without listing attachments
        (no bpftool call): cheap enough for every metrics scrape."""
        if self._bpf is None:
            return {}
        table = self._bpf[b"nm_counters"]
        return {name: int(sum(table[table.Key(i)])) for i, name in enumerate(COUNTERS)}

    def state_of_kernel(self) -> EbpfState:
        cookie = netns_cookie()
        attached = tuple(a for a in list_attached(self.mount) if a.netns_cookie == cookie)
        counters: dict[str, int] = {}
        ages: dict[int, float | None] = {}
        maps: dict[str, int] = {}
        if self._bpf is not None:
            table = self._bpf[b"nm_counters"]
            for i, name in enumerate(COUNTERS):
                counters[name] = int(sum(table[table.Key(i)]))
            live = self._bpf[b"nm_liveness"]
            now = heartbeat.now_ns()
            for slot in (heartbeat.SLOT_PROXY, heartbeat.SLOT_DNS):
                beat = int(live[live.Key(slot)].value)
                ages[slot] = (now - beat) / 1e9 if beat else None
            maps = {name.decode(): self._bpf[name].map_id for name in (n.encode() for n in MAP_LAYOUTS)
                    if hasattr(self._bpf[name], "map_id")}
        elif attached:
            # Another process (the CLI): read the maps of the attached programs.
            with contextlib.suppress(CaptureError):
                maps = _maps_of_prog(attached[0].prog_id)
                counters, ages = read_maps_by_id(maps)
        return EbpfState(self.mount, attached, counters, ages.get(heartbeat.SLOT_PROXY),
                         ages.get(heartbeat.SLOT_DNS), tuple(f"{n} id {i}" for n, i in sorted(maps.items())))

    def status(self) -> CaptureStatus:
        st = self.state_of_kernel()
        sections: dict[str, tuple[str, ...]] = {"ebpf programs": tuple(a.describe() for a in st.attached)}
        if st.maps:
            sections["ebpf maps"] = st.maps
        detail: dict[str, Any] = {
            "counters": st.counters, "liveness_age_s": st.liveness_age_s,
            "dns_liveness_age_s": st.dns_liveness_age_s, "failure_policy": self.failure_policy,
            "cgroup2": st.mount, "dns_captured": self.dns_port is not None, "state": self._state.value}
        if self.inbound is not None:
            inbound = self.inbound.status()
            sections.update(inbound.sections)
            detail["inbound"] = self.settings.inbound_mode
        return CaptureStatus(backend=self.name, installed=bool(st.attached), sections=sections, detail=detail)

    def verify(self) -> CaptureDiff:
        st = self.state_of_kernel()
        have = {Attachment(a.cgroup, a.attach_name, a.function) for a in st.attached}
        want = set(self.expected())
        problems: list[str] = []
        ids_by_fn = {a.function: a.prog_id for a in st.attached}
        if self._bpf is not None:
            for fn, pid in ids_by_fn.items():
                if pid != self._prog_id(self._bpf, fn):
                    problems.append(f"{fn} attached is prog id {pid}, not the one this agent loaded")
        if (self._state is ProxyState.SERVING and st.liveness_age_s is not None
                and st.liveness_age_s > self.liveness_timeout_s):
            problems.append(f"the proxy workers' liveness entry is {st.liveness_age_s:.1f}s old: the kernel treats "
                            f"the proxy as down (failurePolicy {self.failure_policy}); are the workers hung?")
        diff = CaptureDiff(
            missing=tuple(a.describe() for a in sorted(want - have)),
            unexpected=tuple(a.describe() for a in sorted(have - want)),
            jump_problems=tuple(problems),
        )
        if self.inbound is not None:
            diff = diff + self.inbound.verify()
        return diff


def survey() -> dict[str, tuple[str, ...]]:
    """What eBPF capture serves this netns, for `nodemesh capture status` without
    a config: programs, maps, counters and liveness (bpftool only, no bcc)."""
    mount = cgroup2_mount()
    cookie = netns_cookie()
    attached = [a for a in list_attached(mount) if a.netns_cookie == cookie]
    if not attached:
        return {}
    maps = _maps_of_prog(attached[0].prog_id)
    counters, ages = read_maps_by_id(maps)
    live = [f"{'proxy workers' if slot == 0 else 'dns proxy'}: "
            + (f"{age:.1f}s ago" if age is not None else "never / cleared") for slot, age in sorted(ages.items())]
    return {"programs": tuple(a.describe() for a in attached),
            "maps": tuple(f"{n} id {i}" for n, i in sorted(maps.items())),
            "counters": tuple(f"{k} {v}" for k, v in counters.items() if v),
            "liveness": tuple(live)}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m nodeagent.capture.ebpf {status,remove-leftovers,available}` in a netns."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    cmd = args[0] if args else "status"
    if cmd == "available":
        ok, why = available()
        print(("yes: " if ok else "no: ") + why)
        return 0 if ok else 1
    mount = cgroup2_mount()
    if cmd == "remove-leftovers":
        print(f"detached {remove_leftovers(mount)} program(s)")
        EbpfCapture._unpin(None)
        return 0
    cookie = netns_cookie()
    for a in list_attached(mount):
        if a.netns_cookie == cookie:
            print(a.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
