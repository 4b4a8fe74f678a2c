"""The rollout state machine, pure: (Rollout, status, now, the last interval's
readings) -> (new status, decisions). No I/O and no clock of its own, so it is
tested with a fake clock (tests/unit/test_rollout_machine.py); the controller
(controlplane/rollout/controller.py) persists the status it returns.

Phases: Progressing (stepping through the weights, judged every analysis
interval) · Paused (spec.paused, by the operator or by a failed analysis with
onFailure: Pause) · Promoted (the candidate takes all traffic) · RolledBack (the
stable version takes it all back). After Promoted/RolledBack the losing version
retires once expireAfter has passed and it has carried no traffic for
expiryGrace; never while it still receives traffic.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from nodemesh.rolloutspec import Rollout

PROGRESSING = "Progressing"
PAUSED = "Paused"
PROMOTED = "Promoted"
ROLLED_BACK = "RolledBack"
CONCLUDED = (PROMOTED, ROLLED_BACK)
MAX_READINGS = 60
MAX_DECISIONS = 60
MAX_HISTORY = 20

Status = dict[str, Any]


@dataclass(frozen=True)
class Stats:
    """One version's traffic over one analysis interval, as its callers' proxies saw it.
    `total` counts requests (or closed TCP connections on a TCP service)."""

    total: float = 0.0
    failures: float = 0.0
    p99_ms: float | None = None

    @property
    def success_rate(self) -> float | None:
        return None if self.total <= 0 else max(0.0, 1.0 - self.failures / self.total)

    def as_dict(self) -> dict[str, Any]:
        sr = self.success_rate
        return {"total": round(self.total, 3), "failures": round(self.failures, 3),
                "successRate": None if sr is None else round(sr, 4),
                "p99Ms": None if self.p99_ms is None else round(self.p99_ms, 2)}


@dataclass(frozen=True)
class Decision:
    decision: str  # start | step | pass | inconclusive | pause | resume | rollback | promote | retire
    reason: str  # a stable code (metrics label): analysis_passed, success_rate, latency, operator, ...
    detail: str  # the sentence operators read


def weight(ro: Rollout, st: Status) -> int:
    """The candidate's percent of traffic in this status."""
    phase = st.get("phase")
    if phase == PROMOTED:
        return 100
    if phase == ROLLED_BACK or not phase:
        return 0
    step = int(st.get("step", 0))
    return ro.weights[min(step, len(ro.weights) - 1)]


def losing_version(ro: Rollout, st: Status) -> str:
    return ro.stable if st.get("phase") == PROMOTED else ro.candidate if st.get("phase") == ROLLED_BACK else ""


def judge(ro: Rollout, cand: Stats) -> tuple[str, str, str]:
    """(verdict, reason code, sentence) of one interval's candidate readings."""
    a = ro.analysis
    if cand.total < max(1, a.min_requests):
        return "inconclusive", "too_few_requests", (f"{cand.total:g} requests to {ro.candidate} in the interval, "
                                                    f"fewer than minRequests {a.min_requests}: no verdict")
    sr = cand.success_rate or 0.0
    if sr < a.success_rate:
        return "fail", "success_rate", (f"success rate of {ro.candidate} {sr:.3f} is below the floor "
                                        f"{a.success_rate:g} ({cand.failures:g} of {cand.total:g} failed)")
    if a.p99_latency_ms and cand.p99_ms is not None and cand.p99_ms > a.p99_latency_ms:
        return "fail", "latency", (f"p99 latency of {ro.candidate} {cand.p99_ms:.1f} ms is above the ceiling "
                                   f"{a.p99_latency_ms:g} ms")
    return "pass", "analysis_passed", (f"{ro.candidate}: success rate {sr:.3f} >= {a.success_rate:g}"
                                       + (f", p99 {cand.p99_ms:.1f} ms <= {a.p99_latency_ms:g} ms"
                                          if a.p99_latency_ms and cand.p99_ms is not None else ""))


