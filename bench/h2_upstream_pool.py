"""Pooled h2c upstream connections (many requests on one HBONE CONNECT stream)
against one connection per request: sequential unary gRPC calls through two
node proxies on loopback (the harness of tests/unit/test_h2_stack.py).
Run: .venv/bin/python bench/h2_upstream_pool.py"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.unit import test_h2_stack as t  # noqa: E402 - after the path insert

N = 400


async def body(m: t.Mesh, per_request: bool) -> None:
    pool = m.a.l7.h2_upstreams
    pool.per_request = per_request
    call = m.channel.unary_unary("/test.Echo/Unary", *t._ident)

    def go() -> tuple[float, float]:
        call(b"warm", timeout=5)
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(N):
            call(b"x", timeout=5)
        return time.perf_counter() - t0, time.process_time() - cpu0

    wall, cpu = await asyncio.to_thread(go)
    print(f"{'per-request' if per_request else 'pooled':12s} {N} sequential unary calls: {wall / N * 1e6:.0f} us/call "
          f"wall, {cpu / N * 1e6:.0f} us/call CPU (whole process), conns opened {pool.opened}")


if __name__ == "__main__":
    for _round in range(3):
        for pr in (False, True):
            t.run(functools.partial(body, per_request=pr), [t.Backend("r0")])
