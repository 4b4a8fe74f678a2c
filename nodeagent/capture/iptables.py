"""Traffic capture with iptables: pure functions render `iptables-restore
--noflush` text, a thin executor applies it atomically (one restore call).

Only our own chains and the one jump into each are ever written or removed;
every other rule is left alone. Tables used:
  nat     NODEMESH_OUTPUT (workloads' outbound -> :15001),
          NODEMESH_PREROUTING (inbound plaintext -> :15006, redirect mode)
  mangle  NODEMESH_TPROXY, NODEMESH_DIVERT, NODEMESH_MANGLE_OUT (tproxy mode)
  filter  NODEMESH_INPUT (tproxy mode: refuses inbound while the proxy is down
          under failurePolicy closed; TPROXY itself would drop, i.e. hang)
plus, in tproxy mode, one `ip rule` and one route (nodeagent.capture.policyroute).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import shlex
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from nodeagent.meshview.snapshot import LocalWorkload
from nodeagent.supervision.settings import ProxySettings

from . import policyroute
from .base import CaptureDiff, CaptureError, CaptureStatus, NetfilterTargets, ProxyState, diff_chains

__all__ = [
    "CaptureDiff",
    "CaptureError",
    "IptablesCapture",
    "NatState",
    "SaveState",
    "diff_state",
    "parse_nat_save",
    "parse_save",
    "remove_leftovers",
    "render_install",
    "render_remove",
]

log = logging.getLogger(__name__)

OUTPUT_CHAIN = "NODEMESH_OUTPUT"
PREROUTING_CHAIN = "NODEMESH_PREROUTING"
TPROXY_CHAIN = "NODEMESH_TPROXY"
DIVERT_CHAIN = "NODEMESH_DIVERT"
MANGLE_OUT_CHAIN = "NODEMESH_MANGLE_OUT"
INPUT_CHAIN = "NODEMESH_INPUT"

# (built-in chain, our chain) pairs of the nat table in redirect mode (kept for callers).
JUMPS: tuple[tuple[str, str], ...] = (("OUTPUT", OUTPUT_CHAIN), ("PREROUTING", PREROUTING_CHAIN))
OUR_CHAINS = (OUTPUT_CHAIN, PREROUTING_CHAIN)

TABLES = ("nat", "mangle", "filter")
# Every chain we may ever create, per table (leftovers of any mode are found).
ALL_CHAINS: dict[str, tuple[str, ...]] = {
    "nat": (OUTPUT_CHAIN, PREROUTING_CHAIN),
    "mangle": (TPROXY_CHAIN, DIVERT_CHAIN, MANGLE_OUT_CHAIN),
    "filter": (INPUT_CHAIN,),
}
ALL_JUMPS: dict[str, tuple[tuple[str, str], ...]] = {
    "nat": JUMPS,
    "mangle": (("PREROUTING", TPROXY_CHAIN), ("OUTPUT", MANGLE_OUT_CHAIN)),
    "filter": (("INPUT", INPUT_CHAIN),),
}


@dataclass(frozen=True)
class Layout:
    """Which of our chains and jumps a mode uses, per table."""

    chains: dict[str, tuple[str, ...]]
    jumps: dict[str, tuple[tuple[str, str], ...]]


def layout(inbound_mode: str) -> Layout:
    if inbound_mode == "tproxy":
        return Layout(
            chains={"nat": (OUTPUT_CHAIN,), "mangle": ALL_CHAINS["mangle"], "filter": ALL_CHAINS["filter"]},
            jumps={"nat": (("OUTPUT", OUTPUT_CHAIN),), "mangle": ALL_JUMPS["mangle"], "filter": ALL_JUMPS["filter"]},
        )
    return Layout(chains={"nat": OUR_CHAINS}, jumps={"nat": JUMPS})


# ------------------------------------------------------------------ state parsing


@dataclass(frozen=True)
class NatState:
    """What of ours is in one table, parsed from iptables-save."""

    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # our chain -> rules (normalized)
    jumps: dict[str, int] = field(default_factory=dict)  # built-in chain -> count of jumps into ours
    jump_positions: dict[str, tuple[int, ...]] = field(default_factory=dict)  # 1-based

    @property
    def installed(self) -> bool:
        return all(c in self.chains for c in OUR_CHAINS) and all(self.jumps.get(b, 0) >= 1 for b, _ in JUMPS)

    @property
    def anything(self) -> bool:
        return bool(self.chains) or any(self.jumps.values())


@dataclass(frozen=True)
class SaveState:
    """Our chains and jumps in every table (table -> NatState)."""

    tables: dict[str, NatState] = field(default_factory=dict)

    def table(self, name: str) -> NatState:
        return self.tables.get(name, NatState())

    @property
    def anything(self) -> bool:
        return any(t.anything for t in self.tables.values())

    def installed_for(self, lay: Layout) -> bool:
        for table, chains in lay.chains.items():
            st = self.table(table)
            if not all(c in st.chains for c in chains):
                return False
            if not all(st.jumps.get(b, 0) >= 1 for b, _ in lay.jumps.get(table, ())):
                return False
        return True


def normalize_rule(rule: str) -> str:
    """Canonical text of one rule spec (without `-A CHAIN`), so rendered rules and
    what iptables-save prints compare equal: quotes dropped, host addresses /32."""
    tokens = shlex.split(rule)
    out: list[str] = []
    for i, tok in enumerate(tokens):
        if i > 0 and tokens[i - 1] in ("-d", "-s", "--destination", "--source"):
            with contextlib.suppress(ValueError):
                tok = str(ipaddress.ip_network(tok, strict=False))
        out.append(tok)
    return " ".join(out)


def parse_save(text: str) -> SaveState:
    """Extract our chains and the jumps into them, per table, from iptables-save
    output. Other chains' rules are ignored."""
    chains: dict[str, dict[str, list[str]]] = {}
    positions: dict[str, dict[str, list[int]]] = {}
    counters: dict[tuple[str, str], int] = {}
    table = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:]
            continue
        if table not in ALL_CHAINS:
            continue
        ours = ALL_CHAINS[table]
        if line.startswith(":"):
            name = line[1:].split()[0]
            if name in ours:
                chains.setdefault(table, {}).setdefault(name, [])
            continue
        if line.startswith("-A "):
            parts = line.split(None, 2)
            chain = parts[1]
            spec = parts[2] if len(parts) > 2 else ""
            counters[(table, chain)] = counters.get((table, chain), 0) + 1
            if chain in ours:
                chains.setdefault(table, {}).setdefault(chain, []).append(normalize_rule(spec))
                continue
            for builtin, our in ALL_JUMPS[table]:
                if chain == builtin and normalize_rule(spec) == f"-j {our}":
                    positions.setdefault(table, {}).setdefault(builtin, []).append(counters[(table, chain)])
    tables = {}
    for t in set(chains) | set(positions):
        pos = positions.get(t, {})
        tables[t] = NatState(
            chains={k: tuple(v) for k, v in chains.get(t, {}).items()},
            jumps={k: len(v) for k, v in pos.items()},
            jump_positions={k: tuple(v) for k, v in pos.items()},
        )
    return SaveState(tables)


