"""The rollout controller: runs in the control plane, drives every Rollout
through controlplane/rollout/machine.py, and keeps each one's state (step,
readings, decisions with reasons, retirement) in the Rollout's status in the
store, so a restarted control plane resumes where it was.

Weights reach the data plane through the ordinary xDS path: the snapshot
publisher rebuilds on every store change and reads `splits()` (the weights each
Rollout's status implies). Several replicas on one store: only the elected
replica runs the controller (controlplane/leader.py, `run_while_leader`), and
each Rollout's status also carries a driver lease (`status.driver`), taken and
renewed only by a compare-and-set write (`Store.apply_planned` re-reads the
resource and writes only if nobody wrote it since). The lease fences the short
window in which a deposed leader has not yet learnt it lost: exactly one replica
writes a rollout's state, and another takes over once the lease lapses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from controlplane.nodes import RegisteredNode
from controlplane.rollout import machine
from controlplane.rollout.readings import Readings, Snapshot, interval_stats
from controlplane.store import Put, Store, StoredResource, StoreError
from controlplane.xds.subsets import VersionSplit
from nodemesh import model
from nodemesh.rolloutspec import KIND_ROLLOUT, Rollout

log = logging.getLogger("nodemesh.controlplane.rollout")

TICK_S = 0.25
LEASE_S = 6.0  # a driver that has not renewed for this long is replaced


def load(store: Store) -> list[tuple[Rollout, StoredResource]]:
    out = []
    items, _ = store.list(KIND_ROLLOUT)
    for r in items:
        try:
            obj = model.object_from_spec(r.kind, r.namespace, r.name, r.spec(), dict(r.labels))
        except model.ValidationError as e:
            log.warning("stored Rollout %s/%s no longer validates, ignoring it: %s", r.namespace, r.name, e)
            continue
        if not isinstance(obj, Rollout):
            raise TypeError(f"stored Rollout {r.namespace}/{r.name} parsed as {type(obj).__name__}")
        out.append((obj, r))
    return out


def split_of(ro: Rollout, status: dict[str, Any]) -> VersionSplit:
    """What a Rollout in this status asks of the data plane. Before the controller
    has started the run (or after the spec changed), all traffic stays on stable."""
    if status.get("run") != ro.run_id:
        return VersionSplit(ro.service_key, ro.version_label, ((ro.stable, 100), (ro.candidate, 0)))
    w = machine.weight(ro, status)
    ret = status.get("retirement") or {}
    retired = (str(ret["version"]),) if ret.get("state") == "Retired" and ret.get("version") else ()
    return VersionSplit(ro.service_key, ro.version_label, ((ro.stable, 100 - w), (ro.candidate, w)), retired)


def splits(store: Store) -> list[VersionSplit]:
    """Every Rollout's split, for the snapshot build."""
    return [split_of(ro, r.status()) for ro, r in load(store)]


def summaries(store: Store) -> list[dict[str, Any]]:
    """What the mesh view shows per Rollout: versions, phase, weights, the last reading."""
    out = []
    for ro, r in load(store):
        st = dict(r.status())
        readings = st.get("readings")
        out.append({"key": ro.key, "service": ro.service_key, "stable": ro.stable, "candidate": ro.candidate,
                    "phase": st.get("phase", "Pending") if st.get("run") == ro.run_id else "Pending",
                    "weight": split_of(ro, st).weights[1][1], "step": st.get("step", 0),
                    "reason": st.get("reason", ""), "reading": readings[-1] if isinstance(readings, list) and
                    readings else None, "retirement": st.get("retirement")})
    return out


def version_workloads(nodes: Sequence[RegisteredNode], services: dict[str, Any], ro: Rollout,
                      version: str) -> set[str]:
    svc = services.get(ro.service_key)
    if svc is None:
        return set()
    return {w.key for n in nodes for w in n.workloads
            if svc.selects(w.namespace, w.label_map) and w.label_map.get(ro.version_label) == version}


@dataclass
class _Baseline:
    run: str
    at: float
    cand: Snapshot
    stable: Snapshot
    loser: Snapshot | None = None


