#!/usr/bin/env python3
"""Side-by-side comparison: direct, HAProxy, Envoy (L7 and L4) and nodemesh on the
same two-node namespace topology, in the same run (rotated rounds, medians).

Topology (docs/benchmarks-method.md has the details): a 1 KiB HTTP/1.1 nginx on
node 2; the client on node 1. Paths:
  direct       client -> nginx on node 2 (a port no mesh capture touches)
  haproxy      client -> HAProxy on node 1 -> h2 over mTLS -> HAProxy on node 2 -> nginx
  envoy_l7     the same with Envoy 1.40 (HTTP/2 between)
  envoy_l4     Envoy tcp_proxy + mTLS both sides (like ztunnel)
  mesh_l7      nodemesh: the client workload connects to the service VIP (port
               protocol http), iptables capture, HBONE between the agents' proxies
  mesh_l4      nodemesh, the port declared tcp (the L4 HBONE path)
  mesh_l7_w2   nodemesh L7 with 2 proxy workers per node (a second lab, same shape)
  mesh_pt      nodemesh plaintext passthrough: the captured client workload calls node 2's
               address directly (outside the mesh), relayed by node 1's proxy (splice)
Every proxy has one worker (except mesh_l7_w2). Per path and round: max req/s
(wrk -t1 -c50), latency at a fixed rate over 10 connections from scheduled send
times (bench/openloop.py), proxy CPU from /proc for both proxies, and for the
L4 paths the bulk MB/s of one iperf3 stream.

Usage (root): .venv/bin/python bench/compare.py [--rounds 3] [--duration 8]
              [--fixed-seconds 5] [--bulk-seconds 5] [--paths direct,haproxy,...]
Short pass while developing: --rounds 1 --duration 2 --fixed-seconds 2 --bulk-seconds 2
Writes bench/results/compare-<time>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import peers
from peers import PORTS

from nodemesh.lab.harness import Lab, LabError, LabWorkload, list_lab_namespaces

CLIENT_UID, PLAIN_UID, WEB_UID = 3001, 4000, 2001
# Lab ids of this benchmark only: leftovers of an interrupted run are removed by
# these names, never other labs (other engineers' tests may be running).
# NODEMESH_BENCH_LAB names them apart when two runs share a machine.
_LAB = os.environ.get("NODEMESH_BENCH_LAB", "cmp")[:4]
LAB_IDS = {1: f"{_LAB}w1", 2: f"{_LAB}w2"}
HBONE_PORT = 15008
ALL_PATHS = ("direct", "haproxy", "envoy_l7", "envoy_l4", "mesh_l7", "mesh_l4", "mesh_l7_w2", "mesh_pt")
BULK_PATHS = ("direct", "envoy_l4", "mesh_l4", "mesh_pt")
LABELS = {
    "direct": "direct",
    "haproxy": "HAProxy 2.6 L7 pair, h2 between",
    "envoy_l7": "Envoy 1.40 L7 pair, HTTP/2 between",
    "envoy_l4": "Envoy 1.40 L4 pair (tcp_proxy + TLS)",
    "mesh_l7": "nodemesh L7 (capture, HBONE), 1 worker",
    "mesh_l4": "nodemesh L4 (port tcp, HBONE), 1 worker",
    "mesh_l7_w2": "nodemesh L7, 2 workers",
    "mesh_pt": "nodemesh plaintext passthrough (captured, not meshed)",
}

MESH_CONFIG = f"""\
apiVersion: nodemesh.io/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec:
  trustDomain: cluster.local
  # Which identities may run where (default deny; nodemesh/bindings.py).
  identityBindings:
    - {{name: web, nodes: ['node-*'], serviceAccounts: [default/web], workloadLabels: {{app: [web]}}}}
    - {{name: client, nodes: ['node-*'], serviceAccounts: [default/client]}}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: {PORTS.upstream_mesh}, protocol: http}}]
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {{name: web-tcp, namespace: default}}
spec:
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: {PORTS.upstream_mesh_tcp}, protocol: tcp}}
  - {{name: iperf, port: {PORTS.iperf_mesh}, targetPort: {PORTS.iperf_mesh}, protocol: tcp}}
