"""Load for the restart test, run inside a node as the client workload with
Debian's python3 (stdlib only): HELD keep-alive connections sending a request
every PERIOD seconds, and RATE new connections per second making one request
each, to HOST:PORT through the mesh, until the file STOP exists. Prints one JSON
object of counts at the end.

Counted as failures: a connect that fails or times out, a reset (ECONNRESET,
EPIPE, or EOF before a whole response: a half-answered request), a response
other than 200, a request not answered within the timeout. A response carrying
`Connection: close` followed by the close is graceful: the held connection is
opened again (counted in `held_graceful_closes`)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

TIMEOUT_S = 15.0


class Counts:
    def __init__(self) -> None:
        self.c: dict[str, int] = {}
        self.worst_s = 0.0
        self.errors: list[str] = []

    def inc(self, key: str, detail: str = "") -> None:
        self.c[key] = self.c.get(key, 0) + 1
        if detail and len(self.errors) < 20:
            self.errors.append(f"{time.strftime('%H:%M:%S')} {key}: {detail}")


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
                  close: bool) -> tuple[int, bool]:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: web\r\n{'Connection: close' if close else ''}\r\n\r\n"
                 .replace("\r\n\r\n\r\n", "\r\n\r\n").encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    await reader.readexactly(int(fields.get("content-length", "0")))
    return status, fields.get("connection", "").lower() == "close"


def classify(e: BaseException) -> str:
    if isinstance(e, asyncio.IncompleteReadError):
        return "reset"  # EOF before a whole response
    if isinstance(e, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(e, TimeoutError):
        return "timeout"
    return "error"


async def one_new(host: str, port: int, n: Counts, seq: int) -> None:
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT_S)
    except (OSError, TimeoutError) as e:
        n.inc("new_failed_connects", repr(e))
        return
    try:
        status, _ = await asyncio.wait_for(request(reader, writer, f"/new/{seq}", close=True), TIMEOUT_S)
        n.inc("new_ok" if status == 200 else "new_bad_status", "" if status == 200 else str(status))
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        n.inc(f"new_{classify(e)}", repr(e))
    finally:
        writer.close()
        n.worst_s = max(n.worst_s, time.monotonic() - t0)


async def held(host: str, port: int, n: Counts, period: float, stop: asyncio.Event, i: int) -> None:
    k = 0
    while not stop.is_set():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT_S)
        except (OSError, TimeoutError) as e:
            n.inc("held_failed_connects", repr(e))
            await asyncio.sleep(period)
            continue
        n.inc("held_connections")
        try:
            while not stop.is_set():
                k += 1
                t0 = time.monotonic()
                try:
                    status, close = await asyncio.wait_for(request(reader, writer, f"/held/{i}/{k}", False),
                                                           TIMEOUT_S)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                    n.inc(f"held_{classify(e)}", repr(e))
                    break
                n.worst_s = max(n.worst_s, time.monotonic() - t0)
                n.inc("held_ok" if status == 200 else "held_bad_status", "" if status == 200 else str(status))
                if close:
                    n.inc("held_graceful_closes")
                    break
                await asyncio.sleep(period)
        finally:
            writer.close()


async def main(host: str, port: int, rate: float, nheld: int, period: float, stopfile: str) -> Counts:
    n = Counts()
    stop = asyncio.Event()
    holders = [asyncio.create_task(held(host, port, n, period, stop, i)) for i in range(nheld)]
    news: set[asyncio.Task[None]] = set()
    t0 = time.monotonic()
    seq = 0
    while not os.path.exists(stopfile):
        seq += 1
        t = asyncio.create_task(one_new(host, port, n, seq))
        news.add(t)
        t.add_done_callback(news.discard)
        # On schedule: a slow loop catches up rather than lowering the rate.
        await asyncio.sleep(max(0.0, t0 + seq / rate - time.monotonic()))
    n.c["seconds"] = int(time.monotonic() - t0)
    n.c["new_attempted"] = seq
    stop.set()
    await asyncio.gather(*holders, *list(news))
    return n


if __name__ == "__main__":
    h, p, r, m, per, f = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), \
        sys.argv[6]
    counts = asyncio.run(main(h, p, r, m, per, f))
    print(json.dumps({**counts.c, "worst_s": round(counts.worst_s, 3), "errors": counts.errors}), flush=True)
