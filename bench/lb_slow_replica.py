#!/usr/bin/env python3
"""Does latency-aware balancing earn its keep? One slow replica among three.

On the namespace lab (4 nodes: the client on node 1, one `web` replica on each
of nodes 2-4, the replica on node 4 answering DELAY ms late), an open-loop
client sends RATE requests/s through the mesh with a deadline
(`x-nodemesh-deadline-ms`, which the proxy enforces: 504 once it passes). Each
round runs with DestinationPolicy loadBalancer.policy PeakEwma, then
RoundRobin (alternating, so drift hits both). Reported per policy: success
rate (200 within the deadline, measured by the client from each request's
scheduled send time, so no coordinated omission), p50/p99 latency, and the
share of requests the slow replica got.

Usage: .venv/bin/python bench/lb_slow_replica.py [--rounds 3] [--duration 10] [--rate 200]
          [--delay-ms 50] [--deadline-ms 50] [--policies PeakEwma,RoundRobin,LeastRequest]
Writes JSON to bench/results/ and a Markdown table to stdout. Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import CONFIG  # noqa: E402 - the same mesh as bench/run.py (a MeshConfig and the web Service)

CLIENT_UID = 3001


def policy(name: str) -> str:
    return f"""\
apiVersion: nodemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {{name: web, namespace: default}}
spec:
  targetRef: {{name: web}}
  loadBalancer: {{policy: {name}}}
"""


# ---------------------------------------------------------------- client (runs inside node 1)


async def _request(pool: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], host: str, path: str,
                   deadline_ms: int) -> tuple[int, str]:
    if pool:
        reader, writer = pool.pop()
    else:
        reader, writer = await asyncio.open_connection(host, 80)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: web\r\nx-nodemesh-deadline-ms: {deadline_ms}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await reader.readexactly(int(hdrs.get("content-length", "0")))
    if hdrs.get("connection", "").lower() == "close":
        writer.close()
    else:
        pool.append((reader, writer))
    replica = ""
    if status == 200:
        replica = str(json.loads(body).get("replica", ""))
    return status, replica


async def client(host: str, rate: float, duration: float, deadline_ms: int) -> dict[str, Any]:
    pool: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    results: list[tuple[int, float, str]] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    n = int(rate * duration)

    async def one(i: int) -> None:
        scheduled = start + i / rate
        await asyncio.sleep(max(0.0, scheduled - loop.time()))
        try:
            status, replica = await asyncio.wait_for(_request(pool, host, f"/r{i}", deadline_ms), 5.0)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            status, replica = 0, ""
        results.append((status, loop.time() - scheduled, replica))

    await asyncio.gather(*(one(i) for i in range(n)))
    for _, w in pool:
        w.close()
    lat = sorted(r[1] * 1000 for r in results)
    ok = sum(1 for s, t, _ in results if s == 200 and t * 1000 <= deadline_ms)
    replicas: dict[str, int] = {}
    for _, _, rep in results:
        if rep:
            replicas[rep] = replicas.get(rep, 0) + 1
    return {"requests": len(results), "ok": ok, "statuses": {str(s): sum(1 for r in results if r[0] == s)
                                                              for s in {r[0] for r in results}},
            "p50_ms": lat[len(lat) // 2], "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "replicas": replicas}


# ---------------------------------------------------------------- driver (root, builds the lab)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from nodemesh.lab.harness import Lab, LabWorkload

    policies = args.policies.split(",")
    rounds: list[dict[str, Any]] = []
    with Lab(nodes=4, lab_id=f"lb{int(time.time()) % 10000}") as lab:
        lab.start_controlplane()
        lab.apply(CONFIG + "---\n" + policy(policies[0]))
        for k in (2, 3, 4):
            lab.add_workload(LabWorkload(f"web-{k}", node=k, uid=2000 + k, ports=(8080,), service_account="web",
                                         labels={"app": "web"}))
        lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client"))
        for k in (2, 3):
            lab.start_app(f"web-{k}")
        lab.start_app("web-4", ["--delay-ms", str(args.delay_ms)])
        for k in (1, 2, 3, 4):
            lab.start_agent(k)
        vip = lab.service_vip("web")
        lab.wait_for(lambda: lab.curl(1, f"http://{vip}/warm", uid=CLIENT_UID).returncode == 0, 20,
                     "the service to answer")
        for r in range(args.rounds):
            for pol in policies:
                lab.apply(policy(pol))
                time.sleep(1.5)  # the push reaches node 1; the balancer state is per policy object
                n0 = len(lab.access_log(1))
                res = lab.ns_exec(lab.node_ns(1), [sys.executable, __file__, "--client", vip, "--rate",
                                                   str(args.rate), "--duration", str(args.duration),
                                                   "--deadline-ms", str(args.deadline_ms)],
                                  uid=CLIENT_UID, timeout=args.duration * 3 + 30)
                out = json.loads(res.stdout)
                time.sleep(0.5)  # the proxy's access log lines of the last requests
                sent: dict[str, int] = {}
                for e in lab.access_log(1)[n0:]:
                    if e.get("method") and str(e.get("path", "")).startswith("/r"):
                        w = str(e.get("dst_workload", "") or "none").split("/")[-1]
                        sent[w] = sent.get(w, 0) + 1
                out.update(policy=pol, round=r, sent=sent)
                rounds.append(out)
                print(f"round {r} {pol}: {out['ok']}/{out['requests']} ok, p99 {out['p99_ms']:.1f} ms, "
                      f"answered by {out['replicas']}, sent to {sent}", file=sys.stderr)
    summary = {}
    for pol in policies:
        rs = [x for x in rounds if x["policy"] == pol]
        total = sum(x["requests"] for x in rs)
        slow = sum(x["sent"].get("web-4", 0) for x in rs)  # from the proxy's access log: sent, not answered
        summary[pol] = {
            "success_pct": 100.0 * sum(x["ok"] for x in rs) / total,
            "p50_ms": statistics.median(x["p50_ms"] for x in rs),
            "p99_ms": statistics.median(x["p99_ms"] for x in rs),
            "slow_share_pct": 100.0 * slow / total,
            "requests": total,
        }
    return {"params": vars(args), "rounds": rounds, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--client", metavar="VIP", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--delay-ms", type=int, default=50, help="extra latency of the slow replica")
    ap.add_argument("--deadline-ms", type=int, default=50)
    ap.add_argument("--policies", default="PeakEwma,RoundRobin")
    args = ap.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(client(args.client, args.rate, args.duration, args.deadline_ms))))
        return
    result = run(args)
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"lb-slow-replica-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nOne replica of three +{args.delay_ms} ms; deadline {args.deadline_ms} ms; {args.rate:g} req/s open "
          f"loop; {args.rounds} rounds x {args.duration:g} s per policy ({path.name})\n")
    print("| policy | success under deadline | p50 | p99 | share sent to the slow replica |")
    print("|---|---|---|---|---|")
    for pol, s in result["summary"].items():
        print(f"| {pol} | {s['success_pct']:.2f}% | {s['p50_ms']:.1f} ms | {s['p99_ms']:.1f} ms | "
              f"{s['slow_share_pct']:.1f}% |")


if __name__ == "__main__":
    main()
