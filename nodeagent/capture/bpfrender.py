"""eBPF capture, pure: which program goes on which cgroup for a set of
workloads, and the contents of the config, exclusion and uid maps. No bcc,
no kernel: unit-tested as plain functions."""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodeagent.capture.base import CaptureError
from nodeagent.capture.bpflayout import (
    BPF_DIR,
    LIVENESS_TIMEOUT_S,
    POLICIES,
    PROGRAMS,
    SOURCES,
    NmCidrKey,
    NmConfig,
)
from nodeagent.meshview.snapshot import LocalWorkload
from nodeagent.supervision.settings import ProxySettings

log = logging.getLogger("nodeagent.capture.ebpf")


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
