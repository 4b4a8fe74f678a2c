"""W3C trace context and B3: parsing, generation, child spans, and the exporters."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from nodeagent.observe import tracing

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("value", [
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # three fields
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span id
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # v00 with extra field
])
def test_invalid_traceparent_is_refused(value: str) -> None:
    assert tracing.parse_traceparent(value) is None


def test_traceparent_round_trip_and_future_version() -> None:
    ctx = tracing.parse_traceparent(TP)
    assert ctx == tracing.TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)
    assert tracing.format_traceparent(ctx) == TP
    later = tracing.parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more")
    assert later is not None and not later.sampled


def test_child_span_keeps_trace_and_tracestate() -> None:
    span, out = tracing.child_span([("TraceParent", TP), ("tracestate", "a=1, bad, b=2")], "hop")
    assert span.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and span.parent_span_id == "00f067aa0ba902b7"
    assert span.span_id != "00f067aa0ba902b7"
    assert dict(out) == {"traceparent": f"00-{span.trace_id}-{span.span_id}-01", "tracestate": "a=1,b=2"}


def test_b3_single_and_multi_are_read_and_answered_in_b3() -> None:
    span, out = tracing.child_span({"b3": "80f198ee56343ba8-e457b5a2e4d86bd1-1"}, "hop")
    assert span.trace_id == "000000000000000080f198ee56343ba8" and span.parent_span_id == "e457b5a2e4d86bd1"
    hdrs = dict(out)
    assert hdrs["x-b3-traceid"] == span.trace_id and hdrs["x-b3-spanid"] == span.span_id
    assert hdrs["traceparent"].startswith(f"00-{span.trace_id}-")
    multi = tracing.parse_b3({"X-B3-TraceId": "4bf92f3577b34da6a3ce929d0e0e4736", "X-B3-SpanId": "00f067aa0ba902b7",
                              "X-B3-Sampled": "0"})
    assert multi is not None and not multi.sampled
    root, _ = tracing.child_span({}, "root")
    assert root.parent_span_id == "" and len(root.trace_id) == 32


def test_replace_trace_headers() -> None:
    out = tracing.replace_trace_headers([("Host", "x"), ("traceparent", TP), ("X-B3-SpanId", "1")],
                                        [("traceparent", "new")])
    assert out == [("Host", "x"), ("traceparent", "new")]


def test_file_exporter_writes_otlp_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    exp = tracing.FileExporter(str(path), "svc")
    span = tracing.start_span(None, "op", "client", attributes={"n": 3, "ok": True, "s": "x"}, now_ns=10)
    tracing.finish_span(span, now_ns=20)
    exp.export(span)
    exp.close()
    rec = json.loads(path.read_text())
    assert rec["service"] == "svc" and rec["kind"] == 3 and rec["endTimeUnixNano"] == "20"
    assert {"key": "n", "value": {"intValue": "3"}} in rec["attributes"]


def test_otlp_http_exporter_posts_protobuf() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    got: list[dict[str, Any]] = []
    done = threading.Event()

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append({"path": self.path, "type": self.headers["Content-Type"],
                        "body": ExportTraceServiceRequest.FromString(body)})
            self.send_response(200)
            self.end_headers()
            done.set()

        def log_message(self, *a: Any) -> None:
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        exp = tracing.exporter_for(f"http://127.0.0.1:{srv.server_port}", "nodemesh-proxy.n1")
        parent = tracing.start_span(None, "parent")
        span = tracing.start_span(parent.context, "op", "client", attributes={"n": 3, "ok": True, "s": "x", "f": 0.5},
                                  now_ns=10)
        exp.export(tracing.finish_span(span, status="error", message="upstream reset", now_ns=25))
        assert done.wait(5)
        exp.close()
    finally:
        srv.shutdown()
    assert got[0]["path"] == "/v1/traces" and got[0]["type"] == "application/x-protobuf"
    rs = got[0]["body"].resource_spans[0]
    assert rs.resource.attributes[0].key == "service.name"
    assert rs.resource.attributes[0].value.string_value == "nodemesh-proxy.n1"
    (sent,) = rs.scope_spans[0].spans
    assert rs.scope_spans[0].scope.name == "nodemesh" and sent.name == "op" and sent.kind == 3  # client
    assert sent.trace_id.hex() == parent.trace_id and sent.parent_span_id.hex() == parent.span_id
    assert sent.span_id.hex() == span.span_id
    assert (sent.start_time_unix_nano, sent.end_time_unix_nano) == (10, 25)
    assert (sent.status.code, sent.status.message) == (2, "upstream reset")
    attrs = {kv.key: kv.value for kv in sent.attributes}
    assert (attrs["n"].int_value, attrs["ok"].bool_value, attrs["s"].string_value, attrs["f"].double_value) == (
        3, True, "x", 0.5)
    with pytest.raises(ValueError, match="must start with http"):
        tracing.OtlpHttpExporter("collector:4318")


def test_grpc_call_continues_the_apps_trace_through_the_http2_stack() -> None:
    """HTTP/2 (gRPC) path: the app's traceparent and tracestate are continued; the
    endpoint receives the proxy's span as parent under the app's trace ID, and the
    request's access log line carries that trace ID (nodeagent/proxy/http/h2stack.py)."""
    import asyncio

    import grpc

    from tests.unit.test_h2_stack import Backend, _ident, run

    seen: list[dict[str, str]] = []

    class Recording(Backend):
        def _unary(self, req: bytes, ctx: grpc.ServicerContext) -> bytes:
            seen.append({k: v for k, v in ctx.invocation_metadata() if isinstance(v, str)})
            return super()._unary(req, ctx)

    tid, app_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    async def body(m: object) -> None:
        call = m.channel.unary_unary("/test.Echo/Unary", *_ident)  # type: ignore[attr-defined]
        md = [("traceparent", f"00-{tid}-{app_span}-01"), ("tracestate", "app=1")]
        resp = await asyncio.to_thread(lambda: call(b"hi", metadata=md, timeout=10))
        assert resp.startswith(b"r0:hi")
        await asyncio.sleep(0.05)
        line = m.grpc_lines()[-1]  # type: ignore[attr-defined]
        assert line["trace_id"] == tid and line["span_id"] != app_span

        got = tracing.parse_traceparent(seen[-1]["traceparent"])
        assert got is not None and got.trace_id == tid and got.span_id == line["span_id"]
        assert seen[-1]["tracestate"] == "app=1"

    run(body, [Recording("r0")])
