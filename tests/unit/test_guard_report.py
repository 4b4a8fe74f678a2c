"""Parse once per node: when the receiving node's policy guard stands in front
of a workload, it reports the exchanges it parsed itself (an ExchangeReport
with the observer's callbacks) instead of a watch parsing the same bytes again.
Each test drives the guard with real peers, then feeds the very bytes the
workload saw and sent to the watch the guard replaced, and asserts both tell
telemetry the same thing (method, target, trace headers, status, grpc-status,
body bytes, resets); plus the handoff itself (the tap comes off the end)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import h2.events

from nodeagent.observe.h2watch import H2Watch
from nodeagent.observe.httpwatch import Exchange, ExchangeReport, Http1Watch
from nodeagent.observe.telemetry import ProxyTelemetry, SessionTelemetry
from nodeagent.proxy import authz_l7
from nodeagent.proxy.authz import inbound_facts
from nodeagent.proxy.relay import Session
from tests.unit.test_authz_h2 import Mesh
from tests.unit.test_authz_l7 import CLIENT, WEB, FakeEnd, Log, policies
from tests.unit.test_authz_l7 import POLICY as L7_POLICY

# test_authz_l7's ALLOW policy for any method on /public*.
POLICY = L7_POLICY.split("---")[0].replace("methods: [GET], ", "")

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Seen:
    """Both callbacks of one observer, in order."""

    def __init__(self) -> None:
        self.started: list[Exchange] = []
        self.done: list[Exchange] = []

    def report(self) -> ExchangeReport:
        return ExchangeReport(self.started.append, self.done.append)


def facts(ex: Exchange) -> dict[str, Any]:
    """What telemetry reads from an exchange (timestamps aside)."""
    return {"method": ex.method, "target": ex.target, "trace": ex.trace_headers, "grpc": ex.grpc,
            "request_bytes": ex.request_bytes, "response_bytes": ex.response_bytes, "status": ex.status,
            "grpc_status": ex.grpc_status, "complete": ex.complete,
            "extra": {k: v for k, v in ex.extra.items() if k != "session"}}


def guard(report: ExchangeReport) -> tuple[authz_l7.InboundHttpGuard, FakeEnd, FakeEnd]:
    """An HTTP/1.1 guard between two fake ends, reporting to `report`."""
    check = authz_l7.L7Check(policies(POLICY), inbound_facts(WEB, 8080, CLIENT, "10.0.0.11"))
    caller, workload = FakeEnd(), FakeEnd()
    g = authz_l7.InboundHttpGuard(check, workload, Session(Log(), "inbound"), report)  # type: ignore[arg-type]
    g.attach(caller)
    return g, caller, workload


def test_http1_guard_reports_what_the_watch_would_have() -> None:
    guard_seen, watch_seen = Seen(), Seen()
    g, caller, workload = guard(guard_seen.report())
    watch = Http1Watch(watch_seen.started.append, watch_seen.done.append)
    answers: list[bytes] = []

    def exchange(request: bytes, answer: bytes) -> None:
        sent = len(workload.data)
        g.send(request)
        watch.request(bytes(workload.data[sent:]))
        g.workload_side.send(answer)
        watch.response(answer)
        answers.append(answer)

    exchange(b"GET /public/./a?x=1 HTTP/1.1\r\nHost: web\r\ntraceparent: " + TRACE.encode()
             + b"\r\nbaggage: k=v\r\nX-Other: 1\r\n\r\n",
             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    exchange(b"POST /public/b HTTP/1.1\r\nHost: web\r\nContent-Type: application/grpc\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n",
             b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\ngrpc-status: 5\r\n\r\n")
    assert len(guard_seen.started) == 1 + 1  # started when the head went to the workload
    exchange(b"GET /admin HTTP/1.1\r\nHost: web\r\n\r\n", b"")  # denied: never reached the workload
    assert b"403 Forbidden" in caller.data
    got = [facts(e) for e in guard_seen.done]
    assert got == [facts(e) for e in watch_seen.done]
    assert got[0]["target"] == "/public/a?x=1"  # as forwarded (normalized)
    assert got[0]["trace"] == (("traceparent", TRACE), ("baggage", "k=v"))
    assert (got[1]["grpc"], got[1]["request_bytes"], got[1]["response_bytes"], got[1]["grpc_status"]) == \
        (True, 8, 4, "5")
    assert all(e["status"] == 200 and e["complete"] for e in got)


def test_http1_request_cut_short_is_reported_at_close_with_no_status() -> None:
    seen = Seen()
    report = seen.report()
    g, _caller, _workload = guard(report)
    g.send(b"GET /public/slow HTTP/1.1\r\nHost: web\r\n\r\n")
    assert len(seen.started) == 1 and not seen.done
    report.close()  # telemetry closes the connection's report with its session
    assert [(e.status, e.complete) for e in seen.done] == [(0, False)]


def test_upgrade_stops_the_report_as_it_stopped_the_watch() -> None:
    seen = Seen()
    report = seen.report()
    g, _caller, _workload = guard(report)
    g.send(b"GET /public/ws HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert report.stopped == "upgrade" and not seen.started


class ReportedMesh(Mesh):
    """The h2 guard with a report, and an H2Watch fed every byte between the guard and the workload."""

    def __init__(self) -> None:
        self.guard_seen, self.watch_seen = Seen(), Seen()
        self.report = self.guard_seen.report()
        self.watch = H2Watch(self.watch_seen.started.append, self.watch_seen.done.append)
        super().__init__()

    def pump(self) -> None:
        if not hasattr(self, "_wired"):
            self._wired = True
            self.guard.report = self.report  # before the preface: the bridge takes it at its start
            watch, end, side = self.watch, self.workload_end, self.guard.workload_side
            send, forward = end.send, side.send

            def to_workload(data: bytes) -> None:
                watch.request(data)
                send(data)

            def from_workload(data: bytes) -> None:
                watch.response(data)
                forward(data)

            end.send = to_workload  # type: ignore[method-assign]
            side.send = from_workload  # type: ignore[method-assign]
        super().pump()


def test_h2_guard_reports_what_the_watch_would_have() -> None:
    m = ReportedMesh()
    m.call("/echo.Echo/GetUser")  # answered: grpc-status in the trailers
    m.answer(m.of(h2.events.RequestReceived, m.server_events)[-1].stream_id, status="5")
    m.call("/echo.Echo/Delete")  # denied by the guard: never reaches the workload
    sid = m.call("/echo.Echo/GetStream", end=False)  # reset by the caller mid-call
    m.client.reset_stream(sid)
    m.pump()
    sid = m.call("/plain/x", body=b"", grpc=False)  # plain HTTP/2, reset by the workload
    m.server.reset_stream(m.of(h2.events.RequestReceived, m.server_events)[-1].stream_id)
    m.pump()
    m.call("/echo.Echo/GetLast")  # open when the connection ends
    m.report.close()
    m.watch.close()
    got = [facts(e) for e in m.guard_seen.done]
    assert got == [facts(e) for e in m.watch_seen.done]
    assert [(e["target"], e["status"], e["grpc_status"], e["extra"].get("reset_by")) for e in got] == [
        ("/echo.Echo/GetUser", 200, "5", None), ("/echo.Echo/GetStream", 0, "", "client"),
        ("/plain/x", 0, "", "workload"), ("/echo.Echo/GetLast", 0, "", None)]
    assert got[0]["extra"]["grpc_service"] == "echo.Echo" and got[0]["request_bytes"] == 7
    assert m.report.is_l7 and m.watch.is_l7


def test_malformed_h2_fails_the_report_as_it_failed_the_watch() -> None:
    m = ReportedMesh()
    m.call("/echo.Echo/GetUser")
    m.guard.send(b"\x00\x00\x01\x09\x00\x00\x00\x00\x07x")  # CONTINUATION with no header block
    assert m.report.failed and not m.report.is_l7
    assert [e.extra.get("abandoned", "") != "" for e in m.guard_seen.done] == [True]


def test_the_tap_comes_off_the_workload_end_when_a_guard_parses() -> None:
    settings = SimpleNamespace(tracing="", node_name="b", trace_sampling=1.0, access_log_sampling=1.0)
    telemetry = ProxyTelemetry(SimpleNamespace(settings=settings, snapshot=None))  # type: ignore[arg-type]
    session = Session(Log(), "inbound")  # type: ignore[arg-type]
    session.observer = telemetry
    watch = Http1Watch(lambda ex: None, lambda ex: None)
    end = FakeEnd()
    end.tap = watch  # type: ignore[attr-defined]
    session.telemetry = SessionTelemetry(0.0, http_watch=watch)
    check = authz_l7.L7Check(policies(POLICY), inbound_facts(WEB, 8080, CLIENT, "10.0.0.11"))
    g = authz_l7.wrap(check, end, session)
    assert end.tap is None  # type: ignore[attr-defined]
    assert isinstance(g.report, ExchangeReport) and session.telemetry.http_watch is g.report
    other = FakeEnd()  # an end nobody watches: nothing to hand off
    assert authz_l7.wrap(check, other, Session(Log(), "inbound")).report is None  # type: ignore[arg-type]
