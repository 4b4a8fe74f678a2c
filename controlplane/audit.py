"""The audit log of changes, and the separate, bounded account of refused calls.

Change records (every admitted call that changes something: config, tokens,
operators, node revocations, root rotations) are hash-chained: each record's
`hash` is an HMAC-SHA256, keyed with a key derived from the control-plane CA's
private key, over the previous record's hash and this record's fields. The
chain's head (last seq and hash) is kept beside it under its own HMAC, and an
anchor replaces the records pruned at the old end. `verify()` walks the chain:
an edited field, a deleted or inserted row, a truncated tail or a forged head
is reported with the seq where the chain breaks. Someone who can write the
database but does not hold the CA key cannot repair the chain after an edit.

Refused calls never enter the chain (so a flood of anonymous calls cannot
push real history out): RefusalLog counts them per (method, code, caller),
keeps a rate-limited sample of recent ones, and rate-limits their log lines.
All of it is bounded in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controlplane.records import Record, Records
from nodemesh.v1 import mesh_pb2

log = logging.getLogger("nodemesh.controlplane.audit")

AUDIT_KEEP = 100_000  # change records kept; older ones are pruned behind an anchor
PRUNE_SLACK = 1_000
CHAIN = "audit"
HEAD_TABLE = "audit_head"
GENESIS = "0" * 64
_FIELDS = ("seq", "unix_ms", "principal", "action", "detail", "outcome", "prev")


def audit_key(ca_key_pem: bytes) -> bytes:
    """The chain's HMAC key, derived from the control-plane CA's private key (so
    every replica sharing that CA derives the same key, and no extra secret
    file exists to leak)."""
    return hmac.new(hashlib.sha256(ca_key_pem).digest(), b"nodemesh audit chain v1", hashlib.sha256).digest()


def _link(key: bytes, rec: Record) -> str:
    body = json.dumps({f: rec.get(f) for f in _FIELDS}, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _seal(key: bytes, what: str, seq: int, h: str) -> str:
    return hmac.new(key, f"{what}|{seq}|{h}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Verification:
    ok: bool
    records: int
    first_seq: int
    last_seq: int
    problem: str = ""


class AuditLog:
    def __init__(self, records: Records, key: bytes, clock: Callable[[], float] = time.time,
                 keep: int = AUDIT_KEEP) -> None:
        self._records = records
        self._key = key
        self._clock = clock
        self._keep = keep
        self._appended = 0

    def append(self, principal: str, action: str, detail: str, outcome: str) -> Record | None:
        ms = int(self._clock() * 1000)
        # Read before the append's transaction (which holds the records' lock); only an
        # empty chain (everything pruned) links to the anchor.
        anchor = self._records.get(HEAD_TABLE, "anchor") or {}

        def make(last: Record | None) -> Record:
            if last is None:
                seq, prev = int(anchor.get("seq", 0)) + 1, str(anchor.get("hash", GENESIS))
            else:
                seq, prev = int(last["seq"]) + 1, str(last["hash"])
            rec: Record = {"seq": seq, "unix_ms": ms, "principal": principal[:300], "action": action[:100],
                           "detail": detail[:2000], "outcome": outcome[:500], "prev": prev}
            rec["hash"] = _link(self._key, rec)
            return rec

        def sealed_head(rec: Record) -> Record:
            # Written in the append's own transaction: no window where the head lags.
            return {"seq": rec["seq"], "hash": rec["hash"], "seal": _seal(self._key, "head", rec["seq"], rec["hash"])}

        rec = self._records.append(CHAIN, make, (HEAD_TABLE, "head", sealed_head))
        self._appended += 1
        if self._appended % PRUNE_SLACK == 0 and not self._records.blocking:
            self._prune()  # not with etcd yet (docs/security.md "Limits"): the chain there is not pruned
        return rec

    def _prune(self) -> None:
        if self._records.count(CHAIN) > self._keep + PRUNE_SLACK:
            self._prune_to(self._keep)

    def _prune_to(self, keep: int) -> None:
        n = self._records.count(CHAIN)
        if n <= keep:
            return
        oldest = self._records.scan(CHAIN, -1, n - keep)
        last = oldest[-1]
        anchor = {"seq": last["seq"], "hash": last["hash"], "seal": _seal(self._key, "anchor", last["seq"],
                                                                           last["hash"])}
        # The anchor first: a crash between the two leaves records the anchor already covers.
        self._records.update(HEAD_TABLE, "anchor", lambda _old: anchor)
        self._records.drop_upto(CHAIN, int(last["seq"]))
        log.info("audit: pruned change records up to seq %d (kept %d)", last["seq"], keep)

    def entries(self, limit: int = 100) -> list[mesh_pb2.AuditEntry]:
        return [mesh_pb2.AuditEntry(unix_ms=r["unix_ms"], principal=r["principal"], action=r["action"],
                                    detail=r["detail"], outcome=r["outcome"], seq=r["seq"], hash=r["hash"])
                for r in self._records.tail(CHAIN, max(1, min(limit, 10_000)))]

    def verify(self) -> Verification:
        anchor = self._records.get(HEAD_TABLE, "anchor")
        head = self._records.get(HEAD_TABLE, "head")
        prev_seq, prev_hash = 0, GENESIS
        if anchor is not None:
            if not hmac.compare_digest(str(anchor.get("seal", "")),
                                       _seal(self._key, "anchor", int(anchor.get("seq", -1)),
                                             str(anchor.get("hash", "")))):
                return Verification(False, 0, 0, 0, "the chain's anchor (where pruned records ended) was edited: "
                                                    "its seal does not verify")
            prev_seq, prev_hash = int(anchor["seq"]), str(anchor["hash"])
        first, count = prev_seq + 1, 0
        while True:
            batch = self._records.scan(CHAIN, prev_seq, 5000)
            if not batch:
                break
            for rec in batch:
                seq = int(rec.get("seq", -1))
                if seq != prev_seq + 1:
                    return Verification(False, count, first, prev_seq,
                                        f"record(s) {prev_seq + 1}..{seq - 1} are missing: deleted from the chain")
                if rec.get("prev") != prev_hash:
                    return Verification(False, count, first, prev_seq,
                                        f"record {seq} does not link to record {prev_seq} (its prev hash differs): "
                                        "a record was replaced or inserted")
                if not hmac.compare_digest(str(rec.get("hash", "")), _link(self._key, rec)):
                    return Verification(False, count, first, prev_seq,
                                        f"record {seq} was edited: its hash does not match its content "
                                        f"({rec.get('principal')} {rec.get('action')} at {rec.get('unix_ms')})")
                prev_seq, prev_hash = seq, str(rec["hash"])
                count += 1
        if head is None:
            if count:
                return Verification(False, count, first, prev_seq, "the chain's head record is missing")
            return Verification(True, 0, first, prev_seq)
        if not hmac.compare_digest(str(head.get("seal", "")),
                                   _seal(self._key, "head", int(head.get("seq", -1)), str(head.get("hash", "")))):
            return Verification(False, count, first, prev_seq, "the chain's head was edited: its seal does not verify")
        if int(head["seq"]) > prev_seq:
            return Verification(False, count, first, prev_seq,
                                f"record(s) {prev_seq + 1}..{head['seq']} are missing: the newest records were "
                                "deleted (the head says the chain reaches further)")
        if int(head["seq"]) == prev_seq and head["hash"] != prev_hash:
            return Verification(False, count, first, prev_seq, f"record {prev_seq} differs from the one the head "
                                                               "sealed: it was replaced")
        return Verification(True, count, first, prev_seq)


# ---------------------------------------------------------------- refused calls

MAX_COUNT_KEYS = 1000
SAMPLES = 200
SAMPLE_RATE_PER_S = 5.0
LOG_EVERY_S = 10.0
NODE_REFUSALS = 10
MAX_NODES = 10_000


class RefusalLog:
    """Refused calls: counted, sampled and logged within fixed bounds."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.total = 0
        self.counts: dict[tuple[str, str, str], int] = {}
        self.samples: deque[mesh_pb2.AuditEntry] = deque(maxlen=SAMPLES)
        self._bucket = SAMPLE_RATE_PER_S
        self._bucket_at = clock()
        self._logged: dict[str, tuple[float, int]] = {}  # log key -> (last logged at, suppressed since)
        self.by_node: dict[str, deque[str]] = {}

    @staticmethod
    def _principal_key(principal: str) -> str:
        # Anonymous callers are one key however they present themselves (bounded).
        return principal if principal.startswith(("node/", "operator/", "local")) else "anonymous"

    def record(self, principal: str, method: str, code: str, message: str, peer: str = "") -> None:
        now = self._clock()
        short = method.rsplit("/", 1)[-1]
        who = self._principal_key(principal)
        with self._lock:
            self.total += 1
            key = (short, code, who)
            if key in self.counts or len(self.counts) < MAX_COUNT_KEYS:
                self.counts[key] = self.counts.get(key, 0) + 1
            else:
                other = ("(other)", "", "")
                self.counts[other] = self.counts.get(other, 0) + 1
            self._bucket = min(SAMPLE_RATE_PER_S, self._bucket + (now - self._bucket_at) * SAMPLE_RATE_PER_S)
            self._bucket_at = now
            if self._bucket >= 1.0:
                self._bucket -= 1.0
                self.samples.append(mesh_pb2.AuditEntry(unix_ms=int(now * 1000), principal=principal[:200],
                                                        action=short, detail=f"from {peer}"[:200],
                                                        outcome=f"{code}: {message}"[:500]))
            if who.startswith("node/"):
                node = who[len("node/"):]
                if node in self.by_node or len(self.by_node) < MAX_NODES:
                    stamp = time.strftime("%H:%M:%SZ", time.gmtime(now))
                    self.by_node.setdefault(node, deque(maxlen=NODE_REFUSALS)).appendleft(
                        f"{stamp} {short}: {message}"[:600])
            log_key = f"{short}|{who}"
            last, suppressed = self._logged.get(log_key, (float("-inf"), 0))
            if now - last < LOG_EVERY_S:
                if log_key in self._logged or len(self._logged) < MAX_COUNT_KEYS:
                    self._logged[log_key] = (last, suppressed + 1)
                return
            if log_key in self._logged or len(self._logged) < MAX_COUNT_KEYS:
                self._logged[log_key] = (now, 0)
        more = f" ({suppressed} more like it in the last {LOG_EVERY_S:.0f}s not logged)" if suppressed else ""
        log.warning("refused %s to %s (%s): %s%s", method, principal, peer, message, more)

    def node_refusals(self, node: str) -> list[str]:
        with self._lock:
            return list(self.by_node.get(node, ()))

    def response(self, limit: int = 50) -> mesh_pb2.RefusalsResponse:
        with self._lock:
            counts = sorted(self.counts.items(), key=lambda kv: -kv[1])
            samples = list(self.samples)[-max(1, min(limit, SAMPLES)):]
            return mesh_pb2.RefusalsResponse(
                total=self.total,
                counts=[mesh_pb2.RefusalCount(method=m, code=c, principal=p, count=n) for (m, c, p), n in counts],
                samples=list(reversed(samples)))


def describe(rec: Any) -> str:
    return f"#{rec.seq} {rec.principal} {rec.action} {rec.detail} -> {rec.outcome}"
