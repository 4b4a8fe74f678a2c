"""Where the control plane's security records live: small JSON records in
named tables (operators, credentials, node identities) and append-only
sequences (the audit chain). One interface, two backends: the control plane's
SQLite file (one control plane) and etcd (replicas; controlplane/store_etcd.py
subclasses Records). Every read-modify-write is atomic.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

Record = dict[str, Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS security_records (
    tbl TEXT NOT NULL,
    key TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (tbl, key)
);
CREATE TABLE IF NOT EXISTS security_log (
    tbl TEXT NOT NULL,
    seq INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (tbl, seq)
);
"""


class Records:
    """SQLite backend (its own connection to the control plane's file, WAL)."""

    blocking = False  # True where calls wait on the network (etcd): run them off the event loop

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock | None = None) -> None:
        self._db = db
        self._lock = lock or threading.Lock()
        with self._lock:
            db.executescript(_SCHEMA)

    def _txn(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn()
                self._db.execute("COMMIT")
                return out
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get(self, table: str, key: str) -> Record | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM security_records WHERE tbl = ? AND key = ?",
                                   (table, key)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def update(self, table: str, key: str, change: Callable[[Record | None], Record | None]) -> Record | None:
        """Atomically replace one record with change(old); None from change: no write."""
        def run() -> Record | None:
            row = self._db.execute("SELECT record FROM security_records WHERE tbl = ? AND key = ?",
                                   (table, key)).fetchone()
            new = change(None if row is None else dict(json.loads(row[0])))
            if new is not None:
                self._db.execute("INSERT INTO security_records (tbl, key, record) VALUES (?, ?, ?) "
                                 "ON CONFLICT(tbl, key) DO UPDATE SET record = excluded.record",
                                 (table, key, json.dumps(new, sort_keys=True)))
            return new

        result: Record | None = self._txn(run)
        return result

    def items(self, table: str) -> list[tuple[str, Record]]:
        with self._lock:
            rows = self._db.execute("SELECT key, record FROM security_records WHERE tbl = ? ORDER BY key",
                                    (table,)).fetchall()
        return [(str(k), dict(json.loads(r))) for k, r in rows]

    # ------------------------------------------------------------ append-only sequences

    def append(self, table: str, make: Callable[[Record | None], Record],
               head: tuple[str, str, Callable[[Record], Record]] | None = None) -> Record | None:
        """Append make(last record) with seq = last seq + 1, atomically (two
        writers never both link to the same predecessor); with `head` =
        (table, key, of), record of(new record) there in the same transaction.
        Returns the record (a backend that queues appends may return None)."""
        def run() -> Record:
            row = self._db.execute("SELECT record FROM security_log WHERE tbl = ? ORDER BY seq DESC LIMIT 1",
                                   (table,)).fetchone()
            last = None if row is None else dict(json.loads(row[0]))
            rec = make(last)
            self._db.execute("INSERT INTO security_log (tbl, seq, record) VALUES (?, ?, ?)",
                             (table, int(rec["seq"]), json.dumps(rec, sort_keys=True)))
            if head is not None:
                self._db.execute("INSERT INTO security_records (tbl, key, record) VALUES (?, ?, ?) "
                                 "ON CONFLICT(tbl, key) DO UPDATE SET record = excluded.record",
                                 (head[0], head[1], json.dumps(head[2](rec), sort_keys=True)))
            return rec

        result: Record = self._txn(run)
        return result

    def tail(self, table: str, limit: int) -> list[Record]:
        """The newest `limit` records, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT record FROM security_log WHERE tbl = ? ORDER BY seq DESC LIMIT ?",
                                    (table, limit)).fetchall()
        return [dict(json.loads(r[0])) for r in rows]

    def scan(self, table: str, after_seq: int, limit: int) -> list[Record]:
        """Records with seq > after_seq, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT record FROM security_log WHERE tbl = ? AND seq > ? ORDER BY seq "
                                    "LIMIT ?", (table, after_seq, limit)).fetchall()
        return [dict(json.loads(r[0])) for r in rows]

    def count(self, table: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM security_log WHERE tbl = ?", (table,)).fetchone()[0])

    def drop_upto(self, table: str, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM security_log WHERE tbl = ? AND seq <= ?", (table, seq))
