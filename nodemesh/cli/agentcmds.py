"""`nodemesh agent run|stop-post` and `nodemesh capture status|verify|remove`: the node
agent's verbs."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from nodemesh.cli.output import CommandError, add_output_flags_with_json, emit

log = logging.getLogger("nodeagent")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _cmd_agent_run(args: argparse.Namespace) -> int:
    from nodeagent.capture.base import CaptureError
    from nodeagent.config import ConfigError, load_config
    from nodeagent.supervision.supervisor import AgentError, run_agent

    _setup_logging(args.verbose)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        raise CommandError(f"invalid agent config {args.config}: {e}", code=2) from e
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # the agent works on the default loop too, only slower
        pass
    try:
        asyncio.run(run_agent(config, config_path=args.config))
    except (AgentError, CaptureError) as e:
        log.error("agent failed: %s", e)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def _capture_for_config(config_path: str) -> tuple[Any, dict[str, Any]]:
    """The backend the agent with this config uses (its status.json says which,
    and in which proxy state), and that status."""
    from nodeagent.capture import select as capture_select
    from nodeagent.capture.base import ProxyState
    from nodeagent.config import load_config
    from nodeagent.supervision.supervisor import resolve_control_plane

    cfg = load_config(config_path)
    settings = cfg.proxy_settings(resolve_control_plane(cfg))
    try:
        agent_status = json.loads((Path(cfg.state_dir) / "status.json").read_text())
    except (OSError, ValueError):
        agent_status = {}
    mode = agent_status.get("capture_backend") or cfg.capture.mode
    dns_port = cfg.dns.port if getattr(cfg, "dns", None) is not None and cfg.dns.enabled else None
    if agent_status and not agent_status.get("dns_listening", True):
        dns_port = None
    choice = capture_select.choose(mode, settings, cfg.local_workloads(),
                                   failure_policy=cfg.capture.failure_policy, dns_port=dns_port)
    backend = choice.backend
    state = agent_status.get("proxy_state")
    if state and hasattr(backend, "state"):
        backend.state = ProxyState(state)
    return backend, agent_status


def _cmd_capture_status(args: argparse.Namespace) -> int:
    """Exactly what of nodemesh's capture is installed in this network namespace."""
    from nodeagent.capture.base import CaptureError
    from nodeagent.capture.select import survey
    from nodeagent.config import ConfigError
    from nodeagent.supervision.settings import ProxySettings

    try:
        settings = ProxySettings(node_name="", node_address="")
        backend = None
        agent_status: dict[str, Any] = {}
        if args.config:
            backend, agent_status = _capture_for_config(args.config)
            settings = backend.settings
        found = survey(settings)
        diff = backend.verify() if backend is not None else None
    except (CaptureError, ConfigError) as e:
        raise CommandError(f"capture status: {e}", code=2) from e
    out: dict[str, Any] = {"installed": {k: {n: list(v) for n, v in sec.items()} for k, sec in found.items()}}
    if backend is not None:
        out.update(backend=backend.name, proxy_state=agent_status.get("proxy_state", ""),
                   matches_config=diff.ok if diff else None, differences=diff.describe() if diff else "")
    def human(out: dict[str, Any]) -> str:
        lines = [] if out["installed"] else ["no nodemesh capture installed in this network namespace"]
        for name, sections in out["installed"].items():
            lines.append(f"{name}:")
            for section, rules in sections.items():
                lines.append(f"  {section}:")
                lines += [f"    {rule}" for rule in rules]
        if "backend" in out:
            lines.append(f"agent backend: {out['backend']} (proxy {out['proxy_state'] or 'state unknown'})")
            lines.append(f"matches config: {'yes' if out['matches_config'] else 'no'} ({out['differences']})")
        return "\n".join(lines)

    emit(out, args.output, human)
    return 0 if diff is None or diff.ok else 1


def _cmd_capture_verify(args: argparse.Namespace) -> int:
    """Check what is installed against what the config should install: exit 0/1."""
    from nodeagent.capture.base import CaptureError
    from nodeagent.capture.select import survey
    from nodeagent.config import ConfigError

    try:
        backend, agent_status = _capture_for_config(args.config)
        diff = backend.verify()
        # A backend may compose others (ebpf: the nftables inbound part).
        owned = tuple(getattr(backend, "components", (backend.name,)))
        others = [k for k in survey(backend.settings) if k not in (*owned, "policy routing")]
    except (CaptureError, ConfigError) as e:
        raise CommandError(f"capture verify: {e}", f"the agent config {args.config}", code=2) from e
    problems = [diff.describe()] if not diff.ok else []
    problems += [f"leftover {o} capture while the agent uses {backend.name}: run `nodemesh capture remove` "
                 "or restart the agent" for o in others]
    def human(out: dict[str, Any]) -> str:
        if out["problems"]:
            return f"capture ({out['backend']}) does NOT match the config: " + "; ".join(out["problems"])
        return f"capture ({out['backend']}) matches the config"

    emit({"backend": backend.name, "ok": not problems, "problems": problems,
          "proxy_state": agent_status.get("proxy_state", "")}, args.output, human)
    return 0 if not problems else 1


def _cmd_capture_remove(_args: argparse.Namespace) -> int:
    from nodeagent.capture.removal import remove_capture

    return remove_capture()


def _cmd_agent_stop_post(args: argparse.Namespace) -> int:
    from nodeagent.capture.removal import after_agent_stop

    return after_agent_stop(args.config)


def register(subparsers: Any) -> None:
    agent = subparsers.add_parser("agent", help="the node agent")
    agent_sub = agent.add_subparsers(dest="agent_command", metavar="AGENT_COMMAND")
    agent_sub.required = True
    run = agent_sub.add_parser("run", help="run the node agent (proxy, capture, xDS, certificates)")
    run.add_argument("--config", required=True, help="agent config file, e.g. /etc/nodemesh/agent.yaml")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=_cmd_agent_run)
    sp = agent_sub.add_parser("stop-post", help="the unit's ExecStopPost: after an unclean end, remove capture "
                              "under failurePolicy open ($SERVICE_RESULT from systemd)")
    sp.add_argument("--config", required=True, help="agent config file, e.g. /etc/nodemesh/agent.yaml")
    sp.set_defaults(func=_cmd_agent_stop_post)

    capture = subparsers.add_parser("capture", help="inspect or remove traffic capture in this network namespace")
    capture_sub = capture.add_subparsers(dest="capture_command", metavar="CAPTURE_COMMAND")
    capture_sub.required = True
    st = capture_sub.add_parser("status", help="show the capture rules installed in this network namespace")
    st.add_argument("--config", help="also compare with what this agent config should install")
    add_output_flags_with_json(st)
    st.set_defaults(func=_cmd_capture_status)
    vf = capture_sub.add_parser("verify", help="check installed capture against an agent config (exit 0/1)")
    vf.add_argument("--config", required=True, help="the agent config file, e.g. /etc/nodemesh/agent.yaml")
    add_output_flags_with_json(vf)
    vf.set_defaults(func=_cmd_capture_verify)
    rm = capture_sub.add_parser("remove", help="remove nodemesh capture rules (e.g. left by a killed agent)")
    rm.set_defaults(func=_cmd_capture_remove)
