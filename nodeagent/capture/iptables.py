"""Traffic capture with iptables (nat table): pure functions render
`iptables-restore --noflush` text, a thin executor applies it atomically.

Only our own chains (NODEMESH_OUTPUT, NODEMESH_PREROUTING) and the one jump into
each are ever written or removed; every other rule in the table is left alone.
"""

from __future__ import annotations

import ipaddress
import logging
import shlex
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from nodeagent.settings import ProxySettings
from nodeagent.snapshot import LocalWorkload

log = logging.getLogger(__name__)

OUTPUT_CHAIN = "NODEMESH_OUTPUT"
PREROUTING_CHAIN = "NODEMESH_PREROUTING"
# (built-in chain, our chain) pairs: the jumps we insert.
JUMPS: tuple[tuple[str, str], ...] = (("OUTPUT", OUTPUT_CHAIN), ("PREROUTING", PREROUTING_CHAIN))
OUR_CHAINS = (OUTPUT_CHAIN, PREROUTING_CHAIN)


class CaptureError(RuntimeError):
    """Installing, removing or reading capture rules failed."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


# ------------------------------------------------------------------ state parsing


@dataclass(frozen=True)
class NatState:
    """What of ours is in the nat table, parsed from `iptables-save -t nat`."""

    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # our chain -> rules (normalized)
    jumps: dict[str, int] = field(default_factory=dict)  # built-in chain -> count of jumps into ours
    jump_positions: dict[str, tuple[int, ...]] = field(default_factory=dict)  # 1-based

    @property
    def installed(self) -> bool:
        return all(c in self.chains for c in OUR_CHAINS) and all(self.jumps.get(b, 0) >= 1 for b, _ in JUMPS)

    @property
    def anything(self) -> bool:
        return bool(self.chains) or any(self.jumps.values())


def normalize_rule(rule: str) -> str:
    """Canonical text of one rule spec (without `-A CHAIN`), so rendered rules and
    what iptables-save prints compare equal: quotes dropped, host addresses /32."""
    tokens = shlex.split(rule)
    out: list[str] = []
    for i, tok in enumerate(tokens):
        if i > 0 and tokens[i - 1] in ("-d", "-s", "--destination", "--source"):
            try:
                tok = str(ipaddress.ip_network(tok, strict=False))
            except ValueError:
                pass
        out.append(tok)
    return " ".join(out)


def parse_nat_save(text: str) -> NatState:
    """Extract our chains and the jumps into them from iptables-save output of
    the nat table. Other chains' rules are ignored."""
    chains: dict[str, list[str]] = {}
    positions: dict[str, list[int]] = {}
    counters: dict[str, int] = {}
    in_nat = False
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            in_nat = line == "*nat"
            continue
        if not in_nat:
            continue
        if line.startswith(":"):
            name = line[1:].split()[0]
            if name in OUR_CHAINS:
                chains.setdefault(name, [])
            continue
        if line.startswith("-A "):
            parts = line.split(None, 2)
            chain = parts[1]
            spec = parts[2] if len(parts) > 2 else ""
            counters[chain] = counters.get(chain, 0) + 1
            if chain in OUR_CHAINS:
                chains.setdefault(chain, []).append(normalize_rule(spec))
                continue
            for builtin, ours in JUMPS:
                if chain == builtin and normalize_rule(spec) == f"-j {ours}":
                    positions.setdefault(builtin, []).append(counters[chain])
    return NatState(
        chains={k: tuple(v) for k, v in chains.items()},
        jumps={k: len(v) for k, v in positions.items()},
        jump_positions={k: tuple(v) for k, v in positions.items()},
    )


# ------------------------------------------------------------------ rendering


