#!/usr/bin/env python3
"""Baseline benchmark on the two-node namespace lab: direct vs through nodemesh.

Side by side in one run, rotated over rounds (medians reported):
  - max req/s and latency of small HTTP requests over persistent connections (wrk -t1 -c50),
  - p50/p99 at a fixed rate (wrk's distribution at -R is not available in Debian's wrk,
    so a fixed-rate open-loop client in this file measures from each request's
    scheduled send time, without coordinated omission),
  - bulk MB/s of one TCP stream (iperf3),
  - node proxy CPU seconds per 1,000 requests (both nodes' agents and workers, from /proc),
for one and for two proxy workers. Writes JSON to bench/results/ and a Markdown table to stdout.

Usage: .venv/bin/python bench/run.py [--rounds 3] [--duration 8] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nodemesh.lab.harness import Lab, LabWorkload  # noqa: E402

CLIENT_UID, DIRECT_UID, WEB_UID = 3001, 4000, 2001
BODY_1K = "x" * 1024

CONFIG = """\
apiVersion: nodemesh.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  trustDomain: cluster.local
  # Which identities may run where (default deny; nodemesh/bindings.py).
  identityBindings:
    - {name: web, nodes: ['node-*'], serviceAccounts: [default/web], workloadLabels: {app: [web]}}
    - {name: client, nodes: ['node-*'], serviceAccounts: [default/client]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: http}]
"""


def nginx_conf(workdir: Path) -> Path:
    d = workdir / "nginx"
    d.mkdir(exist_ok=True)
    os.chmod(d, 0o777)  # noqa: S103 (nginx's workers run as another user and write their temp files here)
    conf = d / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        worker_processes 1;
        pid {d}/nginx.pid;
        error_log {d}/error.log warn;
        events {{ worker_connections 4096; }}
        http {{
          access_log off;
          client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
          fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
          keepalive_requests 1000000;
          server {{
            listen 8080 reuseport;
            listen 8081 reuseport;
            location / {{ default_type text/plain; return 200 '{BODY_1K}'; }}
          }}
        }}
        """))
    os.chmod(conf, 0o644)
    return conf


def proxy_cpu_seconds(lab: Lab) -> float:
    total = 0.0
    for k in (1, 2):
        p = lab.procs.get(f"agent-{k}")
        if p is None:
            continue
        try:
            root = psutil.Process(p.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for pr in procs:
            try:
                if "nodemesh" in " ".join(pr.cmdline()) or "nodeagent" in " ".join(pr.cmdline()):
                    t = pr.cpu_times()
                    total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def wrk(lab: Lab, url: str, uid: int, duration: float, conns: int = 50) -> dict[str, float]:
    res = lab.ns_exec(lab.node_ns(1), ["wrk", "-t1", f"-c{conns}", f"-d{duration:.0f}s", "--latency", url],
                      uid=uid, check=False, timeout=duration + 30)
    out = res.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)

    def pct(p: str) -> float:
        mm = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        if not mm:
            return float("nan")
        v = float(mm.group(1))
        return v / 1000 if mm.group(2) == "us" else v * 1000 if mm.group(2) == "s" else v

    if not m or errors or (total and float(total.group(1)) == 0):
        raise RuntimeError(f"wrk against {url} failed or saw errors: {res.stderr or out}")
    return {"rps": float(m.group(1)), "requests": float(total.group(1)) if total else 0.0,
            "p50_ms": pct("50"), "p99_ms": pct("99"),
            "non2xx": float(errors.group(1)) if errors else 0.0,
            "socket_errors": 1.0 if sock_err else 0.0}


FIXED_RATE_CLIENT = r"""
import asyncio, sys, time
host, port, rate, seconds, conns = (sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]),
                                    int(sys.argv[5]))
REQ = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
lat = []
async def conn_loop(i, start):
    r, w = await asyncio.open_connection(host, port)
    interval = conns / rate
    n = 0
    while True:
        sched = start + i * (1 / rate) + n * interval
        if sched - start > seconds:
            break
        now = time.perf_counter()
        if sched > now:
            await asyncio.sleep(sched - now)
        w.write(REQ)
        head = await r.readuntil(b"\r\n\r\n")
        cl = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
        await r.readexactly(cl)
        lat.append(time.perf_counter() - sched)
        n += 1
    w.close()
async def main():
    start = time.perf_counter() + 0.2
    await asyncio.gather(*(conn_loop(i, start) for i in range(conns)))
asyncio.run(main())
lat.sort()
print(len(lat), lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000)
"""


def fixed_rate(lab: Lab, host: str, port: int, uid: int, rate: float, seconds: float) -> dict[str, float]:
    res = lab.ns_exec(lab.node_ns(1), [sys.executable, "-c", FIXED_RATE_CLIENT, host, str(port), str(rate),
                                       str(seconds), "10"], uid=uid, check=False, timeout=seconds + 30)
    parts = res.stdout.split()
    if len(parts) != 3:
        raise RuntimeError(f"fixed-rate client failed: {res.stderr[-500:]}")
    return {"n": float(parts[0]), "p50_ms": float(parts[1]), "p99_ms": float(parts[2])}


