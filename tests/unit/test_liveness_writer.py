"""The workers' eBPF liveness writer does not rescan the mount table on every beat
when there is no BPF filesystem (iptables/nftables mode), yet notices at once the
one the agent mounts on /sys/fs/bpf when eBPF capture is installed."""

from __future__ import annotations

import os

import pytest

from nodeagent.capture import heartbeat


def test_no_bpffs_is_not_rescanned_every_beat(monkeypatch: pytest.MonkeyPatch) -> None:
    scans: list[int] = []
    mounted = [False]
    def bpffs_mount() -> str | None:
        scans.append(1)
        return "/sys/fs/bpf" if mounted[0] else None

    monkeypatch.setattr(heartbeat, "bpffs_mount", bpffs_mount)
    monkeypatch.setattr(os.path, "ismount", lambda p: mounted[0] and p == "/sys/fs/bpf")
    w = heartbeat.LivenessWriter()
    for _ in range(20):
        assert w.beat() is False
    assert len(scans) == 1
    mounted[0] = True  # the agent installs eBPF capture and mounts bpffs: seen on the next beat
    assert w._target() is not None and len(scans) == 2
