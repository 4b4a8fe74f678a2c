"""The strict HTTP edge, one test per rule: the path normalizer, the HTTP/1.1
request reader (httptools), the receiving node's guard (fake relay ends) and
the sending node's L7 listener (two in-process proxies over loopback mTLS).
Each attack here must fail with the status and reason the docs name
(docs/security.md, "HTTP edges")."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest

from nodeagent.observe import meshmetrics
from nodeagent.proxy import authz_l7
from nodeagent.proxy.authz import inbound_facts
from nodeagent.proxy.http import h1
from nodeagent.proxy.http.edge import HEAD_TIMEOUT, IDLE_TIMEOUT, STREAM_IDLE_TIMEOUT, ConnTimer
from nodeagent.proxy.http.h1 import EdgeError, EndOfRequest, H2Preface, RequestHead, RequestReader
from nodeagent.proxy.http.pathnorm import BadTarget, normalize_target
from nodeagent.proxy.relay import Session
from nodemesh import model
from nodemesh.httpedge import DEFAULT_LIMITS, HttpLimits, parse_limits
from nodemesh.security import MeshSecurity, SecurityPolicies

from .test_authz_l7 import WEB, FakeEnd, Log
from .test_http_stack import VIP, Mesh, Server, run

CLIENT = "spiffe://cluster.local/ns/default/sa/client"

# ---------------------------------------------------------------- the path normalizer


@pytest.mark.parametrize("raw,path,query,authority", [
    ("/a/b?x=1", "/a/b", "?x=1", None),
    ("//admin", "/admin", "", None),
    ("/a//b///c/", "/a/b/c/", "", None),
    ("/public/../admin", "/admin", "", None),
    ("/%2e%2e/admin", "/admin", "", None),
    ("/a/./b/../c?q=/..", "/a/c", "?q=/..", None),
    ("/a/..", "/", "", None),
    ("/%61dmin", "/admin", "", None),
    ("/caf%c3%a9", "/caf%C3%A9", "", None),
    ("/admin;x=1", "/admin;x=1", "", None),  # parameters stay, and are matched as written
    ("http://web/admin", "/admin", "", "web"),
    ("HTTP://web:8080", "/", "", "web:8080"),
    ("http://web?x", "/", "?x", "web"),
])
def test_normalization(raw: str, path: str, query: str, authority: str | None) -> None:
    t = normalize_target(raw)
    assert (t.path, t.query, t.authority) == (path, query, authority)


@pytest.mark.parametrize("raw,reason", [
    ("/admin#.css", "fragment_in_target"),
    ("/a%2fb", "escaped_slash"),
    ("/a%5Cb", "escaped_slash"),
    ("/a\\b", "escaped_slash"),
    ("/a%zz", "bad_percent_escape"),
    ("/a%4", "bad_percent_escape"),
    ("web:80", "bad_target"),
    ("ftp://web/x", "bad_target"),
    ("http://user@web/x", "bad_target"),
    ("*", "bad_target"),  # only for OPTIONS
])
def test_refused_targets(raw: str, reason: str) -> None:
    with pytest.raises(BadTarget) as e:
        normalize_target(raw)
    assert e.value.reason == reason and e.value.status == 400


def test_escaped_slash_actions_and_h2_paths() -> None:
    assert normalize_target("/a%2Fb", escaped_slashes="KEEP_UNCHANGED").path == "/a%2Fb"
    assert normalize_target("/a%2f..%2fb", escaped_slashes="UNESCAPE_AND_FORWARD").path == "/b"
    # Stable: a second hop normalizing again reads the same path (fuzz finding: %5c became a raw "\").
    for action in ("KEEP_UNCHANGED", "UNESCAPE_AND_FORWARD"):
        once = normalize_target("/%a50/%5c/", escaped_slashes=action)
        assert normalize_target(once.target, escaped_slashes=action) == once
    assert normalize_target("*", "OPTIONS").path == "*"
    with pytest.raises(BadTarget):
        normalize_target("http://web/admin", h2=True)  # HTTP/2 :path is never absolute-form


# ---------------------------------------------------------------- the HTTP/1.1 reader


def refused(data: bytes, limits: HttpLimits = DEFAULT_LIMITS) -> EdgeError:
    r = RequestReader(limits)
    with pytest.raises(EdgeError) as e:
        r.feed(data)
    assert r.dead is e.value
    with pytest.raises(EdgeError):
        r.feed(b"GET / HTTP/1.1\r\n\r\n")  # stays refused
    return e.value


@pytest.mark.parametrize("data,status,reason", [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
     "cl_and_te"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400,
     "cl_and_te"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400,
     "bad_content_length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello", 400, "bad_content_length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello", 400, "bad_content_length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "transfer_coding"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 501, "transfer_coding"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501, "transfer_coding"),
    (b"GET / HTTP/9.9\r\nHost: a\r\n\r\n", 505, "http_version"),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "http_version"),
    (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505, "http_version"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400, "bad_request"),  # obs-fold: rejected
    (b"GET / HTTP/1.1\nHost: a\n\n", 400, "bad_request"),  # bare LF: rejected
    (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400, "bad_request"),
    (b"GET /admin#.css HTTP/1.1\r\nHost: a\r\n\r\n", 400, "fragment_in_target"),
    (b"GET /a%2fb HTTP/1.1\r\nHost: a\r\n\r\n", 400, "escaped_slash"),
    (b"CONNECT web:80 HTTP/1.1\r\nHost: web\r\n\r\n", 400, "bad_target"),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(5000)) + b"\r\n", 431,
     "too_many_headers"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431, "header_too_large"),
    (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
    (b"GET / HTTP/1.1\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "h2_preface"),
])
def test_reader_refuses(data: bytes, status: int, reason: str) -> None:
    e = refused(data)
    assert (e.status, e.reason) == (status, reason), e


def test_head_size_counts_across_reads() -> None:
    r = RequestReader()
    assert r.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 50_000) == [] and r.in_head
    with pytest.raises(EdgeError) as e:
        r.feed(b"a" * 20_000)
    assert e.value.status == 431


def test_limits_are_configurable() -> None:
    small = HttpLimits(max_headers=2, max_request_line=64)
    assert refused(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", small).status == 431
    assert refused(b"GET /" + b"a" * 100 + b" HTTP/1.1\r\n\r\n", small).status == 414
    assert RequestReader(small).feed(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n")


def test_reader_events_and_framing() -> None:
    r = RequestReader()
    evs = r.feed(b"POST http://web/x/../y?q HTTP/1.1\r\nHost: other\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n0\r\nT: 1\r\n\r\nGET / HTTP/1.0\r\n\r\n")
    head, body, end, head2, end2 = evs
    assert isinstance(head, RequestHead) and head.target.target == "/y?q" and head.target.authority == "web"
    assert head.chunked and head.content_length is None and head.keep_alive
    assert body == b"hello" and isinstance(end, EndOfRequest) and end.trailers == [("t", "1")]
    assert isinstance(head2, RequestHead) and head2.version == "1.0" and not head2.keep_alive
    assert isinstance(end2, EndOfRequest)
    assert RequestReader().feed(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")[0].keep_alive is False  # type: ignore[union-attr]


def test_h2_preface_is_an_event_not_a_request() -> None:
    r = RequestReader()
    evs = r.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert len(evs) == 1 and isinstance(evs[0], H2Preface) and r.upgraded


def test_response_framer() -> None:
    f = h1.ResponseFramer()
    head = f.head(200, "OK", [("x", "1")], method="GET", version="1.1", keep_alive=True, length=None)
    assert head.endswith(b"transfer-encoding: chunked\r\n\r\n") and f.body(b"ab") == b"2\r\nab\r\n"
    assert f.end() == b"0\r\n\r\n" and not f.close
    f = h1.ResponseFramer()
    head = f.head(200, "OK", [], method="GET", version="1.0", keep_alive=False, length=None)
    assert b"connection: close" in head and f.close and f.body(b"ab") == b"ab" and f.end() == b""
    head = f.head(204, "", [], method="GET", version="1.1", keep_alive=True, length=None)
    assert b"content-length" not in head and b"transfer-encoding" not in head
    f.head(200, "OK", [], method="HEAD", version="1.1", keep_alive=True, length=10)
    assert f.body(b"x") == b""


def test_limits_config_parse() -> None:
    limits, problems = parse_limits({"maxRequestHeaders": 50, "requestHeadersTimeoutSeconds": 2.5,
                                     "pathWithEscapedSlashesAction": "KEEP_UNCHANGED"})
    assert not problems and limits.max_headers == 50 and limits.request_head_timeout_s == 2.5
    _, problems = parse_limits({"maxRequestHeaders": 0, "bogus": 1, "pathWithEscapedSlashesAction": "x"})
    assert sorted(p for p, _ in problems) == ["spec.http.bogus", "spec.http.maxRequestHeaders",
                                              "spec.http.pathWithEscapedSlashesAction"]
    doc = model.parse_document({"apiVersion": "nodemesh.io/v1alpha1", "kind": "MeshConfig",
                                "metadata": {"name": "mesh"}, "spec": {"http": {"maxRequestHeaders": 50}}})
    assert doc.obj.http_limits.max_headers == 50 and doc.obj.spec()["http"] == {"maxRequestHeaders": 50}
    sec = MeshSecurity(http=doc.obj.http_limits)
    assert MeshSecurity.from_json(sec.to_json()) == sec  # how it reaches the agents


# ---------------------------------------------------------------- the time limits


class Probe:
    """What a connection reports to its ConnTimer, set by hand."""

    def __init__(self, in_head: bool = False, busy: bool = False) -> None:
        self.in_head, self.busy, self.moved = in_head, busy, 0

    def __call__(self) -> tuple[bool, bool, int]:
        return self.in_head, self.busy, self.moved


def test_conn_timer_head_and_idle() -> None:
    p = Probe()
    fired: list[str] = []
    t = ConnTimer(HttpLimits(request_head_timeout_s=1.0, idle_timeout_s=3.0), p, fired.append)
    p.in_head = True
    assert t.tick(0.25) and t.tick(0.25) and t.tick(0.25) and t.tick(0.25)  # counted from first sight
    assert not t.tick(0.25) and fired == [HEAD_TIMEOUT]
    fired.clear()
    p.in_head = False
    t = ConnTimer(HttpLimits(request_head_timeout_s=1.0, idle_timeout_s=1.0), p, fired.append)
    for _ in range(4):
        p.moved += 1  # bytes moving: never idle
        assert t.tick(0.25)
    p.busy = True  # a request in flight: not idle either
    for _ in range(8):
        assert t.tick(0.25)
    p.busy = False
    while t.tick(0.25):
        pass
    assert fired == [IDLE_TIMEOUT]


def test_conn_timer_stream_idle() -> None:
    p = Probe(busy=True)
    fired: list[str] = []
    t = ConnTimer(HttpLimits(stream_idle_timeout_s=1.0), p, fired.append)
    assert t.period == 0.25  # a quarter of the shortest limit
    for _ in range(12):
        p.moved += 1  # a request in flight whose bytes move: never idle
        assert t.tick(0.25)
    for _ in range(3):  # 0.75 s of nothing moving
        assert t.tick(0.25)
    assert not t.tick(0.25) and fired == [STREAM_IDLE_TIMEOUT]


# ---------------------------------------------------------------- the receiving node's guard

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


def guard(limits: HttpLimits = DEFAULT_LIMITS) -> tuple[authz_l7.InboundHttpGuard, FakeEnd, FakeEnd, Session]:
    docs = model.parse_documents(POLICIES)
    pol = SecurityPolicies(MeshSecurity(http=limits), (), tuple(d.obj for d in docs))
    session = Session(Log(), "inbound")  # type: ignore[arg-type]
    caller, workload = FakeEnd(), FakeEnd()
    g = authz_l7.InboundHttpGuard(authz_l7.L7Check(pol, inbound_facts(WEB, 8080, CLIENT, "10.0.0.11")),
                                  workload, session)
    g.attach(caller)
    return g, caller, workload, session


def test_guard_refuses_cl_te_smuggling() -> None:
    g, caller, workload, session = guard()
    smuggled = b"POST /admin/secret HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n\r\n"
    g.send(b"POST /public HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"0\r\n\r\n%b" % (5 + len(smuggled), smuggled))
    assert caller.data.startswith(b"HTTP/1.1 400 ") and b"cl_and_te" in caller.data
    assert not workload.data and workload.aborted and caller.eof
    assert session.fields["reason"] == "cl_and_te" and session.fields["http_status"] == 400


def test_guard_reframes_what_it_decided() -> None:
    g, caller, workload, _ = guard()
    g.send(b"POST /public/a HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    head = bytes(workload.data).split(b"\r\n\r\n")[0].lower()
    assert b"transfer-encoding: chunked" in head and b"content-length" not in head
    g.workload_side.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    workload.data.clear()
    g.send(b"GET http://web/public/b/../c HTTP/1.1\r\nHost: evil\r\n\r\n")
    assert workload.data.startswith(b"GET /public/c HTTP/1.1\r\nhost: web\r\n")
    assert caller.data.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("request_line,status", [
    (b"GET http://web/admin HTTP/1.1", 403),
    (b"GET //admin HTTP/1.1", 403),
    (b"GET /admin;x=1 HTTP/1.1", 403),
    (b"GET /admin;x=.css HTTP/1.1", 403),
    (b"GET /public/../admin HTTP/1.1", 403),
    (b"GET /admin#.css HTTP/1.1", 400),
    (b"GET /admin%2f.css HTTP/1.1", 400),
    (b"GET /%61dmin/x.css HTTP/1.1", 403),
])
def test_guard_normalization_bypasses_fail(request_line: bytes, status: int) -> None:
    g, caller, workload, _ = guard()
    g.send(request_line + b"\r\nHost: web\r\n\r\n")
    assert caller.data.startswith(b"HTTP/1.1 %d " % status), bytes(caller.data[:80])
    assert not workload.data


def test_guard_limits_and_versions() -> None:
    for data, status in [
        (b"GET /public HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(5000)) + b"\r\n", 431),
        (b"GET /public HTTP/9.9\r\nHost: web\r\n\r\n", 505),
        (b"GET /public HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ]:
        g, caller, workload, _ = guard()
        g.send(data)
        assert caller.data.startswith(b"HTTP/1.1 %d " % status) and not workload.data


def test_guard_pauses_the_caller_on_a_pipelined_flood() -> None:
    class Pausing(FakeEnd):
        paused = False

        def pause_reading(self) -> None:
            self.paused = True

        def resume_reading(self) -> None:
            self.paused = False

    g, _caller, workload, _ = guard(HttpLimits(max_buffered_bytes=64 * 1024))
    caller = Pausing()
    g.attach(caller)
    g.send(b"GET /public/slow HTTP/1.1\r\nHost: web\r\n\r\n")  # in flight: its response has not come
    body = b"x" * 8192
    flood = b"POST /public/p HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    for _ in range(10):
        g.send(flood)
    assert caller.paused and g._queued > 64 * 1024
    assert workload.data.count(b"POST") == 0  # nothing of the queued requests went ahead of the response
    answered = 0

    def still_paused() -> bool:  # (a call: mypy would keep the attribute narrowed by the assert above)
        return caller.paused

    while still_paused():
        g.workload_side.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        answered += 1
        assert workload.data.count(b"POST") == answered  # one at a time, in order
    assert g._queued <= 32 * 1024  # reading resumes once the queue is down to half the limit
    while answered < 11:
        g.workload_side.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        answered += 1
    assert workload.data.count(b"POST") == 10 and g._queued == 0


def test_guard_ends_a_request_whose_bytes_stop_moving() -> None:
    g, caller, workload, session = guard(HttpLimits(stream_idle_timeout_s=1.0))
    g.send(b"GET /public HTTP/1.1\r\nHost: web\r\n\r\n")
    assert workload.data.startswith(b"GET /public ")  # in flight; the workload never answers
    ticks = 0
    while g.timer.tick(0.25):
        ticks += 1
    assert ticks >= 3 and session.fields["reason"] == STREAM_IDLE_TIMEOUT and caller.aborted and workload.aborted


def test_guard_slow_head_gets_408() -> None:
    g, caller, workload, session = guard(HttpLimits(request_head_timeout_s=1.0))
    g.send(b"GET /public HTTP/1.1\r\nHost: we")
    while g.timer.tick(0.25):
        pass
    assert caller.data.startswith(b"HTTP/1.1 408 ") and session.fields["reason"] == "request_head_timeout"
    assert not workload.data and caller.eof


# ---------------------------------------------------------------- the sending node's listener


async def raw_exchange(m: Mesh, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes through node A's outbound listener; everything until the proxy closes."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    m.dst[sock.getsockname()[1]] = VIP
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, m.a_out)
    r, w = await asyncio.open_connection(sock=sock)
    w.write(data)
    out = b""
    try:
        while chunk := await asyncio.wait_for(r.read(65536), wait):
            out += chunk
    finally:
        w.close()
    return out


def with_limits(m: Mesh, limits: HttpLimits) -> None:
    snap = m.a.snapshot
    assert snap is not None
    m.a.update(dataclasses.replace(snap, security=SecurityPolicies(MeshSecurity(http=limits))),
               m.ca.certs(CLIENT))


def refusals(status: int, reason: str) -> float:
    return float(meshmetrics.HTTP_EDGE_REFUSED.value({"side": "outbound", "status": str(status), "reason": reason})
                 or 0.0)


def test_sending_side_refuses_smuggling_and_never_forwards_the_rest() -> None:
    srv = Server("web")

    async def body(m: Mesh) -> None:
        before = refusals(400, "cl_and_te")
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n"
        out = await raw_exchange(m, b"POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled + smuggled)
        assert out.startswith(b"HTTP/1.1 400 ") and b"connection: close" in out and out.count(b"HTTP/1.1") == 1
        assert srv.seen == [] and refusals(400, "cl_and_te") == before + 1

    run(body, [srv])


@pytest.mark.parametrize("data,status", [
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(5000)) + b"\r\n", 431),
    (b"GET / HTTP/9.9\r\nHost: web\r\n\r\n", 505),
    (b"GET /a#b HTTP/1.1\r\nHost: web\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
])
def test_sending_side_refusals(data: bytes, status: int) -> None:
    srv = Server("web")

    async def body(m: Mesh) -> None:
        out = await raw_exchange(m, data)
        assert out.startswith(b"HTTP/1.1 %d " % status), out[:80]
        assert srv.seen == []

    run(body, [srv])


def test_sending_side_answers_the_h2_preface_with_goaway() -> None:
    srv = Server("web")

    async def body(m: Mesh) -> None:
        out = await raw_exchange(m, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert out.endswith(bytes.fromhex("0000080700000000000000000000000d"))  # GOAWAY HTTP_1_1_REQUIRED
        assert srv.seen == []

    run(body, [srv])


def test_sending_side_forwards_exactly_what_it_routed() -> None:
    srv = Server("web")

    async def body(m: Mesh) -> None:
        out = await raw_exchange(m, b"GET http://web.default/x/..//admin?q=1 HTTP/1.1\r\nHost: other\r\n"
                                    b"Connection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"web /admin?q=1")
        (seen,) = srv.seen
        assert seen.startswith("GET /admin?q=1 HTTP/1.1") and "host: web.default" in seen.lower()

    run(body, [srv])


def test_sending_side_slow_head_closed_at_the_deadline() -> None:
    srv = Server("web")

    async def body(m: Mesh) -> None:
        with_limits(m, HttpLimits(request_head_timeout_s=0.4))
        t0 = asyncio.get_running_loop().time()
        out = await raw_exchange(m, b"GET / HTTP/1.1\r\nHost: w", wait=5.0)
        took = asyncio.get_running_loop().time() - t0
        assert out.startswith(b"HTTP/1.1 408 ") and 0.4 <= took < 2.0, (out[:60], took)

    run(body, [srv])


def test_sending_side_request_with_nothing_moving_gets_408() -> None:
    srv = Server("slow", delay=3.0)

    async def body(m: Mesh) -> None:
        with_limits(m, HttpLimits(stream_idle_timeout_s=0.4))
        before = refusals(408, STREAM_IDLE_TIMEOUT)
        t0 = asyncio.get_running_loop().time()
        out = await raw_exchange(m, b"GET /x HTTP/1.1\r\nHost: web\r\n\r\n", wait=5.0)
        took = asyncio.get_running_loop().time() - t0
        assert out.startswith(b"HTTP/1.1 408 ") and b"x-nodemesh-reason: stream_idle_timeout" in out, out[:200]
        assert 0.4 <= took < 2.0, took
        await asyncio.sleep(0.05)
        line = [r for r in m.rec_a if r.get("method") == "GET"][-1]
        assert line["reason"] == STREAM_IDLE_TIMEOUT and line["status"] == 408
        assert refusals(408, STREAM_IDLE_TIMEOUT) == before + 1

    run(body, [srv])


# ---------------------------------------------------------------- found by tests/fuzz/fuzz_h1.py


def test_obs_text_header_values_are_forwarded_not_crashed_on() -> None:
    g, caller, workload, _ = guard()
    g.send(b"GET /public HTTP/1.1\r\nHost: web\r\nX-Name: caf\xe9\r\n\r\n")
    assert b"x-name: caf\xe9\r\n" in workload.data and not caller.data


def test_the_h2_preface_is_recognised_whatever_the_pieces() -> None:
    for data in (b"PRI * \x04", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"):
        whole: list[object] = []
        pieces: list[object] = []
        for out, cuts in ((whole, [len(data)]), (pieces, list(range(1, len(data) + 1)))):
            r, pos = RequestReader(), 0
            try:
                for c in cuts:
                    out.extend(type(e).__name__ for e in r.feed(data[pos:c]))
                    pos = c
            except EdgeError as e:
                out.append(e.status)
        assert whole == pieces, (data, whole, pieces)


def test_guard_ends_a_connection_whose_workload_speaks_out_of_turn() -> None:
    g, _caller, workload, session = guard()
    g.send(b"GET /public HTTP/1.1\r\nHost: web\r\n\r\n")
    g.workload_side.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    g.workload_side.send(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")  # nothing asked
    assert session.fields["reason"] == "upstream_protocol_error" and workload.aborted
    g.send(b"GET /public/2 HTTP/1.1\r\nHost: web\r\n\r\n")
    assert b"/public/2" not in workload.data


def test_header_values_lose_surrounding_whitespace() -> None:
    head = RequestReader().feed(b"GET / HTTP/1.1\r\nHost: web\t\r\nX: \t v \t\r\n\r\n")[0]
    assert isinstance(head, RequestHead) and head.headers == [("host", "web"), ("x", "v")]
    g, caller, workload, _ = guard()
    g.send(b"GET /public HTTP/1.1\r\nHost: web\t\r\n\r\n")  # fuzz finding: h11 refused "web\t" and raised
    assert workload.data.startswith(b"GET /public HTTP/1.1\r\nhost: web\r\n") and not caller.data
