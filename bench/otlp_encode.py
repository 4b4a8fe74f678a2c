"""OTLP trace export encoding: opentelemetry-proto's ExportTraceServiceRequest
(what nodeagent/observe/tracing.py sends) against the hand-built OTLP/JSON dicts
it replaced, per batch of proxy spans (13 attributes each, as the proxy sets).
Runs in the exporter's thread, off the connection path; printed as JSON.

Run: .venv/bin/python bench/otlp_encode.py [--spans 256 --n 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodeagent.observe import tracing  # noqa: E402


def json_body(spans: list[tracing.Span]) -> bytes:
    """The former encoder: OTLP/JSON dicts (the file exporter's per-span form)."""
    req: dict[str, Any] = {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
        "scopeSpans": [{"scope": {"name": "nodemesh"}, "spans": [tracing.span_to_otlp(s) for s in spans]}]}]}
    return json.dumps(req).encode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spans", type=int, default=256)
    ap.add_argument("--n", type=int, default=50)
    a = ap.parse_args()
    spans = []
    for _ in range(a.spans):
        attrs: dict[str, Any] = {f"attr.{j}": f"value-{j}" for j in range(12)}
        attrs["bytes"] = 1234
        spans.append(tracing.finish_span(tracing.start_span(None, "outbound web.default.svc.mesh", "client",
                                                            attributes=attrs)))
    out: dict[str, Any] = {}
    for name, fn in (("protobuf", lambda: tracing.otlp_request(spans, "svc").SerializeToString()),
                     ("json", lambda: json_body(spans))):
        per_batch = min(timeit.repeat(fn, number=a.n, repeat=3)) / a.n
        out[name] = {"us_per_span": round(per_batch / a.spans * 1e6, 1), "body_bytes": len(fn())}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
