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

The workload certificates (SVIDs) the mesh CA signs for a node carry the node
and its issuance epoch in their serial (nodemesh/revocation.py); a revocation
moves the epoch on, and `revoked_nodes()` is the list every node receives over
xDS to refuse, at HBONE, the SVIDs of the epochs before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from controlplane.records import Records
from nodemesh.revocation import MAX_EPOCH, RevocationList, RevokedNode, trim

log = logging.getLogger("nodemesh.controlplane.auth")

MAX_SERIALS = 16  # valid certificates per node kept (renewals overlap by at most a few)
# How long past (revocation + longest SVID lifetime) an entry stays: an SVID signed
# while the revocation was being written, and peers whose clocks lag.
SVID_MARGIN_S = 300.0



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
    last_revoked_by: str = ""
    # The node's SVIDs carry this in their serial; SVIDs of lower epochs were
    # issued before its latest revocation and are refused at HBONE.
    svid_epoch: int = 0

    @classmethod
    def of(cls, name: str, d: Mapping[str, Any] | None) -> NodeIdentity:
        d = d or {}
        return cls(name=name, labels=dict(d.get("labels") or {}), join_address=str(d.get("join_address") or ""),
                   joined_unix=float(d.get("joined_unix") or 0), revoked_unix=float(d.get("revoked_unix") or 0),
                   revoked_by=str(d.get("revoked_by") or ""), serials=dict(d.get("serials") or {}),
                   revoked_serials=dict(d.get("revoked_serials") or {}),
                   last_revoked_unix=float(d.get("last_revoked_unix") or d.get("revoked_unix") or 0),
                   last_revoked_by=str(d.get("last_revoked_by") or d.get("revoked_by") or ""),
                   svid_epoch=int(d.get("svid_epoch") or 0))

    def to_dict(self) -> dict[str, Any]:
        return {"labels": dict(self.labels), "join_address": self.join_address, "joined_unix": self.joined_unix,
                "revoked_unix": self.revoked_unix, "revoked_by": self.revoked_by, "serials": dict(self.serials),
                "revoked_serials": dict(self.revoked_serials), "last_revoked_unix": self.last_revoked_unix,
                "last_revoked_by": self.last_revoked_by, "svid_epoch": self.svid_epoch}

    def revoked_svids(self, max_svid_ttl_s: float) -> RevokedNode | None:
        """The revocation list entry of this node, while SVIDs it covers may be valid."""
        if not self.svid_epoch or not self.last_revoked_unix:
            return None
        return RevokedNode(self.name, self.svid_epoch, self.last_revoked_unix, self.last_revoked_by,
                           self.last_revoked_unix + max_svid_ttl_s + SVID_MARGIN_S)


class NodeRevocation(NamedTuple):
    fresh: bool  # the node was not revoked before
    certificates: int  # node certificates refused from now on
    identity: NodeIdentity  # the record as written


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

    def revoke(self, name: str, by: str) -> NodeRevocation:
        """Revoke `name`: every certificate issued to it so far is refused from
        now on, node certificates here and its SVIDs at every node's HBONE port."""
        now = self._clock()
        result: list[Any] = [False, 0, None]

        def change(old: dict[str, Any] | None) -> dict[str, Any]:
            rec = NodeIdentity.of(name, old).to_dict()
            result[0] = not rec["revoked_unix"]
            result[1] = len(rec["serials"])
            rec["revoked_serials"] = _prune({**rec["revoked_serials"], **rec["serials"]}, now)
            rec["serials"] = {}
            rec["last_revoked_unix"], rec["last_revoked_by"] = now, by
            # Every SVID issued so far (or being signed now) has a lower epoch: peers refuse them.
            rec["svid_epoch"] = min(int(rec["svid_epoch"]) + 1, MAX_EPOCH)
            if not rec["revoked_unix"]:
                rec["revoked_unix"], rec["revoked_by"] = now, by
            result[2] = rec
            return rec

        # The record as written (a replica's mirror of a shared store may not show it yet).
        written = self._records.update(self.TABLE, name, change)
        return NodeRevocation(bool(result[0]), int(result[1]), NodeIdentity.of(name, written or result[2]))

    def revoked_nodes(self, max_svid_ttl_s: float) -> list[RevokedNode]:
        """Every node whose SVIDs issued before its latest revocation may still be
        valid: what peers must refuse (nodemesh/revocation.py)."""
        now = self._clock()
        out = []
        for rec in self.all():
            entry = rec.revoked_svids(max_svid_ttl_s)
            if entry is not None and entry.until_unix > now:
                out.append(entry)
        return out


class SvidRevocations:
    """The revocation list the xDS snapshot carries (MeshConfig revoked_nodes),
    as last read from the node identity records (SQLite, or etcd shared by the
    replicas). refresh() reads it again: after a revocation here (which
    note()s its entry at once, before a replica's mirror shows it) and every
    few seconds, for revocations made at other replicas and entries that expire."""

    def __init__(self, nodes: NodeIdentities, max_svid_ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._nodes = nodes
        self._ttl = float(max_svid_ttl_s)
        self._clock = clock
        self._noted: dict[str, RevokedNode] = {}
        self._list = RevocationList()
        self._lock = threading.Lock()  # refresh() runs off the event loop too (controlplane/trustwatch.py)
        self.refresh()

    def current(self) -> RevocationList:
        return self._list

    def note(self, identity: NodeIdentity) -> bool:
        """A revocation just written here: in the list now. True if that changed it."""
        entry = identity.revoked_svids(self._ttl)
        with self._lock:
            if entry is not None:
                self._noted[entry.node] = entry
            return self._refresh()

    def refresh(self) -> bool:
        """Read the records again; True if the list changed."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> bool:
        now = self._clock()
        entries = {e.node: e for e in self._nodes.revoked_nodes(self._ttl)}
        for name, e in list(self._noted.items()):
            have = entries.get(name)
            if have is not None and have.epoch >= e.epoch:
                del self._noted[name]  # the records show it (or a later one)
            elif e.until_unix > now:
                entries[name] = e
        kept, dropped = trim(entries.values(), now)
        if dropped:
            log.warning("%d revoked node(s) left out of the SVID revocation list (at most %d entries): their "
                        "SVIDs issued before the revocation are accepted again until they expire", dropped,
                        len(kept))
        new = RevocationList.of(kept)
        changed = new != self._list
        self._list = new
        return changed
