"""The strict HTTP edges through two real nodes (real capture, real HBONE,
the lab's Content-Length-only app on node 2 logging every request it runs).
Each test plays the attacker against the sending node (a captured client
calling the service VIP) and the receiving node's guard (a plaintext caller on
node 2's inbound listener, which has no sending node in front of it), and
checks the workload never ran what the policy did not decide."""

from __future__ import annotations

import time

import psutil
import pytest

from nodemesh.lab.harness import Lab
from tests.netns.conftest import CLIENT_UID

pytestmark = pytest.mark.netns

POLICIES = """\
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: public, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - to: [{operation: {paths: ["/public*", "*.css"]}}]
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
"""

# A raw TCP client run inside a node namespace (Debian's python3: workload uids cannot
# use the venv). It sends argv[3] (hex) in pieces of argv[4] bytes every argv[5] seconds
# (a slow sender, which stops once the peer closes) and prints, as hex, all it read until
# the peer closed or argv[6] s passed; the last line is the seconds from connect to the close.
RAW_CLIENT = r"""
import select, socket, sys, time
host, port, data = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
piece, gap, wait = int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
s = socket.create_connection((host, port), timeout=5)
t0 = time.monotonic()
out, closed = b"", False
for i in range(0, len(data), piece):
    try:
        s.sendall(data[i:i + piece])
    except (BrokenPipeError, ConnectionResetError):
        break
    # Read what came meanwhile (an early answer), and stop sending once the peer closed.
    while not closed and select.select([s], [], [], gap)[0]:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            b = b""
        out += b
        closed = not b
    if closed:
        break
s.settimeout(wait)
try:
    while not closed:
        b = s.recv(65536)
        if not b:
            break
        out += b
except (socket.timeout, ConnectionResetError):
    pass
print(out.hex())
print(round(time.monotonic() - t0, 3))
"""


def raw(lab: Lab, host: str, port: int, data: bytes, uid: int, piece: int = 1 << 20, gap: float = 0.0,
        wait: float = 5.0) -> tuple[bytes, float]:
    r = lab.ns_exec(lab.node_ns(1), ["/usr/bin/python3", "-c", RAW_CLIENT, host, str(port), data.hex(),
                                     str(piece), str(gap), str(wait)], uid=uid, check=False, timeout=wait + 30)
    assert r.returncode == 0, r.stderr
    out, took = r.stdout.split("\n")[:2]
    return bytes.fromhex(out), float(took)


def app_requests(lab: Lab) -> list[str]:
    return [line for line in lab.log("app-web-2").splitlines() if line[:4] in ("GET ", "POST", "PUT ")]


def edges_lab(mesh: Lab) -> tuple[str, str]:
    """The mesh with web-2 logging requests and the policies in force on node 2."""
    mesh.stop("app-web-2")
    mesh.start_app("web-2", ["--log-requests"])
    mesh.apply(POLICIES)
    vip = mesh.service_vip("web")
    plain = mesh.node_ip(2)
    mesh.wait_for(lambda: raw(mesh, plain, 8080, b"GET /private HTTP/1.1\r\nHost: web\r\n\r\n", 0, wait=2)[0]
                  .startswith(b"HTTP/1.1 403"), 15, "the policies on node 2")
    return vip, plain


