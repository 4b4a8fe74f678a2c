"""The node CLI's observation commands, all read from the local agent's admin
endpoint (nodeagent/supervision/admin.py): status, services, endpoints, routes, explain,
top, tap, logs, and shell completion. Human tables by default, `-o json|yaml`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from nodemesh.cli.output import CommandError, add_output_flag, emit, table

DEFAULT_ADMIN = "http://127.0.0.1:15000"


class AdminUnreachable(CommandError):
    """The agent's admin endpoint did not answer, or refused."""


DEFAULT_ADMIN_TOKEN_FILE = "/var/lib/nodemesh/admin.token"  # noqa: S105 (a path, not a secret)


def admin_token() -> str:
    """The agent's admin token (stateDir/admin.token, readable by root only), if this
    user can read it: $NODEMESH_ADMIN_TOKEN_FILE, else the default stateDir's."""
    path = os.environ.get("NODEMESH_ADMIN_TOKEN_FILE", DEFAULT_ADMIN_TOKEN_FILE)
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def admin_get(base: str, path: str, timeout: float = 5.0, **params: str) -> Any:
    """GET a JSON (or text) admin path; errors say what to check."""
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise CommandError(f"--admin {base!r} is not an http:// or https:// address",
                           f"the agent's admin endpoint, e.g. {DEFAULT_ADMIN}", code=2)
    url = base.rstrip("/") + path + ("?" + urllib.parse.urlencode(params) if params else "")
    req = urllib.request.Request(url)  # noqa: S310 (scheme checked above: http or https only)
    token = admin_token()
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (http/https only, above)
            body = resp.read().decode()
            ctype = resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace").strip()
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(detail).get("error", detail)
        raise AdminUnreachable(f"{path}: {detail or e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise AdminUnreachable(f"cannot reach the agent's admin endpoint at {base} ({reason})",
                               "is the node agent running on this node, and does --admin (or $NODEMESH_ADMIN) "
                               "match its proxy.adminPort?") from None
    return json.loads(body) if "json" in ctype else body


# ----------------------------------------------------------------------------- output

def _fmt_ms(v: Any) -> str:
    return "-" if v is None else f"{float(v):.1f}ms"


def _fmt_pct(v: Any) -> str:
    return "-" if v is None else f"{float(v) * 100:.1f}%"


# ----------------------------------------------------------------------------- views (pure)

def human_status(s: dict[str, Any]) -> str:
    certs = s.get("certs", {})
    rows = [
        ("node", s.get("node")), ("agent", f"{s.get('agent_version')} (pid {s.get('pid')}) {s.get('phase')}"),
        ("ready", s.get("ready")),
        ("capture", "installed" if s.get("capture_installed") else f"NOT installed {s.get('capture_error', '')}"),
        ("control plane (xDS)", "connected" if s.get("control_plane_connected") else "DISCONNECTED"),
        ("registry lease", "held" if s.get("registry_connected") else "NOT held"),
        ("snapshot version", s.get("snapshot_version")),
        ("certificates", f"v{s.get('certs_version')}: " + ", ".join(
            f"{i} until {c.get('not_after')}" for i, c in certs.items())),
        ("proxy workers", f"{s.get('workers_up')} up" + ("" if s.get("workers_alive") else " (pool gave up)")),
    ]
    rows += [("REFUSED by control plane", r) for r in s.get("refusals") or []]
    return table(("FIELD", "VALUE"), rows)


