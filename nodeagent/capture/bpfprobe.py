"""Can eBPF capture load here (a real compile and load of bpf/ with bcc,
nothing attached), the compile itself, and the agent watchdog's probe of the
proxy in eBPF mode (listener and fresh heartbeat)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from nodeagent.capture import heartbeat
from nodeagent.capture.base import CaptureError
from nodeagent.capture.bpfheaders import HeadersError, ensure_bcc_headers
from nodeagent.capture.bpflayout import (
    LIVENESS_TIMEOUT_S,
    PROGRAMS,
)
from nodeagent.capture.bpfnode import cgroup2_mount, netns_cookie
from nodeagent.capture.bpfrender import (
    load_source,
)

log = logging.getLogger("nodeagent.capture.ebpf")


_available: tuple[bool, str] | None = None
# What available() compiled and loaded, kept for the first install: compiling bpf/ is
# the slowest step of an eBPF start (1.5-3 s here), and the probe and the install
# compiled the same source twice.
_prepared: Any = None


def load_programs() -> Any:
    """Compile bpf/ with bcc and load every program (not attached). The first
    call after available() takes the probe's copy instead of compiling again."""
    global _prepared
    if _prepared is not None:
        bpf, _prepared = _prepared, None
        return bpf
    return _compile_and_load()


def _compile_and_load() -> Any:
    started = time.monotonic()
    try:
        tree = ensure_bcc_headers()
    except HeadersError as e:
        raise CaptureError("no_kernel_headers", str(e)) from None
    try:
        from bcc import BPF  # Debian's python3-bpfcc, via the venv's system site packages
    except ImportError:
        raise CaptureError("no_bcc", "cannot import bcc: install python3-bpfcc and run the agent with a "
                           "Python that sees /usr/lib/python3/dist-packages (scripts/setup.sh's .venv does)") from None
    # Said before it starts: the agent is silent for the seconds bcc's clang takes.
    log.info("ebpf: compiling and loading bpf/ with bcc (kernel headers %s)", tree.path)
    compile_at = time.monotonic()
    try:
        bpf = BPF(text=load_source().encode(), cflags=["-Wno-macro-redefined"])
        loaded_at = time.monotonic()
        for spec in PROGRAMS.values():
            bpf.load_func(spec.function.encode(), spec.prog_type, attach_type=spec.attach_type)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - bcc raises bare Exception (verifier log on stderr)
        raise CaptureError("bpf_load_failed", f"compiling or loading bpf/ failed: {e}; "
                           "is the agent root (CAP_BPF, CAP_NET_ADMIN) and the kernel 5.15 or later?") from None
    now = time.monotonic()
    log.info("ebpf: bpf/ ready in %.1fs (headers %.1fs, compile %.1fs, load %.1fs)", now - started,
             compile_at - started, loaded_at - compile_at, now - loaded_at)
    return bpf


def available() -> tuple[bool, str]:
    """Can eBPF capture load here, and why not: a real compile and load of bpf/
    (nothing attached). Cached: the answer does not change while the agent runs."""
    global _available, _prepared
    if _available is not None:
        return _available
    try:
        if os.geteuid() != 0:
            raise CaptureError("not_root", "eBPF capture needs root (CAP_BPF and CAP_NET_ADMIN)")
        cgroup2_mount()
        netns_cookie()
        _prepared = _compile_and_load()  # the first install attaches these (load_programs)
        _available = (True, "bcc compiled and the kernel loaded every program in bpf/")
    except CaptureError as e:
        _available = (False, str(e))
    return _available


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
