"""Operators and their credentials.

An operator (name, role ro|rw) holds credentials: bearer tokens
(`nmop1.<id>.<secret>`, only a SHA-256 of the secret is kept) and client
certificates (recorded by serial when signed). Each credential has an id, an
expiry (capped: MAX_OPERATOR_TTL_S) and can be revoked on its own (by id or,
for certificates, by serial); revoking an operator by name revokes every
credential it holds. A certificate is accepted only while its serial is
recorded and not revoked, so creating an operator of the same name again never
brings an old certificate back.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controlplane.records import Record, Records
from nodemesh.keyfiles import write_private

log = logging.getLogger("nodemesh.controlplane.operators")

ADMIN_TOKEN_FILE = "admin.token"  # noqa: S105 (a file name, not a secret)
BOOTSTRAP_OPERATOR = "admin"
OPERATOR_TOKEN_PREFIX = "nmop1"  # noqa: S105 (the public prefix that marks a token's kind)
DEFAULT_OPERATOR_TTL_S = 30 * 24 * 3600
MAX_OPERATOR_TTL_S = 90 * 24 * 3600
DEFAULT_OPERATOR_CERT_TTL_S = DEFAULT_OPERATOR_TTL_S
RO, RW = "ro", "rw"
ROLES = (RO, RW)
OPERATORS, CREDENTIALS = "operators", "operator_credentials"


@dataclass(frozen=True)
class Caller:
    kind: str  # local | operator | node | anonymous
    name: str = ""
    role: str = ""  # ro | rw for operators and local
    why_anonymous: str = ""  # what was presented and why it did not count
    credential: str = ""  # the operator credential id, or the node certificate's serial

    @property
    def principal(self) -> str:
        if self.kind == "local":
            return "local (unix socket)"
        if self.kind in ("operator", "node"):
            return f"{self.kind}/{self.name}"
        return "anonymous"


class OperatorError(ValueError):
    """A bad operator request; the message names the field."""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def cert_credential_id(serial_hex: str) -> str:
    return f"cert-{serial_hex.lower()}"


def clamp_operator_ttl(ttl_s: int) -> int:
    if ttl_s < 0:
        raise OperatorError(f"ttl_seconds {ttl_s} must not be negative")
    if ttl_s > MAX_OPERATOR_TTL_S:
        raise OperatorError(f"ttl_seconds {ttl_s} exceeds the cap of {MAX_OPERATOR_TTL_S // 86400} days for "
                            "operator credentials")
    return ttl_s or DEFAULT_OPERATOR_TTL_S


class Operators:
    def __init__(self, records: Records | sqlite3.Connection, clock: Callable[[], float] = time.time) -> None:
        self._records = records if isinstance(records, Records) else Records(records)
        self._clock = clock

    @staticmethod
    def _check(name: str, role: str) -> None:
        if not name or len(name) > 63 or not all(c.isalnum() or c in "-_." for c in name):
            raise OperatorError(f"name {name!r} must be 1-63 letters, digits, '-', '_' or '.'")
        if role not in ROLES:
            raise OperatorError(f"role {role!r} must be one of {', '.join(ROLES)}")

    def count(self) -> int:
        return len(self._records.items(OPERATORS))

    def _upsert(self, name: str, role: str) -> None:
        now = self._clock()

        def change(old: Record | None) -> Record:
            # Re-creating a revoked operator makes it usable again for NEW credentials only.
            return {"name": name, "role": role, "created_unix": (old or {}).get("created_unix", now),
                    "revoked_unix": None}

        self._records.update(OPERATORS, name, change)

    def _add_credential(self, cred: Record) -> None:
        self._records.update(CREDENTIALS, cred["id"], lambda _old: cred)

    def create_token(self, name: str, role: str, ttl_s: int = 0) -> tuple[str, str, float]:
        """A new bearer token for `name`: (token, credential id, expiry). The
        operator's older tokens are revoked (one token per operator)."""
        self._check(name, role)
        ttl = clamp_operator_ttl(ttl_s)
        self._upsert(name, role)
        for cid, cred in self._records.items(CREDENTIALS):
            if cred.get("operator") == name and cred.get("kind") == "token" and not cred.get("revoked_unix"):
                self._revoke_id(cid, "replaced by a new token")
        token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        now = self._clock()
        self._add_credential({"id": token_id, "operator": name, "kind": "token", "token_sha256": _hash(secret),
                              "created_unix": now, "expires_unix": now + ttl, "revoked_unix": None})
        return f"{OPERATOR_TOKEN_PREFIX}.{token_id}.{secret}", token_id, now + ttl

    def register_cert(self, name: str, role: str, serial_hex: str, expires_unix: float) -> str:
        """Operator `name` may use the certificate with this serial; returns its credential id."""
        self._check(name, role)
        self._upsert(name, role)
        cid = cert_credential_id(serial_hex)
        self._add_credential({"id": cid, "operator": name, "kind": "cert", "serial": serial_hex.lower(),
                              "created_unix": self._clock(), "expires_unix": expires_unix, "revoked_unix": None})
        return cid

    def _revoke_id(self, cid: str, why: str = "") -> bool:
        now = self._clock()

        def change(old: Record | None) -> Record | None:
            if old is None or old.get("revoked_unix"):
                return None
            return {**old, "revoked_unix": now, "token_sha256": None, "revoked_why": why}

        return self._records.update(CREDENTIALS, cid, change) is not None

    def revoke(self, name: str) -> int:
        """Revoke operator `name` and every credential it holds; returns how many
        credentials (or 1 when only the operator record was live), 0 if none."""
        now = self._clock()
        was = self._records.update(OPERATORS, name, lambda old: None if old is None or old.get("revoked_unix")
                                   else {**old, "revoked_unix": now})
        n = sum(self._revoke_id(cid, "operator revoked") for cid, cred in self._records.items(CREDENTIALS)
                if cred.get("operator") == name)
        return n or (1 if was is not None else 0)

    def revoke_credential(self, cid: str) -> bool:
        return self._revoke_id(cid, "revoked by id")

    def revoke_serial(self, serial_hex: str) -> bool:
        return self._revoke_id(cert_credential_id(serial_hex.lower().removeprefix("0x")), "revoked by serial")

    def credential_owner(self, cid: str) -> str:
        cred = self._records.get(CREDENTIALS, cid)
        return str(cred.get("operator", "")) if cred else ""

    def _live(self, cred: Record | None, name: str | None, what: str) -> Caller:
        if cred is None:
            return Caller("anonymous", why_anonymous=f"the {what} is unknown to this control plane")
        if cred.get("revoked_unix"):
            return Caller("anonymous", why_anonymous=f"the {what} ({cred['id']}) was revoked at "
                          f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(float(cred['revoked_unix'])))}")
        if float(cred.get("expires_unix") or 0) <= self._clock():
            return Caller("anonymous", why_anonymous=f"the {what} ({cred['id']}) expired")
        owner = str(cred.get("operator", ""))
        if name is not None and owner != name:
            return Caller("anonymous", why_anonymous=f"the {what} belongs to operator {owner!r}, not {name!r}")
        op = self._records.get(OPERATORS, owner)
        if op is None or op.get("revoked_unix"):
            return Caller("anonymous", why_anonymous=f"operator {owner!r} is unknown or revoked")
        return Caller("operator", owner, str(op["role"]), credential=str(cred["id"]))

    def by_token(self, token: str) -> Caller:
        parts = token.strip().split(".")
        if len(parts) != 3 or parts[0] != OPERATOR_TOKEN_PREFIX or len(parts[1]) > 64:
            return Caller("anonymous", why_anonymous="the bearer token is not an operator token "
                                                     f"({OPERATOR_TOKEN_PREFIX}.<id>.<secret>)")
        cred = self._records.get(CREDENTIALS, parts[1])
        if cred is not None and not cred.get("revoked_unix") and (
                cred.get("kind") != "token"
                or not hmac.compare_digest(str(cred.get("token_sha256") or ""), _hash(parts[2]))):
            return Caller("anonymous", why_anonymous="the bearer token is unknown or revoked")
        return self._live(cred, None, "bearer token")

    def by_cert(self, name: str, serial_hex: str) -> Caller:
        return self._live(self._records.get(CREDENTIALS, cert_credential_id(serial_hex)), name,
                          f"certificate of operator {name!r} (serial {serial_hex[:16]})")

    def credentials(self) -> list[Record]:
        return [c for _, c in self._records.items(CREDENTIALS)]