def parse_nat_save(text: str) -> NatState:
    """Our nat-table chains and jumps (the redirect-mode view)."""
    return parse_save(text).table("nat")


# ------------------------------------------------------------------ rendering


def _host_cidr(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


def _workload_match(wl: LocalWorkload) -> str | None:
    if wl.uid is not None:
        return f"-m owner --uid-owner {wl.uid}"
    if wl.cgroup:
        return f"-m cgroup --path {shlex.quote('/' + wl.cgroup.strip('/'))}"
    return None


def _inbound_ports(workloads: Sequence[LocalWorkload]) -> list[tuple[str, int]]:
    return [(wl.ip, p) for wl in workloads if ipaddress.ip_address(wl.ip).version == 4 for p in wl.ports]


def output_rules(settings: ProxySettings, workloads: Sequence[LocalWorkload],
                 exclusions: Iterable[str], control_plane: Sequence[str] = (),
                 state: ProxyState = ProxyState.SERVING, dns_port: int | None = None) -> tuple[str, ...]:
    """Rules of NODEMESH_OUTPUT, in order. The proxy's own traffic (marked)
    returns first so it is never captured again; loopback, the control plane
    and excluded CIDRs return next; then each declared workload's TCP is
    redirected to the outbound listener. Nothing else on the node is touched.

    BYPASS: the workload rules RETURN instead (their packet counters count the
    connections that bypassed the mesh). REFUSE keeps the REDIRECT: with no
    listener on the port the kernel answers the SYN with a reset at once."""
    rules = [f"-m mark --mark {settings.mark:#x} -j RETURN"]
    if dns_port is not None:
        # Mesh DNS (docs/dns.md): a workload's port 53 to ANY address, loopback
        # stubs included, goes to the agent's DNS proxy, hence before the RETURNs.
        rules += [f"-p {proto} -m {proto} --dport 53 {match} -j REDIRECT --to-ports {dns_port}"
                  for wl in workloads if (match := _workload_match(wl)) for proto in ("udp", "tcp")]
    rules.append("-d 127.0.0.0/8 -j RETURN")
    seen: set[str] = set()
    for cidr in list(control_plane) + list(exclusions):
        net = str(ipaddress.ip_network(cidr, strict=False))
        if net in seen or ipaddress.ip_network(net).version != 4:
            # The nat table here is IPv4 only; IPv6 exclusions belong to ip6tables.
            continue
        seen.add(net)
        rules.append(f"-d {net} -j RETURN")
    target = "RETURN" if state is ProxyState.BYPASS else f"REDIRECT --to-ports {settings.outbound_port}"
    for wl in workloads:
        match = _workload_match(wl)
        if match is not None:
            rules.append(f"-p tcp {match} -j {target}")
    return tuple(rules)


def prerouting_rules(settings: ProxySettings, workloads: Sequence[LocalWorkload],
                     state: ProxyState = ProxyState.SERVING) -> tuple[str, ...]:
    """Rules of NODEMESH_PREROUTING (redirect mode): plaintext TCP arriving for a
    local workload's port goes to the inbound listener. Traffic on lo is left
    alone, since the proxy itself delivers to workloads over loopback-routed
    local addresses. BYPASS: none (callers reach the workload directly)."""
    if state is ProxyState.BYPASS:
        return ()
    return tuple(
        f"-d {_host_cidr(ip)} ! -i lo -p tcp -m tcp --dport {port} -j REDIRECT --to-ports {settings.inbound_plain_port}"
        for ip, port in _inbound_ports(workloads)
    )


def _xmark(mark: int) -> str:
    return f"{mark:#x}/{mark:#x}"


def tproxy_rules(settings: ProxySettings, workloads: Sequence[LocalWorkload],
                 state: ProxyState = ProxyState.SERVING) -> dict[str, tuple[str, ...]]:
    """mangle/filter chains of tproxy mode, as iptables-save prints them.

    NODEMESH_TPROXY: packets of a connection a transparent socket already owns
    (the proxy's accepted inbound sockets, and its source-preserving upstream
    sockets) are marked and accepted; new plaintext connections to a workload
    port arriving on any interface but lo go to :15006 with TPROXY.
    NODEMESH_MANGLE_OUT: the proxy's upstream connections that carry the
    caller's source address get a connmark, and the workload's replies on them
    are marked, so policy routing brings them back to the proxy instead of
    sending them to the caller directly.
    NODEMESH_INPUT (REFUSE only): reset inbound connections while the proxy is down."""
    m = settings.tproxy_mark
    ports = _inbound_ports(workloads)
    tp = [f"-p tcp -m socket --transparent -j {DIVERT_CHAIN}"]
    if state is ProxyState.SERVING:
        tp += [f"-d {_host_cidr(ip)} ! -i lo -p tcp -m tcp --dport {port} -j TPROXY --on-port "
               f"{settings.inbound_plain_port} --on-ip 0.0.0.0 --tproxy-mark {_xmark(m)}" for ip, port in ports]
    refuse: list[str] = []
    if state is ProxyState.REFUSE:
        refuse = [f"-d {_host_cidr(ip)} ! -i lo -p tcp -m tcp --dport {port} -j REJECT --reject-with tcp-reset"
                  for ip, port in ports]
    return {
        TPROXY_CHAIN: tuple(tp),
        DIVERT_CHAIN: (f"-j MARK --set-xmark {_xmark(m)}", "-j ACCEPT"),
        MANGLE_OUT_CHAIN: (
            f"-p tcp -m mark --mark {settings.mark:#x} -m addrtype ! --src-type LOCAL "
            f"-j CONNMARK --set-xmark {_xmark(m)}",
            f"-p tcp -m connmark --mark {_xmark(m)} -j MARK --set-xmark {_xmark(m)}",
        ),
        INPUT_CHAIN: tuple(refuse),
    }


def desired_tables(settings: ProxySettings, workloads: Sequence[LocalWorkload], exclusions: Iterable[str],
                   control_plane: Sequence[str] = (),
                   state: ProxyState = ProxyState.SERVING,
                   dns_port: int | None = None) -> dict[str, dict[str, tuple[str, ...]]]:
    """table -> our chain -> rules, for the settings' inbound mode and `state`."""
    out = output_rules(settings, workloads, exclusions, control_plane, state, dns_port)
    if settings.inbound_mode == "tproxy":
        tp = tproxy_rules(settings, workloads, state)
        return {"nat": {OUTPUT_CHAIN: out},
                "mangle": {c: tp[c] for c in ALL_CHAINS["mangle"]},
                "filter": {INPUT_CHAIN: tp[INPUT_CHAIN]}}
    return {"nat": {OUTPUT_CHAIN: out, PREROUTING_CHAIN: prerouting_rules(settings, workloads, state)}}


def desired_chains(settings: ProxySettings, workloads: Sequence[LocalWorkload],
                   exclusions: Iterable[str], control_plane: Sequence[str] = ()) -> dict[str, tuple[str, ...]]:
    """The nat chains (redirect mode), kept for callers of the nat-only view."""
    return desired_tables(settings, workloads, exclusions, control_plane)["nat"]


def render_tables(desired: dict[str, dict[str, tuple[str, ...]]], lay: Layout, state: SaveState) -> str:
    """iptables-restore --noflush text making every table hold exactly `desired`
    and one jump into each chain of `lay`; our chains of other modes (leftovers
    of an earlier config) are flushed and deleted. Declaring `:CHAIN - [0:0]`
    flushes a chain, so leftovers of a killed agent are replaced."""
    lines: list[str] = []
    for table in TABLES:
        cur = state.table(table)
        want = desired.get(table, {})
        stale = [c for c in ALL_CHAINS[table] if c in cur.chains and c not in want]
        stale_jumps = [(b, c) for b, c in ALL_JUMPS[table] if c not in want and cur.jumps.get(b, 0)]
        if not want and not stale and not stale_jumps:
            continue
        body = [f"*{table}"]
        body += [f":{name} - [0:0]" for name in want]
        body += [f":{name} - [0:0]" for name in stale]
        for builtin, ours in lay.jumps.get(table, ()):
            # Per table, each built-in chain jumps into at most one chain of ours.
            count = cur.jumps.get(builtin, 0)
            # A killed agent racing a restart can leave duplicates: keep one.
            body += [f"-D {builtin} -j {ours}"] * max(0, count - 1)
            if count == 0:
                body.append(f"-I {builtin} 1 -j {ours}")
        for builtin, ours in stale_jumps:
            body += [f"-D {builtin} -j {ours}"] * cur.jumps.get(builtin, 0)
        for name, rules in want.items():
            body += [f"-A {name} {rule}" for rule in rules]
        body += [f"-X {name}" for name in stale]
        body.append("COMMIT")
        lines += body
    return "\n".join(lines) + "\n" if lines else ""


def render_install(settings: ProxySettings, workloads: Sequence[LocalWorkload],
                   exclusions: Iterable[str], control_plane: Sequence[str], current_save: str,
                   state: ProxyState = ProxyState.SERVING) -> str:
    """iptables-restore --noflush text installing capture over `current_save`."""
    return render_tables(desired_tables(settings, workloads, exclusions, control_plane, state),
                         layout(settings.inbound_mode), parse_save(current_save))


def render_remove(current_save: str) -> str:
    """iptables-restore --noflush text deleting exactly our jumps and chains, as
    far as they exist now; "" when there is nothing to remove."""
    state = parse_save(current_save)
    if not state.anything:
        return ""
    lines: list[str] = []
    for table in TABLES:
        cur = state.table(table)
        if not cur.anything:
            continue
        present = [c for c in ALL_CHAINS[table] if c in cur.chains]
        lines.append(f"*{table}")
        # Flush before delete: a chain that still has rules cannot be deleted.
        lines += [f":{name} - [0:0]" for name in present]
        for builtin, ours in ALL_JUMPS[table]:
            lines += [f"-D {builtin} -j {ours}"] * cur.jumps.get(builtin, 0)
        lines += [f"-X {name}" for name in present]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _diff_table(table: str, expected: dict[str, tuple[str, ...]], state: NatState,
                jumps: tuple[tuple[str, str], ...]) -> CaptureDiff:
    """Our chains rule by rule (base.diff_chains), then the jumps into them."""
    prefix = "" if table == "nat" else f"{table} "
    want = {chain: tuple(normalize_rule(r) for r in rules) for chain, rules in expected.items()}
    diff = diff_chains(want, state.chains, str, prefix)
    problems: list[str] = []
    for builtin, ours in jumps:
        n = state.jumps.get(builtin, 0)
        if n == 0:
            problems.append(f"no jump from {prefix}{builtin} to {ours}")
        elif n > 1:
            problems.append(f"{n} jumps from {prefix}{builtin} to {ours} (expected 1)")
    return diff + CaptureDiff(jump_problems=tuple(problems))


def diff_state(expected: dict[str, tuple[str, ...]], state: NatState) -> CaptureDiff:
    """nat-table comparison (redirect-mode view)."""
    jumps = tuple((b, c) for b, c in JUMPS if c in expected)
    return _diff_table("nat", expected, state, jumps)


def diff_tables(expected: dict[str, dict[str, tuple[str, ...]]], lay: Layout, state: SaveState) -> CaptureDiff:
    total = CaptureDiff()
    for table in TABLES:
        want = expected.get(table, {})
        cur = state.table(table)
        if not want:
            if cur.anything:
                total = total + CaptureDiff(jump_problems=(f"leftover nodemesh chains or jumps in table {table}",))
            continue
        total = total + _diff_table(table, want, cur, lay.jumps.get(table, ()))
    return total


# ------------------------------------------------------------------ executor

Runner = Callable[[Sequence[str], str | None], str]


def run_command(argv: Sequence[str], stdin: str | None) -> str:
    """Run a command in the current network namespace; raise CaptureError with a hint."""
    try:
        proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30,
                              check=False)
    except FileNotFoundError:
        raise CaptureError("iptables_missing",
                           f"{argv[0]} not found: is the iptables package installed and on PATH?") from None
    except subprocess.TimeoutExpired:
        raise CaptureError("iptables_timeout",
                           f"{argv[0]} did not finish in 30 s: is another process holding the xtables lock?") from None
    if proc.returncode != 0:
        raise CaptureError(
            "iptables_failed",
            f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()}; "
            "is the agent running as root (CAP_NET_ADMIN) and are the nat/mangle tables available?",
        )
    return proc.stdout