"""


class BenchError(RuntimeError):
    pass


@dataclass
class Path_:
    """How to drive one comparison path: where the client runs and what it targets."""

    key: str
    lab: Lab
    uid: int
    host: str
    port: int
    cpu_pids: Callable[[], list[int]]  # the proxies whose CPU counts (none for direct)
    bulk: tuple[str, int] | None = None
    log_names: tuple[str, ...] = ()  # lab process logs to show when the path fails
    mtls_port: int | None = None  # node 2's port between the proxies (connections counted under load)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def log_tail(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.lab.log(n)[-1500:]}" for n in self.log_names)


# --------------------------------------------------------------------------- tools
def host_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, from /proc/stat."""
    t = psutil.cpu_times()
    total = sum(t)
    return total - t.idle - getattr(t, "iowait", 0.0), total


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wrk(p: Path_, duration: float) -> dict[str, float]:
    # wrk is exec'd by `ip netns exec` and setpriv, so it is our direct child and its
    # CPU shows in RUSAGE_CHILDREN once reaped: the load generator's own cost.
    c0 = children_cpu()
    res = p.lab.ns_exec(p.lab.node_ns(1), ["wrk", "-t1", "-c50", f"-d{max(1, round(duration))}s", "--latency",
                                           p.url], uid=p.uid, check=False, timeout=duration + 60)
    gen_cpu = children_cpu() - c0
    out = res.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)

    def pct(q: str) -> float:
        mm = re.search(rf"\s{q}%\s+([\d.]+)(us|ms|s)\b", out)
        if not mm:
            return float("nan")
        v = float(mm.group(1))
        return {"us": v / 1000, "ms": v, "s": v * 1000}[mm.group(2)]

    if not m or not total or int(total.group(1)) == 0 or non2xx:
        raise BenchError(f"wrk against {p.url} failed or saw non-2xx responses:\n{out}{res.stderr}")
    return {"rps": float(m.group(1)), "requests": float(total.group(1)), "wrk_p50_ms": pct("50"),
            "wrk_p99_ms": pct("99"), "socket_errors": sock_err.group(1) if sock_err else "",  # type: ignore[dict-item]
            "generator_vcpu": gen_cpu / duration}


def openloop(p: Path_, rate: float, seconds: float) -> dict[str, Any]:
    res = p.lab.ns_exec(p.lab.node_ns(1), [sys.executable, str(ROOT / "bench" / "openloop.py"), p.host, str(p.port),
                                           "--rate", str(rate), "--seconds", str(seconds), "--connections", "10"],
                        uid=p.uid, check=False, timeout=seconds + 60)
    try:
        out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise BenchError(f"open-loop client against {p.url} failed: {res.stdout[-800:]}{res.stderr[-800:]}") from e
    if "error" in out:
        raise BenchError(f"open-loop client against {p.url}: {out['error']}")
    if out["errors"]:
        raise BenchError(f"open-loop client against {p.url}: {out['errors']} of {out['expected']} requests failed "
                         f"({out['error_sample']})")
    return out


def iperf(p: Path_, seconds: float) -> float:
    assert p.bulk is not None
    host, port = p.bulk
    res = p.lab.ns_exec(p.lab.node_ns(1), ["iperf3", "-c", host, "-p", str(port), "-t", str(max(1, round(seconds))),
                                           "-J"], uid=p.uid, check=False, timeout=seconds + 60)
    try:
        data = json.loads(res.stdout)
        return float(data["end"]["sum_received"]["bits_per_second"]) / 8 / 1e6
    except (ValueError, KeyError) as e:
        raise BenchError(f"iperf3 to {host}:{port} failed: {res.stdout[-600:]} {res.stderr[-400:]}") from e


def check_path(p: Path_, timeout: float = 20.0) -> None:
    """One request must come back 200 with the 1 KiB body, or the path is misconfigured.
    Retried for a while: an agent installs capture before its first xDS snapshot lands."""
    deadline = time.monotonic() + timeout
    while True:
        res = p.lab.curl(1, p.url, p.uid, extra=["-o", "/dev/null", "-w", "%{http_code} %{size_download}"])
        if res.stdout.strip() == "200 1024":
            return
        if time.monotonic() > deadline:
            raise BenchError(f"path {p.key}: GET {p.url} as uid {p.uid} gave {res.stdout.strip()!r} "
                             f"{res.stderr.strip()!r} (want '200 1024')\n{p.log_tail()}")
        time.sleep(0.3)


