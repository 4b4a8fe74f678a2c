#!/usr/bin/env python3
"""Does compiling the hot pure modules with mypyc pay? One request's worth of
their work, repeated: the HTTP/1.1 request reader (h1.py, around httptools),
the path normalizer (pathnorm.py), route selection over a five-route table
(route_select.py), and the HBONE framing core (hbone.py: one request and one
response DATA frame through a tunnel, both directions, window updates).

Run it under callgrind to count instructions (this machine has no hardware
counters; wall time here is noise):

  valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.pure \\
      .venv/bin/python bench/mypyc_eval.py --iterations 1000
  bench/mypyc_build.sh /tmp/mypyc-eval     # a copy of the tree, the four modules compiled
  cd /tmp/mypyc-eval && PYTHONPATH=/tmp/mypyc-eval valgrind --tool=callgrind \\
      --callgrind-out-file=/tmp/cg.mypyc <repo>/.venv/bin/python <repo>/bench/mypyc_eval.py --iterations 1000
(`--iterations 0` gives the start-up cost to subtract; the totals are in
callgrind's "summary:" line.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "PYTHONPATH" not in os.environ:  # else: the tree to measure (pure or compiled) is on it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodeagent.meshview.l7snapshot import RouteEntry, RouteTable, WeightedCluster  # noqa: E402
from nodeagent.proxy import hbone  # noqa: E402
from nodeagent.proxy.http import h1, pathnorm, route_select  # noqa: E402
from nodemesh.httpedge import DEFAULT_LIMITS  # noqa: E402
from nodemesh.routespec import RouteMatch, StringMatch  # noqa: E402

REQUEST = (b"GET /api/v1/items/42?expand=owner HTTP/1.1\r\nHost: web.default.svc.cluster.local\r\n"
           b"User-Agent: curl/8.5.0\r\nAccept: */*\r\nX-Request-Id: 3f2a1c\r\n"
           b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n")
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024
CL = "outbound|80||web.default.svc.mesh"
TABLE = RouteTable(CL, (
    RouteEntry("admin", RouteMatch("PathPrefix", "/admin"), (WeightedCluster(CL),)),
    RouteEntry("v2", RouteMatch("PathPrefix", "/api/v2"), (WeightedCluster(CL),)),
    RouteEntry("canary", RouteMatch("PathPrefix", "/api", headers=(StringMatch("x-canary", "yes"),)),
               (WeightedCluster(CL),)),
    RouteEntry("api", RouteMatch("PathPrefix", "/api"), (WeightedCluster(CL),)),
    RouteEntry("rest", RouteMatch(), (WeightedCluster(CL),)),
))


def _tunnel() -> tuple[hbone.HboneConnection, hbone.HboneConnection, int]:
    c, s = hbone.HboneConnection(client=True), hbone.HboneConnection(client=False)
    c.initiate()
    s.initiate()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    sid = c.open_tunnel("10.0.1.7", 8080)
    for ev in s.receive_data(c.data_to_send()):
        if isinstance(ev, hbone.ConnectRequested):
            s.accept(ev.stream_id)
    c.receive_data(s.data_to_send())
    return c, s, sid


def one_request(c: hbone.HboneConnection, s: hbone.HboneConnection, sid: int) -> str:
    reader = h1.RequestReader(DEFAULT_LIMITS)
    events = reader.feed(REQUEST)
    head = next(e for e in events if isinstance(e, h1.RequestHead))
    target = pathnorm.normalize_target(head.target.target)
    view = route_select.RequestView(head.method, target.target, tuple(head.headers))
    entry = route_select.select_route(TABLE, view)
    # The request through the tunnel, the response back, windows returned on both sides.
    c.send(sid, REQUEST)
    for ev in s.receive_data(c.data_to_send()):
        if isinstance(ev, hbone.Data):
            s.acknowledge(ev.stream_id, ev.flow_controlled_length)
    s.send(sid, RESPONSE)
    for ev in c.receive_data(s.data_to_send()):
        if isinstance(ev, hbone.Data):
            c.acknowledge(ev.stream_id, ev.flow_controlled_length)
    s.receive_data(c.data_to_send())
    return entry.name if entry else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=2000)
    a = ap.parse_args()
    c, s, sid = _tunnel()
    assert one_request(c, s, sid) == "api"  # noqa: S101 - the workload is what it claims
    t0 = time.process_time()
    for _ in range(a.iterations):
        one_request(c, s, sid)
    cpu = time.process_time() - t0
    compiled = hbone.__file__.endswith(".so")
    print(f"{'mypyc' if compiled else 'pure'}: {a.iterations} requests, "
          f"{cpu / max(1, a.iterations) * 1e6:.1f} us/request CPU (noisy; count instructions with callgrind)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
