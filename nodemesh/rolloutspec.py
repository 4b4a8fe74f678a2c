"""The Rollout kind: a versioned deployment of one Service that the control
plane drives (controlplane/rollout/). Parsed and validated into a frozen
dataclass like every other kind; every problem names the field path.

    spec:
      service: web               # a Service of the Rollout's namespace
      versionLabel: version      # the workload label that tells versions apart
      stable: v1                 # version now serving
      candidate: v2              # version being rolled out
      strategy:
        type: Steps              # Atomic | Linear | Steps
        steps: [1, 5, 25, 50, 100]   # Steps: the candidate's percent per step
        linear: {steps: 4, duration: 8s}   # Linear: N equal steps over a duration
        pause: 2s                # time on each step (Atomic, Steps)
      analysis:
        interval: 2s
        minRequests: 10          # per interval, for the candidate; fewer: no verdict
        successRate: 0.99        # floor (fraction of requests or connections)
        p99Latency: 500ms        # ceiling (requests only)
        grpcFailureClasses: [unavailable, internal]   # gRPC statuses counted as failures
      onFailure: Rollback        # or Pause
      expireAfter: 30s           # the losing version retires this long after the end ...
      expiryGrace: 5s            # ... once it has carried no traffic for this long
      paused: false              # operator controls (nodemesh rollout pause/resume/promote/abort);
      promote: false             # they do not restart the run
      abort: false
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nodemesh.fieldcheck import FieldChecker, Problem, valid_label_key

KIND_ROLLOUT = "Rollout"
ALIASES = {"rollout": KIND_ROLLOUT, "rollouts": KIND_ROLLOUT, "ro": KIND_ROLLOUT}

STRATEGIES = ("Atomic", "Linear", "Steps")
ON_FAILURE = ("Rollback", "Pause")
# gRPC status codes by the names Gateway API and nodemesh use (nodemesh.routespec.GRPC_CODES and more).
GRPC_CLASSES = {"cancelled": 1, "unknown": 2, "invalid-argument": 3, "deadline-exceeded": 4, "not-found": 5,
                "already-exists": 6, "permission-denied": 7, "resource-exhausted": 8,
                "failed-precondition": 9, "aborted": 10, "out-of-range": 11, "unimplemented": 12,
                "internal": 13, "unavailable": 14, "data-loss": 15, "unauthenticated": 16}
DEFAULT_GRPC_CLASSES = ("unknown", "deadline-exceeded", "unimplemented", "internal", "unavailable", "data-loss")
# Fields an operator flips without restarting the run (everything else defines the run).
CONTROL_FIELDS = ("paused", "promote", "abort")
MAX_STEPS = 100
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Analysis:
    interval_s: float = 10.0
    min_requests: int = 20
    success_rate: float = 0.99
    p99_latency_ms: float = 0.0  # 0: no ceiling
    grpc_failure_codes: tuple[int, ...] = tuple(GRPC_CLASSES[c] for c in DEFAULT_GRPC_CLASSES)


@dataclass(frozen=True)
class Rollout:
    name: str
    namespace: str
    service: str
    version_label: str
    stable: str
    candidate: str
    strategy: str  # Atomic | Linear | Steps
    weights: tuple[int, ...]  # the candidate's percent per step, increasing, ending at 100
    step_s: float  # time on each step before the next (at least one analysis interval)
    analysis: Analysis
    on_failure: str = "Rollback"
    expire_after_s: float = 0.0  # 0: never retire the losing version
    expiry_grace_s: float = 10.0
    paused: bool = False
    promote: bool = False
    abort: bool = False
    labels: tuple[tuple[str, str], ...] = ()
    raw_spec: tuple[tuple[str, Any], ...] = ()
    kind: str = KIND_ROLLOUT

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.service}"

    def spec(self) -> dict[str, Any]:
        return dict(self.raw_spec)

    @property
    def run_id(self) -> str:
        """What identifies one run: the spec without the operator controls. A change
        of it (another candidate, other steps) starts a new run."""
        run = {k: v for k, v in self.raw_spec if k not in CONTROL_FIELDS}
        return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]

    def subset(self, version: str) -> tuple[tuple[str, str], ...]:
        return ((self.version_label, version),)


def parse(subject: str, name: str, namespace: str, labels: tuple[tuple[str, str], ...],
          spec_raw: Any) -> tuple[Rollout | None, list[Problem]]:
    """Entry point used by nodemesh.model.parse_document."""
    c = FieldChecker(subject)
    spec = c.mapping(spec_raw, "spec", ("service", "versionLabel", "stable", "candidate", "strategy", "analysis",
                                    "onFailure", "expireAfter", "expiryGrace", *CONTROL_FIELDS), required=True) or {}
    service = c.text(spec.get("service"), "spec.service", required=True)
    if service and not _NAME.match(service):
        c.add("spec.service", "must be a DNS label (the name of a Service in the Rollout's namespace)")
    label = c.text(spec.get("versionLabel", "version"), "spec.versionLabel")
    if label and not valid_label_key(label):
        c.add("spec.versionLabel", f"{label!r} is not a valid label key")
    versions = {}
    for f in ("stable", "candidate"):
        v = spec.get(f)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        versions[f] = c.label_value(c.text(v, f"spec.{f}", required=True), f"spec.{f}")
    if versions["stable"] and versions["stable"] == versions["candidate"]:
        c.add("spec.candidate", "must differ from spec.stable")
    st = c.mapping(spec.get("strategy"), "spec.strategy", ("type", "steps", "linear", "pause"), required=True) or {}
    stype = c.text(st.get("type"), "spec.strategy.type", required=True)
    if stype and stype not in STRATEGIES:
        c.add("spec.strategy.type", f"must be one of {', '.join(STRATEGIES)}, got {stype!r}")
    an = c.mapping(spec.get("analysis"), "spec.analysis",
               ("interval", "minRequests", "successRate", "p99Latency", "grpcFailureClasses")) or {}
    interval = c.duration(an.get("interval"), "spec.analysis.interval", 10.0, 0.5, 3600.0)
    weights: tuple[int, ...] = ()
    step_s = c.duration(st.get("pause"), "spec.strategy.pause", interval, 0.0, 7 * 86400.0)
    if stype == "Steps":
        raw = st.get("steps")
        if not isinstance(raw, list) or not raw:
            c.add("spec.strategy.steps", "required for type Steps: the candidate's percent per step, "
                  "like [1, 5, 25, 50, 100]")
            raw = []
        if len(raw) > MAX_STEPS:
            c.add("spec.strategy.steps", f"at most {MAX_STEPS} steps")
        ws: list[int] = []
        for i, w in enumerate(raw[:MAX_STEPS]):
            got = c.integer(w, f"spec.strategy.steps[{i}]", 1, 100, 0)
            if got and ws and got <= ws[-1]:
                c.add(f"spec.strategy.steps[{i}]", f"must be greater than the step before ({ws[-1]}): "
                      "weights only grow until promotion")
            if got:
                ws.append(got)
        if ws and ws[-1] != 100 and len(ws) == len(raw):
            c.add(f"spec.strategy.steps[{len(raw) - 1}]", f"the last step must be 100 (the weights must add "
                  f"up to the whole service), got {ws[-1]}")
        weights = tuple(ws)
        for f in ("linear",):
            if f in st:
                c.add(f"spec.strategy.{f}", "only for type Linear")
    elif stype == "Linear":
        lin = c.mapping(st.get("linear"), "spec.strategy.linear", ("steps", "duration"), required=True) or {}
        n = c.integer(lin.get("steps"), "spec.strategy.linear.steps", 1, MAX_STEPS, 0)
        if lin and "steps" not in lin:
            c.add("spec.strategy.linear.steps", "required")
        dur = c.duration(lin.get("duration"), "spec.strategy.linear.duration", 0.0, 0.0, 30 * 86400.0)
        if lin and "duration" not in lin:
            c.add("spec.strategy.linear.duration", "required")
        if n:
            weights = tuple(round(100 * (i + 1) / n) for i in range(n))
            step_s = dur / n
            if len(set(weights)) != n:
                c.add("spec.strategy.linear.steps", "too many steps: two steps would get the same weight")
        for f in ("steps", "pause"):
            if f in st:
                c.add(f"spec.strategy.{f}", "not for type Linear (it spreads linear.steps over linear.duration)")
    elif stype == "Atomic":
        weights = (100,)
        for f in ("steps", "linear"):
            if f in st:
                c.add(f"spec.strategy.{f}", "not for type Atomic (all traffic moves at once)")
    if weights and step_s < interval:
        c.add("spec.strategy", f"each step lasts {step_s:g}s, shorter than one analysis interval ({interval:g}s): "
              "no step could be judged")
    min_req = c.integer(an.get("minRequests"), "spec.analysis.minRequests", 0, 1_000_000_000, 20)
    sr = c.number(an.get("successRate"), "spec.analysis.successRate", 0.0, 1.0, 0.99)
    p99 = c.duration(an.get("p99Latency"), "spec.analysis.p99Latency", 0.0, 0.0, 3600.0) * 1000.0
    codes = Analysis().grpc_failure_codes
    if "grpcFailureClasses" in an:
        raw_cls = an.get("grpcFailureClasses")
        if not isinstance(raw_cls, list):
            c.add("spec.analysis.grpcFailureClasses", "must be a list of gRPC status names")
            raw_cls = []
        got_codes = []
        for i, cl in enumerate(raw_cls):
            if cl not in GRPC_CLASSES:
                c.add(f"spec.analysis.grpcFailureClasses[{i}]",
                      f"must be one of {', '.join(GRPC_CLASSES)}, got {cl!r}")
            else:
                got_codes.append(GRPC_CLASSES[cl])
        codes = tuple(sorted(set(got_codes)))
    on_failure = c.text(spec.get("onFailure", "Rollback"), "spec.onFailure")
    if on_failure and on_failure not in ON_FAILURE:
        c.add("spec.onFailure", f"must be one of {', '.join(ON_FAILURE)}, got {on_failure!r}")
    expire = c.duration(spec.get("expireAfter"), "spec.expireAfter", 0.0, 0.0, 30 * 86400.0)
    grace = c.duration(spec.get("expiryGrace"), "spec.expiryGrace", max(10.0, 2 * interval), 0.0, 30 * 86400.0)
    paused, promote, abort = (c.flag(spec.get(f), f"spec.{f}") for f in CONTROL_FIELDS)
    if promote and abort:
        c.add("spec.abort", "a rollout cannot be promoted and aborted at once")
    if c.problems:
        return None, c.problems
    return Rollout(name, namespace, service, label, versions["stable"], versions["candidate"], stype, weights,
                   step_s, Analysis(interval, min_req, sr, p99, codes), on_failure, expire, grace, paused, promote,
                   abort, labels, tuple(sorted(spec.items()))), []


def check_against(rollouts: Sequence[Rollout], services: Sequence[Any],
                  workloads: Sequence[tuple[str, dict[str, str]]] | None) -> list[Problem]:
    """Cross-object checks at apply: the service exists; one Rollout per service;
    each version selects at least one registered workload of the service (when the
    registry is known: `workloads` as (namespace, labels) pairs)."""
    problems: list[Problem] = []
    by_key = {s.key: s for s in services}
    owner: dict[str, str] = {}
    for r in sorted(rollouts, key=lambda r: r.key):
        subj = f"Rollout {r.key}"
        svc = by_key.get(r.service_key)
        if svc is None:
            problems.append((f"{subj}: spec.service", (f"no Service {r.service_key}; apply the Service first "
                             "(a Rollout moves traffic between versions of an existing service)")))
            continue
        if r.service_key in owner:
            problems.append((f"{subj}: spec.service", (f"Rollout {owner[r.service_key]} already drives "
                             f"{r.service_key}; one Rollout per service")))
        owner.setdefault(r.service_key, r.key)
        if workloads is None:
            continue
        for f, version in (("stable", r.stable), ("candidate", r.candidate)):
            n = sum(1 for ns, labels in workloads if svc.selects(ns, labels) and labels.get(r.version_label) == version)
            if n == 0:
                problems.append((f"{subj}: spec.{f}", (f"the label {r.version_label}={version} selects no registered "
                                 f"workload of Service {svc.key} (selector {dict(svc.selector)}); start that "
                                 "version first")))
    return problems
