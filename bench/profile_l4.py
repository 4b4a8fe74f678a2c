#!/usr/bin/env python3
"""Where the proxies' CPU goes on the L4 paths: py-spy on each node's proxy
worker while load runs through the same two-node lab as bench/compare.py.

Loads: `rps` (wrk -t1 -c50 through the tcp service port: request/response
over HBONE), `bulk` (one iperf3 stream through HBONE), `passthrough` (one
iperf3 stream to node 2's address, outside the mesh: captured and relayed as
plaintext). For each load and node, py-spy records --seconds at --rate Hz
(with native frames: syscalls and OpenSSL show up) and writes a collapsed
stack file and a summary of the functions with the most samples (self and
inclusive), plus the CPU the proxies used, from /proc.

Usage (root): .venv/bin/python bench/profile_l4.py [--loads rps,bulk,passthrough]
              [--seconds 8] [--rate 200] [--out bench/results/profile-<time>]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import compare
import peers
from peers import PORTS

from nodemesh.lab.harness import Lab, LabError

LAB_ID = "prof" + os.environ.get("NODEMESH_BENCH_LAB", "")[:3]


def worker_pids(lab: Lab) -> dict[int, int]:
    """node -> pid of its (first) proxy worker."""
    import psutil

    out: dict[int, int] = {}
    for k in (1, 2):
        root = psutil.Process(lab.procs[f"agent-{k}"].pid)
        for pr in root.children(recursive=True):
            if "nodeagent.proxy.worker" in " ".join(pr.cmdline()):
                out[k] = pr.pid
                break
    return out


def summarize(collapsed: Path, top: int = 25) -> str:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n_s = line.rpartition(" ")
        n = int(n_s)
        total += n
        frames = stack.split(";")
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples", "self:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_c.most_common(top)]
    lines.append("inclusive:")
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", default="rps,bulk,passthrough")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"profile-{time.strftime('%Y%m%d-%H%M%S')}"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lab = Lab(nodes=2, lab_id=LAB_ID)
    try:
        lab.create()
        vips = compare.start_mesh_lab(lab)
        p = compare.Path_("mesh_l4", lab, compare.CLIENT_UID, vips["web-tcp"], 80, compare.agent_pids(lab))
        compare.check_path(p)
        compare.wrk(p, 2.0)  # warm-up
        pids = worker_pids(lab)
        secs = int(max(1, round(a.seconds)))
        for load in [x.strip() for x in a.loads.split(",") if x.strip()]:
            if load == "rps":
                argv = ["wrk", "-t1", "-c50", f"-d{secs + 2}s", p.url]
            elif load == "bulk":
                argv = ["iperf3", "-c", vips["web-tcp"], "-p", str(PORTS.iperf_mesh), "-t", str(secs + 2)]
            elif load == "passthrough":
                argv = ["iperf3", "-c", lab.node_ip(2), "-p", str(PORTS.iperf_plain), "-t", str(secs + 2)]
            else:
                print(f"unknown load {load}", file=sys.stderr)
                return 1
            result: dict[str, str] = {}

            def drive(argv: list[str] = argv, result: dict[str, str] = result) -> None:
                res = lab.ns_exec(lab.node_ns(1), argv, uid=compare.CLIENT_UID, check=False, timeout=secs + 60)
                result["out"] = res.stdout[-1500:] + res.stderr[-500:]

            cpu0 = peers.tree_cpu_seconds(p.cpu_pids())
            t = threading.Thread(target=drive)
            t.start()
            time.sleep(1.0)
            spies = []
            for node, pid in pids.items():
                f = out / f"{load}-node{node}.txt"
                spies.append((node, f, subprocess.Popen(
                    [str(ROOT / ".venv" / "bin" / "py-spy"), "record", "--pid", str(pid), "--rate", str(a.rate),
                     "--duration", str(secs), "--format", "raw", "--native", "-o", str(f)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
            for _node, _f, sp in spies:
                sp.wait(timeout=secs + 60)
            t.join()
            cpu = peers.tree_cpu_seconds(p.cpu_pids()) - cpu0
            print(f"== {load}: proxies used {cpu:.2f} CPU-s\n{result.get('out', '')[-700:]}")
            for node, f, _sp in spies:
                if f.exists():
                    text = summarize(f)
                    (out / f"{load}-node{node}-summary.txt").write_text(text)
                    print(f"-- node {node} worker --\n{text}\n")
    except (LabError, compare.BenchError) as e:
        print(f"profile: {e}", file=sys.stderr)
        return 1
    finally:
        lab.destroy()
    print(f"files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
