"""Which workload certificates (SVIDs) peers must refuse because the node they
were issued to was revoked: the serial layout the mesh CA signs with, and the
revocation list every node receives over xDS (MeshConfig revoked_nodes).

A workload SVID's serial says which node it was issued to and in which of that
node's issuance epochs (controlplane/ca.py signs it so; controlplane/nodeids.py
keeps each node's epoch and moves it on at every revocation):

    bits 152..155  SERIAL_MAGIC (a serial in this layout)
    bits 104..151  node tag: the first 48 bits of SHA-256 over the node name
    bits  80..103  the node's issuance epoch when the SVID was signed
    bits   0..79   random

A revoked node has one entry, "refuse its SVIDs of epochs below E", so the list
holds one entry per node revoked within the longest SVID lifetime (an entry is
dropped once every SVID it covers has expired), whatever the number of SVIDs.
The check needs only the serial OpenSSL already reports for a peer
(`getpeercert()["serialNumber"]`): no certificate parsing per handshake.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

SERIAL_MAGIC = 0x9
_MAGIC_SHIFT, _TAG_SHIFT, _EPOCH_SHIFT = 152, 104, 80
TAG_BITS, EPOCH_BITS, RANDOM_BITS = 48, 24, 80
MAX_EPOCH = (1 << EPOCH_BITS) - 1
# Entries a revocation list may carry (one per node revoked within the longest
# SVID lifetime); beyond it the entries expiring first are dropped, and the
# control plane says so in its log.
MAX_REVOKED_NODES = 4096


class RevocationError(ValueError):
    """A revocation list entry that is not well formed; the message names the field."""


def node_tag(node: str) -> int:
    """The 48-bit tag of `node` in its SVIDs' serials."""
    return int.from_bytes(hashlib.sha256(b"nodemesh svid node\0" + node.encode()).digest()[:TAG_BITS // 8], "big")


def svid_serial(node: str, epoch: int) -> int:
    """A fresh serial for an SVID issued to `node` in issuance epoch `epoch`
    (positive, 156 bits: within RFC 5280's 20 octets, 80 of them random)."""
    if not 0 <= epoch <= MAX_EPOCH:
        raise RevocationError(f"issuance epoch {epoch} of node {node} is outside 0..{MAX_EPOCH}")
    return ((SERIAL_MAGIC << _MAGIC_SHIFT) | (node_tag(node) << _TAG_SHIFT) | (epoch << _EPOCH_SHIFT)
            | secrets.randbits(RANDOM_BITS))


def serial_origin(serial: int) -> tuple[int, int] | None:
    """(node tag, epoch) of a serial in the SVID layout; None for any other serial
    (certificates from other CAs, or issued before this layout)."""
    if serial >> _MAGIC_SHIFT != SERIAL_MAGIC:
        return None
    return (serial >> _TAG_SHIFT) & ((1 << TAG_BITS) - 1), (serial >> _EPOCH_SHIFT) & MAX_EPOCH


def parse_serial(text: str) -> int | None:
    """The serial as OpenSSL prints it (hex, any case, maybe a leading 0); None if not hex."""
    try:
        return int(text, 16)
    except (TypeError, ValueError):
        return None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass(frozen=True)
class RevokedNode:
    """SVIDs issued to `node` in an epoch below `epoch` are refused until `until_unix`
    (by then every one of them has expired)."""

    node: str
    epoch: int
    revoked_unix: float
    revoked_by: str
    until_unix: float

    @property
    def tag(self) -> int:
        return node_tag(self.node)

    def check(self) -> RevokedNode:
        if not self.node or len(self.node) > 253:
            raise RevocationError(f"revoked_nodes: node {self.node!r} must be a node name of 1 to 253 characters")
        if not 1 <= self.epoch <= MAX_EPOCH:
            raise RevocationError(f"revoked_nodes[{self.node}].epoch {self.epoch} must be in 1..{MAX_EPOCH}")
        if not 0 < self.revoked_unix <= self.until_unix:
            raise RevocationError(f"revoked_nodes[{self.node}]: revoked_unix {self.revoked_unix} must be positive "
                                  f"and not after until_unix {self.until_unix}")
        if len(self.revoked_by) > 512:
            raise RevocationError(f"revoked_nodes[{self.node}].revoked_by is longer than 512 characters")
        return self


@dataclass(frozen=True)
class RevocationList:
    """The revoked nodes every node holds, indexed by node tag."""

    entries: tuple[RevokedNode, ...] = ()
    _by_tag: Mapping[int, RevokedNode] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_tag", {e.tag: e for e in self.entries})

    @classmethod
    def of(cls, entries: Iterable[RevokedNode]) -> RevocationList:
        """Checked, one entry per node (the highest epoch), sorted by node name, at most
        MAX_REVOKED_NODES (raises RevocationError naming the first bad entry)."""
        best: dict[str, RevokedNode] = {}
        for e in entries:
            e.check()
            if e.node not in best or e.epoch > best[e.node].epoch:
                best[e.node] = e
        if len(best) > MAX_REVOKED_NODES:
            raise RevocationError(f"revoked_nodes: {len(best)} entries, at most {MAX_REVOKED_NODES}")
        return cls(tuple(sorted(best.values(), key=lambda e: e.node)))

    def __len__(self) -> int:
        return len(self.entries)

    def refusal(self, serial_hex: str, identity: str, now: float | None = None) -> str:
        """'' unless the certificate with this serial (as OpenSSL prints it) was
        issued to a revoked node before its revocation; then why it is refused."""
        if not self._by_tag:
            return ""
        serial = parse_serial(serial_hex)
        origin = serial_origin(serial) if serial is not None else None
        if origin is None:
            return ""
        entry = self._by_tag.get(origin[0])
        if entry is None or origin[1] >= entry.epoch:
            return ""
        if entry.until_unix <= (time.time() if now is None else now):
            return ""  # every certificate it covers has expired: the TLS check refuses them anyway
        return (f"certificate {format(serial, 'x')} of {identity or 'no SPIFFE ID'} was issued to node "
                f"{entry.node}, revoked at {_iso(entry.revoked_unix)} by {entry.revoked_by or 'an operator'}")


def trim(entries: Iterable[RevokedNode], now: float) -> tuple[list[RevokedNode], int]:
    """The entries still needed at `now`, newest revocations first up to
    MAX_REVOKED_NODES; and how many live ones did not fit."""
    live = sorted((e for e in entries if e.until_unix > now), key=lambda e: -e.revoked_unix)
    return live[:MAX_REVOKED_NODES], max(0, len(live) - MAX_REVOKED_NODES)