def service_rows(dump: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for s in dump.get("services", []):
        eps = [e for p in s.get("ports", []) for e in p.get("endpoints", [])]
        out.append({"service": f"{s['namespace']}/{s['name']}", "vip": s.get("vip", ""),
                    "ports": [f"{p['port']}->{p['target_port']}/{p.get('protocol', 'tcp')}"
                              for p in s.get("ports", [])],
                    "endpoints": len(eps), "healthy": sum(1 for e in eps if e.get("healthy", True))})
    return out


def human_services(rows: list[dict[str, Any]]) -> str:
    return table(("SERVICE", "VIP", "PORTS", "ENDPOINTS"),
                 [(r["service"], r["vip"], ",".join(r["ports"]), f"{r['healthy']}/{r['endpoints']} healthy")
                  for r in rows])


def endpoint_rows(clusters: dict[str, Any], service: str) -> list[dict[str, Any]]:
    want = service if "/" in service else None
    rows = []
    for c in clusters.get("clusters", []):
        if (want and c["service"] != want) or (not want and c["service"].split("/")[-1] != service):
            continue
        for e in c["endpoints"]:
            rows.append({"service": c["service"], "port": c["port"], **e})
    return rows


def human_endpoints(rows: list[dict[str, Any]]) -> str:
    return table(("SERVICE", "PORT", "ENDPOINT", "WORKLOAD", "NODE", "HEALTHY", "EWMA", "OUTSTANDING"),
                 [(r["service"], r["port"], r["address"], r["workload"], r["node"],
                   "yes" if r["healthy"] else "NO", _fmt_ms(r.get("ewma_ms")), r.get("outstanding", 0))
                  for r in rows])


def route_rows(dump: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for s in dump.get("services", []):
        for p in s.get("ports", []):
            table_ = p.get("routes") or {}
            entries = table_.get("routes", []) if isinstance(table_, dict) else []
            if not entries:
                rows.append({"service": f"{s['namespace']}/{s['name']}", "port": p["port"],
                             "protocol": p.get("protocol", "tcp"), "route": "(L4: every connection)",
                             "match": "", "backends": [p.get("cluster", "")]})
            for r in entries:
                rows.append({"service": f"{s['namespace']}/{s['name']}", "port": p["port"],
                             "protocol": p.get("protocol", "tcp"), "route": r.get("name", ""),
                             "match": json.dumps({k: v for k, v in (r.get("match") or {}).items() if v},
                                                 separators=(",", ":"), default=str),
                             "backends": [f"{c['cluster']}({c.get('weight', 1)})" for c in r.get("clusters", [])]
                             or ([f"direct {r['direct_status']}"] if r.get("direct_status") else [])})
    return rows


def human_routes(rows: list[dict[str, Any]]) -> str:
    return table(("SERVICE", "PORT", "PROTOCOL", "ROUTE", "MATCH", "BACKENDS"),
                 [(r["service"], r["port"], r["protocol"], r["route"], r["match"], ", ".join(r["backends"]))
                  for r in rows])


def human_explain(x: dict[str, Any]) -> str:
    lines = [(f"{x['source']['workload']} ({x['source']['identity']}) -> {x['destination']['input']}"
              f"  [{x['destination']['read_as']}]  on {x['node']}, snapshot {x['snapshot_version']}"),
             f"  capture:  {'CAPTURED' if x['capture']['captured'] else 'not captured'}: {x['capture']['rule']}",
             f"  plan:     {x['plan']['kind']} ({x['plan']['reason']}): {x['plan']['detail']}"]
    if x["plan"].get("cluster"):
        lines.append(f"  cluster:  {x['plan']['cluster']} protocol {x['plan'].get('protocol', 'tcp')}")
    for r in x.get("routes", []):
        lines.append(f"  route:    {r['name']} match {json.dumps(r['match'], default=str)} -> "
                     f"{', '.join(r['backends'])}")
    if x.get("policies"):
        lines.append(f"  policies: {json.dumps(x['policies'], default=str)}")
    for c in x.get("candidates", []):
        az = c.get("authorization", {})
        lines.append(f"  endpoint: {c['address']} {c['workload']} on {c['node']} "
                     f"ewma {_fmt_ms(c['ewma_ms'])} outstanding {c['outstanding']} "
                     f"authz {az.get('verdict')} ({az.get('why')})")
        lines.append(f"            path: {c['path']}")
    lines.append(f"  choice:   {x.get('choice', '')}")
    return "\n".join(lines)


def top_rows(prev: dict[str, Any] | None, cur: dict[str, Any]) -> list[dict[str, Any]]:
    """Rates between two /summary answers (reporter=source edges: the callers' view)."""
    dt = cur["time_unix"] - prev["time_unix"] if prev else 0.0
    before = {(e["reporter"], e["source"], e["destination_service"], e["destination_workload"]): e
              for e in (prev or {}).get("edges", [])}
    rows = []
    for e in cur.get("edges", []):
        p = before.get((e["reporter"], e["source"], e["destination_service"], e["destination_workload"]))

        def rate(f: str, e: dict[str, Any] = e, p: dict[str, Any] | None = p) -> float | None:
            if p is None or dt <= 0:
                return None
            return max(0.0, (float(e[f]) - float(p[f])) / dt)

        rows.append({"reporter": e["reporter"], "source": e["source"], "service": e["destination_service"],
                     "destination": e["destination_workload"], "requests": e["requests"],
                     "connections": e["tcp_opened"], "request_rate": rate("requests"),
                     "connection_rate": rate("tcp_opened"), "success_rate": e["success_rate"],
                     "p99_ms": e["p99_ms"], "mtls": e["mtls"]})
    return rows


def human_top(rows: list[dict[str, Any]]) -> str:
    def r(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}/s"

    return table(("REPORTER", "SOURCE", "SERVICE", "DESTINATION", "RPS", "CONN/S", "TOTAL", "SUCCESS", "P99",
                  "SECURITY"),
                 [(x["reporter"], x["source"], x["service"], x["destination"], r(x["request_rate"]),
                   r(x["connection_rate"]), int(x["requests"] or x["connections"]), _fmt_pct(x["success_rate"]),
                   _fmt_ms(x["p99_ms"]), ",".join(x["mtls"])) for x in rows])


def log_line(r: dict[str, Any]) -> str:
    src = r.get("source_workload") or r.get("src", "?")
    dst = r.get("dst_workload") or r.get("dst_addr", "?")
    err = f" {r.get('error_reason')}: {r.get('error', '')}" if r.get("error_reason") else ""
    return (f"{r.get('start', '')} {r.get('direction', '?'):8} {src} -> {r.get('destination_service', '-')} "
            f"({dst}) via {r.get('via', '-')} flags {r.get('response_flags', '-')} "
            f"{r.get('bytes_sent', 0)}B/{r.get('bytes_received', 0)}B {r.get('duration_ms', 0)}ms "
            f"trace {r.get('trace_id', '-')}{err}")


def matches_service(r: dict[str, Any], service: str) -> bool:
    svc = r.get("dst_service") or ""
    fq = r.get("destination_service") or ""
    return service in (svc, svc.split("/")[-1], fq) or fq.startswith(service + ".")


# ----------------------------------------------------------------------------- commands

def _cmd_status(a: argparse.Namespace) -> int:
    s = admin_get(a.admin, "/status")
    try:
        admin_get(a.admin, "/ready")
        s["ready"] = True
    except AdminUnreachable as e:
        s["ready"] = f"no: {e}"
    emit(s, a.output, human_status)
    return 0


def _cmd_services(a: argparse.Namespace) -> int:
    emit(service_rows(admin_get(a.admin, "/config_dump")), a.output, human_services)
    return 0


def _cmd_endpoints(a: argparse.Namespace) -> int:
    rows = endpoint_rows(admin_get(a.admin, "/clusters"), a.service)
    if not rows and a.output == "table":
        raise CommandError(f"no endpoints for service {a.service!r} in this node's snapshot",
                           "`nodemesh services` lists the services this node knows")
    emit(rows, a.output, human_endpoints)
    return 0


def _cmd_routes(a: argparse.Namespace) -> int:
    emit(route_rows(admin_get(a.admin, "/config_dump")), a.output, human_routes)
    return 0


def _cmd_explain(a: argparse.Namespace) -> int:
    emit(admin_get(a.admin, "/explain", **{"from": a.source, "to": a.to}), a.output, human_explain)
    return 0


def _cmd_top(a: argparse.Namespace) -> int:
    prev = None
    n = 0
    while True:
        cur = admin_get(a.admin, "/summary")
        if prev is not None or a.count == 1:
            rows = top_rows(prev, cur)
            if a.output == "table" and sys.stdout.isatty() and a.count != 1:
                sys.stdout.write("\x1b[H\x1b[2J")
            emit(rows, a.output, human_top)
            n += 1
            if a.count and n >= a.count:
                return 0
        prev = cur
        time.sleep(a.interval)


def _follow(a: argparse.Namespace, keep: Callable[[dict[str, Any]], bool], tail: int) -> int:
    since = 0.0
    shown = 0
    deadline = time.monotonic() + a.duration if a.duration else None
    first = True
    while True:
        d = admin_get(a.admin, "/recent", since=repr(since))
        recs = [r for r in d["records"] if keep(r)]
        if first and tail:
            recs = recs[-tail:]
        first = False
        for r in recs:
            if a.output == "table":
                print(log_line(r), flush=True)
            else:
                emit(r, "json" if a.output == "json" else "yaml", str)
            shown += 1
            if a.count and shown >= a.count:
                return 0
        if d["records"]:
            since = max(since, max(r.get("end_unix", 0) for r in d["records"]))
        if not a.follow or (deadline is not None and time.monotonic() > deadline):
            return 0
        time.sleep(a.interval)


def _cmd_tap(a: argparse.Namespace) -> int:
    a.follow = True
    return _follow(a, lambda r: matches_service(r, a.service), tail=0)


def _cmd_logs(a: argparse.Namespace) -> int:
    return _follow(a, lambda r: True, tail=a.tail)


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script for the whole `nodemesh` command tree."""
    tree: dict[str, list[str]] = {}

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        words: list[str] = []
        for act in p._actions:  # argparse has no public API for this
            words += [o for o in act.option_strings if o.startswith("--")]
            if isinstance(act, argparse._SubParsersAction):
                for name, sub in act.choices.items():
                    words.append(name)
                    walk(sub, f"{path} {name}".strip())
        tree[path] = sorted(set(words))

    walk(parser, "")
    cases = "\n".join(f'    "{k}") words="{" ".join(v)}" ;;' for k, v in sorted(tree.items()))
    return f"""# nodemesh bash completion: source <(nodemesh completion bash)
_nodemesh() {{
  local cur path="" w words
  cur="${{COMP_WORDS[COMP_CWORD]}}"
  for w in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
    case "$w" in -*) ;; *) path="${{path:+$path }}$w" ;; esac
  done
  case "$path" in
{cases}
    *) words="" ;;
  esac
  COMPREPLY=( $(compgen -W "$words" -- "$cur") )
}}
complete -F _nodemesh nodemesh
"""


def _cmd_completion(a: argparse.Namespace) -> int:
    from nodemesh.cli import build_parser

    script = bash_completion(build_parser())
    if a.shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    sys.stdout.write(script)
    return 0


def _until_interrupted(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Live views (top, tap, logs -f) run until Ctrl-C, which is their normal end."""
    def run(a: argparse.Namespace) -> int:
        try:
            return fn(a)
        except KeyboardInterrupt:
            return 0
    return run


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(p: argparse.ArgumentParser, outputs: bool = True) -> None:
        p.add_argument("--admin", default=os.environ.get("NODEMESH_ADMIN", DEFAULT_ADMIN),
                       help=f"the local agent's admin endpoint (env NODEMESH_ADMIN, default {DEFAULT_ADMIN})")
        if outputs:
            add_output_flag(p)

    p = sub.add_parser("status", help="this node's agent: capture, control plane link, versions, certificates")
    common(p)
    p.set_defaults(func=_until_interrupted(_cmd_status))
    p = sub.add_parser("services", help="services in this node's snapshot")
    common(p)
    p.set_defaults(func=_until_interrupted(_cmd_services))
    p = sub.add_parser("endpoints", help="a service's endpoints with health, EWMA and outstanding connections")
    p.add_argument("service", help="<name> or <namespace>/<name>")
    common(p)
    p.set_defaults(func=_until_interrupted(_cmd_endpoints))
    p = sub.add_parser("routes", help="route tables per service port")
    common(p)
    p.set_defaults(func=_until_interrupted(_cmd_routes))
    p = sub.add_parser("explain", help="what the proxy would do with a connection, step by step")
    p.add_argument("source", metavar="FROM_WORKLOAD", help="a local workload: <name> or <namespace>/<name>")
    p.add_argument("to", metavar="TO", help="ip:port, or a service name (web, web.default, default/web[:port])")
    common(p)
    p.set_defaults(func=_until_interrupted(_cmd_explain))
    p = sub.add_parser("top", help="live golden metrics per service edge")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--count", type=int, default=0, help="stop after this many refreshes (0: run until Ctrl-C)")
    common(p)
    p.set_defaults(func=_until_interrupted(_cmd_top))
    p = sub.add_parser("tap", help="stream live connection summaries for a service")
    p.add_argument("service", help="<name>, <namespace>/<name> or the service's host name")
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--count", type=int, default=0, help="stop after this many records")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds")
    common(p)
    p.set_defaults(func=_until_interrupted(_cmd_tap))
    p = sub.add_parser("logs", help="recent access log records from this node's proxy")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    p.add_argument("--tail", type=int, default=50, help="how many recent records to show first")
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--duration", type=float, default=0.0)
    common(p)
    p.set_defaults(func=_until_interrupted(_cmd_logs))
    p = sub.add_parser("completion", help="print a shell completion script: source <(nodemesh completion bash)")
    p.add_argument("shell", choices=("bash", "zsh"))
    p.set_defaults(func=_cmd_completion)
