"""`nodemesh demo --keep` ended with SIGTERM (a terminal closing, `kill`, systemd)
removes what it made, as Ctrl-C does."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from nodemesh.lab.demo import DEMO_LAB_ID
from nodemesh.lab.harness import NETNS_PREFIX, list_lab_namespaces
from tests.conftest import require_root, require_tool

ROOT = Path(__file__).resolve().parents[2]


def _demo_namespaces() -> list[str]:
    return [ns for ns in list_lab_namespaces() if ns.startswith(f"{NETNS_PREFIX}{DEMO_LAB_ID}-")]


def _pids_in(namespaces: list[str]) -> set[int]:
    pids: set[int] = set()
    for ns in namespaces:
        out = subprocess.run(["ip", "netns", "pids", ns], check=False, capture_output=True, text=True).stdout
        pids |= {int(p) for p in out.split()}
    return pids


def test_demo_keep_sigterm_removes_everything() -> None:
    require_root("the demo")
    for tool in ("ip", "iptables-restore", "curl", "tcpdump"):
        require_tool(tool)
    proc = subprocess.Popen([sys.executable, "-m", "nodemesh", "demo", "--keep", "--requests", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    out: list[str] = []
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        # Raw reads: select() on a buffered reader misses lines already pulled into its
        # buffer, and the demo then sleeps without writing again.
        deadline = time.monotonic() + 100
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    break
                out.append(data.decode(errors="replace"))
                if "lab left running" in "".join(out[-2:]):
                    break
        assert "lab left running" in "".join(out), "".join(out)
        namespaces = _demo_namespaces()
        pids = _pids_in(namespaces)
        assert namespaces and pids, "the demo made no namespaces or processes to clean up"
        proc.send_signal(signal.SIGTERM)
        raw, _ = proc.communicate(timeout=60)
        rest = raw.decode(errors="replace")
        out.append(rest)
        assert proc.returncode == 128 + signal.SIGTERM, "".join(out)
        assert "removing every namespace" in rest, "".join(out)
        assert _demo_namespaces() == [], "SIGTERM left the demo's namespaces behind"
        alive = {p for p in pids if Path(f"/proc/{p}").exists()}
        assert not alive, f"SIGTERM left the demo's processes running: {sorted(alive)}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
