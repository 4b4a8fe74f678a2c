#!/usr/bin/env python3
"""Where one L7 request's microseconds go on each node: the sending node's
proxy (process A: the outbound HTTP/1.1 listener, the pipeline, HBONE client)
and the receiving node's (process B: HBONE server, the workload connection),
each in its own process on loopback with real mTLS HBONE, a keep-alive 1 KiB
HTTP/1.1 backend beside B in a process of its own, and the client in the
parent (neither's CPU is counted). The receiving workload has no HTTP
authorization rules, so B relays the stream at L4 (the common case); with
--l7-policy an AuthorizationPolicy with an HTTP rule (GET /item*) applies to it,
so B's guard (authz_l7.py) decides every request. No root, no namespaces: a quick, repeatable view, not the benchmark
(bench/compare.py is).

Phase 1 measures CPU per request in each proxy process (time.process_time
over --requests sequential keep-alive requests on --conns connections).
Phase 2 runs the same load under cProfile in both processes and prints each
side's functions by own time and cumulative time.

Usage: .venv/bin/python bench/profile_l7.py [--requests 4000] [--conns 4] [--top 25]
       [--l7-policy] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import multiprocessing as mp
import os
import pstats
import socket
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodeagent.meshview.snapshot import (  # noqa: E402 - after the path insert
    Endpoint,
    LocalWorkload,
    MeshSettings,
    Service,
    ServicePort,
    Snapshot,
    Workload,
)
from nodeagent.proxy.accesslog import AccessLog  # noqa: E402
from nodeagent.proxy.outbound import by_uid  # noqa: E402
from nodeagent.proxy.proxy import NodeProxy  # noqa: E402
from nodeagent.proxy.testca import TestCA  # noqa: E402
from nodeagent.supervision.settings import Certs  # noqa: E402
from nodemesh import model  # noqa: E402
from nodemesh.lab.loopback import NODE_A, NODE_B, TRUST_DOMAIN, loopback_settings, spiffe_id  # noqa: E402
from nodemesh.security import MeshSecurity, SecurityPolicies  # noqa: E402

A, B = NODE_A, NODE_B
TD = TRUST_DOMAIN
CLIENT = spiffe_id("client")
WEB = spiffe_id("web")
VIP = ("10.96.0.20", 80)
CL = "outbound|80||web.default.svc.mesh"
BODY = b"x" * 1024
L7_POLICY = """\
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-http, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - to: [{operation: {methods: [GET], paths: ["/item*"]}}]
"""


def _security(l7_policy: bool) -> SecurityPolicies:
    if not l7_policy:
        return SecurityPolicies()
    docs = model.parse_documents(L7_POLICY)
    return SecurityPolicies(MeshSecurity(), (), tuple(d.obj for d in docs if d.kind == "AuthorizationPolicy"))


def _snapshot(node: str, pem: str, web_port: int, hbone_b: int, l7_policy: bool = False) -> Snapshot:
    mesh = MeshSettings(trust_domain=TD, trust_bundle=(pem,))
    ep = Endpoint(B, web_port, "default/web-0", WEB, "b", B, hbone_port=hbone_b)
    services = (Service("web", "default", VIP[0], (ServicePort(VIP[1], web_port, "http", "http", CL, (ep,)),)),)
    workloads = (Workload("web-0", "default", "web", "b", B, (web_port,), WEB, B, hbone_b),)
    local = ((LocalWorkload("client", "default", "client", A, (), uid=os.getuid()),) if node == "a"
             else (LocalWorkload("web", "default", "web", B, (web_port,), labels=(("app", "web"),)),))
    return Snapshot("1", node, mesh, services, workloads, local, security=_security(l7_policy))


class _Backend(asyncio.Protocol):
    """A keep-alive HTTP/1.1 server answering 1 KiB to every request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY))


