"""The lab's gRPC workload: a grpcio server (generic handlers, no generated
code) that says which replica answered, for HTTP/2 traffic through the mesh.

/nodemesh.lab.Echo/Unary: request bytes `DELAY_MS:PAYLOAD` (or just PAYLOAD),
answered `<name>:<PAYLOAD>` after DELAY_MS (at most 10 s). SIGTERM stops it
with a 5 s grace. Needs grpcio (nodemesh's venv). A test workload, not part of
the mesh.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from concurrent import futures
from types import FrameType

import grpc

SERVICE, METHOD = "nodemesh.lab.Echo", "Unary"
MAX_DELAY_S = 10.0


def answer(name: str, request: bytes) -> bytes:
    """`<name>:<payload>`, after the delay the request asks for."""
    head, sep, payload = request.partition(b":")
    if sep and head.isdigit():
        time.sleep(min(int(head) / 1000, MAX_DELAY_S))
    else:
        payload = request
    return name.encode() + b":" + payload


def serve(name: str, host: str, port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(32))
    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: answer(name, req),
                                                  request_deserializer=None, response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    if not server.add_insecure_port(f"{host}:{port}"):
        raise SystemExit(f"labgrpc: cannot listen on {host}:{port}")
    server.start()
    stopped = threading.Event()

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        server.stop(5.0).wait()
        stopped.set()

    signal.signal(signal.SIGTERM, on_term)
    print(f"labgrpc {name} serving on {host}:{port}", flush=True)
    while not stopped.wait(3600):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--host", default="0.0.0.0")  # noqa: S104 (a workload in its own machine or namespace)
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    serve(a.name, a.host, a.port)


if __name__ == "__main__":
    main()
