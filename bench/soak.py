#!/usr/bin/env python3
"""Soak: a fixed request rate through two nodes for a long time, watching each
agent's memory.

The same two-node lab as bench/compare.py (nginx with a 1 KiB body on node 2,
a captured client workload on node 1, HBONE between the agents' proxies). One
open-loop client (bench/openloop.py: 10 keep-alive connections, latency from
scheduled send times) runs for the whole soak; every --sample seconds the RSS
of each agent process (the agent and its proxy workers, per node) is recorded.
At the end: errors, latency, the RSS series, and per process the growth after
warm-up (the first --warmup fraction of the run) as a least-squares slope in
bytes per request. "flat" means the slope stays under --max-bytes-per-request
(default 2): a leak of one small object per request is about 50-100.

Usage (root): .venv/bin/python bench/soak.py [--minutes 10] [--rate 500]
              [--path l7|l4] [--sample 10]
Writes bench/results/soak-<time>.json and prints a table; exit 0 only if there
were no errors and every agent process was flat after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import compare

from nodemesh.lab.harness import Lab, LabError

# Its own lab id (netns names): a soak may run beside bench/compare.py or tests.
LAB_ID = "soak" + os.environ.get("NODEMESH_BENCH_LAB", "")[:3]


def agent_procs(lab: Lab) -> dict[str, psutil.Process]:
    """node-N/agent and node-N/worker-K for every agent process tree."""
    out: dict[str, psutil.Process] = {}
    for k in (1, 2):
        p = lab.procs.get(f"agent-{k}")
        if p is None:
            continue
        try:
            root = psutil.Process(p.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        workers = 0
        for pr in tree:
            try:
                cmd = " ".join(pr.cmdline())
            except psutil.Error:
                continue
            if "python" not in cmd and "nodeagent" not in cmd:
                continue  # `ip netns exec` / setpriv wrappers
            if pr.pid == root.pid or "worker" not in cmd:
                name = f"node-{k}/agent" if f"node-{k}/agent" not in out else f"node-{k}/agent-{pr.pid}"
            else:
                workers += 1
                name = f"node-{k}/worker-{workers}"
            out[name] = pr
    return out


def rss(procs: dict[str, psutil.Process]) -> dict[str, int]:
    got: dict[str, int] = {}
    for name, pr in procs.items():
        try:
            got[name] = int(pr.memory_info().rss)
        except psutil.Error:
            got[name] = -1
    return got


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def tracemalloc_report(directory: str, warmup: float, top: int = 8) -> str:
    """Per worker: the source lines whose live allocations grew most between the
    first snapshot after warm-up and the last one."""
    import glob
    import tracemalloc

    lines: list[str] = []
    by_worker: dict[str, list[str]] = {}
    for f in sorted(glob.glob(os.path.join(directory, "w*-*.snap"))):
        by_worker.setdefault(os.path.basename(f).split("-")[0], []).append(f)
    skip = [tracemalloc.Filter(False, tracemalloc.__file__)]
    for worker, files in by_worker.items():
        if len(files) < 2:
            continue
        first = tracemalloc.Snapshot.load(files[min(len(files) - 2, int(len(files) * warmup))]).filter_traces(skip)
        last = tracemalloc.Snapshot.load(files[-1]).filter_traces(skip)
        stats = [s for s in last.compare_to(first, "lineno") if s.size_diff > 0][:top]
        lines.append(f"tracemalloc, worker {worker[1:]}: growth after warm-up, top {top} lines")
        lines += [f"  {s}" for s in stats]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=500.0, help="requests per second (default 500)")
    ap.add_argument("--path", choices=("l7", "l4"), default="l7",
                    help="l7: the service port declared http; l4: declared tcp (default l7)")
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples (default 10)")
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the run ignored for the slope")
    ap.add_argument("--max-bytes-per-request", type=float, default=2.0)
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("--tracemalloc", metavar="DIR",
                    help="proxy workers trace allocations and dump snapshots into DIR every 20 s; the report "
                         "lists the lines whose live memory grew most after warm-up (slows the workers)")
    a = ap.parse_args()
    if min(a.minutes, a.rate, a.sample) <= 0 or not 0 <= a.warmup < 1:
        ap.error("--minutes, --rate and --sample must be positive, --warmup in [0, 1)")
    if os.geteuid() != 0:
        print("soak: run as root (network namespaces, capture)", file=sys.stderr)
        return 1
    # SIGTERM (a timeout, Ctrl-C from a wrapper) must still tear the lab down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seconds = a.minutes * 60
    samples: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    wall = 0.0
    lab = Lab(nodes=2, lab_id=LAB_ID, keep_workdir=a.keep_workdir)
    if a.tracemalloc:
        os.makedirs(a.tracemalloc, exist_ok=True)
        os.chmod(a.tracemalloc, 0o777)  # noqa: S103 (the agents and workers write their snapshots here)
        os.environ["NODEMESH_TRACEMALLOC_DIR"] = os.path.abspath(a.tracemalloc)  # the agents inherit it
    try:
        lab.create()
        vips = compare.start_mesh_lab(lab)
        host = vips["web"] if a.path == "l7" else vips["web-tcp"]
        p = compare.Path_(a.path, lab, compare.CLIENT_UID, host, 80, compare.agent_pids(lab),
                          log_names=("agent-1", "agent-2"))
        compare.check_path(p)
        procs = agent_procs(lab)
        print(f"soak: {a.rate:g} req/s for {a.minutes:g} min through {a.path} ({host}:80); "
              f"watching {', '.join(f'{n} ({pr.pid})' for n, pr in procs.items())}", flush=True)
        client = lab.spawn("soak-client", lab.node_ns(1),
                           [sys.executable, str(ROOT / "bench" / "openloop.py"), host, "80", "--rate", str(a.rate),
                            "--seconds", str(seconds), "--connections", "10"], uid=compare.CLIENT_UID)
        t0 = time.monotonic()
        next_at = t0
        while client.poll() is None:
            now = time.monotonic()
            if now >= next_at:
                t, sizes = round(now - t0, 1), rss(procs)
                samples.append({"t": t, "rss": sizes})
                cells = "  ".join(f"{n} {v / 2**20:7.1f} MiB" for n, v in sizes.items())
                print(f"  {t:7.1f}s  {cells}", flush=True)
                next_at += a.sample
            time.sleep(min(1.0, max(0.05, next_at - time.monotonic())))
        samples.append({"t": round(time.monotonic() - t0, 1), "rss": rss(procs)})
        wall = time.monotonic() - t0
        lines = lab.log("soak-client").strip().splitlines()
        try:
            result = json.loads(lines[-1])
        except (ValueError, IndexError):
            result = {"error": "open-loop client printed no result: " + "\n".join(lines[-5:])}
    except (LabError, compare.BenchError) as e:
        print(f"soak: {e}", file=sys.stderr)
        return 1
    finally:
        lab.destroy()

    # Growth after warm-up, per process, in bytes per request at the rate achieved
    # (a busy machine may serve less than the offered rate; the client then drains).
    achieved = float(result.get("n", 0)) / wall if "error" not in result and wall > 0 else a.rate
    growth: dict[str, dict[str, float]] = {}
    cut = seconds * a.warmup
    for name in samples[0]["rss"] if samples else []:
        pts = [(s["t"], s["rss"][name]) for s in samples if s["t"] >= cut and s["rss"].get(name, -1) >= 0]
        per_s = slope([x for x, _ in pts], [float(y) for _, y in pts])
        growth[name] = {"bytes_per_s": round(per_s, 1), "bytes_per_request": round(per_s / max(achieved, 1.0), 2),
                        "first_MiB": round(samples[0]["rss"][name] / 2**20, 1),
                        "last_MiB": round(samples[-1]["rss"][name] / 2**20, 1),
                        "after_warmup_MiB": round(pts[0][1] / 2**20, 1) if pts else float("nan")}
    errors = int(result.get("errors", 0)) if "error" not in result else -1
    flat = all(g["bytes_per_request"] <= a.max_bytes_per_request for g in growth.values())
    report = {"args": vars(a), "client": result, "achieved_rps": achieved, "samples": samples, "growth": growth,
              "flat": flat}
    resdir = ROOT / "bench" / "results"
    resdir.mkdir(exist_ok=True)
    out = resdir / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2, default=str))

    print(f"\nSoak {a.minutes:g} min at {a.rate:g} req/s ({a.path}; {achieved:,.0f} req/s achieved over "
          f"{wall:,.0f} s): {result.get('n', 0)} requests, "
          f"errors {errors if errors >= 0 else result.get('error')}, "
          f"p50 {result.get('p50_ms', float('nan')):.2f} ms, p99 {result.get('p99_ms', float('nan')):.2f} ms")
    print("| process | RSS first | after warm-up | last | growth after warm-up |")
    print("|---|---|---|---|---|")
    for name, g in growth.items():
        print(f"| {name} | {g['first_MiB']} MiB | {g['after_warmup_MiB']} MiB | {g['last_MiB']} MiB | "
              f"{g['bytes_per_s']:,.0f} B/s = {g['bytes_per_request']:.2f} B/request |")
    if a.tracemalloc:
        print(tracemalloc_report(a.tracemalloc, a.warmup))
    print(f"memory {'flat' if flat else 'GROWING'} after warm-up (limit {a.max_bytes_per_request:g} B/request)")
    print(f"JSON: {out}")
    return 0 if errors == 0 and flat else 2


if __name__ == "__main__":
    sys.exit(main())