def _replace_with(record: Record) -> Callable[[Record | None], Record]:
    return lambda _old: record


def migrate_legacy(db: sqlite3.Connection, operators: Operators, records: Records) -> int:
    """Bring the tokens of the older `operators` table (one token per operator,
    revocation by name) into credentials, so an existing bootstrap token keeps
    working. Certificates had no record of their serial and must be re-issued."""
    try:
        rows = db.execute("SELECT name, role, token_id, token_sha256, created_unix, revoked_unix FROM operators"
                          ).fetchall()
    except sqlite3.OperationalError:
        return 0
    n = 0
    now = time.time()
    for name, role, token_id, token_hash, created, revoked in rows:
        if records.get(OPERATORS, str(name)) is not None:
            continue
        operator = {"name": name, "role": role, "created_unix": created, "revoked_unix": revoked}
        records.update(OPERATORS, str(name), _replace_with(operator))
        if token_id and token_hash and not revoked:
            credential = {"id": token_id, "operator": name, "kind": "token", "token_sha256": token_hash,
                          "created_unix": created, "expires_unix": now + MAX_OPERATOR_TTL_S, "revoked_unix": None}
            records.update(CREDENTIALS, str(token_id), _replace_with(credential))
        n += 1
    if n:
        log.info("moved %d operators of the older operators table to per-credential records; operator "
                 "certificates issued before must be issued again", n)
    return n


def bootstrap_admin(state_dir: str, operators: Operators, audit: Any = None) -> str | None:
    """At the first start (no operator yet) make the rw operator `admin` and
    write its token to <state_dir>/admin.token (0600). Returns the path, if written."""
    if operators.count():
        return None
    path = os.path.join(state_dir, ADMIN_TOKEN_FILE)
    token, cid, expires = operators.create_token(BOOTSTRAP_OPERATOR, RW, MAX_OPERATOR_TTL_S)
    write_private(path, (token + "\n").encode())
    if audit is not None:
        audit.append("control plane", "bootstrap", f"operator {BOOTSTRAP_OPERATOR} (rw), token {cid} in {path}",
                     "ok")
    log.info("created the bootstrap operator %r; its token (%s, valid until %s) is in %s (mode 0600)",
             BOOTSTRAP_OPERATOR, cid, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)), path)
    return path