def versions() -> dict[str, str]:
    def first(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired) as e:
            return f"unavailable: {e}"

    return {"haproxy": first(["haproxy", "-v"]), "nginx": first(["nginx", "-v"]),
            "envoy": first([peers.envoy_binary(), "--version"]), "wrk": first(["wrk", "-v"]),
            "iperf3": first(["iperf3", "-v"]), "kernel": os.uname().release}


# --------------------------------------------------------------------------- set-up
def remove_leftovers() -> None:
    """Namespaces of an interrupted run of this benchmark (its lab ids only)."""
    for ns in list_lab_namespaces():
        if any(ns.startswith(f"nmlab-{lid}-") for lid in LAB_IDS.values()):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                  check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)


def wait_listening(lab: Lab, node: int, port: int, name: str, timeout: float = 20) -> None:
    def up() -> bool:
        proc = lab.procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}:\n{lab.log(name)[-2000:]}")
        out = lab.ns_exec(lab.node_ns(node), ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        return bool(out.strip())

    lab.wait_for(up, timeout, f"{name} to listen on port {port} in node {node}", lambda: lab.log(name))


def start_mesh_lab(lab: Lab) -> dict[str, str]:
    """Control plane, workloads, upstreams and both agents; returns the service VIPs."""
    lab.start_controlplane()
    lab.apply(MESH_CONFIG)
    lab.add_workload(LabWorkload("web-2", node=2, uid=WEB_UID, service_account="web", labels={"app": "web"},
                                 ports=(PORTS.upstream_mesh, PORTS.upstream_mesh_tcp, PORTS.iperf_mesh)))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client"))
    d = lab.workdir / "nginx"
    d.mkdir(exist_ok=True)
    os.chmod(d, 0o777)  # noqa: S103 (nginx's workers run as another user and write their temp files here)
    conf = peers.write(d / "nginx.conf", peers.render_nginx_upstream(d))
    os.chmod(conf, 0o644)
    lab.spawn("nginx", lab.node_ns(2), ["nginx", "-c", str(conf), "-g", "daemon off; master_process off;"],
              uid=WEB_UID)
    lab.spawn("iperf3-mesh", lab.node_ns(2), ["iperf3", "-s", "-p", str(PORTS.iperf_mesh)], uid=WEB_UID)
    lab.spawn("iperf3-plain", lab.node_ns(2), ["iperf3", "-s", "-p", str(PORTS.iperf_plain)], uid=WEB_UID)
    for port, name in ((PORTS.upstream_plain, "nginx"), (PORTS.iperf_mesh, "iperf3-mesh"),
                       (PORTS.iperf_plain, "iperf3-plain")):
        wait_listening(lab, 2, port, name)
    lab.start_agent(1)
    lab.start_agent(2)
    return {"web": lab.service_vip("web"), "web-tcp": lab.service_vip("web-tcp")}


def proc_pids(lab: Lab, names: list[str]) -> Callable[[], list[int]]:
    """Pids of the lab's processes `names`, looked up at call time (a restart changes them)."""
    def pids() -> list[int]:
        return [lab.procs[n].pid for n in names if n in lab.procs]
    return pids


def agent_pids(lab: Lab) -> Callable[[], list[int]]:
    # The agent and its proxy workers (children): "the node's proxy" for CPU.
    return proc_pids(lab, ["agent-1", "agent-2"])


def start_peers(lab: Lab, wanted: set[str]) -> dict[str, peers.PeerPair]:
    pki = peers.make_pki(lab.workdir / "peers" / "pki")
    pairs = {k: v for k, v in peers.build_pairs(lab.workdir, lab.node_ip(1), lab.node_ip(2), pki).items()
             if k in wanted}
    for pair in pairs.values():
        for proc in pair.processes:
            lab.spawn(proc.name, lab.node_ns(proc.node), list(proc.argv))
        for proc in pair.processes:
            wait_listening(lab, proc.node, proc.listen[1], proc.name)
    return pairs


@contextlib.contextmanager
def labs(paths: list[str]) -> Iterator[dict[int, Lab]]:
    made: dict[int, Lab] = {}
    try:
        for workers in (1, 2):
            if workers == 2 and "mesh_l7_w2" not in paths:
                continue
            lab = Lab(nodes=2, lab_id=LAB_IDS[workers], proxy_workers=workers)
            made[workers] = lab
            lab.create()
        yield made
    finally:
        for lab in made.values():
            lab.destroy()


def build_paths(made: dict[int, Lab], paths: list[str]) -> dict[str, Path_]:
    out: dict[str, Path_] = {}
    lab = made[1]
    vips = start_mesh_lab(lab)
    print(f"  lab {lab.lab_id} (1 worker) up: web {vips['web']}, web-tcp {vips['web-tcp']}", flush=True)
    out["direct"] = Path_("direct", lab, PLAIN_UID, lab.node_ip(2), PORTS.upstream_plain, list,
                          bulk=(lab.node_ip(2), PORTS.iperf_plain), log_names=("nginx",))
    pairs = start_peers(lab, set(paths))
    for key, pair in pairs.items():
        procs = pair.processes
        out[key] = Path_(key, lab, PLAIN_UID, pair.front[0], pair.front[1], proc_pids(lab, [x.name for x in procs]),
                         bulk=pair.bulk_front, log_names=tuple(x.name for x in procs), mtls_port=procs[1].listen[1])
    mesh_logs = ("agent-1", "agent-2")
    out["mesh_l7"] = Path_("mesh_l7", lab, CLIENT_UID, vips["web"], 80, agent_pids(lab), log_names=mesh_logs,
                           mtls_port=HBONE_PORT)
    out["mesh_l4"] = Path_("mesh_l4", lab, CLIENT_UID, vips["web-tcp"], 80, agent_pids(lab),
                           bulk=(vips["web-tcp"], PORTS.iperf_mesh), log_names=mesh_logs, mtls_port=HBONE_PORT)
    out["mesh_pt"] = Path_("mesh_pt", lab, CLIENT_UID, lab.node_ip(2), PORTS.upstream_plain, agent_pids(lab),
                           bulk=(lab.node_ip(2), PORTS.iperf_plain), log_names=mesh_logs)
    if 2 in made:
        lab2 = made[2]
        vips2 = start_mesh_lab(lab2)
        print(f"  lab {lab2.lab_id} (2 workers) up: web {vips2['web']}", flush=True)
        out["mesh_l7_w2"] = Path_("mesh_l7_w2", lab2, CLIENT_UID, vips2["web"], 80, agent_pids(lab2),
                                  log_names=mesh_logs, mtls_port=HBONE_PORT)
    return {k: v for k, v in out.items() if k in paths}


# --------------------------------------------------------------------------- measurement
def count_established(lab: Lab, node: int, port: int) -> int:
    out = lab.ns_exec(lab.node_ns(node), ["ss", "-Htn", "state", "established", f"sport = :{port}"],
                      check=False).stdout
    return len(out.splitlines())


def measure(p: Path_, a: argparse.Namespace) -> dict[str, Any]:
    r: dict[str, Any] = {}
    cpu0 = peers.tree_cpu_seconds(p.cpu_pids())
    b0, t0 = host_busy()
    # Halfway through wrk's 50 connections, how many connections cross between the
    # proxies: 1-2 means requests are multiplexed (h2, HBONE), 50 means one per client.
    sampler: threading.Timer | None = None
    if p.mtls_port is not None:
        port = p.mtls_port
        sampler = threading.Timer(a.duration / 2,
                                  lambda: r.__setitem__("mtls_conns", count_established(p.lab, 2, port)))
        sampler.start()
    r.update(wrk(p, a.duration))
    if sampler is not None:
        sampler.join()
    b1, t1 = host_busy()
    cpu1 = peers.tree_cpu_seconds(p.cpu_pids())
    r["host_busy"] = (b1 - b0) / (t1 - t0) if t1 > t0 else float("nan")
    r["cpu_s_per_1k_max"] = (cpu1 - cpu0) / r["requests"] * 1000 if p.cpu_pids() else None
    fr = openloop(p, a.rate, a.fixed_seconds)
    cpu2 = peers.tree_cpu_seconds(p.cpu_pids())
    r.update({f"fixed_{k}": v for k, v in fr.items()
              if k.endswith("_ms") or k in ("n", "unfinished", "client_cpu_s")})
    # CPU-seconds per 1,000 requests while serving 1k req/s = vCPU per 1k req/s.
    r["cpu_s_per_1k_fixed"] = (cpu2 - cpu1) / fr["n"] * 1000 if p.cpu_pids() and fr["n"] else None
    if p.bulk is not None and p.key in a.bulk_paths:
        r["bulk_MBps"] = iperf(p, a.bulk_seconds)
    return r


def med(xs: list[Any]) -> float | None:
    vals = [x for x in xs if isinstance(x, (int, float)) and not math.isnan(x)]
    return statistics.median(vals) if vals else None


def summarize(rounds: list[dict[str, dict[str, Any]]], paths: list[str]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    keys = ("rps", "wrk_p50_ms", "wrk_p99_ms", "fixed_p50_ms", "fixed_p99_ms", "fixed_p999_ms",
            "fixed_send_lag_p99_ms", "cpu_s_per_1k_max", "cpu_s_per_1k_fixed", "bulk_MBps", "generator_vcpu",
            "host_busy", "mtls_conns")
    for key in paths:
        got = [r[key] for r in rounds if key in r and "error" not in r[key]]
        errs = [r[key]["error"] for r in rounds if key in r and "error" in r[key]]
        s: dict[str, Any] = {k: med([g.get(k) for g in got]) for k in keys}
        s["rounds_ok"] = len(got)
        if errs:
            s["errors"] = errs
        summary[key] = s
    return summary


def fmt(v: float | None, spec: str, unit: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{unit}"


def table(summary: dict[str, dict[str, Any]], rate: float) -> str:
    d = summary.get("direct", {})
    drps, dp99, dbulk = d.get("rps"), d.get("fixed_p99_ms"), d.get("bulk_MBps")
    header = (f"| path | max req/s (× direct) | p99 at {rate:,.0f} req/s, ms (added over direct) | "
              "vCPU per 1k req/s, both proxies (at max load) | CPU µs per request at max load, both proxies | "
              "bulk one stream, MB/s (× direct) | "
              "wrk p99 ms | wrk vCPU | host CPU busy during wrk | connections between the proxies |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for key, s in summary.items():
        if not s.get("rounds_ok"):
            lines.append(f"| {LABELS[key]} | error: {str(s.get('errors', ['?'])[0])[:120]!r} | | | | | | | | |")
            continue
        rps = s["rps"]
        ratio = f" ({rps / drps:.2f})" if drps and rps else ""
        p99 = s["fixed_p99_ms"]
        added = f" ({p99 - dp99:+.2f})" if key != "direct" and p99 is not None and dp99 is not None else ""
        cpu = fmt(s["cpu_s_per_1k_fixed"], ".2f") + (f" ({s['cpu_s_per_1k_max']:.2f})"
                                                    if s["cpu_s_per_1k_max"] is not None else "")
        # CPU-seconds per 1,000 requests = milliseconds per request: × 1,000 for µs.
        us_per_req = fmt(None if s["cpu_s_per_1k_max"] is None else s["cpu_s_per_1k_max"] * 1000, ".0f")
        bulk = s.get("bulk_MBps")
        bulk_s = "–" if bulk is None else f"{bulk:,.0f}" + (f" ({bulk / dbulk:.2f})" if dbulk else "")
        lines.append(f"| {LABELS[key]} | {rps:,.0f}{ratio} | {fmt(p99, '.2f')}{added} | {cpu} | {us_per_req} | "
                     f"{bulk_s} | "
                     f"{fmt(s['wrk_p99_ms'], '.2f')} | {fmt(s['generator_vcpu'], '.2f')} | "
                     f"{fmt(s['host_busy'], '.0%')} | {fmt(s.get('mtls_conns'), '.0f')} |")
    return "\n".join(lines)


def target_checks(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The goals (docs/benchmarks-method.md, "Targets"), judged on this run's numbers (ratios, same run)."""
    def get(path: str, k: str) -> float | None:
        v = summary.get(path, {}).get(k)
        return v if isinstance(v, (int, float)) else None

    out: list[str] = []

    def check(name: str, ok: bool | None, detail: str) -> None:
        out.append(f"- [{'n/a' if ok is None else 'met' if ok else 'NOT met'}] {name}: {detail}")

    dp99 = get("direct", "fixed_p99_ms")

    def added(path: str) -> float | None:
        p = get(path, "fixed_p99_ms")
        return None if p is None or dp99 is None else p - dp99

    for mesh, peer, what in (("mesh_l7", "haproxy", "L7 vs HAProxy pair"),
                             ("mesh_l4", "envoy_l4", "L4 vs Envoy L4 pair")):
        m, e = get(mesh, "rps"), get(peer, "rps")
        check(f"{what}: max req/s", None if m is None or e is None else m >= e,
              f"{fmt(m, ',.0f')} vs {fmt(e, ',.0f')}" + (f" ({m / e:.2f}×)" if m and e else ""))
        am, ae = added(mesh), added(peer)
        check(f"{what}: added p99 at the fixed rate", None if am is None or ae is None else am <= ae,
              f"{fmt(am, '+.2f')} ms vs {fmt(ae, '+.2f')} ms")
        if mesh == "mesh_l7":
            cm, ce = get(mesh, "cpu_s_per_1k_fixed"), get(peer, "cpu_s_per_1k_fixed")
            check(f"{what}: vCPU per 1k req/s", None if cm is None or ce is None else cm <= ce,
                  f"{fmt(cm, '.3f')} vs {fmt(ce, '.3f')} at the fixed rate; at max load "
                  f"{fmt(get(mesh, 'cpu_s_per_1k_max'), '.3f')} vs {fmt(get(peer, 'cpu_s_per_1k_max'), '.3f')}")
    bm, be = get("mesh_l4", "bulk_MBps"), get("envoy_l4", "bulk_MBps")
    check("L4 bulk ≥ 2× Envoy L4 and ≥ 1 GB/s", None if bm is None or be is None else bm >= 2 * be and bm >= 1000,
          f"{fmt(bm, ',.0f')} MB/s vs Envoy {fmt(be, ',.0f')} MB/s")
    bp, bd = get("mesh_pt", "bulk_MBps"), get("direct", "bulk_MBps")
    check("plaintext passthrough bulk ≥ 0.7× direct", None if bp is None or bd is None else bp >= 0.7 * bd,
          f"{fmt(bp, ',.0f')} MB/s vs direct {fmt(bd, ',.0f')} MB/s" + (f" ({bp / bd:.2f}×)" if bp and bd else ""))
    w1, w2 = get("mesh_l7", "rps"), get("mesh_l7_w2", "rps")
    busy = get("mesh_l7_w2", "host_busy")
    check("2 workers ≥ 1.8× one worker", None if w1 is None or w2 is None else w2 >= 1.8 * w1,
          f"{fmt(w2, ',.0f')} vs {fmt(w1, ',.0f')}" + (f" ({w2 / w1:.2f}×)" if w1 and w2 else "") +
          (f"; host CPU {busy:.0%} busy during the 2-worker run" if busy is not None else "") +
          (" — the machine, not the proxy, is the limit (load generator, nginx and 4 workers share the cores)"
           if busy is not None and busy > 0.9 else ""))
    lag = get("direct", "fixed_send_lag_p99_ms")
    if dp99 is not None and lag is not None:
        out.append(f"- open-loop client: its own send lag p99 {lag:.3f} ms against direct p99 {dp99:.3f} ms"
                   + (" — the generator is a large part of direct's p99; compare added p99 only"
                      if lag > 0.5 * dp99 else ""))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8, help="wrk seconds per path and round (default 8)")
    ap.add_argument("--fixed-seconds", type=float, default=5, help="fixed-rate seconds per path and round")
    ap.add_argument("--bulk-seconds", type=float, default=5, help="iperf3 seconds per L4 path and round")
    ap.add_argument("--rate", type=float, default=1000, help="fixed rate, req/s (default 1000)")
    ap.add_argument("--paths", default=",".join(ALL_PATHS), help=f"comma list of {', '.join(ALL_PATHS)}")
    ap.add_argument("--no-bulk", action="store_true", help="skip iperf3")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the labs' files (configs, logs)")
    a = ap.parse_args()
    paths = [x.strip() for x in a.paths.split(",") if x.strip()]
    bad = [x for x in paths if x not in ALL_PATHS]
    if bad:
        ap.error(f"--paths: unknown {', '.join(bad)}; choose from {', '.join(ALL_PATHS)}")
    if "direct" not in paths:
        paths.insert(0, "direct")  # every ratio is to direct
    if min(a.rounds, a.duration, a.fixed_seconds, a.bulk_seconds, a.rate) <= 0:
        ap.error("--rounds, --duration, --fixed-seconds, --bulk-seconds and --rate must be positive")
    a.bulk_paths = () if a.no_bulk else BULK_PATHS
    if os.geteuid() != 0:
        print("compare: run as root (network namespaces, capture)", file=sys.stderr)
        return 1
    try:
        peers.envoy_binary()
    except FileNotFoundError as e:
        if any(p.startswith("envoy") for p in paths):
            print(f"compare: {e}", file=sys.stderr)
            return 1
    remove_leftovers()
    load0 = os.getloadavg()
    started = time.time()
    rounds: list[dict[str, dict[str, Any]]] = []
    with labs(paths) as made:
        for lab in made.values():
            lab.keep_workdir = a.keep_workdir
        try:
            drive = build_paths(made, paths)
        except (LabError, BenchError) as e:
            print(f"compare: set-up failed: {e}", file=sys.stderr)
            return 1
        for p in drive.values():
            check_path(p)
            wrk(p, min(2.0, a.duration))  # warm-up: pools, TLS sessions, EWMA
        order = list(drive)
        for r in range(a.rounds):
            k = r % len(order)
            rot = order[k:] + order[:k]
            this: dict[str, dict[str, Any]] = {}
            for key in rot:
                try:
                    res = measure(drive[key], a)
                except (BenchError, LabError, subprocess.TimeoutExpired) as e:
                    res = {"error": str(e)[:2000]}
                    print(f"  round {r + 1} {key}: ERROR {str(e)[:400]}\n{drive[key].log_tail()[-1500:]}",
                          flush=True)
                this[key] = res
                if "error" not in res:
                    print(f"  round {r + 1} {key:>10}: {res['rps']:>8,.0f} req/s, fixed p99 "
                          f"{res['fixed_p99_ms']:.2f} ms (lag p99 {res['fixed_send_lag_p99_ms']:.2f}), cpu/1k "
                          f"{fmt(res['cpu_s_per_1k_fixed'], '.3f')} fixed, {fmt(res['cpu_s_per_1k_max'], '.3f')} "
                          f"max" + (f", bulk {res['bulk_MBps']:,.0f} MB/s" if "bulk_MBps" in res else "")
                          + (f", {res['fixed_unfinished']} requests unanswered at the end of the fixed-rate run "
                             "(counted with their wait so far)" if res.get("fixed_unfinished") else ""),
                          flush=True)
            rounds.append(this)
        if a.keep_workdir:
            print(f"  lab files kept in {', '.join(str(lab.workdir) for lab in made.values())}")
    summary = summarize(rounds, list(drive))
    load1 = os.getloadavg()
    report = {
        "meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                 "seconds": round(time.time() - started, 1), "args": {k: v for k, v in vars(a).items()},
                 "cpus": os.cpu_count(), "loadavg_before": load0, "loadavg_after": load1,
                 "versions": versions()},
        "summary": summary, "rounds": rounds,
    }
    resdir = ROOT / "bench" / "results"
    resdir.mkdir(exist_ok=True)
    out = resdir / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nMedians of {a.rounds} rotated round(s); wrk -t1 -c50 -d{a.duration:g}s; fixed rate {a.rate:g} req/s "
          f"over 10 connections for {a.fixed_seconds:g}s (bench/openloop.py); load average before "
          f"{load0[0]:.2f}, after {load1[0]:.2f}. vCPU column: CPU-seconds of both proxies per 1,000 requests "
          "at the fixed rate (in parentheses: at max load).\n")
    print(table(summary, a.rate))
    print("\nTargets (docs/benchmarks-method.md, \"Targets\"):")
    print("\n".join(target_checks(summary)))
    print(f"\nJSON: {out}")
    return 0 if all(s.get("rounds_ok") for s in summary.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
