"""Fault injection: decide, per request, a delay and/or an abort by percentage."""

from __future__ import annotations

import random
from dataclasses import dataclass

from nodemesh.routespec import Fault


@dataclass(frozen=True)
class FaultDecision:
    delay_s: float = 0.0
    abort_status: int = 0
    abort_grpc_status: int = -1


def decide(fault: Fault | None, rng: random.Random | None = None) -> FaultDecision:
    if fault is None:
        return FaultDecision()
    r = rng or random
    delay = fault.delay_s if fault.delay_s and r.random() * 100 < fault.delay_percent else 0.0
    aborting = (fault.abort_status or fault.abort_grpc_status >= 0) and r.random() * 100 < fault.abort_percent
    return FaultDecision(delay, fault.abort_status if aborting else 0,
                         fault.abort_grpc_status if aborting else -1)
