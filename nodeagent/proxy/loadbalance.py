"""Endpoint choice, pure (clock and RNG injected; the caller filters health and
locality): the default, power of two choices over a peak-EWMA of latency
weighted by outstanding work (Linkerd's algorithm, `Balancer`, state per
worker keyed by endpoint (ip, port)), and the other policies: round robin,
least request (P2C over outstanding requests), and consistent hashing (ring
hash and Maglev) on a request key."""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .errors import NoHealthyEndpoint

DEFAULT_RTT_S = 0.030  # what an endpoint we never measured is assumed to cost
DEFAULT_TAU_S = 10.0


class HasAddress(Protocol):
    @property
    def ip(self) -> str: ...
    @property
    def port(self) -> int: ...


E = TypeVar("E", bound=HasAddress)


@dataclass
class _Stats:
    ewma_s: float
    updated_at: float
    outstanding: int = 0
    measured: bool = False  # False: ewma_s is still the default guess


class Balancer:
    def __init__(
        self,
        *,
        default_rtt_s: float = DEFAULT_RTT_S,
        tau_s: float = DEFAULT_TAU_S,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        max_entries: int = 65536,
    ) -> None:
        if tau_s <= 0:
            raise ValueError(f"tau_s must be > 0, got {tau_s}")
        self._default = default_rtt_s
        self._tau = tau_s
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._max = max_entries
        self._stats: dict[tuple[str, int], _Stats] = {}

    def _get(self, key: tuple[str, int]) -> _Stats:
        st = self._stats.get(key)
        if st is None:
            if len(self._stats) >= self._max:
                self._evict()
            st = self._stats[key] = _Stats(self._default, self._clock())
        return st

    def _evict(self) -> None:
        # Forget idle endpoints, least recently updated first, so a churning mesh
        # cannot grow this table without bound.
        idle = sorted((st.updated_at, k) for k, st in self._stats.items() if st.outstanding == 0)
        for _, k in idle[: max(1, len(idle) // 2)]:
            del self._stats[k]

    def observe(self, endpoint: HasAddress, rtt_s: float) -> None:
        """Record one connect latency sample (or a failure penalty)."""
        st = self._get((endpoint.ip, endpoint.port))
        now = self._clock()
        if rtt_s > st.ewma_s or not st.measured:
            st.ewma_s = rtt_s  # peak: react to a slowdown at once; a first sample replaces the guess
        else:
            w = math.exp(-max(0.0, now - st.updated_at) / self._tau)
            st.ewma_s = st.ewma_s * w + rtt_s * (1.0 - w)
        st.updated_at = now
        st.measured = True

    def start(self, endpoint: HasAddress) -> None:
        self._get((endpoint.ip, endpoint.port)).outstanding += 1

    def finish(self, endpoint: HasAddress) -> None:
        st = self._stats.get((endpoint.ip, endpoint.port))
        if st is not None and st.outstanding > 0:
            st.outstanding -= 1

    def _estimate(self, st: _Stats | None, now: float) -> float | None:
        """The latency estimate now, None if never measured. Like tower's PeakEwma, an
        idle estimate decays with time, so an endpoint that was slow once is probed
        again later instead of being starved for ever."""
        if st is None or not st.measured:
            return None
        return st.ewma_s * math.exp(-max(0.0, now - st.updated_at) / self._tau)

    def cost(self, endpoint: HasAddress, peer_estimate: float | None = None,
             now: float | None = None) -> float:
        """ewma × (outstanding + 1). An endpoint never measured is assumed as fast as
        the one it is compared with, or the default guess if that is lower: a new
        replica gets probed at once rather than waiting for the others to slow down."""
        st = self._stats.get((endpoint.ip, endpoint.port))
        est = self._estimate(st, self._clock() if now is None else now)
        if est is None:
            est = self._default if peer_estimate is None else min(peer_estimate, self._default)
        return est * ((st.outstanding if st else 0) + 1)

    def outstanding(self, endpoint: HasAddress) -> int:
        st = self._stats.get((endpoint.ip, endpoint.port))
        return st.outstanding if st else 0

    def pick(self, candidates: Sequence[E]) -> E:
        n = len(candidates)
        if n == 0:
            raise NoHealthyEndpoint("no candidate endpoints to choose from")
        if n == 1:
            return candidates[0]
        i, j = self._rng.sample(range(n), 2)
        a, b = candidates[i], candidates[j]
        now = self._clock()  # one instant for both, so decay cannot bias a tie
        est_a = self._estimate(self._stats.get((a.ip, a.port)), now)
        est_b = self._estimate(self._stats.get((b.ip, b.port)), now)
        cost_a, cost_b = self.cost(a, est_b, now), self.cost(b, est_a, now)
        if cost_a == cost_b:
            return a  # a and b are already a random pair in random order
        return a if cost_a < cost_b else b

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{ip}:{port}=ewma {st.ewma_s * 1000:.1f}ms out {st.outstanding}"
            for (ip, port), st in sorted(self._stats.items())
        )
        return f"<Balancer p2c peak-ewma tau={self._tau}s [{parts}]>"



def _h(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


def _key(e: HasAddress) -> str:
    return f"{e.ip}:{e.port}"


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[E]) -> E:
        e = candidates[self._next % len(candidates)]
        self._next += 1
        return e


class LeastRequest:
    """Two random choices, the one with fewer outstanding requests."""

    def __init__(self, outstanding: Callable[[HasAddress], int], rng: random.Random | None = None) -> None:
        self._out = outstanding
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[E]) -> E:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return a if self._out(a) <= self._out(b) else b