def _node(role: str, certs: Certs, pem: str, pipe: Connection, ports: tuple[int, int], l7_policy: bool) -> None:
    """One node's proxy (and, on B, the backend) in this process, driven by `pipe`."""
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        web_port = ports[0]
        if role == "b":
            proxy = NodeProxy(loopback_settings("b", B), access_log=AccessLog("off"), original_dst=lambda s: VIP)
        else:
            proxy = NodeProxy(loopback_settings("a", A), access_log=AccessLog("off"), original_dst=lambda s: VIP,
                              source_lookup=by_uid(os.getuid()))
        await proxy.start()
        hbone = ports[1] if role == "a" else proxy.addresses()[2][1]
        proxy.update(_snapshot(role, pem, web_port, hbone, l7_policy), certs)
        pipe.send((web_port, hbone, proxy.addresses()[0]))
        prof: cProfile.Profile | None = None
        cpu0 = 0.0
        while True:
            cmd = await loop.run_in_executor(None, pipe.recv)
            if cmd == "start":
                cpu0 = time.process_time()
                pipe.send("ok")
            elif cmd == "profile":
                prof = cProfile.Profile()
                prof.enable()
                cpu0 = time.process_time()
                pipe.send("ok")
            elif cmd == "stop":
                cpu = time.process_time() - cpu0
                stats = ""
                if prof is not None:
                    prof.disable()
                    out = io.StringIO()
                    ps = pstats.Stats(prof, stream=out)
                    ps.sort_stats("tottime").print_stats(TOP)
                    ps.sort_stats("cumulative").print_stats(TOP)
                    stats = out.getvalue()
                    prof = None
                pipe.send((cpu, stats))
            elif cmd == "exit":
                await proxy.stop()
                return

    uvloop.run(main())


TOP = 25


def _backend(pipe: Connection) -> None:
    """The workload beside node B, in a process of its own (its CPU is not B's)."""
    import uvloop

    async def main() -> None:
        srv = await asyncio.get_running_loop().create_server(_Backend, B, 0)
        pipe.send(int(srv.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()

    uvloop.run(main())


async def _load(a_out: tuple[str, int], requests: int, conns: int) -> float:
    """`requests` sequential requests spread over `conns` keep-alive connections; wall seconds."""
    per = requests // conns

    async def one() -> None:
        r, w = await asyncio.open_connection(*a_out)
        req = b"GET /item HTTP/1.1\r\nHost: web\r\n\r\n"
        for _ in range(per):
            w.write(req)
            await r.readuntil(b"\r\n\r\n")
            await r.readexactly(len(BODY))
        w.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(conns)))
    return time.perf_counter() - t0


def _run(cmd: str, pipes: list[Connection], a_out: tuple[str, int], requests: int, conns: int
         ) -> tuple[float, list[tuple[float, str]]]:
    for p in pipes:
        p.send(cmd)
    for p in pipes:
        p.recv()
    wall = asyncio.run(_load(a_out, requests, conns))
    for p in pipes:
        p.send("stop")
    return wall, [p.recv() for p in pipes]


def main() -> int:
    global TOP
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", help="write the CPU figures here")
    ap.add_argument("--l7-policy", action="store_true",
                    help="an AuthorizationPolicy with an HTTP rule on the receiving workload:"
                         " its guard decides each request")
    a = ap.parse_args()
    TOP = a.top
    ca = TestCA()
    ctx = mp.get_context("fork")
    w_pipe, w_child = ctx.Pipe()
    w = ctx.Process(target=_backend, args=(w_child,), daemon=True)
    w.start()
    web_port = w_pipe.recv()
    b_pipe, b_child = ctx.Pipe()
    b = ctx.Process(target=_node, args=("b", ca.certs(WEB), ca.pem, b_child, (web_port, 0), a.l7_policy), daemon=True)
    b.start()
    web_port, hbone_b, _ = b_pipe.recv()
    a_pipe, a_child = ctx.Pipe()
    ap_ = ctx.Process(target=_node, args=("a", ca.certs(CLIENT), ca.pem, a_child, (web_port, hbone_b),
                                                     a.l7_policy), daemon=True)
    ap_.start()
    _, _, a_out = a_pipe.recv()
    # The outbound listener sees every connection as captured on its way to the VIP (original_dst).
    a_out = (str(a_out[0]), int(a_out[1]))
    pipes = [a_pipe, b_pipe]
    try:
        asyncio.run(_load(a_out, 400, a.conns))  # warm: connections, pools, caches
        wall, [(cpu_a, _), (cpu_b, _)] = _run("start", pipes, a_out, a.requests, a.conns)
        n = a.requests // a.conns * a.conns
        result = {"requests": n, "conns": a.conns, "l7_policy": a.l7_policy, "wall_s": wall, "req_per_s": n / wall,
                  "sending_cpu_us_per_req": cpu_a / n * 1e6, "receiving_cpu_us_per_req": cpu_b / n * 1e6}
        print(json.dumps(result, indent=1))
        _, [(pa, sa), (pb, sb)] = _run("profile", pipes, a_out, a.requests, a.conns)
        print(f"\n==== sending node (A), under cProfile {pa / n * 1e6:.0f} us/request ====\n{sa}")
        print(f"\n==== receiving node (B), under cProfile {pb / n * 1e6:.0f} us/request ====\n{sb}")
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=1))
    finally:
        for p in pipes:
            p.send("exit")
        ap_.join(5)
        b.join(5)
        w.terminate()
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    raise SystemExit(main())