def _host_cidr(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


def output_rules(settings: ProxySettings, workloads: Sequence[LocalWorkload],
                 exclusions: Iterable[str], control_plane: Sequence[str] = ()) -> tuple[str, ...]:
    """Rules of NODEMESH_OUTPUT, in order. The proxy's own traffic (marked)
    returns first so it is never captured again; loopback, the control plane
    and excluded CIDRs return next; then each declared workload's TCP is
    redirected to the outbound listener. Nothing else on the node is touched."""
    rules = [f"-m mark --mark {settings.mark:#x} -j RETURN", "-d 127.0.0.0/8 -j RETURN"]
    seen: set[str] = set()
    for cidr in list(control_plane) + list(exclusions):
        net = str(ipaddress.ip_network(cidr, strict=False))
        if net in seen or ipaddress.ip_network(net).version != 4:
            # The nat table here is IPv4 only; IPv6 exclusions belong to ip6tables.
            continue
        seen.add(net)
        rules.append(f"-d {net} -j RETURN")
    for wl in workloads:
        if wl.uid is not None:
            match = f"-m owner --uid-owner {wl.uid}"
        elif wl.cgroup:
            match = f"-m cgroup --path {shlex.quote('/' + wl.cgroup.strip('/'))}"
        else:
            continue
        rules.append(f"-p tcp {match} -j REDIRECT --to-ports {settings.outbound_port}")
    return tuple(rules)


def prerouting_rules(settings: ProxySettings, workloads: Sequence[LocalWorkload]) -> tuple[str, ...]:
    """Rules of NODEMESH_PREROUTING: plaintext TCP arriving for a local workload's
    port goes to the inbound listener. Traffic on lo is left alone, since the
    proxy itself delivers to workloads over loopback-routed local addresses."""
    rules = []
    for wl in workloads:
        if ipaddress.ip_address(wl.ip).version != 4:
            continue
        for port in wl.ports:
            rules.append(
                f"-d {_host_cidr(wl.ip)} ! -i lo -p tcp -m tcp --dport {port} "
                f"-j REDIRECT --to-ports {settings.inbound_plain_port}"
            )
    return tuple(rules)


def desired_chains(settings: ProxySettings, workloads: Sequence[LocalWorkload],
                   exclusions: Iterable[str], control_plane: Sequence[str] = ()) -> dict[str, tuple[str, ...]]:
    return {
        OUTPUT_CHAIN: output_rules(settings, workloads, exclusions, control_plane),
        PREROUTING_CHAIN: prerouting_rules(settings, workloads),
    }


def render_install(settings: ProxySettings, workloads: Sequence[LocalWorkload],
                   exclusions: Iterable[str], control_plane: Sequence[str], current_save: str) -> str:
    """iptables-restore --noflush text that makes the nat table hold exactly our
    chains and one jump into each. Declaring `:CHAIN - [0:0]` flushes the chain,
    so leftovers of a killed agent are replaced; extra jumps are deleted."""
    state = parse_nat_save(current_save)
    chains = desired_chains(settings, workloads, exclusions, control_plane)
    lines = ["*nat"]
    lines += [f":{name} - [0:0]" for name in OUR_CHAINS]
    for builtin, ours in JUMPS:
        count = state.jumps.get(builtin, 0)
        # A killed agent racing a restart can leave duplicates: keep one.
        lines += [f"-D {builtin} -j {ours}"] * max(0, count - 1)
        if count == 0:
            lines.append(f"-I {builtin} 1 -j {ours}")
    for name in OUR_CHAINS:
        lines += [f"-A {name} {rule}" for rule in chains[name]]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_remove(current_save: str) -> str:
    """iptables-restore --noflush text deleting exactly our jumps and chains, as
    far as they exist now; "" when there is nothing to remove."""
    state = parse_nat_save(current_save)
    if not state.anything:
        return ""
    lines = ["*nat"]
    present = [c for c in OUR_CHAINS if c in state.chains]
    # Flush before delete: a chain that still has rules cannot be deleted.
    lines += [f":{name} - [0:0]" for name in present]
    for builtin, ours in JUMPS:
        lines += [f"-D {builtin} -j {ours}"] * state.jumps.get(builtin, 0)
    lines += [f"-X {name}" for name in present]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class CaptureDiff:
    """Difference between the rules that should be installed and what is."""

    missing: tuple[str, ...] = ()  # "CHAIN: rule" expected but absent
    unexpected: tuple[str, ...] = ()  # "CHAIN: rule" present but not expected
    jump_problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.jump_problems)

    def describe(self) -> str:
        if self.ok:
            return "capture rules are as expected"
        parts = [f"missing: {m}" for m in self.missing]
        parts += [f"unexpected: {u}" for u in self.unexpected]
        parts += list(self.jump_problems)
        return "; ".join(parts)