def test_smuggling_and_normalization_bypasses_fail_on_both_nodes(mesh: Lab) -> None:
    vip, plain = edges_lab(mesh)
    ok, _ = raw(mesh, vip, 80, b"GET /public/ok HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n", CLIENT_UID)
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
    seen_before = len(app_requests(mesh))

    # CL+TE: read by its chunked framing the body is empty, by Content-Length it carries a
    # second request. Both edges refuse it with 400 and close; the app never sees either.
    smuggled = b"POST /admin/secret HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n\r\n"
    attack = (b"POST /public/form HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"0\r\n\r\n%b" % (5 + len(smuggled), smuggled))
    for host, port, uid in ((vip, 80, CLIENT_UID), (plain, 8080, 0)):
        out, _ = raw(mesh, host, port, attack, uid)
        assert out.startswith(b"HTTP/1.1 400 ") and b"cl_and_te" in out and out.count(b"HTTP/1.1 ") == 1, out[:300]

    # Normalization: what was decided is what is forwarded.
    cases = [(b"GET http://web/admin HTTP/1.1", 403), (b"GET //admin HTTP/1.1", 403),
             (b"GET /admin;x=1 HTTP/1.1", 403), (b"GET /admin;x=.css HTTP/1.1", 403),
             (b"GET /public/../admin HTTP/1.1", 403), (b"GET /admin#.css HTTP/1.1", 400),
             (b"GET /admin%2f.css HTTP/1.1", 400), (b"GET /%61dmin/x.css HTTP/1.1", 403)]
    for line, want in cases:
        for host, port, uid in ((vip, 80, CLIENT_UID), (plain, 8080, 0)):
            out, _ = raw(mesh, host, port, line + b"\r\nHost: web\r\nConnection: close\r\n\r\n", uid)
            # The sending node answers 400 itself; a 403 always comes from node 2's guard.
            assert out.startswith(b"HTTP/1.1 %d " % want), (line, host, out[:300])
    # Allowed, and forwarded exactly as decided: the app sees the normalized path.
    out, _ = raw(mesh, plain, 8080, b"GET //public/./a/../b.css HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n", 0)
    assert out.startswith(b"HTTP/1.1 200") and b'"path": "/public/b.css"' in out, out[:300]

    seen = app_requests(mesh)[seen_before:]
    assert seen == ["GET /public/b.css"], seen
    assert not any("/admin" in line for line in app_requests(mesh))
    # Counted and logged with the reason on both nodes (a connection's line is written when it ends).
    for k in (1, 2):
        mesh.wait_for(lambda k=k: any(e.get("reason") == "cl_and_te" and e.get("http_status") == 400
                                      for e in mesh.access_log(k)), 10, f"node {k}'s cl_and_te log line")


def test_sending_side_refuses_what_it_cannot_read(mesh: Lab) -> None:
    vip, _plain = edges_lab(mesh)
    seen_before = len(app_requests(mesh))
    many = b"GET /public HTTP/1.1\r\nHost: web\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n"
    out, _ = raw(mesh, vip, 80, many, CLIENT_UID)
    assert out.startswith(b"HTTP/1.1 431 "), out[:200]
    out, _ = raw(mesh, vip, 80, b"GET /public HTTP/9.9\r\nHost: web\r\n\r\n", CLIENT_UID)
    assert out.startswith(b"HTTP/1.1 505 "), out[:200]
    out, _ = raw(mesh, vip, 80, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", CLIENT_UID)
    assert out.endswith(bytes.fromhex("0000080700000000000000000000000d")), out  # GOAWAY HTTP_1_1_REQUIRED
    assert app_requests(mesh)[seen_before:] == []
    reasons = {e.get("reason") for e in mesh.access_log(1)}
    assert {"too_many_headers", "http_version", "h2_preface_on_http_port"} <= reasons, reasons


def test_slow_head_closed_at_the_deadline(mesh: Lab) -> None:
    vip, plain = edges_lab(mesh)
    mesh.apply(POLICIES_WITH_TIMEOUT)
    slow = b"GET /public/slow HTTP/1.1\r\nHost: web\r\nX-Slow: " + b"a" * 40

    def answered_408(host: str, port: int, uid: int) -> bool:
        # One byte every 0.1 s: the head would take ~6 s; the deadline is 1 s.
        out, took = raw(mesh, host, port, slow, uid, piece=1, gap=0.1, wait=10)
        return out.startswith(b"HTTP/1.1 408 ") and took < 9

    for host, port, uid in ((vip, 80, CLIENT_UID), (plain, 8080, 0)):
        mesh.wait_for(lambda h=host, p=port, u=uid: answered_408(h, p, u), 40,
                      f"a slow head to {host}:{port} to be cut with 408")
    assert not any("/public/slow" in line for line in app_requests(mesh))


POLICIES_WITH_TIMEOUT = """\
apiVersion: nodemesh.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: cluster.local, outboundPolicy: ALLOW_ANY, http: {requestHeadersTimeoutSeconds: 1}}
"""


def _agent_rss(lab: Lab, k: int) -> int:
    p = psutil.Process(lab.procs[f"agent-{k}"].pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])


FLOOD_CLIENT = r"""
import socket, sys, time
host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=5)
s.sendall(b"GET /public/hold?delay_ms=15000 HTTP/1.1\r\nHost: web\r\n\r\n")
body = b"x" * 65000
req = b"POST /public/p HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
s.settimeout(0.5)
sent, t0, ended = 0, time.monotonic(), "still open"
while sent < total and time.monotonic() - t0 < 8:
    try:
        sent += s.send(req)
    except socket.timeout:
        pass
    except OSError as e:  # the proxy may end a flooding connection at a limit: count what went in until then
        ended = type(e).__name__
        break
print(sent, ended)
time.sleep(3)
"""


def test_pipelined_flood_leaves_rss_bounded(mesh: Lab) -> None:
    vip, plain = edges_lab(mesh)
    for host, port, uid, k in ((plain, 8080, 0, 2), (vip, 80, CLIENT_UID, 1)):
        before = _agent_rss(mesh, k)
        flood = mesh.spawn(f"flood-{k}", mesh.node_ns(1), ["/usr/bin/python3", "-c", FLOOD_CLIENT, host, str(port),
                                                           str(300 << 20)], uid=uid)
        time.sleep(4)
        # Meanwhile another connection is served.
        out, _ = raw(mesh, host, port, b"GET /public/other HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n", uid)
        assert out.startswith(b"HTTP/1.1 200"), out[:200]
        grown = _agent_rss(mesh, k) - before
        flood.wait(30)
        sent = int(mesh.log(f"flood-{k}").split()[0])
        # The proxy stopped reading at the buffer limit: far less than 300 MiB went in, and
        # the worker did not buffer what did.
        assert sent < 64 << 20, (k, sent)
        assert grown < 48 << 20, (k, grown)
