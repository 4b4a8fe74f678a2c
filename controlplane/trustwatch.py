"""Republish the xDS snapshot when the trust bundle changes by itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from controlplane.ca import CertificateAuthority

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