class IptablesCapture(NetfilterTargets):
    """Applies rendered rules with one iptables-restore call each time, so a
    reader never sees half a rule set."""

    name = "iptables"

    def __init__(self, settings: ProxySettings, workloads: Sequence[LocalWorkload],
                 exclusions: Iterable[str] = (), control_plane: Sequence[str] = (),
                 runner: Runner = run_command, manage_routes: bool | None = None,
                 dns_port: int | None = None) -> None:
        super().__init__(settings, workloads, exclusions, control_plane, dns_port)
        self._run = runner
        # Policy routes go through netlink; scripted runners in unit tests skip them.
        self._routes = (runner is run_command) if manage_routes is None else manage_routes

    @property
    def tproxy(self) -> bool:
        return self.settings.inbound_mode == "tproxy"

    def _save(self) -> str:
        return self._run(["iptables-save"], None)

    def _restore(self, text: str, action: str) -> None:
        try:
            self._run(["iptables-restore", "--noflush"], text)
        except CaptureError as e:
            raise CaptureError(e.reason, f"iptables-restore failed while {action}: {e}") from None

    def expected_tables(self) -> dict[str, dict[str, tuple[str, ...]]]:
        return desired_tables(self.settings, self.workloads, self.exclusions, self.control_plane, self.state,
                              self.dns_port)

    def expected(self) -> dict[str, tuple[str, ...]]:
        return self.expected_tables()["nat"]

    def install(self) -> None:
        """Install (or repair) capture atomically; leftovers are replaced."""
        current = self._save()
        state = parse_save(current)
        # What was there (the agent says whose: its own, a restart's, a killed agent's).
        self.replaced = (", ".join(f"{t}/{c}" for t, st in sorted(state.tables.items()) for c in st.chains)
                         or "jumps only") if state.anything else ""
        if self.replaced:
            log.debug("capture: replacing iptables rules in place (%s)", self.replaced)
        if self._routes:
            pr = policyroute.for_settings(self.settings)
            if self.tproxy:
                policyroute.install(pr)
            else:
                policyroute.remove(pr)
        text = render_tables(self.expected_tables(), layout(self.settings.inbound_mode), state)
        if text:
            self._restore(text, "installing capture")
        diff = self.verify()
        if not diff.ok:
            raise CaptureError("capture_mismatch",
                               f"capture rules differ right after install: {diff.describe()}; "
                               "is another agent or firewall manager rewriting the tables?")

    def set_proxy_state(self, state: ProxyState) -> None:
        """Re-render for `state` and apply in one restore call (policy routes stay)."""
        self.state = state
        text = render_tables(self.expected_tables(), layout(self.settings.inbound_mode), parse_save(self._save()))
        if text:
            self._restore(text, f"switching capture to {state.value}")

    def remove(self) -> bool:
        """Remove our jumps, chains and policy route; True if anything was removed."""
        text = render_remove(self._save())
        removed = False
        if text:
            self._restore(text, "removing capture")
            removed = True
        if self._routes:
            removed = policyroute.remove(policyroute.for_settings(self.settings)) or removed
        return removed

    def save_state(self) -> SaveState:
        return parse_save(self._save())

    def status(self) -> CaptureStatus:
        state = self.save_state()
        sections: dict[str, tuple[str, ...]] = {}
        for table, st in sorted(state.tables.items()):
            for builtin, n in sorted(st.jumps.items()):
                sections.setdefault(f"{table} jumps", ())
                sections[f"{table} jumps"] += (f"{builtin} -> {n} jump(s) into nodemesh",)
            for chain, rules in st.chains.items():
                sections[f"{table} {chain}"] = rules
        if self._routes:
            nrules, nroutes = policyroute.present(policyroute.for_settings(self.settings))
            if nrules or nroutes:
                sections["policy routing"] = policyroute.for_settings(self.settings).describe()
        return CaptureStatus("iptables", state.installed_for(layout(self.settings.inbound_mode)), sections,
                             {"inbound": self.settings.inbound_mode, "state": self.state.value})

    def verify(self) -> CaptureDiff:
        diff = diff_tables(self.expected_tables(), layout(self.settings.inbound_mode), self.save_state())
        if self._routes:
            pr = policyroute.for_settings(self.settings)
            diff = diff + CaptureDiff(jump_problems=policyroute.diff(pr, self.tproxy))
        return diff


def remove_leftovers(runner: Runner = run_command, settings: ProxySettings | None = None) -> bool:
    """Remove our chains (every table) and the default TPROXY policy route from
    this netns without knowing the config."""
    text = render_remove(runner(["iptables-save"], None))
    removed = False
    if text:
        runner(["iptables-restore", "--noflush"], text)
        removed = True
    if runner is run_command:
        s = settings or ProxySettings(node_name="", node_address="")
        removed = policyroute.remove(policyroute.for_settings(s)) or removed
    return removed