class RingHash:
    """Each endpoint at `replicas` points of a 64-bit ring; a key goes to the next point."""

    def __init__(self, replicas: int = 100) -> None:
        self._replicas = replicas
        self._for: tuple[str, ...] = ()
        self._points: list[int] = []
        self._owners: list[int] = []

    def _build(self, keys: tuple[str, ...]) -> None:
        pts = sorted((_h(f"{k}#{i}"), n) for n, k in enumerate(keys) for i in range(self._replicas))
        self._points = [p for p, _ in pts]
        self._owners = [n for _, n in pts]
        self._for = keys

    def pick(self, candidates: Sequence[E], key: str) -> E:
        keys = tuple(_key(e) for e in candidates)
        if keys != self._for:
            self._build(keys)
        i = bisect.bisect(self._points, _h(key)) % len(self._points)
        return candidates[self._owners[i]]


class Maglev:
    """Maglev lookup table (prime size M): near-even spread, minimal disruption."""

    def __init__(self, table_size: int = 65537) -> None:
        self._m = table_size
        self._for: tuple[str, ...] = ()
        self._table: list[int] = []

    def _build(self, keys: tuple[str, ...]) -> None:
        m, n = self._m, len(keys)
        offsets = [_h("o" + k) % m for k in keys]
        skips = [_h("s" + k) % (m - 1) + 1 for k in keys]
        nxt = [0] * n
        table = [-1] * m
        filled = 0
        while filled < m:
            for i in range(n):
                c = (offsets[i] + nxt[i] * skips[i]) % m
                while table[c] >= 0:
                    nxt[i] += 1
                    c = (offsets[i] + nxt[i] * skips[i]) % m
                table[c] = i
                nxt[i] += 1
                filled += 1
                if filled == m:
                    break
        self._table = table
        self._for = keys

    def pick(self, candidates: Sequence[E], key: str) -> E:
        keys = tuple(_key(e) for e in candidates)
        if keys != self._for:
            self._build(keys)
        return candidates[self._table[_h(key) % self._m]]


def locality_tier(candidates: Sequence[E], node: str, zone: str) -> list[E]:
    """Same node if any, else same zone if any, else all (failover)."""
    same_node = [e for e in candidates if getattr(e, "node", None) == node]
    if same_node:
        return same_node
    if zone:
        same_zone = [e for e in candidates if getattr(e, "zone", "") == zone]
        if same_zone:
            return same_zone
    return list(candidates)
