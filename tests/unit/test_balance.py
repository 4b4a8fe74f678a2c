"""Peak-EWMA power-of-two-choices balancer with a fake clock and RNG."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from nodeagent.proxy.errors import NoHealthyEndpoint
from nodeagent.proxy.loadbalance import Balancer


@dataclass(frozen=True)
class Ep:
    ip: str
    port: int = 80


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_none_and_one_candidate() -> None:
    b = Balancer(clock=Clock(), rng=random.Random(1))
    with pytest.raises(NoHealthyEndpoint):
        b.pick([])
    only = Ep("10.0.0.1")
    assert b.pick([only]) is only


def test_slow_endpoint_chosen_rarely() -> None:
    clock = Clock()
    b = Balancer(clock=clock, rng=random.Random(7))
    fast, slow, mid = Ep("10.0.0.1"), Ep("10.0.0.2"), Ep("10.0.0.3")
    b.observe(fast, 0.001)
    b.observe(mid, 0.002)
    b.observe(slow, 0.500)
    counts = Counter(b.pick([fast, slow, mid]).ip for _ in range(3000))
    # p2c: the worst of three is only chosen if drawn... never, since it loses every pair.
    assert counts["10.0.0.2"] == 0
    assert counts["10.0.0.1"] > counts["10.0.0.3"] > 0


def test_outstanding_connections_raise_cost() -> None:
    b = Balancer(clock=Clock(), rng=random.Random(3))
    a, c = Ep("10.0.0.1"), Ep("10.0.0.2")
    b.observe(a, 0.010)
    b.observe(c, 0.010)
    for _ in range(3):
        b.start(a)
    assert b.outstanding(a) == 3 and b.cost(a) == pytest.approx(0.040)
    assert all(b.pick([a, c]) is c for _ in range(50))
    for _ in range(3):
        b.finish(a)
    b.finish(a)  # never below zero
    assert b.outstanding(a) == 0
    assert "10.0.0.1:80=ewma 10.0ms out 0" in repr(b)


def test_peak_then_decay_with_tau() -> None:
    clock = Clock()
    b = Balancer(clock=clock, tau_s=10.0, default_rtt_s=0.05)
    e = Ep("10.0.0.9")
    assert b.cost(e) == 0.05  # unseen: default RTT
    b.observe(e, 0.2)
    assert b.cost(e) == pytest.approx(0.2)  # above current: replaces at once
    clock.t += 10.0  # one tau later a fast sample pulls it down by 1 - 1/e
    b.observe(e, 0.0)
    assert b.cost(e) == pytest.approx(0.2 * 0.36788, rel=1e-3)
    b.observe(e, 0.0)  # no time passed: no decay at all
    assert b.cost(e) == pytest.approx(0.2 * 0.36788, rel=1e-3)


def test_unseen_endpoint_preferred_over_slow_one() -> None:
    b = Balancer(clock=Clock(), rng=random.Random(0), default_rtt_s=0.03)
    slow, new = Ep("10.0.0.1"), Ep("10.0.0.2")
    b.observe(slow, 1.0)
    assert all(b.pick([slow, new]) is new for _ in range(20))


def test_keyed_by_address_not_object() -> None:
    b = Balancer(clock=Clock())
    b.observe(Ep("10.0.0.1", 80), 0.3)
    assert b.cost(Ep("10.0.0.1", 80)) == pytest.approx(0.3)
    assert b.cost(Ep("10.0.0.1", 81)) == b.cost(Ep("10.9.9.9"))


def test_table_is_bounded() -> None:
    b = Balancer(clock=Clock(), max_entries=10)
    for i in range(100):
        b.observe(Ep(f"10.0.0.{i}"), 0.01)
    assert len(b._stats) <= 10


def test_new_endpoint_is_probed_beside_a_fast_one() -> None:
    b = Balancer(clock=Clock(), rng=random.Random(1), default_rtt_s=0.03)
    fast, new = Ep("10.0.0.1"), Ep("10.0.0.2")
    b.observe(fast, 0.001)
    # Compared as equals, the new replica wins about half the picks until measured.
    picks = [b.pick([fast, new]) is new for _ in range(200)]
    assert 50 < sum(picks) < 150


def test_idle_estimate_decays_so_a_once_slow_endpoint_is_retried() -> None:
    clock = Clock()
    b = Balancer(clock=clock, rng=random.Random(2), default_rtt_s=0.03, tau_s=10.0)
    was_slow, steady = Ep("10.0.0.1"), Ep("10.0.0.2")
    b.observe(was_slow, 0.050)
    b.observe(steady, 0.002)
    assert all(b.pick([was_slow, steady]) is steady for _ in range(20))
    clock.t += 60.0  # six time constants idle: 50 ms decays below 0.2 ms
    b.observe(steady, 0.002)
    assert b.pick([was_slow, steady]) is was_slow


def test_tie_is_not_biased_by_a_clock_that_moves_between_reads() -> None:
    class Ticking:
        t = 1000.0

        def __call__(self) -> float:
            self.t += 1e-6  # every read sees a later instant, as time.monotonic does
            return self.t

    b = Balancer(clock=Ticking(), rng=random.Random(3), default_rtt_s=0.03)
    known, new = Ep("10.0.0.1"), Ep("10.0.0.2")
    b.observe(known, 0.003)
    picks = [b.pick([known, new]) is new for _ in range(200)]
    assert 50 < sum(picks) < 150
