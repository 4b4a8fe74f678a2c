"""gRPC load across agent restarts (not yet part of test_cluster.py: with it,
calls and even plain HTTP/1.1 connects fail during one restart in a few runs;
see the drain report of 2026-12-05), run inside a node as the client workload with
the node's nodemesh venv (grpcio): CHANNELS channels, each its own HTTP/2
connection (no shared subchannels), each with CALLS calls always in flight to
TARGET's /nodemesh.lab.Echo/Unary (nodemesh/lab/labgrpc.py), every call taking
DELAY_MS at the server so that some are in flight whenever a worker drains,
until the file STOP exists. Prints one JSON object of counts at the end.

A call is a failure if it ends with any status but OK or with an answer that is
not `<replica>:<what was sent>`; gRPC's own transparent retry of a stream the
server refused (never processed) is what a real client does and counts as OK."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import grpc

TIMEOUT_S = 15.0


def main(target: str, nchannels: int, ncalls: int, delay_ms: int, stopfile: str) -> dict[str, object]:
    lock = threading.Lock()
    counts: dict[str, int] = {}
    errors: list[str] = []
    replicas: set[str] = set()
    done = threading.Event()

    def count(key: str, detail: str = "") -> None:
        with lock:
            counts[key] = counts.get(key, 0) + 1
            if detail and len(errors) < 20:
                errors.append(f"{time.strftime('%H:%M:%S')} {key}: {detail}")

    def caller(ch: grpc.Channel, i: int) -> None:
        call = ch.unary_unary("/nodemesh.lab.Echo/Unary")
        k = 0
        while not done.is_set():
            k += 1
            sent = f"{i}-{k}".encode()
            try:
                got = call(b"%d:%s" % (delay_ms, sent), timeout=TIMEOUT_S)
            except grpc.RpcError as e:
                count(f"failed_{e.code().name.lower()}", e.details() or "")
                time.sleep(0.1)
                continue
            name, _, echoed = got.partition(b":")
            if echoed != sent:
                count("bad_answer", repr(got[:80]))
                continue
            count("ok")
            with lock:
                replicas.add(name.decode())

    channels = [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(nchannels)]
    t0 = time.monotonic()
    threads = [threading.Thread(target=caller, args=(ch, c * ncalls + j), daemon=True)
               for c, ch in enumerate(channels) for j in range(ncalls)]
    for t in threads:
        t.start()
    while not os.path.exists(stopfile):
        time.sleep(0.2)
    done.set()
    for t in threads:
        t.join(TIMEOUT_S + 5)
    for ch in channels:
        ch.close()
    return {**counts, "seconds": int(time.monotonic() - t0), "replicas": sorted(replicas), "errors": errors}


if __name__ == "__main__":
    tgt, nch, nc, delay, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    print(json.dumps(main(tgt, nch, nc, delay, stop)), flush=True)
