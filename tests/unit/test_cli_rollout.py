"""`nodemesh rollout status` rendering (pure): progress bar, step, time to the
next step, readings against the thresholds, retirement."""

from __future__ import annotations

from typing import Any

from nodemesh.cli.rolloutcmds import progress_bar, render_status

SPEC: dict[str, Any] = {"service": "web", "stable": "v1", "candidate": "v2",
                        "strategy": {"type": "Steps", "steps": [5, 25, 100], "pause": "30s"},
                        "analysis": {"interval": "10s", "successRate": 0.99, "p99Latency": "300ms"}}


def test_progress_bar() -> None:
    assert progress_bar(25, 8) == "[##......]  25 %"
    assert progress_bar(100, 4) == "[####] 100 %"


def test_status_view_progressing() -> None:
    doc = {"metadata": {"name": "web", "namespace": "default"}, "spec": SPEC,
           "status": {"run": "x", "phase": "Progressing", "step": 1, "weight": 25, "stepStartedAt": 100.0,
                      "nextAnalysisAt": 112.0, "reason": "step 2 of 3: 25 % to v2",
                      "readings": [{"t": 108, "weight": 25, "verdict": "pass",
                                    "candidate": {"total": 61, "successRate": 1.0, "p99Ms": 12.4},
                                    "stable": {"total": 180, "successRate": 1.0, "p99Ms": 11.9}}]}}
    text = render_status(doc, 110.0)
    assert "step      2 of 3  (5% 25% 100%)" in text
    assert "next      step 3 in 20s, once an analysis has passed (a step lasts 30s)" in text
    assert "analysis  every 10s, next in 2.0s" in text
    assert "weights   v1 75 %   v2 25 %" in text
    assert "success rate >= 0.99, p99 <= 300ms" in text and "-> pass" in text


def test_status_view_ended_with_retirement() -> None:
    doc = {"metadata": {"name": "web"}, "spec": SPEC,
           "status": {"run": "x", "phase": "Promoted", "weight": 100, "reason": "every step passed analysis",
                      "retirement": {"version": "v1", "state": "Waiting", "reason": "still receives traffic"}}}
    text = render_status(doc, 0.0)
    assert "[########################################] 100 %" in text and "  step  " not in text
    assert "retirement v1: Waiting - still receives traffic" in text
    assert "not started" in render_status({"metadata": {"name": "web"}, "spec": SPEC, "status": {}}, 0.0)
