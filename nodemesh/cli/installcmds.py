"""`nodemesh install agent|controlplane` and `nodemesh uninstall`: the verbs; the
plans, units and the executor are nodemesh/install.py (docs/systemd.md)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from nodemesh.cli.output import CommandError
from nodemesh.install import (
    AGENT_UNIT,
    CP_UNIT,
    CP_USER,
    DEFAULT_AGENT_CONFIG,
    UNIT_DIR,
    InstallError,
    install_agent,
    install_controlplane,
    uninstall,
)


def _cmd_install(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise CommandError("install needs root", "it writes units under /etc/systemd/system and makes a user")
    try:
        if args.kind == "agent":
            plan = install_agent(args.config, args.python, start=not args.no_start, unit_dir=args.unit_dir)
            print(f"installed {AGENT_UNIT} (user {plan.user or 'root'}, capabilities {' '.join(plan.caps)})"
                  + ("" if args.no_start else ": running, capture installed"))
        else:
            install_controlplane(args.python, args.listen or ["0.0.0.0:15010"], args.san, args.serve_arg,
                                 start=not args.no_start, unit_dir=args.unit_dir)
            print(f"installed {CP_UNIT} (user {CP_USER}, no capabilities)" + ("" if args.no_start else ": running"))
    except (InstallError, OSError) as e:
        raise CommandError(f"install {args.kind}: {e}") from e
    return 0


def _cmd_uninstall(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise CommandError("uninstall needs root")
    try:
        done = uninstall(args.kind, True if args.purge else (False if args.keep_state else None), args.python)
    except (InstallError, OSError) as e:
        raise CommandError(f"uninstall {args.kind}: {e}") from e
    print("removed: " + (", ".join(done) if done else "nothing (not installed)"))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("install", help="install the agent or the control plane as a hardened systemd service")
    p.add_argument("kind", choices=("agent", "controlplane"))
    p.add_argument("--config", default=DEFAULT_AGENT_CONFIG, help="agent: its config file (checked first)")
    p.add_argument("--listen", action="append", default=None, metavar="ADDR",
                   help="controlplane: a TCP listener (default 0.0.0.0:15010); the unix admin socket is always on")
    p.add_argument("--san", action="append", default=[], metavar="IP|NAME",
                   help="controlplane: a name or IP agents dial (into the server certificate)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="controlplane: another `controlplane serve` argument, e.g. --serve-arg=--store=etcd")
    p.add_argument("--python", default=sys.executable, help="the interpreter the unit runs (default: this one)")
    p.add_argument("--unit-dir", default=UNIT_DIR, help=argparse.SUPPRESS)
    p.add_argument("--no-start", action="store_true", help="write and enable the unit, do not start it")
    p.set_defaults(func=_cmd_install)
    u = sub.add_parser("uninstall", help="remove the service, its capture and (asked, or --purge) its state")
    u.add_argument("kind", choices=("agent", "controlplane"))
    g = u.add_mutually_exclusive_group()
    g.add_argument("--purge", action="store_true", help="also delete the state (keys, store), config and user")
    g.add_argument("--keep-state", action="store_true", help="keep the state without asking")
    u.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    u.set_defaults(func=_cmd_uninstall)
