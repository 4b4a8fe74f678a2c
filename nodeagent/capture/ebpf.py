"""Traffic capture with eBPF (Debian's bcc): cgroup programs redirect workload
connects to the proxy, answer SO_ORIGINAL_DST for it, and decide fail-open or
fail-closed in the kernel from a liveness entry the agent keeps fresh.

The C sources are bpf/*.c (one per attach point) and bpf/maps.h; this module
is the executor: it loads, attaches and detaches. The rest lives by job:
bpflayout (the C's structs and programs), bpfrender (the plan and map
contents, pure), bpfnode (/proc and cgroup facts), bpfinspect (bpftool),
bpfprobe (availability, the compile, the watchdog probe), bpfcli (`python -m`). Only programs named ``nm_*`` whose
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
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nodeagent.capture import heartbeat
from nodeagent.capture.base import CaptureDiff, CaptureError, CaptureStatus, ProxyState
from nodeagent.capture.bpfinspect import (
    Attached,
    detach,
    list_attached,
    maps_of_prog,
    read_maps_by_id,
    remove_leftovers,
)
from nodeagent.capture.bpflayout import (
    ATTACH_NAMES,
    BPF_F_ALLOW_MULTI,
    COUNTERS,
    LIVENESS_TIMEOUT_S,
    MAP_LAYOUTS,
    PROGRAMS,
    REFRESH_S,
)
from nodeagent.capture.bpfnode import cgroup2_mount, netns_cookie, own_cgroup, udp_bound
from nodeagent.capture.bpfprobe import available, load_programs
from nodeagent.capture.bpfrender import (
    Attachment,
    plan_attachments,
    render_config,
    render_exclusions,
    render_uids,
)
from nodeagent.meshview.snapshot import LocalWorkload
from nodeagent.supervision.settings import ProxySettings

__all__ = ["EbpfCapture", "EbpfState", "available"]  # select.py imports this module lazily

log = logging.getLogger("nodeagent.capture.ebpf")


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
                                   "create it and place the workload's processes in it before the agent "
                                   "installs capture")
        cookie = netns_cookie()
        bpf = load_programs()
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
            detach(self.mount, x)
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
                maps = maps_of_prog(attached[0].prog_id)
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
