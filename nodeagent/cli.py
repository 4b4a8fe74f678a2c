"""The agent's subcommands of `nodemesh`: `agent run`, `capture status`, `capture remove`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

log = logging.getLogger("nodeagent")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _cmd_agent_run(args: argparse.Namespace) -> int:
    from nodeagent.capture.iptables import CaptureError
    from nodeagent.config import ConfigError, load_config
    from nodeagent.supervisor import AgentError, run_agent

    _setup_logging(args.verbose)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"nodemesh agent: invalid config {args.config}: {e}", file=sys.stderr)
        return 2
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


def _capture_for_status(config_path: str | None) -> Any:
    from nodeagent.capture.iptables import IptablesCapture
    from nodeagent.config import load_config

    if not config_path:
        return None
    cfg = load_config(config_path)
    settings = cfg.proxy_settings()
    return IptablesCapture(settings, cfg.local_workloads(), exclusions=settings.excluded_cidrs)


def _cmd_capture_status(args: argparse.Namespace) -> int:
    from nodeagent.capture.iptables import CaptureError, parse_nat_save, run_command
    from nodeagent.config import ConfigError

    try:
        state = parse_nat_save(run_command(["iptables-save", "-t", "nat"], None))
        capture = _capture_for_status(args.config)
    except (CaptureError, ConfigError) as e:
        print(f"nodemesh capture status: {e}", file=sys.stderr)
        return 2
    out: dict[str, Any] = {
        "installed": state.installed,
        "jumps": state.jumps,
        "chains": {name: list(rules) for name, rules in state.chains.items()},
    }
    rc = 0 if state.installed or not state.anything else 1
    if capture is not None:
        from nodeagent.capture.iptables import diff_state

        diff = diff_state(capture.expected(), state)
        out["matches_config"] = diff.ok
        out["differences"] = diff.describe()
        rc = 0 if diff.ok else 1
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"capture installed: {'yes' if state.installed else 'no'}")
        for builtin, n in sorted(state.jumps.items()):
            print(f"  jumps from {builtin}: {n}")
        for name, rules in state.chains.items():
            print(f"  chain {name}:")
            for r in rules:
                print(f"    {r}")
        if capture is not None:
            print(f"matches config: {'yes' if out['matches_config'] else 'no'} ({out['differences']})")
    return rc


def _cmd_capture_remove(_args: argparse.Namespace) -> int:
    from nodeagent.capture.iptables import CaptureError, remove_leftovers

    try:
        removed = remove_leftovers()
    except CaptureError as e:
        print(f"nodemesh capture remove: {e}", file=sys.stderr)
        return 1
    print("removed nodemesh capture rules" if removed else "no nodemesh capture rules to remove")
    return 0


def register(subparsers: Any) -> None:
    agent = subparsers.add_parser("agent", help="the node agent")
    agent_sub = agent.add_subparsers(dest="agent_command", metavar="AGENT_COMMAND")
    agent_sub.required = True
    run = agent_sub.add_parser("run", help="run the node agent (proxy, capture, xDS, certificates)")
    run.add_argument("--config", required=True, help="agent config file, e.g. /etc/nodemesh/agent.yaml")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=_cmd_agent_run)

    capture = subparsers.add_parser("capture", help="inspect or remove traffic capture in this network namespace")
    capture_sub = capture.add_subparsers(dest="capture_command", metavar="CAPTURE_COMMAND")
    capture_sub.required = True
    st = capture_sub.add_parser("status", help="show the capture rules installed in this network namespace")
    st.add_argument("--config", help="also compare with what this agent config should install")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=_cmd_capture_status)
    rm = capture_sub.add_parser("remove", help="remove nodemesh capture rules (e.g. left by a killed agent)")
    rm.set_defaults(func=_cmd_capture_remove)
