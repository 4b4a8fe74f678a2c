"""`python -m nodeagent.capture.bpfcli {status,remove-leftovers,available}`:
eBPF capture by hand inside a network namespace (tests, operators)."""

from __future__ import annotations

from collections.abc import Sequence

from nodeagent.capture.bpfinspect import (
    list_attached,
    remove_leftovers,
)
from nodeagent.capture.bpfnode import cgroup2_mount, netns_cookie
from nodeagent.capture.bpfprobe import available
from nodeagent.capture.ebpf import EbpfCapture


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