class _Tx:
    def __init__(self, ro: Rollout, st: Status, now: float) -> None:
        self.ro, self.st, self.now = ro, st, now
        self.decisions: list[Decision] = []
        self.set_paused: bool | None = None  # the controller writes spec.paused when set

    def decide(self, decision: str, reason: str, detail: str, at_weight: int | None = None) -> None:
        d = Decision(decision, reason, detail)
        self.decisions.append(d)
        log = self.st.setdefault("decisions", [])
        log.append({"t": round(self.now, 3), "decision": decision, "reason": reason, "detail": detail,
                    "step": self.st.get("step", 0),
                    "weight": weight(self.ro, self.st) if at_weight is None else at_weight})
        del log[:-MAX_DECISIONS]
        if decision not in ("pass", "inconclusive"):
            self.st["reason"] = detail

    def conclude(self, phase: str, decision: str, reason: str, detail: str) -> None:
        was = weight(self.ro, self.st)  # the decision is logged with the weight it was taken at
        self.st["phase"] = phase
        self.st["endedAt"] = round(self.now, 3)
        self.st["weight"] = weight(self.ro, self.st)
        self.decide(decision, reason, detail, at_weight=was)
        loser = losing_version(self.ro, self.st)
        if self.ro.expire_after_s > 0:
            self.st["retirement"] = {"version": loser, "state": "Waiting", "expiresAt":
                                     round(self.now + self.ro.expire_after_s, 3), "idleSince": None,
                                     "reason": f"{loser} expires {self.ro.expire_after_s:g}s after the rollout "
                                               "ended, then retires once it has carried no traffic for "
                                               f"{self.ro.expiry_grace_s:g}s"}

    def enter_step(self, step: int) -> None:
        self.st["step"] = step
        self.st["weight"] = weight(self.ro, self.st)
        self.st["stepStartedAt"] = round(self.now, 3)
        self.st["stepPassed"] = False
        self.st["nextAnalysisAt"] = round(self.now + self.ro.analysis.interval_s, 3)


def new_run(ro: Rollout, old: Status | None, now: float) -> tuple[Status, list[Decision]]:
    history = list((old or {}).get("history", []))
    if old and old.get("run"):
        history.append({"run": old["run"], "stable": old.get("stable"), "candidate": old.get("candidate"),
                        "outcome": old.get("phase"), "reason": old.get("reason", ""),
                        "startedAt": old.get("startedAt"), "endedAt": old.get("endedAt", now)})
    st: Status = {"run": ro.run_id, "stable": ro.stable, "candidate": ro.candidate, "phase": PROGRESSING,
                  "startedAt": round(now, 3), "readings": [], "decisions": [], "history": history[-MAX_HISTORY:]}
    tx = _Tx(ro, st, now)
    tx.enter_step(0)
    tx.decide("start", "started", f"rolling out {ro.candidate} over {ro.stable}: {ro.strategy} "
              f"{'/'.join(str(w) for w in ro.weights)} %, {ro.step_s:g}s per step")
    if ro.paused:
        st["phase"] = PAUSED
        tx.decide("pause", "operator", "paused by the operator (spec.paused)")
    return st, tx.decisions