def iperf(lab: Lab, host: str, uid: int, port: int, seconds: float = 4) -> float:
    res = lab.ns_exec(lab.node_ns(1), ["iperf3", "-c", host, "-p", str(port), "-t", f"{seconds:.0f}", "-J"],
                      uid=uid, check=False, timeout=seconds + 30)
    try:
        data = json.loads(res.stdout)
        return float(data["end"]["sum_received"]["bits_per_second"]) / 8 / 1e6
    except (ValueError, KeyError) as e:
        raise RuntimeError(f"iperf3 failed: {res.stdout[-500:]} {res.stderr[-500:]}") from e


def run_cluster(workers: int, rounds: int, duration: float, rate: float) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {"direct": [], "mesh": []}
    bulk: dict[str, list[float]] = {"direct": [], "mesh": []}
    cpu_per_1k: list[float] = []
    with Lab(nodes=2, lab_id=f"bench{workers}", proxy_workers=workers) as lab:
        lab.start_controlplane()
        lab.apply(CONFIG)
        lab.add_workload(LabWorkload("web-2", node=2, uid=WEB_UID, ports=(8080, 5201), service_account="web",
                                     labels={"app": "web"}))
        lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client"))
        conf = nginx_conf(lab.workdir)
        lab.spawn("nginx", lab.node_ns(2), ["nginx", "-c", str(conf), "-g", "daemon off;"], uid=WEB_UID)
        lab.spawn("iperf3", lab.node_ns(2), ["iperf3", "-s", "-p", "5201"], uid=WEB_UID)
        # Direct paths use ports no workload declares: node 2's inbound capture takes
        # every declared port, so "direct" to 8080 would pass through node 2's proxy.
        lab.spawn("iperf3-direct", lab.node_ns(2), ["iperf3", "-s", "-p", "5202"], uid=WEB_UID)
        lab.start_agent(1)
        lab.start_agent(2)
        vip = lab.service_vip("web")
        time.sleep(1.0)
        paths = {"direct": (f"http://{lab.node_ip(2)}:8081/", DIRECT_UID, lab.node_ip(2), 8081),
                 "mesh": (f"http://{vip}/", CLIENT_UID, vip, 80)}
        # warm up (pools, EWMA, TLS sessions)
        for url, uid, _h, _p in paths.values():
            wrk(lab, url, uid, 2)
        for r in range(rounds):
            order = ["direct", "mesh"] if r % 2 == 0 else ["mesh", "direct"]
            for name in order:
                url, uid, host, port = paths[name]
                cpu0 = proxy_cpu_seconds(lab)
                w = wrk(lab, url, uid, duration)
                cpu1 = proxy_cpu_seconds(lab)
                fr = fixed_rate(lab, host, port, uid, rate, 5)
                w.update({"fixed_p50_ms": fr["p50_ms"], "fixed_p99_ms": fr["p99_ms"]})
                results[name].append(w)
                if name == "mesh" and w["requests"]:
                    cpu_per_1k.append((cpu1 - cpu0) / w["requests"] * 1000)
                bulk[name].append(iperf(lab, lab.node_ip(2), uid, 5202 if name == "direct" else 5201))
                print(f"  workers={workers} round {r + 1} {name}: {w['rps']:.0f} req/s, "
                      f"p50 {w['p50_ms']:.2f} ms, p99 {w['p99_ms']:.2f} ms, fixed-rate p99 "
                      f"{fr['p99_ms']:.2f} ms, bulk {bulk[name][-1]:.0f} MB/s", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    summary: dict[str, Any] = {"workers": workers}
    for name in ("direct", "mesh"):
        summary[name] = {k: med(name, k) for k in ("rps", "p50_ms", "p99_ms", "fixed_p50_ms", "fixed_p99_ms")}
        summary[name]["bulk_MBps"] = statistics.median(bulk[name])
    summary["mesh_cpu_s_per_1k"] = statistics.median(cpu_per_1k) if cpu_per_1k else float("nan")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--rate", type=float, default=500, help="fixed-rate latency test, req/s")
    ap.add_argument("--workers", default="1,2")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: run as root", file=sys.stderr)
        return 1
    out = []
    for w in [int(x) for x in a.workers.split(",")]:
        out.append(run_cluster(w, a.rounds, a.duration, a.rate))
    resdir = Path(__file__).parent / "results"
    resdir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (resdir / f"baseline-{stamp}.json").write_text(json.dumps(out, indent=2))
    print("\n| path | proxy workers | max req/s (× direct) | wrk p50 / p99 ms | p50 / p99 ms at "
          f"{a.rate:.0f} req/s | bulk MB/s (× direct) | proxy CPU s per 1k req |")
    print("|---|---|---|---|---|---|---|")
    for s in out:
        d, m = s["direct"], s["mesh"]
        print(f"| direct | – | {d['rps']:,.0f} (1.00) | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} | "
              f"{d['fixed_p50_ms']:.2f} / {d['fixed_p99_ms']:.2f} | {d['bulk_MBps']:,.0f} (1.00) | – |")
        print(f"| nodemesh | {s['workers']} | {m['rps']:,.0f} ({m['rps'] / d['rps']:.2f}) | "
              f"{m['p50_ms']:.2f} / {m['p99_ms']:.2f} | {m['fixed_p50_ms']:.2f} / {m['fixed_p99_ms']:.2f} | "
              f"{m['bulk_MBps']:,.0f} ({m['bulk_MBps'] / d['bulk_MBps']:.2f}) | {s['mesh_cpu_s_per_1k']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
