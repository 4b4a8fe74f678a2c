"""The rollout state machine with a fake clock, the Rollout model's validation
(field paths), interval readings from heartbeat summaries, and the controller
over a real SQLite store and a real etcd: persistence, resume after a restart, one driver."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controlplane.api import plan_changes
from controlplane.nodes import RegisteredNode, RegisteredWorkload
from controlplane.rollout import machine
from controlplane.rollout.controller import RolloutController, splits
from controlplane.rollout.machine import Stats, advance
from controlplane.rollout.readings import Readings, VersionCounters, interval_stats
from controlplane.store import SQLiteStore, Store
from nodemesh import model
from nodemesh.rolloutspec import Rollout
from tests.unit.test_store_contract import etcd_certs, etcd_endpoint, make_store  # noqa: F401 - fixtures

SERVICE = """\
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080, protocol: http}]}
"""


def rollout(extra: str = "", steps: str = "[20, 50, 100]", on_failure: str = "Rollback") -> Rollout:
    doc = f"""\
apiVersion: nodemesh.io/v1alpha1
kind: Rollout
metadata: {{name: web}}
spec:
  service: web
  stable: v1
  candidate: v2
  strategy: {{type: Steps, steps: {steps}, pause: 2s}}
  analysis: {{interval: 1s, minRequests: 5, successRate: 0.95, p99Latency: 200ms}}
  onFailure: {on_failure}
  expireAfter: 10s
  expiryGrace: 3s
{extra}"""
    obj = model.parse_documents(doc)[0].obj
    assert isinstance(obj, Rollout)
    return obj


GOOD = Stats(100, 0, 20.0)


def run(ro: Rollout, t_end: float, cand: Stats = GOOD, t0: float = 1000.0,
        st: machine.Status | None = None) -> tuple[machine.Status, list[machine.Decision], float]:
    t = t0
    decisions: list[machine.Decision] = []
    while t <= t_end:
        due = machine.analysis_due(ro, st, t)
        st, ds, _ = advance(ro, st, t, cand if due else None, Stats(100, 0, 10.0) if due else None)
        decisions += ds
        t += 0.25
    assert st is not None
    return st, decisions, t



def _status(store: Any) -> dict[str, Any]:
    """The stored status of Rollout default/web."""
    status: dict[str, Any] = store.get("Rollout", "default", "web").status()
    return status

def test_healthy_rollout_steps_through_and_promotes() -> None:
    ro = rollout()
    st, ds, _ = advance(ro, None, 1000.0)
    assert st["phase"] == "Progressing" and machine.weight(ro, st) == 20 and ds[0].decision == "start"
    st, ds, _ = run(ro, 1001.9, st=st, t0=1000.25)
    assert machine.weight(ro, st) == 20  # a step lasts `pause` (2 s) even after a pass
    st, ds, _ = run(ro, 1002.1, st=st, t0=1002.0)
    assert machine.weight(ro, st) == 50 and [d.decision for d in ds if d.decision == "step"] == ["step"]
    st, ds, _ = run(ro, 1010, st=st, t0=1002.25)
    assert st["phase"] == "Promoted" and machine.weight(ro, st) == 100
    assert ds[-1].reason == "steps_complete"
    assert all(r["verdict"] == "pass" for r in st["readings"])
    assert st["retirement"]["version"] == "v1" and st["retirement"]["state"] == "Waiting"


def test_failing_candidate_rolls_back_at_the_first_failed_analysis_with_reason() -> None:
    ro = rollout()
    st, _, _ = advance(ro, None, 1000.0)
    st, ds, _ = run(ro, 1001.0, cand=Stats(40, 20, 10.0), st=st, t0=1000.25)
    assert st["phase"] == "RolledBack" and machine.weight(ro, st) == 0
    assert ds[-1].decision == "rollback" and ds[-1].reason == "success_rate"
    assert "0.500 is below the floor 0.95" in st["reason"]
    assert st["endedAt"] == pytest.approx(1001.0)


def test_slow_candidate_rolls_back_on_latency() -> None:
    st, ds, _ = run(rollout(), 1003, cand=Stats(50, 0, 450.0))
    assert st["phase"] == "RolledBack" and ds[-1].reason == "latency"


def test_too_few_requests_is_inconclusive_and_holds_the_step() -> None:
    st, ds, _ = run(rollout(), 1010, cand=Stats(2, 2, 900.0))
    assert st["phase"] == "Progressing" and machine.weight(rollout(), st) == 20
    assert {d.decision for d in ds} == {"start", "inconclusive"}


def test_on_failure_pause_sets_spec_paused_and_resume_restarts_the_step() -> None:
    ro = rollout(on_failure="Pause")
    st, _, _ = advance(ro, None, 1000.0)
    st, ds, set_paused = advance(ro, st, 1001.0, Stats(40, 20), Stats(40, 0))
    assert st["phase"] == "Paused" and set_paused is True and ds[-1].decision == "pause"
    paused = rollout("  paused: true\n", on_failure="Pause")
    assert paused.run_id == ro.run_id  # operator controls do not start a new run
    st, ds, _ = advance(paused, st, 1005.0)
    assert st["phase"] == "Paused" and not ds
    st, ds, _ = advance(ro, st, 1006.0)
    assert st["phase"] == "Progressing" and ds[-1].decision == "resume" and st["stepStartedAt"] == 1006.0


def test_operator_promote_and_abort() -> None:
    st, _, _ = advance(rollout(), None, 1000.0)
    promoted, ds, _ = advance(rollout("  promote: true\n"), st, 1000.5)
    assert promoted["phase"] == "Promoted" and ds[-1].reason == "operator"
    aborted, ds, _ = advance(rollout("  abort: true\n"), st, 1000.5)
    assert aborted["phase"] == "RolledBack" and "aborted by the operator" in aborted["reason"]


def test_retirement_waits_for_expiry_and_for_no_traffic() -> None:
    ro = rollout("  promote: true\n")
    st, _, _ = advance(ro, None, 1000.0)
    st, _, _ = advance(ro, st, 1001.0)
    st, _, _ = advance(ro, st, 1005.0, loser_traffic=0)  # before expiry (1011): nothing
    assert st["retirement"]["state"] == "Waiting" and st["retirement"]["idleSince"] is None
    st, _, _ = advance(ro, st, 1012.0, loser_traffic=3)  # expired, but still used
    assert "still receives traffic" in st["retirement"]["reason"]
    st, _, _ = advance(ro, st, 1013.0, loser_traffic=0)
    st, _, _ = advance(ro, st, 1015.0, loser_traffic=0)  # 2 s idle < 3 s grace
    assert st["retirement"]["state"] == "Waiting"
    st, _, _ = advance(ro, st, 1016.5, loser_traffic=4)  # traffic again: the grace starts over
    st, _, _ = advance(ro, st, 1017.0, loser_traffic=0)
    st, _, _ = advance(ro, st, 1019.0, loser_traffic=0)
    assert st["retirement"]["state"] == "Waiting"
    st, ds, _ = advance(ro, st, 1020.5, loser_traffic=0)
    assert st["retirement"]["state"] == "Retired" and ds[-1].decision == "retire"


def test_a_changed_run_starts_over_and_keeps_history() -> None:
    st, _, _ = run(rollout(), 1003, cand=Stats(40, 20))
    other = model.parse_documents(json.dumps({**json.loads(json.dumps(model.to_yaml_document(
        "Rollout", "default", "web", {**rollout().spec(), "candidate": "v3"})))}))[0].obj
    assert isinstance(other, Rollout)
    st2, _ds, _ = advance(other, st, 1004.0)
    assert st2["phase"] == "Progressing" and st2["candidate"] == "v3"
    assert st2["history"][-1]["outcome"] == "RolledBack" and "below the floor" in st2["history"][-1]["reason"]


@pytest.mark.parametrize("spec,path,reason", [
    ("{service: web, stable: v1, candidate: v2, strategy: {type: Steps, steps: [10, 50]}}",
     "spec.strategy.steps[1]", "the last step must be 100"),
    ("{service: web, stable: v1, candidate: v2, strategy: {type: Steps, steps: [50, 20, 100]}}",
     "spec.strategy.steps[1]", "must be greater than the step before"),
    ("{service: web, stable: v1, candidate: v1, strategy: {type: Atomic}}", "spec.candidate", "must differ"),
    ("{service: web, stable: v1, candidate: v2, strategy: {type: Linear}}", "spec.strategy.linear", "required"),
    (("{service: web, stable: v1, candidate: v2, strategy: {type: Steps, steps: [100], pause: 1s},"
     " analysis: {interval: 5s}}"), "spec.strategy", "shorter than one analysis interval"),
    ("{service: web, stable: v1, candidate: v2, strategy: {type: Atomic}, analysis: {successRate: 2}}",
     "spec.analysis.successRate", "must be a number in 0..1"),
    ("{service: web, stable: v1, candidate: v2, strategy: {type: Atomic}, onFailure: Retry}",
     "spec.onFailure", "must be one of"),
    (("{service: web, stable: v1, candidate: v2, strategy: {type: Atomic},"
     " analysis: {grpcFailureClasses: [unavailable, bogus]}}"),
     "spec.analysis.grpcFailureClasses[1]", "must be one of"),
])
def test_invalid_rollouts_name_the_field(spec: str, path: str, reason: str) -> None:
    with pytest.raises(model.ValidationError) as e:
        model.parse_documents(f"apiVersion: nodemesh.io/v1alpha1\nkind: Rollout\nmetadata: {{name: web}}\n"
                              f"spec: {spec}\n")
    assert any(p == f"Rollout default/web: {path}" and reason in r for p, r in e.value.problems), e.value.problems


def test_linear_strategy_spreads_steps_over_the_duration() -> None:
    ro = model.parse_documents("apiVersion: nodemesh.io/v1alpha1\nkind: Rollout\nmetadata: {name: web}\nspec: "
                               "{service: web, stable: v1, candidate: v2, strategy: {type: Linear, linear: "
                               "{steps: 4, duration: 20s}}, analysis: {interval: 2s}}\n")[0].obj
    assert isinstance(ro, Rollout) and ro.weights == (25, 50, 75, 100) and ro.step_s == 5.0


def test_apply_checks_service_and_versions_against_the_registry(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"))
    docs = model.parse_documents(SERVICE + "---\n" + json.dumps(model.to_yaml_document(
        "Rollout", "default", "web", {**rollout().spec(), "service": "nope"})))
    with pytest.raises(model.ValidationError) as e:
        plan_changes(store, docs, workloads=[])
    assert e.value.problems[0][0] == "Rollout default/web: spec.service"
    assert "no Service default/nope" in str(e.value)
    docs = model.parse_documents(SERVICE + "---\n" + json.dumps(model.to_yaml_document(
        "Rollout", "default", "web", rollout().spec())))
    with pytest.raises(model.ValidationError) as e:
        plan_changes(store, docs, workloads=[("default", {"app": "web", "version": "v1"})])
    assert [p for p, _ in e.value.problems] == ["Rollout default/web: spec.candidate"]
    assert "version=v2 selects no registered workload" in str(e.value)
    plan_changes(store, docs, workloads=[("default", {"app": "web", "version": v}) for v in ("v1", "v2")])


def test_interval_stats_from_summaries_survive_an_agent_restart() -> None:
    buckets = (10.0, 100.0, 1000.0)
    base = {"n1": VersionCounters(100, 5, hist=(90, 10, 0, 0)), "n2": VersionCounters(50, 0, hist=(50, 0, 0, 0))}
    # n2 restarted: its counts went down
    now = {"n1": VersionCounters(200, 15, hist=(170, 20, 10, 0)), "n2": VersionCounters(10, 1, hist=(0, 0, 10, 0))}
    st, _ = interval_stats(now, base, buckets)
    assert st.total == 110 and st.failures == 11
    assert st.p99_ms is not None and 100 < st.p99_ms <= 1000


def _summary(req: float, err: float, dst: str) -> str:
    return json.dumps({"edges": [{"reporter": "source", "source": "default/client", "destination_service_key":
                                  "default/web", "destination_workload": dst, "requests": req, "errors": err,
                                  "tcp_opened": 0, "latency_hist": [req, 0, 0, 0]}],
                       "latency_buckets_ms": [10, 100, 1000]})


def test_controller_persists_resumes_and_keeps_one_driver(make_store: Callable[[], Store]) -> None:  # noqa: F811
    """On SQLite and on a real etcd: the state survives the driver, a second replica
    never writes a rollout whose lease is held, and takes over once it lapses."""
    now = [1000.0]
    store = make_store()
    spec = rollout().spec()
    plan = plan_changes(store, model.parse_documents(SERVICE + "---\n" + json.dumps(model.to_yaml_document(
        "Rollout", "default", "web", spec))))
    store.apply(plan.writes)
    nodes = [RegisteredNode("n1", ("10.0.0.1",), workloads=(
        RegisteredWorkload("web-1", "default", "web", "10.1.0.1", (8080,), (("app", "web"), ("version", "v1"))),
        RegisteredWorkload("web-2", "default", "web", "10.1.0.2", (8080,), (("app", "web"), ("version", "v2")))))]
    svc = model.parse_documents(SERVICE)[0].obj
    readings = Readings(clock=lambda: now[0])
    sent = {"v1": 0.0, "v2": 0.0}

    def feed() -> None:
        sent["v2"] += 20
        readings.ingest("n1", _summary(sent["v2"], 0, "default/web-2"))

    def controller(rid: str, on: Store) -> RolloutController:
        return RolloutController(on, lambda: nodes, lambda: {svc.key: svc}, readings, clock=lambda: now[0],
                                 replica_id=rid)

    # "b" has its own handle on the same state: a second replica (or the restarted one).
    a, b = controller("a", store), controller("b", make_store())
    assert splits(store)[0].weights == (("v1", 100), ("v2", 0))  # before the controller starts: all stable
    while now[0] < 1002.6:
        feed()
        a.tick()
        b.tick()  # the second replica never takes over a held lease
        now[0] += 0.25
    st = _status(store)
    assert st["driver"]["id"] == "a" and st["step"] == 1 and st["weight"] == 50
    assert splits(store)[0].weights == (("v1", 50), ("v2", 50))
    assert [d["decision"] for d in st["decisions"]][:1] == ["start"]
    # "a" stops (a control plane restart): "b" takes over once the lease lapses and resumes at step 2.
    while now[0] < 1012:
        feed()
        b.tick()
        now[0] += 0.25
    st = _status(store)
    assert st["driver"]["id"] == "b" and st["phase"] in ("Progressing", "Promoted")
    assert st["decisions"][0]["decision"] == "start" and st["startedAt"] == 1000.0  # the same run, resumed
    # Re-applying the same spec keeps the state.
    store.apply(plan_changes(store, model.parse_documents(json.dumps(model.to_yaml_document(
        "Rollout", "default", "web", spec)))).writes)
    assert store.get("Rollout", "default", "web").status()["run"] == st["run"]  # type: ignore[union-attr]


def test_readings_count_direct_traffic_and_open_connections_against_retirement() -> None:
    r = Readings(clock=lambda: 100.0)
    summary = {"edges": [
        # The caller's proxy saw the service (analysis input) ...
        {"reporter": "source", "source": "default/c", "destination_service_key": "default/web",
         "destination_workload": "default/web-1", "requests": 10, "errors": 1, "grpc_status": {"14": 2, "5": 3}},
        # ... and a connection straight to the workload's address, still open (no bytes counted yet).
        {"reporter": "source", "source": "default/c", "destination_service_key": "unknown/unknown",
         "destination_workload": "default/web-1", "tcp_opened": 1, "tcp_closed": 0},
        {"reporter": "source", "source": "default/c", "destination_service_key": "default/web",
         "destination_workload": "default/other", "requests": 99}]}
    r.ingest("n1", json.dumps(summary))
    snap = r.version("default/web", {"default/web-1"}, grpc_failures={14})
    assert snap["n1"].requests == 10 and snap["n1"].failures == 3  # 5xx + UNAVAILABLE, not NOT_FOUND
    stats, traffic = interval_stats(snap, snap, ())
    assert stats.total == 0 and traffic == 1  # nothing moved, but a connection is open: not idle
    r.ingest("n2", "x" * (300 * 1024))  # oversized: dropped
    assert "n2" not in r.latest
