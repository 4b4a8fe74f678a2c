"""Load-balancing policies other than the default P2C peak-EWMA (balance.py):
round robin, least request (P2C over outstanding requests), random, and
consistent hashing (ring hash and Maglev) on a request key. Pure; RNG injected.
Each picks from a candidate list; the caller filters health and locality."""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from .balance import HasAddress

E = TypeVar("E", bound=HasAddress)


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
