"""The `nodemesh` command: one entry point for the control plane, the node
agent, the config API client, the demo and the lab helpers. One module per
verb group (*cmds.py), one output layer (output.py). This package and
nodemesh.lab are the only parts of `nodemesh` that import the two sides
(nodeagent, controlplane); the shared model modules import neither."""

from __future__ import annotations

import argparse
import os
import sys

# Before anything imports grpc: the agent spawns its proxy workers (fork + exec)
# while its xDS and registry streams are busy, and gRPC's fork support then runs
# its child-side handlers in the forked child before exec, which can abort it
# ("Check failed: next_worker->state == KICKED", a worker that never starts: seen
# in CI on a worker restart). Nothing of nodemesh uses gRPC across a fork, so the
# handlers only add that risk.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from nodemesh import __version__


def _cmd_version(_args: argparse.Namespace) -> int:
    print(f"nodemesh {__version__}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from nodemesh.lab.demo import run_demo

    return run_demo(requests=args.requests, keep=args.keep)


def _cmd_lab_cleanup(_args: argparse.Namespace) -> int:
    from nodemesh.lab.harness import cleanup_all

    removed = cleanup_all()
    print(f"removed {len(removed)} lab namespace(s)" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodemesh", description="A service mesh for Linux nodes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from nodemesh.cli import admincmds, agentcmds, configcmds, installcmds, observecmds, rolloutcmds, securitycmds

    configcmds.register(sub)  # controlplane serve, apply, get, delete, bootstrap
    agentcmds.register(sub)  # agent run|stop-post, capture status|verify|remove
    observecmds.register(sub)  # status, services, endpoints, routes, explain, top, tap, logs, completion
    securitycmds.register(sub)  # authz check, certs
    admincmds.register(sub)  # token create, operator create|revoke, node, audit, ca rotate (docs/security.md)
    installcmds.register(sub)  # install, uninstall (docs/systemd.md)
    rolloutcmds.register(sub)  # rollout status|pause|resume|promote|abort|history (docs/deployments.md)

    p = sub.add_parser("demo", help="bring up a two-node mesh in network namespaces and show traffic crossing it")
    p.add_argument("--requests", type=int, default=6, help="requests the client sends by the service VIP")
    p.add_argument("--keep", action="store_true", help="leave the lab running until Ctrl-C")
    p.set_defaults(func=_cmd_demo)

    lab = sub.add_parser("lab", help="helpers for the namespace lab used by the demo and tests")
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND")
    lab_sub.required = True
    lc = lab_sub.add_parser("cleanup", help="remove lab namespaces left by an interrupted run")
    lc.set_defaults(func=_cmd_lab_cleanup)

    v = sub.add_parser("version", help="print the version")
    v.set_defaults(func=_cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    from nodemesh.cli.output import run

    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
