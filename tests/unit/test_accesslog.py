"""The access log writer (nodeagent/proxy/accesslog.py): records are serialized
and written together once the event-loop pass that finished them is over, in
order, one JSON line each; outside a loop a record is written at once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from nodeagent.proxy.accesslog import FLUSH_RECORDS, AccessLog


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_records_of_one_loop_pass_are_written_together_after_it(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))

    async def body() -> None:
        for i in range(3):
            log.write({"n": i, "path": "/a"})
        assert path.read_text() == ""  # still this pass: nothing serialized or written yet
        await asyncio.sleep(0)
        assert [r["n"] for r in _lines(path)] == [0, 1, 2]

    asyncio.run(body())
    log.close()


def test_a_full_batch_is_written_at_once_and_outside_a_loop_immediately(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))

    async def body() -> None:
        for i in range(FLUSH_RECORDS):
            log.write({"n": i})
        assert len(_lines(path)) == FLUSH_RECORDS

    asyncio.run(body())
    log.write({"n": "late", "at": Path("/x")})  # no loop running: straight to the file (str() for the odd value)
    assert _lines(path)[-1] == {"n": "late", "at": "/x"}
    log.close()
