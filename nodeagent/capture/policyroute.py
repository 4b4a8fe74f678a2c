"""Policy routing for TPROXY inbound capture, through pyroute2 (netlink):

    ip rule add fwmark MARK/MARK lookup TABLE pref PREF
    ip route add local 0.0.0.0/0 dev lo table TABLE

Packets marked by the TPROXY rules (or by the reply-steering rules) are routed
to the local stack even when their destination is not a local address. Both
are identified exactly (mark, mask, table, pref), so we add and remove only ours.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import CaptureError

if TYPE_CHECKING:
    from nodeagent.supervision.settings import ProxySettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolicyRoute:
    mark: int
    table: int
    pref: int

    def describe(self) -> tuple[str, ...]:
        return (f"ip rule: pref {self.pref} fwmark {self.mark:#x}/{self.mark:#x} lookup {self.table}",
                f"ip route: local 0.0.0.0/0 dev lo table {self.table}")



def for_settings(settings: ProxySettings) -> PolicyRoute:
    """The TPROXY policy route of the agent's settings (mark, table, pref)."""
    return PolicyRoute(settings.tproxy_mark, settings.tproxy_table, settings.tproxy_rule_pref)

@contextmanager
def netlink_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A plain selector event loop for pyroute2's synchronous API. The agent runs
    on uvloop, whose loops (the policy's new_event_loop) cannot open AF_NETLINK
    sockets ("cannot open a UDP handle, invalid family 16")."""
    loop = asyncio.SelectorEventLoop()
    try:
        yield loop
    finally:
        loop.close()


@contextmanager
def _ipr() -> Iterator[Any]:
    try:
        from pyroute2 import IPRoute
    except ImportError:
        raise CaptureError("pyroute2_missing", "pyroute2 is not installed: pip install pyroute2") from None
    with netlink_loop() as loop:
        ipr = IPRoute(use_event_loop=loop)
        try:
            yield ipr
        finally:
            ipr.close()


def _our_rules(ipr, pr: PolicyRoute) -> list:  # type: ignore[no-untyped-def,type-arg]
    out = []
    for r in ipr.get_rules(family=2):
        if (r.get_attr("FRA_FWMARK") == pr.mark and r.get_attr("FRA_TABLE") == pr.table
                and r.get_attr("FRA_PRIORITY") == pr.pref):
            out.append(r)
    return out


def _our_routes(ipr, pr: PolicyRoute) -> list:  # type: ignore[no-untyped-def,type-arg]
    return [r for r in ipr.get_routes(family=2, table=pr.table)
            if r["type"] == 2 and r["dst_len"] == 0 and r.get_attr("RTA_TABLE") == pr.table]  # RTN_LOCAL


def present(pr: PolicyRoute) -> tuple[int, int]:
    """(number of our rules, number of our routes) installed now."""
    with _ipr() as ipr:
        return len(_our_rules(ipr, pr)), len(_our_routes(ipr, pr))


def install(pr: PolicyRoute) -> None:
    """Make exactly one rule and one route of ours exist (repairs duplicates)."""
    try:
        with _ipr() as ipr:
            rules = _our_rules(ipr, pr)
            for _ in rules[1:]:
                ipr.rule("del", family=2, fwmark=pr.mark, fwmask=pr.mark, table=pr.table, priority=pr.pref)
            if not rules:
                ipr.rule("add", family=2, fwmark=pr.mark, fwmask=pr.mark, table=pr.table, priority=pr.pref)
            if not _our_routes(ipr, pr):
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.route("add", dst="0.0.0.0/0", type="local", oif=lo, table=pr.table, scope=254)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - pyroute2 raises NetlinkError and OSError
        raise CaptureError("policy_route_failed",
                           f"cannot install the TPROXY policy route ({'; '.join(pr.describe())}): {e}; "
                           "is the agent root (CAP_NET_ADMIN) and is capture.tproxyTable free?") from None


def remove(pr: PolicyRoute) -> bool:
    """Delete our rule(s) and route; True if anything was there."""
    removed = False
    try:
        with _ipr() as ipr:
            for _ in _our_rules(ipr, pr):
                ipr.rule("del", family=2, fwmark=pr.mark, fwmask=pr.mark, table=pr.table, priority=pr.pref)
                removed = True
            if _our_routes(ipr, pr):
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.route("del", dst="0.0.0.0/0", type="local", oif=lo, table=pr.table, scope=254)
                removed = True
    except Exception as e:  # noqa: BLE001 - pyroute2 raises NetlinkError and OSError
        raise CaptureError("policy_route_failed", f"cannot remove the TPROXY policy route: {e}") from None
    return removed


def diff(pr: PolicyRoute, wanted: bool) -> tuple[str, ...]:
    """Problems with the policy route, given whether it should exist."""
    try:
        nrules, nroutes = present(pr)
    except Exception as e:  # noqa: BLE001 - pyroute2 raises NetlinkError and OSError
        return (f"cannot read policy routes: {e}",)
    problems = []
    if wanted:
        if nrules != 1:
            problems.append(f"expected 1 ip rule 'fwmark {pr.mark:#x} lookup {pr.table}', found {nrules}")
        if nroutes != 1:
            problems.append(f"expected the local default route in table {pr.table}, found {nroutes}")
    elif nrules or nroutes:
        problems.append(f"leftover TPROXY policy route (table {pr.table}): {nrules} rule(s), {nroutes} route(s)")
    return tuple(problems)


# --- the service VIP range ------------------------------------------------------------------------
# Service VIPs (a class-E range by default) are routed nowhere: on a node without
# a default route, connect() fails with "Network is unreachable" before nat
# OUTPUT sees the SYN. While capture is installed the agent routes the range to
# `lo` (capture redirects the SYN before it leaves; a process capture does not
# cover gets a silent drop, as with a default route whose gateway drops it).
# Ours are recognised by their routing protocol number alone.
RTPROT_NODEMESH = 151


def _vip_routes(ipr) -> list:  # type: ignore[no-untyped-def,type-arg]
    return [r for r in ipr.get_routes(family=2, table=254) if r["proto"] == RTPROT_NODEMESH]


def install_vip_route(cidr: str) -> bool:
    """Route `cidr` to lo (ours only, replacing ours for another range); True if added."""
    try:
        with _ipr() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            have = False
            for r in _vip_routes(ipr):
                if f"{r.get_attr('RTA_DST')}/{r['dst_len']}" == cidr:
                    have = True
                    continue
                ipr.route("del", dst=f"{r.get_attr('RTA_DST')}/{r['dst_len']}", oif=lo, proto=RTPROT_NODEMESH,
                          scope=253, table=254)
            if not have:
                ipr.route("add", dst=cidr, oif=lo, proto=RTPROT_NODEMESH, scope=253, table=254)  # RT_SCOPE_LINK
            return not have
    except Exception as e:  # noqa: BLE001 - pyroute2 raises NetlinkError and OSError
        raise CaptureError("vip_route_failed", f"cannot route the service VIP range {cidr} to lo: {e}; "
                           "does the agent have CAP_NET_ADMIN?") from None


def remove_vip_routes() -> list[str]:
    """Delete every VIP route of ours; the ranges removed."""
    removed = []
    try:
        with _ipr() as ipr:
            for r in _vip_routes(ipr):
                dst = f"{r.get_attr('RTA_DST')}/{r['dst_len']}"
                ipr.route("del", dst=dst, oif=r.get_attr("RTA_OIF"), proto=RTPROT_NODEMESH, scope=r["scope"],
                          table=254)
                removed.append(dst)
    except Exception as e:  # noqa: BLE001 - pyroute2 raises NetlinkError and OSError
        raise CaptureError("vip_route_failed", f"cannot remove the service VIP route: {e}") from None
    return removed


def vip_routes() -> list[str]:
    with _ipr() as ipr:
        return [f"{r.get_attr('RTA_DST')}/{r['dst_len']}" for r in _vip_routes(ipr)]