class RolloutController:
    def __init__(self, store: Store, nodes: Callable[[], Sequence[RegisteredNode]],
                 services: Callable[[], dict[str, Any]], readings: Readings, *, registry: Any = None,
                 clock: Callable[[], float] = time.time, replica_id: str = "") -> None:
        self._store = store
        self._nodes = nodes
        self._services = services
        self.readings = readings
        self._clock = clock
        self.id = replica_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._base: dict[str, _Baseline] = {}
        self.ticks = 0
        self._step_gauge = self._decisions = self._weight_gauge = None
        if registry is not None:
            self._step_gauge = registry.gauge("nodemesh_rollout_step",
                                              "The step a rollout is on (1-based; 0 once it ended).", ("rollout",))
            self._weight_gauge = registry.gauge("nodemesh_rollout_candidate_weight_percent",
                                                "The candidate version's share of traffic (percent).", ("rollout",))
            self._decisions = registry.counter("nodemesh_rollout_decisions_total",
                                               "Decisions rollouts took, by decision and reason code.",
                                               ("decision", "reason"))

    async def run(self, tick_s: float = TICK_S) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                # A bug or a store outage must not stop every rollout for good; the next tick retries.
                log.exception("rollout controller tick failed")
            await asyncio.sleep(tick_s)

    def tick(self) -> None:
        self.ticks += 1
        now = self._clock()
        services = self._services()
        nodes = self._nodes()
        seen = set()
        for ro, res in load(self._store):
            seen.add(ro.key)
            try:
                self._drive(ro, res, now, nodes, services)
            except StoreError as e:
                log.warning("rollout %s: cannot write its state (%s); retrying", ro.key, e)
            except Exception:
                # One rollout's bug must not stall the others; this one is retried next tick.
                log.exception("rollout %s: tick failed", ro.key)
        for key in [k for k in self._base if k not in seen]:
            del self._base[key]

    def _holds(self, status: dict[str, Any], now: float) -> bool:
        d = status.get("driver") or {}
        return not d or d.get("id") == self.id or float(d.get("until", 0)) < now

    def _drive(self, ro: Rollout, res: StoredResource, now: float, nodes: Sequence[RegisteredNode],
               services: dict[str, Any]) -> None:
        status: dict[str, Any] = dict(res.status())
        if not self._holds(status, now):
            self._base.pop(ro.key, None)  # another replica drives it; our baselines go stale
            return
        cand = stable = None
        loser_traffic = None
        base = self._base.get(ro.key)
        codes = ro.analysis.grpc_failure_codes
        buckets = self.readings.buckets
        if base is not None and base.run != status.get("run"):
            base = None
        if machine.analysis_due(ro, status, now):
            c_now = self.readings.version(ro.service_key, version_workloads(nodes, services, ro, ro.candidate), codes)
            s_now = self.readings.version(ro.service_key, version_workloads(nodes, services, ro, ro.stable), codes)
            if base is not None and now - base.at >= ro.analysis.interval_s / 2:
                cand = interval_stats(c_now, base.cand, buckets)[0]
                stable = interval_stats(s_now, base.stable, buckets)[0]
            if base is None or cand is not None:
                base = self._base[ro.key] = _Baseline(str(status.get("run")), now, c_now, s_now)
        elif status.get("phase") in machine.CONCLUDED and (status.get("retirement") or {}).get("state") == "Waiting":
            loser = machine.losing_version(ro, status)
            l_now = self.readings.version(ro.service_key, version_workloads(nodes, services, ro, loser), codes)
            if base is None or base.loser is None:
                self._base[ro.key] = _Baseline(str(status.get("run")), now, {}, {}, l_now)
            elif now - base.at >= ro.analysis.interval_s:
                loser_traffic = interval_stats(l_now, base.loser, buckets)[1]
                self._base[ro.key] = _Baseline(str(status.get("run")), now, {}, {}, l_now)
        new, decisions, set_paused = machine.advance(ro, status, now, cand, stable, loser_traffic)
        if new.get("run") != status.get("run"):
            self._base.pop(ro.key, None)
        if any(d.decision in ("start", "step", "resume") for d in decisions):
            # The next analysis measures from this moment: the new weight's first interval.
            self._base[ro.key] = _Baseline(str(new.get("run")), now, self.readings.version(
                ro.service_key, version_workloads(nodes, services, ro, ro.candidate), codes), self.readings.version(
                ro.service_key, version_workloads(nodes, services, ro, ro.stable), codes))
        driver = status.get("driver") or {}
        renew = driver.get("id") != self.id or float(driver.get("until", 0)) - now < LEASE_S / 2
        if new == status and not renew and set_paused is None:
            self._metrics(ro, new, ())
            return
        new["driver"] = {"id": self.id, "until": round(now + LEASE_S, 3)}
        spec = ro.spec()
        if set_paused is not None:
            spec["paused"] = set_paused
        if self._write(res, spec, new):
            self._metrics(ro, new, decisions)
            for d in decisions:
                if d.decision not in ("pass", "inconclusive"):
                    log.info("rollout %s: %s (%s): %s", ro.key, d.decision, d.reason, d.detail)

    def _write(self, read: StoredResource, spec: dict[str, Any], status: dict[str, Any]) -> bool:
        """Compare-and-set: write only if the resource is still the version we read."""
        wrote: list[bool] = []

        def plan() -> list[Put]:
            cur = self._store.get(*read.ref)
            if cur is None or cur.resource_version != read.resource_version:
                wrote.clear()
                return []  # changed under us (an apply, another replica): decide again next tick
            wrote.append(True)
            return [Put(read.kind, read.namespace, read.name, json.dumps(spec), json.dumps(status), read.labels,
                        read.api_version)]

        self._store.apply_planned(plan)
        return bool(wrote)

    def _metrics(self, ro: Rollout, st: dict[str, Any], decisions: Sequence[machine.Decision]) -> None:
        if self._step_gauge is None or self._decisions is None or self._weight_gauge is None:
            return
        phase = st.get("phase")
        step = 0 if phase in machine.CONCLUDED else int(st.get("step", 0)) + 1
        self._step_gauge.set({"rollout": ro.key}, step)
        self._weight_gauge.set({"rollout": ro.key}, machine.weight(ro, st))
        for d in decisions:
            self._decisions.inc({"decision": d.decision, "reason": d.reason})
