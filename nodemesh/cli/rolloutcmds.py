"""`nodemesh rollout status|pause|resume|promote|abort|history NAME`: the
operator's view of a Rollout (docs/deployments.md). The state lives in the
Rollout's status, written by the control plane's controller; the commands
flip the spec's operator controls (paused, promote, abort), which never
restart the run."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import yaml

from controlplane.apiclient import ConfigClient
from nodemesh import model
from nodemesh.cli.output import CommandError, add_output_flag, add_server_flags, emit, table
from nodemesh.rolloutspec import KIND_ROLLOUT

BAR_WIDTH = 40
CONCLUDED = ("Promoted", "RolledBack")


def _doc(r: Any) -> dict[str, Any]:
    return model.to_yaml_document(r.kind, r.namespace, r.name, json.loads(r.spec_json or "{}"), dict(r.labels),
                                  json.loads(r.status_json or "{}"))


def _weights(spec: dict[str, Any]) -> list[int]:
    st = spec.get("strategy") or {}
    if st.get("type") == "Atomic":
        return [100]
    if st.get("type") == "Linear":
        n = int((st.get("linear") or {}).get("steps", 1))
        return [round(100 * (i + 1) / n) for i in range(n)]
    return [int(w) for w in st.get("steps", [])]


def _step_seconds(spec: dict[str, Any]) -> float | None:
    """How long a step lasts, from the spec as stored (defaults filled by nodemesh.rolloutspec)."""
    try:
        ro = model.parse_document(model.to_yaml_document(KIND_ROLLOUT, "default", "x", spec)).obj
    except model.ValidationError:
        return None
    return float(ro.step_s)


def progress_bar(weight: int, width: int = BAR_WIDTH) -> str:
    filled = round(width * max(0, min(100, weight)) / 100)
    return "[" + "#" * filled + "." * (width - filled) + f"] {weight:3d} %"


def _ago(t: Any, now: float) -> str:
    return "-" if not isinstance(t, (int, float)) else f"{max(0.0, now - t):.0f}s ago"


def render_status(doc: dict[str, Any], now: float) -> str:
    """The status view (pure): phase, progress bar, step, weights, the last
    readings against the thresholds, time to the next step, retirement."""
    spec, st = doc["spec"], doc.get("status") or {}
    meta = doc["metadata"]
    name = f"{meta.get('namespace', 'default')}/{meta['name']}"
    lines = [(f"Rollout {name}: service {spec.get('service')}, {spec.get('versionLabel', 'version')} "
             f"{spec.get('stable')} -> {spec.get('candidate')}")]
    if not st.get("run"):
        lines.append("  not started yet (the control plane picks it up within a second)")
        return "\n".join(lines)
    phase = st.get("phase", "?")
    weights = _weights(spec)
    w = int(st.get("weight", 0))
    step = int(st.get("step", 0))
    lines.append(f"  phase     {phase}" + (f" ({st.get('reason')})" if st.get("reason") else ""))
    lines.append(f"  progress  {progress_bar(w)} to {spec.get('candidate')}")
    if phase not in CONCLUDED:
        lines.append(f"  step      {step + 1} of {len(weights)}  ({' '.join(f'{x}%' for x in weights)})")
        an = spec.get("analysis") or {}
        nxt = st.get("nextAnalysisAt")
        if isinstance(nxt, (int, float)):
            lines.append(f"  analysis  every {an.get('interval', '10s')}, next in {max(0.0, nxt - now):.1f}s")
        started = st.get("stepStartedAt")
        step_s = _step_seconds(spec)
        if isinstance(started, (int, float)) and phase == "Progressing" and step_s is not None:
            left = started + step_s - now
            nxt_step = "the end (promotion)" if step + 1 >= len(weights) else f"step {step + 2}"
            passed = "" if st.get("stepPassed") else ", once an analysis has passed"
            lines.append(f"  next      {nxt_step} in {max(0.0, left):.0f}s{passed} (a step lasts {step_s:g}s)")
    lines.append(f"  weights   {spec.get('stable')} {100 - w} %   {spec.get('candidate')} {w} %")
    an = spec.get("analysis") or {}
    lines.append(f"  thresholds  success rate >= {an.get('successRate', 0.99)}"
                 + (f", p99 <= {an['p99Latency']}" if an.get("p99Latency") else "")
                 + f", at least {an.get('minRequests', 20)} requests per interval")
    for r in (st.get("readings") or [])[-3:]:
        c, s = r.get("candidate", {}), r.get("stable", {})
        lines.append(f"  reading {_ago(r.get('t'), now):>8}  {r.get('weight')}%  {spec.get('candidate')}: "
                     f"{c.get('total')} req, success {c.get('successRate')}, p99 {c.get('p99Ms')} ms | "
                     f"{spec.get('stable')}: {s.get('total')} req, success {s.get('successRate')}, "
                     f"p99 {s.get('p99Ms')} ms -> {r.get('verdict')}")
    ret = st.get("retirement")
    if ret:
        lines.append(f"  retirement {ret.get('version')}: {ret.get('state')} - {ret.get('reason')}")
    return "\n".join(lines)


def _history_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    st = doc.get("status") or {}
    rows = list(st.get("history") or [])
    if st.get("run"):
        rows.append({"run": st["run"], "stable": st.get("stable"), "candidate": st.get("candidate"),
                     "outcome": st.get("phase"), "reason": st.get("reason", ""), "startedAt": st.get("startedAt"),
                     "endedAt": st.get("endedAt")})
    return rows


def _cmd_status(args: argparse.Namespace, c: ConfigClient) -> int:
    live = args.output == "table" and (args.watch or (sys.stdout.isatty() and not args.once))
    while True:
        doc = _doc(c.get(KIND_ROLLOUT, args.name, args.namespace))
        if args.output != "table":
            emit(doc, args.output)
            return 0
        text = render_status(doc, time.time())
        if live:
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
            sys.stdout.flush()
        else:
            print(text)
        if not live or (doc.get("status") or {}).get("phase") in CONCLUDED and not args.watch:
            return 0
        time.sleep(args.interval)


def _cmd_history(args: argparse.Namespace, c: ConfigClient) -> int:
    rows = _history_rows(_doc(c.get(KIND_ROLLOUT, args.name, args.namespace)))
    if args.output != "table":
        emit(rows, args.output)
        return 0
    print(table(("RUN", "STABLE", "CANDIDATE", "OUTCOME", "REASON"),
                [(r.get("run"), r.get("stable"), r.get("candidate"), r.get("outcome"), r.get("reason")) for r in rows]))
    return 0


def _control(field: str, value: bool, verb: str) -> Any:
    def cmd(args: argparse.Namespace, c: ConfigClient) -> int:
        r = c.get(KIND_ROLLOUT, args.name, args.namespace)
        doc = _doc(r)
        phase = (doc.get("status") or {}).get("phase")
        if phase in CONCLUDED:
            raise CommandError(f"rollout {r.namespace}/{r.name} already ended ({phase}); nothing to {verb}",
                               f"`nodemesh rollout history {r.name}` shows how it ended")
        spec = doc["spec"]
        if field == "paused" and not value and not spec.get("paused"):
            print(f"rollout {r.namespace}/{r.name} is not paused")
            return 0
        spec[field] = value
        doc.pop("status", None)
        c.apply(yaml.safe_dump(doc, sort_keys=False))
        print(f"rollout {r.namespace}/{r.name}: {verb} requested (the control plane acts within a second)")
        return 0
    return cmd


def _with_client(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        with ConfigClient(args.server) as c:
            return int(fn(args, c))
    return run


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ro = sub.add_parser("rollout", help="watch and steer Rollouts (docs/deployments.md)")
    rs = ro.add_subparsers(dest="rollout_command", required=True)

    def common(p: argparse.ArgumentParser, outputs: bool = True) -> None:
        p.add_argument("name", help="the Rollout's name")
        p.add_argument("-n", "--namespace", default="", help="default: 'default'")
        if outputs:
            add_output_flag(p)
        add_server_flags(p)

    p = rs.add_parser("status", help="step, weights, readings against thresholds, time to the next step")
    common(p)
    p.add_argument("-w", "--watch", action="store_true", help="keep refreshing (the default on a terminal)")
    p.add_argument("--once", action="store_true", help="print once, even on a terminal")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.set_defaults(func=_with_client(_cmd_status))
    for verb, field, value, text in (("pause", "paused", True, "hold at the current step"),
                                     ("resume", "paused", False, "continue after a pause"),
                                     ("promote", "promote", True, "skip to 100 % and make the candidate stable"),
                                     ("abort", "abort", True, "roll back to the stable version now")):
        p = rs.add_parser(verb, help=text)
        common(p, outputs=False)
        p.set_defaults(func=_with_client(_control(field, value, verb)))
    p = rs.add_parser("history", help="every run of this Rollout with its outcome and reason")
    common(p)
    p.set_defaults(func=_with_client(_cmd_history))
