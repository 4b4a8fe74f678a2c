"""Republish the xDS snapshot when what nodes must trust changes by itself: the
trust bundle (a rotated-out root's overlap ends), the SVID revocation list (a
revocation made at another replica, an entry whose SVIDs have all expired)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from controlplane.ca import CertificateAuthority
    from controlplane.nodeids import SvidRevocations

log = logging.getLogger("nodemesh.controlplane.auth")


async def watch_trust_bundle(ca: CertificateAuthority, republish: Callable[[], None],
                             interval_s: float = 1.0) -> None:
    """A rotated-out root's overlap ending drops it from the bundle every agent
    holds: republish then."""
    last = tuple(ca.trust_bundle)
    while True:
        await asyncio.sleep(interval_s)
        now = tuple(ca.trust_bundle)
        if now != last:
            log.info("the trust bundle changed (%d -> %d roots): republishing", len(last), len(now))
            last = now
            republish()


async def watch_revocations(revocations: SvidRevocations, republish: Callable[[], None],
                            interval_s: float = 2.0) -> None:
    """Read the revocation list again every `interval_s` (a revocation made here
    is pushed at once by RevokeNode; one made at another replica reaches this
    replica's agents within this interval, as its 2-second stream re-check does)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            changed = await asyncio.to_thread(revocations.refresh)
        except Exception:
            log.exception("reading the SVID revocation list failed; the previous one stays in force")
            continue
        if changed:
            log.info("the SVID revocation list changed (%d revoked node(s)): republishing",
                     len(revocations.current()))
            republish()
