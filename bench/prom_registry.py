"""nodemesh.prom (per-worker registries, collected and pickled over the control
channel, merged at scrape) against prometheus-client in multiprocess mode (each
process writes mmap'ed files under PROMETHEUS_MULTIPROC_DIR, the scraper reads
and merges every file), on the proxy's two costs:

- update: one finished request as meshmetrics.record_request makes it (a
  request counter, a duration and two size histograms, Istio's 15-label set),
  timed inside one worker for a repeated series (the steady state);
- scrape: W worker processes each holding S distinct request series, merged
  and rendered to text by the agent (ours: collect + pickle in each worker,
  unpickle + merge + render in the agent, as admin.py does; theirs:
  MultiProcessCollector over the W processes' files + generate_latest).

Run: .venv/bin/python bench/prom_registry.py [--workers 2 --series 2000]
(prometheus-client is a dev dependency; the result is printed as JSON).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import shutil
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodemesh import prom  # noqa: E402

LABELS = ("reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
          "source_version", "destination_workload", "destination_workload_namespace", "destination_principal",
          "destination_app", "destination_version", "destination_service", "destination_service_name",
          "destination_service_namespace", "request_protocol", "response_code", "grpc_response_status",
          "response_flags", "connection_security_policy")
MS = prom.DURATION_BUCKETS_MS
BYTES = prom.BYTES_BUCKETS


def series_labels(i: int) -> dict[str, str]:
    return {ln: (f"{ln}-{i % 97}" if ln != "destination_service" else f"svc-{i}.default.svc.mesh") for ln in LABELS}


class Ours:
    def __init__(self) -> None:
        r = self.registry = prom.Registry()
        self.requests = r.counter("istio_requests_total", "", LABELS)
        self.duration = r.histogram("istio_request_duration_milliseconds", "", LABELS, buckets=MS)
        self.req_bytes = r.histogram("istio_request_bytes", "", LABELS, buckets=BYTES)
        self.resp_bytes = r.histogram("istio_response_bytes", "", LABELS, buckets=BYTES)

    def record(self, labels: dict[str, str]) -> None:
        self.requests.inc(labels)
        self.duration.observe(labels, 12.0)
        self.req_bytes.observe(labels, 300.0)
        self.resp_bytes.observe(labels, 2000.0)


class Theirs:
    def __init__(self) -> None:
        import prometheus_client as pc

        r = self.registry = pc.CollectorRegistry()
        self.requests = pc.Counter("istio_requests", "", LABELS, registry=r)
        self.duration = pc.Histogram("istio_request_duration_milliseconds", "", LABELS, buckets=MS, registry=r)
        self.req_bytes = pc.Histogram("istio_request_bytes", "", LABELS, buckets=BYTES, registry=r)
        self.resp_bytes = pc.Histogram("istio_response_bytes", "", LABELS, buckets=BYTES, registry=r)

    def record(self, labels: dict[str, str]) -> None:
        self.requests.labels(**labels).inc()
        self.duration.labels(**labels).observe(12.0)
        self.req_bytes.labels(**labels).observe(300.0)
        self.resp_bytes.labels(**labels).observe(2000.0)


def _worker(kind: str, series: int, conn: Any) -> None:
    m: Ours | Theirs = Ours() if kind == "ours" else Theirs()
    for i in range(series):
        m.record(series_labels(i))
    lab = series_labels(0)
    update_us = min(timeit.repeat(lambda: m.record(lab), number=2000, repeat=3)) / 2000 * 1e6
    conn.send(("ready", update_us))
    while conn.recv() == "collect":  # the agent's stats request (ours only)
        assert isinstance(m, Ours)
        conn.send_bytes(pickle.dumps(m.registry.collect()))
    conn.close()


def run(kind: str, workers: int, series: int, scrapes: int) -> dict[str, float]:
    mpdir = tempfile.mkdtemp(prefix="prom-mp-")
    if kind == "theirs":
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = mpdir  # before the children import prometheus_client
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    try:
        for _ in range(workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(kind, series, child))
            p.start()
            pipes.append(parent)
            procs.append(p)
        update_us = max(pipe.recv()[1] for pipe in pipes)
        times = []
        size = 0
        for _ in range(scrapes):
            t0 = time.perf_counter()
            if kind == "ours":
                for pipe in pipes:
                    pipe.send("collect")
                parts = [pickle.loads(pipe.recv_bytes()) for pipe in pipes]  # noqa: S301 - our own workers
                text = prom.render(prom.merge(parts))
            else:
                import prometheus_client as pc
                from prometheus_client import multiprocess

                reg = pc.CollectorRegistry()
                multiprocess.MultiProcessCollector(reg, path=mpdir)  # type: ignore[no-untyped-call]  # untyped upstream
                text = pc.generate_latest(reg).decode()
            times.append(time.perf_counter() - t0)
            size = len(text)
        for pipe in pipes:
            pipe.send("stop")
        for p in procs:
            p.join(10)
        times.sort()
        return {"update_us": round(update_us, 1), "scrape_ms_median": round(times[len(times) // 2] * 1e3, 1),
                "scrape_ms_max": round(times[-1] * 1e3, 1), "exposition_bytes": size}
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(mpdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--series", type=int, default=2000, help="distinct request series per worker")
    ap.add_argument("--scrapes", type=int, default=5)
    a = ap.parse_args()
    out = {"workers": a.workers, "series_per_worker": a.series,
           "nodemesh_prom": run("ours", a.workers, a.series, a.scrapes),
           "prometheus_client_multiprocess": run("theirs", a.workers, a.series, a.scrapes)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
