"""Which capture backend the agent uses: `capture.mode` iptables | nftables |
ebpf | auto. `auto` prefers eBPF where the kernel and bcc allow it, then
nftables, then iptables, and says which it chose and why.
"""

from __future__ import annotations

import importlib
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nodeagent.meshview.snapshot import LocalWorkload
from nodeagent.supervision.settings import ProxySettings

from .base import CaptureBackend, CaptureError

log = logging.getLogger(__name__)

MODES = ("iptables", "nftables", "ebpf", "auto")


@dataclass(frozen=True)
class Choice:
    backend: CaptureBackend
    mode: str  # the backend's name
    reason: str  # why this one (for logs and status.json)


def ebpf_available() -> tuple[bool, str]:
    """Ask nodeagent.capture.ebpf.available() if that module exists; any failure
    to import or to answer means "not available", with the reason."""
    try:
        mod = importlib.import_module("nodeagent.capture.ebpf")
    except ImportError as e:
        return False, f"no eBPF backend in this build ({e})"
    fn = getattr(mod, "available", None)
    if fn is None:
        return False, "nodeagent.capture.ebpf has no available()"
    try:
        res = fn()
    except Exception as e:  # noqa: BLE001 - a probe must not kill the agent
        return False, f"eBPF probe failed: {e}"
    if isinstance(res, tuple):
        return bool(res[0]), str(res[1]) if len(res) > 1 else ""
    return bool(res), "" if res else "kernel or bcc does not allow it"


def nftables_available(workloads: Sequence[LocalWorkload]) -> tuple[bool, str]:
    cgroup = [w.key for w in workloads if w.uid is None and w.cgroup]
    if cgroup:
        return False, f"cgroup workloads ({', '.join(cgroup)}) need socket cgroupv2, which pyroute2 cannot express"
    try:
        from .nftables import NftablesCapture

        with NftablesCapture._socket() as nft:
            nft.get_tables()
    except CaptureError as e:
        return False, str(e)
    except Exception as e:  # noqa: BLE001
        return False, f"nf_tables netlink not usable here ({e})"
    return True, "nf_tables answers over netlink"


def iptables_available() -> tuple[bool, str]:
    missing = [t for t in ("iptables-save", "iptables-restore") if shutil.which(t) is None]
    if missing:
        return False, f"{', '.join(missing)} not on PATH"
    return True, "iptables-restore found"


def _build(mode: str, settings: ProxySettings, workloads: Sequence[LocalWorkload],
           failure_policy: str, dns_port: int | None) -> CaptureBackend:
    exclusions = settings.excluded_cidrs
    if mode == "iptables":
        from .iptables import IptablesCapture

        return IptablesCapture(settings, workloads, exclusions=exclusions, dns_port=dns_port)
    if mode == "nftables":
        from .nftables import NftablesCapture

        return NftablesCapture(settings, workloads, exclusions=exclusions, dns_port=dns_port)
    if mode == "ebpf":
        mod: Any = importlib.import_module("nodeagent.capture.ebpf")
        # eBPF captures port 53 itself (connect4/sendmsg4/recvmsg4) and composes
        # the nftables backend's inbound rules (docs/capture-ebpf.md).
        backend: CaptureBackend = mod.EbpfCapture(settings, workloads, exclusions=exclusions,
                                                  failure_policy=failure_policy,
                                                  **({"dns_port": dns_port} if dns_port is not None else {}))
        return backend
    raise CaptureError("capture_mode_unknown", f"capture.mode {mode!r} is not one of {', '.join(MODES)}")


def choose(mode: str, settings: ProxySettings, workloads: Sequence[LocalWorkload], *,
           failure_policy: str = "open", dns_port: int | None = None) -> Choice:
    """The backend for `mode`; `auto` probes in order of preference. dns_port:
    the mesh DNS proxy's port to capture port 53 to (None: not captured)."""
    if mode != "auto":
        if mode == "ebpf":
            ok, why = ebpf_available()
            if not ok:
                raise CaptureError("ebpf_unavailable", f"capture.mode ebpf cannot be used here: {why}; "
                                                       "use capture.mode auto, nftables or iptables")
        return Choice(_build(mode, settings, workloads, failure_policy, dns_port), mode, f"capture.mode is {mode}")
    reasons: list[str] = []
    for candidate, probe in (("ebpf", ebpf_available),
                             ("nftables", lambda: nftables_available(workloads)),
                             ("iptables", iptables_available)):
        ok, why = probe()
        if ok:
            reason = f"auto: {candidate} ({why})" + (f"; skipped {'; '.join(reasons)}" if reasons else "")
            log.info("capture backend: %s", reason)
            return Choice(_build(candidate, settings, workloads, failure_policy, dns_port), candidate, reason)
        reasons.append(f"{candidate}: {why}")
    raise CaptureError("no_capture_backend", "no capture backend can run here: " + "; ".join(reasons))


def survey(settings: ProxySettings) -> dict[str, dict[str, tuple[str, ...]]]:
    """Everything of nodemesh's capture installed in this network namespace, per
    backend (without knowing the config): iptables chains in every table, the
    nftables table, the TPROXY policy route. A backend that cannot be read
    reports why instead."""
    from . import policyroute
    from .iptables import IptablesCapture
    from .nftables import NftablesCapture

    out: dict[str, dict[str, tuple[str, ...]]] = {}
    try:
        st = IptablesCapture(settings, (), manage_routes=False).status()
        if st.sections:
            out["iptables"] = st.sections
    except CaptureError as e:
        out["iptables"] = {"error": (str(e),)}
    try:
        nst = NftablesCapture(settings, ()).read()
        if nst.exists:
            sections: dict[str, tuple[str, ...]] = {}
            for name, (ctype, hook, prio) in nst.chains.items():
                lines = [f"type {ctype} hook {hook} priority {prio}"]
                lines += [r.comment or ",".join(r.names) for r in nst.rules if r.chain == name]
                sections[f"table ip nodemesh chain {name}"] = tuple(lines)
            out["nftables"] = sections
    except CaptureError as e:
        out["nftables"] = {"error": (str(e),)}
    try:
        from . import bpfinspect

        ebpf_sections = bpfinspect.survey()
        if ebpf_sections:
            out["ebpf"] = ebpf_sections
    except CaptureError as e:
        if e.reason not in ("bpftool_missing", "no_cgroup2", "no_netns_cookie"):
            out["ebpf"] = {"error": (str(e),)}
    except ImportError:
        pass
    pr = policyroute.for_settings(settings)
    try:
        nrules, nroutes = policyroute.present(pr)
        if nrules or nroutes:
            out["policy routing"] = {"tproxy": pr.describe() + (f"({nrules} rule(s), {nroutes} route(s))",)}
    except Exception as e:  # noqa: BLE001
        out["policy routing"] = {"error": (f"cannot read: {e}",)}
    return out