def diff_state(expected: dict[str, tuple[str, ...]], state: NatState) -> CaptureDiff:
    """Compare rule by rule, order included (RETURNs must precede REDIRECTs)."""
    missing: list[str] = []
    unexpected: list[str] = []
    problems: list[str] = []
    for chain, rules in expected.items():
        if chain not in state.chains:
            problems.append(f"chain {chain} does not exist")
            continue
        want = [normalize_rule(r) for r in rules]
        have = list(state.chains[chain])
        if want == have:
            continue
        chain_missing = [f"{chain}: {r}" for r in want if r not in have]
        chain_unexpected = [f"{chain}: {r}" for r in have if r not in want]
        missing += chain_missing
        unexpected += chain_unexpected
        if not chain_missing and not chain_unexpected:
            problems.append(f"chain {chain} has the expected rules in the wrong order")
    for builtin, ours in JUMPS:
        n = state.jumps.get(builtin, 0)
        if n == 0:
            problems.append(f"no jump from {builtin} to {ours}")
        elif n > 1:
            problems.append(f"{n} jumps from {builtin} to {ours} (expected 1)")
    return CaptureDiff(tuple(missing), tuple(unexpected), tuple(problems))


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
            "is the agent running as root (CAP_NET_ADMIN) and is the nat table available?",
        )
    return proc.stdout


class IptablesCapture:
    """Applies rendered rules with one iptables-restore call each time, so a
    reader never sees half a rule set."""

    def __init__(self, settings: ProxySettings, workloads: Sequence[LocalWorkload],
                 exclusions: Iterable[str] = (), control_plane: Sequence[str] = (),
                 runner: Runner = run_command) -> None:
        self.settings = settings
        self.workloads = tuple(workloads)
        self.exclusions = tuple(exclusions)
        self.control_plane = tuple(control_plane)
        self._run = runner

    def _save(self) -> str:
        return self._run(["iptables-save", "-t", "nat"], None)

    def _restore(self, text: str, action: str) -> None:
        try:
            self._run(["iptables-restore", "--noflush"], text)
        except CaptureError as e:
            raise CaptureError(e.reason, f"iptables-restore failed while {action}: {e}") from None

    def expected(self) -> dict[str, tuple[str, ...]]:
        return desired_chains(self.settings, self.workloads, self.exclusions, self.control_plane)

    def install(self) -> None:
        """Install (or repair) capture atomically; leftovers are replaced."""
        current = self._save()
        state = parse_nat_save(current)
        if state.anything:
            log.info("capture: replacing leftover rules (%s)", ", ".join(sorted(state.chains)) or "jumps only")
        self._restore(render_install(self.settings, self.workloads, self.exclusions,
                                     self.control_plane, current), "installing capture")
        diff = self.verify()
        if not diff.ok:
            raise CaptureError("capture_mismatch",
                               f"capture rules differ right after install: {diff.describe()}; "
                               "is another agent or firewall manager rewriting the nat table?")

    def remove(self) -> bool:
        """Remove our jumps and chains; True if anything was removed."""
        text = render_remove(self._save())
        if not text:
            return False
        self._restore(text, "removing capture")
        return True

    def status(self) -> NatState:
        return parse_nat_save(self._save())

    def verify(self) -> CaptureDiff:
        return diff_state(self.expected(), self.status())


def remove_leftovers(runner: Runner = run_command) -> bool:
    """Remove our chains from this netns without knowing the config."""
    text = render_remove(runner(["iptables-save", "-t", "nat"], None))
    if not text:
        return False
    runner(["iptables-restore", "--noflush"], text)
    return True
