"""Kernel headers for bcc: find Debian's split header trees, merge them into a
directory of nodemesh's own, and point BCC_KERNEL_SOURCE at it.

bcc compiles BPF C at load time and needs a kernel build tree. Kernels that ship
none (no /lib/modules/$(uname -r)/build, as on this Firecracker kernel) can use
Debian's `linux-headers-amd64`: it installs two trees, `-common` (most of
include/) and `-amd64` (the arch's generated headers and config), which must be
overlaid into one. The programs in bpf/ use UAPI structs only
(bpf_sock_addr, bpf_sock_ops, bpf_sockopt), which are stable across kernel
versions, so a headers package older than the running kernel is fine.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/var/lib/nodemesh/bpf-headers"
SRC_DIR = "/usr/src"
# What an operator installs when nothing is found (Debian 12 on amd64).
HEADERS_PACKAGE = "linux-headers-amd64"
# Present in a complete tree; bcc includes it first.
_MARKER = "include/generated/autoconf.h"


class HeadersError(RuntimeError):
    """No usable kernel headers for bcc; the message says what to install."""


@dataclass(frozen=True)
class HeaderTree:
    version: str  # e.g. 6.1.0-56
    path: str  # the merged (or native) tree to hand bcc
    source: str  # how it was found: "native", "merged from ..."


def _native_build_dir(release: str) -> Path | None:
    """The running kernel's own build tree, when it ships one."""
    build = Path("/lib/modules") / release / "build"
    return build if (build / _MARKER).exists() else None


def debian_trees(src_dir: str = SRC_DIR) -> list[tuple[str, Path, Path]]:
    """(version, common tree, arch tree) pairs of installed Debian header
    packages, newest first."""
    root = Path(src_dir)
    if not root.is_dir():
        return []
    found: list[tuple[str, Path, Path]] = []
    for common in root.glob("linux-headers-*-common"):
        version = common.name[len("linux-headers-"):-len("-common")]
        for arch in sorted(root.glob(f"linux-headers-{version}-*")):
            if arch == common or arch.name.endswith("-common") or not (arch / _MARKER).exists():
                continue
            found.append((version, common, arch))
            break

    def key(item: tuple[str, Path, Path]) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", item[0]))

    return sorted(found, key=key, reverse=True)


def merge_trees(common: Path, arch: Path, dest: Path) -> None:
    """Overlay arch onto common as a tree of symlinks at dest, atomically: a
    half-built tree (an agent killed mid-copy) is never left under dest's name."""
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for src, force in ((common, False), (arch, True)):
        argv = ["cp", "-as" + ("f" if force else ""), f"{src}/.", f"{tmp}/"]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise HeadersError(f"merging kernel headers into {tmp} failed: {' '.join(argv)}: "
                               f"{proc.stderr.strip()}; is {dest.parent} writable?")
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)


def find_headers(cache_dir: str = DEFAULT_CACHE_DIR, src_dir: str = SRC_DIR,
                 release: str | None = None) -> HeaderTree:
    """A header tree bcc can compile against: the kernel's own if it has one,
    else the newest Debian package's trees merged under cache_dir."""
    release = release or platform.release()
    native = _native_build_dir(release)
    if native is not None:
        return HeaderTree(release, str(native), "native")
    trees = debian_trees(src_dir)
    if not trees:
        raise HeadersError(
            f"no kernel headers for bcc: /lib/modules/{release}/build does not exist and no "
            f"{src_dir}/linux-headers-*-common tree is installed; install them with "
            f"`apt-get install {HEADERS_PACKAGE}` (scripts/setup.sh does)")
    version, common, arch = trees[0]
    dest = Path(cache_dir) / version
    if not (dest / _MARKER).exists():
        # Once per machine and headers version (1-3 s here, more on a cold disk).
        log.info("ebpf: first use of kernel headers %s: merging %s + %s into %s", version, common, arch, dest)
        started = time.monotonic()
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HeadersError(f"cannot create {dest.parent} ({e.strerror}): the agent needs a writable "
                               "state directory for merged kernel headers") from None
        merge_trees(common, arch, dest)
        log.info("ebpf: kernel headers merged in %.1fs (kept for the next starts)", time.monotonic() - started)
    return HeaderTree(version, str(dest), f"merged from {common.name} + {arch.name}")


def ensure_bcc_headers(cache_dir: str = DEFAULT_CACHE_DIR) -> HeaderTree:
    """Find (or build) the header tree and export BCC_KERNEL_SOURCE for bcc.
    An operator's own BCC_KERNEL_SOURCE wins when it points at a tree."""
    preset = os.environ.get("BCC_KERNEL_SOURCE", "")
    if preset and (Path(preset) / _MARKER).exists():
        return HeaderTree("preset", preset, "BCC_KERNEL_SOURCE")
    tree = find_headers(cache_dir)
    os.environ["BCC_KERNEL_SOURCE"] = tree.path
    return tree
