"""What eBPF capture has in the kernel, read with bpftool (no bcc): the
nm_* programs attached to cgroups and the netns each serves, their maps'
counters and liveness, detaching leftovers, and the survey `nodemesh capture
status` prints without a config."""

from __future__ import annotations

import ctypes as ct
import json
import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nodeagent.capture import heartbeat
from nodeagent.capture.base import CaptureError
from nodeagent.capture.bpflayout import (
    ATTACH_NAMES,
    COUNTERS,
    PROG_PREFIX,
    NmConfig,
)
from nodeagent.capture.bpfnode import cgroup2_mount, netns_cookie

log = logging.getLogger("nodeagent.capture.ebpf")


def _bpftool(*args: str) -> Any:
    try:
        proc = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise CaptureError("bpftool_missing", "bpftool not found: install it (apt-get install bpftool; "
                           "scripts/setup.sh does)") from None
    if proc.returncode != 0:
        why = proc.stderr.strip() or proc.stdout.strip()
        raise CaptureError("bpftool_failed", f"bpftool {' '.join(args)} failed: {why}")
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


def detach(mount: str, a: Attached) -> None:
    path = mount if a.cgroup == "/" else os.path.join(mount, a.cgroup.lstrip("/"))
    _bpftool("cgroup", "detach", path, a.attach_name, "id", str(a.prog_id))


def remove_leftovers(mount: str | None = None, cookie: int | None = None) -> int:
    """Detach every nm_* program serving this network namespace; how many."""
    mount = mount or cgroup2_mount()
    cookie = netns_cookie() if cookie is None else cookie
    ours = [a for a in list_attached(mount) if a.netns_cookie == cookie]
    for a in ours:
        detach(mount, a)
    if ours:
        log.info("ebpf: detached %d program(s) serving this netns: %s", len(ours),
                 "; ".join(a.describe() for a in ours))
    return len(ours)


def maps_of_prog(prog_id: int) -> dict[str, int]:
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


def survey() -> dict[str, tuple[str, ...]]:
    """What eBPF capture serves this netns, for `nodemesh capture status` without
    a config: programs, maps, counters and liveness (bpftool only, no bcc)."""
    mount = cgroup2_mount()
    cookie = netns_cookie()
    attached = [a for a in list_attached(mount) if a.netns_cookie == cookie]
    if not attached:
        return {}
    maps = maps_of_prog(attached[0].prog_id)
    counters, ages = read_maps_by_id(maps)
    live = [f"{'proxy workers' if slot == 0 else 'dns proxy'}: "
            + (f"{age:.1f}s ago" if age is not None else "never / cleared") for slot, age in sorted(ages.items())]
    return {"programs": tuple(a.describe() for a in attached),
            "maps": tuple(f"{n} id {i}" for n, i in sorted(maps.items())),
            "counters": tuple(f"{k} {v}" for k, v in counters.items() if v),
            "liveness": tuple(live)}
