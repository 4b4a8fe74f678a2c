"""Removing nodemesh's capture from this network namespace without a running
agent: `nodemesh capture remove` (e.g. after a killed agent) and the agent
unit's ExecStopPost (nodeagent/supervision/stoppost.py), which does it after an unclean end
when failurePolicy is open."""

from __future__ import annotations

import os
import sys

from nodeagent.capture import bpfinspect, iptables, nftables, policyroute
from nodeagent.capture.base import CaptureError

# A backend whose tool or kernel feature is missing cannot have left anything.
_ABSENT = ("iptables_missing", "pyroute2_missing", "nft_unavailable", "bpftool_missing", "no_cgroup2",
           "no_netns_cookie")


def remove_capture() -> int:
    """Remove every backend's leftovers; prints what went. 0, or 1 when a removal failed."""
    removed = False
    failed = False
    # The VIP route goes first: without capture, a SYN routed to lo would be
    # dropped and retried for seconds; without the route, connect() fails at once.
    try:
        for cidr in policyroute.remove_vip_routes():
            print(f"removed the route of the service VIP range {cidr}")
    except CaptureError as e:
        if e.reason != "pyroute2_missing":
            print(f"nodemesh capture remove (VIP route): {e}", file=sys.stderr)
            failed = True
    for name, fn in (("iptables", iptables.remove_leftovers), ("nftables", nftables.remove_leftovers),
                     ("ebpf", bpfinspect.remove_leftovers)):
        try:
            removed = bool(fn()) or removed
        except CaptureError as e:
            if e.reason not in _ABSENT:
                print(f"nodemesh capture remove ({name}): {e}", file=sys.stderr)
                failed = True
    print("removed nodemesh capture rules" if removed else "no nodemesh capture rules to remove")
    return 1 if failed else 0


def after_agent_stop(config_path: str) -> int:
    """ExecStopPost of the agent's unit (nodemesh install): after an agent that did
    not stop cleanly (kill -9, a crash, the watchdog), remove the capture it left
    when failurePolicy is open, so workloads' connections flow directly instead of
    into a dead proxy until the restart; under `closed` the rules stay (refusing
    is the point). A clean stop removed or kept capture itself."""
    from nodeagent.config import ConfigError, load_config

    result = os.environ.get("SERVICE_RESULT", "")
    how = f"{os.environ.get('EXIT_CODE', '?')} {os.environ.get('EXIT_STATUS', '?')}"
    if result in ("", "success"):
        return 0
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        print(f"nodemesh agent stop-post: {e}; removing capture as under failurePolicy open", file=sys.stderr)
        return remove_capture()
    if cfg.capture.failure_policy == "closed":
        print(f"agent ended uncleanly ({result}: {how}); failurePolicy closed: capture stays, workloads' "
              "connections wait in the proxy's listeners (kept by systemd) for the restarted agent, or are "
              "refused if none are kept")
        return 0
    print(f"agent ended uncleanly ({result}: {how}); failurePolicy open: removing its capture until it is back")
    return remove_capture()
