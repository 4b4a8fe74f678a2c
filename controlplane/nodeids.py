"""What the control plane knows about each node's identity, as opposed to what
the node says: the labels the operator set for it (join token), the address
it joined from, the serials of the node certificates issued to it, and
whether an operator revoked it.

A node certificate opens the control plane only while its serial is listed
here as valid for its node (an allow list): a revoked node's certificates,
and any certificate this control plane has no record of, are refused at
once, whatever their dates say. A join with a new token (the operator's act)
lifts a revocation for certificates issued from then on; serials revoked
before stay refused until they expire.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.records import Records

MAX_SERIALS = 16  # valid certificates per node kept (renewals overlap by at most a few)



@dataclass(frozen=True)
class NodeIdentity:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    join_address: str = ""
    joined_unix: float = 0.0
    revoked_unix: float = 0.0
    revoked_by: str = ""
    serials: Mapping[str, float] = field(default_factory=dict)  # hex serial -> not after (unix)
    revoked_serials: Mapping[str, float] = field(default_factory=dict)
    # The latest revocation, kept when a join lifts it: join tokens made before
    # it stay void for good (controlplane/tokens.py), whoever holds them.
    last_revoked_unix: float = 0.0

    @classmethod
    def of(cls, name: str, d: Mapping[str, Any] | None) -> NodeIdentity:
        d = d or {}
        return cls(name=name, labels=dict(d.get("labels") or {}), join_address=str(d.get("join_address") or ""),
                   joined_unix=float(d.get("joined_unix") or 0), revoked_unix=float(d.get("revoked_unix") or 0),
                   revoked_by=str(d.get("revoked_by") or ""), serials=dict(d.get("serials") or {}),
                   revoked_serials=dict(d.get("revoked_serials") or {}),
                   last_revoked_unix=float(d.get("last_revoked_unix") or d.get("revoked_unix") or 0))

    def to_dict(self) -> dict[str, Any]:
        return {"labels": dict(self.labels), "join_address": self.join_address, "joined_unix": self.joined_unix,
                "revoked_unix": self.revoked_unix, "revoked_by": self.revoked_by, "serials": dict(self.serials),
                "revoked_serials": dict(self.revoked_serials), "last_revoked_unix": self.last_revoked_unix}


def _prune(serials: Mapping[str, float], now: float) -> dict[str, float]:
    live = {s: t for s, t in serials.items() if t > now}
    # Newest (latest expiry) first when there are too many.
    return dict(sorted(live.items(), key=lambda kv: -kv[1])[:MAX_SERIALS])


class NodeIdentities:
    """Node identity records in `records` (controlplane/records.py: SQLite or etcd)."""

    TABLE = "node_identities"

    def __init__(self, records: Records, clock: Callable[[], float] = time.time) -> None:
        self._records = records
        self._clock = clock

    def _get(self, name: str) -> dict[str, Any] | None:
        return self._records.get(self.TABLE, name)

    def _update(self, name: str, change: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> None:
        self._records.update(self.TABLE, name, change)

    def _names(self) -> list[str]:
        return [k for k, _ in self._records.items(self.TABLE)]

    # ------------------------------------------------------------ reads

    def get(self, name: str) -> NodeIdentity:
        return NodeIdentity.of(name, self._get(name))

    def all(self) -> list[NodeIdentity]:
        return [self.get(n) for n in self._names()]

    def certificate_refused(self, name: str, serial: str) -> str:
        """'' when `serial` is a valid node certificate of `name`, else why not."""
        rec = self.get(name)
        now = self._clock()
        if serial in rec.revoked_serials or (rec.revoked_unix and serial not in rec.serials):
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.revoked_unix or now))
            return (f"node {name} was revoked at {when}{' by ' + rec.revoked_by if rec.revoked_by else ''}; its "
                    f"certificate {serial[:16]} is refused: the node must join again with a new token "
                    f"(`nodemesh token create --node {name}`)")
        expiry = rec.serials.get(serial)
        if expiry is None or expiry <= now:
            return (f"the node certificate {serial[:16]} of node {name} is not one this control plane issued, or it "
                    "expired; join again with a new token")
        return ""

    # ------------------------------------------------------------ writes

    def set_labels(self, name: str, labels: Mapping[str, str]) -> None:
        """The operator's labels for `name` (set with its join token)."""
        def change(old: dict[str, Any] | None) -> dict[str, Any]:
            rec = NodeIdentity.of(name, old)
            return {**rec.to_dict(), "labels": dict(labels)}

        self._update(name, change)

    def issued(self, name: str, serial: str, not_after: float, *, join_address: str | None = None) -> None:
        """A node certificate was issued: at a join (join_address set: lifts a
        revocation, records the attested address) or a renewal."""
        now = self._clock()

        def change(old: dict[str, Any] | None) -> dict[str, Any]:
            rec = NodeIdentity.of(name, old).to_dict()
            rec["serials"] = _prune({**rec["serials"], serial: not_after}, now)
            rec["revoked_serials"] = _prune(rec["revoked_serials"], now)
            if join_address is not None:
                rec.update(join_address=join_address, joined_unix=now, revoked_unix=0.0, revoked_by="")
            return rec

        self._update(name, change)

    def revoke(self, name: str, by: str) -> tuple[bool, int]:
        """Revoke `name`: every certificate issued to it so far is refused from
        now on. Returns (whether it was not revoked before, certificates revoked)."""
        now = self._clock()
        result = [False, 0]

        def change(old: dict[str, Any] | None) -> dict[str, Any]:
            rec = NodeIdentity.of(name, old).to_dict()
            result[0] = not rec["revoked_unix"]
            result[1] = len(rec["serials"])
            rec["revoked_serials"] = _prune({**rec["revoked_serials"], **rec["serials"]}, now)
            rec["serials"] = {}
            rec["last_revoked_unix"] = now
            if not rec["revoked_unix"]:
                rec["revoked_unix"], rec["revoked_by"] = now, by
            return rec

        self._update(name, change)
        return bool(result[0]), int(result[1])
