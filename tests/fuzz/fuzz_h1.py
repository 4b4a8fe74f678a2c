"""Fuzz the strict HTTP/1.1 request edge (nodeagent/proxy/http/h1.py) and the
receiving node's guard built on it (nodeagent/proxy/authz_l7.py).

Properties, for any bytes cut into any pieces:
- the reader yields events or raises EdgeError (with a 4xx/5xx status and a
  reason), nothing else, and stays refused after an error;
- the events are the same whether the bytes come in one piece or many (no
  boundary depends on how TCP cut the stream), or both ways end refused;
- every head is HTTP/1.0 or 1.1, never both chunked and with a
  Content-Length, its path normalized (starts with "/", no dot segments, no
  "#", no escaped slash);
- body bytes of a Content-Length request add up to at most its length;
- the guard, behind an ALLOW policy on /public*, never sends the workload a
  request (as a strict server parses the bytes it got) whose path is outside
  /public (the smuggling property), always sends bytes such a server can
  parse, and never raises.
"""

from __future__ import annotations

import contextlib
import sys

import atheris
import httptools

with atheris.instrument_imports():
    from nodeagent.meshview.snapshot import LocalWorkload
    from nodeagent.proxy import authz_l7
    from nodeagent.proxy.authz import inbound_facts
    from nodeagent.proxy.http.h1 import EdgeError, EndOfRequest, H2Preface, RequestHead, RequestReader
    from nodeagent.proxy.relay import Session
    from nodemesh import model
    from nodemesh.security import MeshSecurity, SecurityPolicies

SEEDS = [
    b"GET /public/a HTTP/1.1\r\nHost: web\r\n\r\n",
    b"POST /public/a HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /public/a HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    (b"POST /public HTTP/1.1\r\nHost: web\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    b"GET /admin HTTP/1.1\r\nHost: web\r\n\r\n"),
    b"GET http://web/public/../admin HTTP/1.0\r\n\r\n",
]
POLICY = """\
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: public, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - to: [{operation: {paths: ["/public*"]}}]
"""
WEB = LocalWorkload("web-1", "default", "web", "10.0.0.12", (8080,), uid=2001, labels=(("app", "web"),))
POLICIES = SecurityPolicies(MeshSecurity(), (), tuple(d.obj for d in model.parse_documents(POLICY)))


def events(data: bytes, cuts: list[int]) -> tuple[list[object], int]:
    """(the events as comparable tuples, the refusal status or 0)."""
    r = RequestReader()
    out: list[object] = []
    pos = 0
    try:
        for cut in [*cuts, len(data)]:
            if cut <= pos:
                continue
            for ev in r.feed(data[pos:cut]):
                out.append(_key(ev))
            pos = cut
    except EdgeError as e:
        assert 400 <= e.status <= 505 and e.reason, e
        assert r.dead is e
        return _merge_bodies(out), e.status
    return _merge_bodies(out), 0


def _key(ev: object) -> object:
    if isinstance(ev, RequestHead):
        t = ev.target
        assert ev.version in ("1.0", "1.1")
        assert not (ev.chunked and ev.content_length is not None)
        assert t.path == "*" or (t.path.startswith("/") and "#" not in t.path), t
        assert all(s not in (".", "..") for s in t.path.split("/")[1:]), t
        assert "%2F" not in t.path.upper() and "\\" not in t.path, t
        return ("head", ev.method, t.target, t.authority, ev.version, tuple(ev.headers), ev.chunked,
                ev.content_length, ev.keep_alive)
    if isinstance(ev, bytes):
        return ("body", ev)
    if isinstance(ev, EndOfRequest):
        return ("end", tuple(ev.trailers))
    assert isinstance(ev, H2Preface)
    return ("h2",)


def _merge_bodies(evs: list[object]) -> list[object]:
    out: list[object] = []
    for ev in evs:
        if isinstance(ev, tuple) and ev[0] == "body" and out and isinstance(out[-1], tuple) and out[-1][0] == "body":
            out[-1] = ("body", out[-1][1] + ev[1])
        else:
            out.append(ev)
    return out


class _End:
    def __init__(self) -> None:
        self.data = bytearray()
        self.rx = self.tx = 0

    def send(self, data: bytes) -> None:
        self.data += data

    def send_eof(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def attach(self, partner: object) -> None:
        pass


class _Log:
    def write(self, rec: object) -> None:
        pass


def guard_check(data: bytes, cuts: list[int], out_of_turn: bool) -> None:
    caller, workload = _End(), _End()
    g = authz_l7.InboundHttpGuard(authz_l7.L7Check(POLICIES, inbound_facts(WEB, 8080, "", "10.0.0.11")), workload,
                                  Session(_Log(), "inbound"))  # type: ignore[arg-type]
    g.attach(caller)
    pos = 0
    for cut in [*cuts, len(data)]:
        if cut > pos:
            g.send(data[pos:cut])
            # The workload answers the request in flight (and, sometimes, speaks out of turn).
            if g._cur is not None or out_of_turn:
                g.workload_side.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            pos = cut
    g.send_eof()
    if g.state == authz_l7.PASS:
        return  # decided at L4 (not HTTP), where the HTTP-only ALLOW never matches: nothing was sent
    # The workload's stream, read as a Content-Length/chunked-honouring server reads it
    # (llhttp, strict): every request line it finds is one the policy allowed.
    urls: list[bytes] = []

    class _Collect:
        def on_url(self, url: bytes) -> None:
            urls.append(url)

    with contextlib.suppress(httptools.HttpParserUpgrade):
        httptools.HttpRequestParser(_Collect()).feed_data(bytes(workload.data))
    assert all(u.startswith(b"/public") for u in urls), (data, bytes(workload.data))


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    seed = SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)] if fdp.ConsumeBool() else b""
    body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 400))
    where = fdp.ConsumeIntInRange(0, len(seed))
    stream = seed[:where] + body + seed[where:]
    cuts = sorted({fdp.ConsumeIntInRange(0, max(1, len(stream))) for _ in range(fdp.ConsumeIntInRange(0, 6))})
    whole = events(stream, [])
    cut = events(stream, cuts)
    if whole[1] == 0 and cut[1] == 0:
        assert whole == cut, (stream, cuts, whole, cut)
    elif whole[1] and cut[1]:
        # Refused both ways; what came before the refusal may differ only by a tail cut short.
        assert whole[1] == cut[1] or {whole[1], cut[1]} <= {400, 431, 414}, (stream, cuts, whole, cut)
    else:
        # Refused one way only: possible only when the refusal is a size limit seen earlier or later.
        assert {whole[1], cut[1]} - {0} <= {431}, (stream, cuts, whole, cut)
    guard_check(stream, cuts, fdp.ConsumeBool())


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