def advance(ro: Rollout, status: Status | None, now: float, cand: Stats | None = None,
            stable: Stats | None = None,
            loser_traffic: float | None = None) -> tuple[Status, list[Decision], bool | None]:
    """One tick. `cand`/`stable`: the interval's readings when an analysis is due
    (see analysis_due), else None. `loser_traffic`: what the losing version carried
    in the last interval (requests + connections), None when not known.
    Returns (status, decisions, set spec.paused to this or None)."""
    if not status or status.get("run") != ro.run_id:
        st, ds = new_run(ro, status, now)
        return st, ds, None
    st = copy.deepcopy(status)
    tx = _Tx(ro, st, now)
    phase = st.get("phase")
    if phase in CONCLUDED:
        _retire(tx, loser_traffic)
        return st, tx.decisions, None
    if ro.abort:
        tx.conclude(ROLLED_BACK, "rollback", "operator", "aborted by the operator: all traffic back to "
                    f"{ro.stable}")
        return st, tx.decisions, None
    if ro.promote:
        tx.conclude(PROMOTED, "promote", "operator", f"promoted by the operator: all traffic to {ro.candidate}")
        return st, tx.decisions, None
    if phase == PAUSED:
        if ro.paused:
            return st, tx.decisions, None
        st["phase"] = PROGRESSING
        tx.enter_step(int(st.get("step", 0)))  # the step's time and analysis start over
        tx.decide("resume", "operator", f"resumed at step {st['step'] + 1} ({weight(ro, st)} %)")
        return st, tx.decisions, None
    if ro.paused:
        st["phase"] = PAUSED
        tx.decide("pause", "operator", "paused by the operator (spec.paused)")
        return st, tx.decisions, None
    if cand is not None and now >= float(st.get("nextAnalysisAt", 0)):
        verdict, reason, detail = judge(ro, cand)
        readings = st.setdefault("readings", [])
        readings.append({"t": round(now, 3), "step": st.get("step", 0), "weight": weight(ro, st),
                         "candidate": cand.as_dict(), "stable": (stable or Stats()).as_dict(),
                         "verdict": verdict, "reason": detail})
        del readings[:-MAX_READINGS]
        st["nextAnalysisAt"] = round(now + ro.analysis.interval_s, 3)
        if verdict == "fail":
            if ro.on_failure == "Pause":
                st["phase"] = PAUSED
                tx.decide("pause", reason, f"{detail}: paused (onFailure Pause); resume or abort")
                return st, tx.decisions, True
            tx.conclude(ROLLED_BACK, "rollback", reason, f"{detail}: rolled back to {ro.stable} at step "
                        f"{int(st.get('step', 0)) + 1} ({weight(ro, st)} %)")
            return st, tx.decisions, None
        tx.decide(verdict, reason, detail)
        if verdict == "pass":
            st["stepPassed"] = True
    if st.get("stepPassed") and now >= float(st.get("stepStartedAt", 0)) + ro.step_s:
        step = int(st.get("step", 0))
        if step + 1 >= len(ro.weights):
            tx.conclude(PROMOTED, "promote", "steps_complete", f"every step passed analysis: {ro.candidate} "
                        f"is now stable")
        else:
            tx.enter_step(step + 1)
            tx.decide("step", "analysis_passed", f"step {step + 2} of {len(ro.weights)}: {weight(ro, st)} % "
                      f"to {ro.candidate}")
    return st, tx.decisions, None


def analysis_due(ro: Rollout, status: Status | None, now: float) -> bool:
    if not status:
        return False
    return status.get("run") == ro.run_id and status.get("phase") == PROGRESSING \
        and now >= float(status.get("nextAnalysisAt", 0))


def _retire(tx: _Tx, loser_traffic: float | None) -> None:
    ret = tx.st.get("retirement")
    if not ret or ret.get("state") == "Retired":
        return
    ro, now = tx.ro, tx.now
    if now < float(ret.get("expiresAt", 0)):
        return  # the reason set at the end names when it expires
    if loser_traffic is None:
        return  # no interval measured yet: decide on the next reading
    if loser_traffic > 0:
        ret["idleSince"] = None
        ret["reason"] = (f"expired, but {ret['version']} still receives traffic (requests, connections or bytes "
                         "in the last interval): not retired")
        return
    if ret.get("idleSince") is None:
        ret["idleSince"] = round(now, 3)
    idle = now - float(ret["idleSince"])
    if idle < ro.expiry_grace_s:
        ret["reason"] = f"expired; no traffic for {idle:.0f}s of the {ro.expiry_grace_s:g}s grace"
        return
    ret["state"] = "Retired"
    ret["retiredAt"] = round(now, 3)
    ret["reason"] = (f"no traffic for {idle:.0f}s after expiry: removed from routing, endpoints withdrawn; "
                     "its workloads can be shut down")
    tx.decide("retire", "expired", f"{ret['version']} retired: {ret['reason']}")
