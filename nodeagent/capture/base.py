"""What every capture backend offers the agent (the CaptureBackend protocol) and
the types they share: errors, the proxy-serving state, and verify results.

Every backend touches only its own chains, tables or programs, renders first and
applies atomically, repairs leftovers of a killed agent at install, and removes
exactly what it added.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from nodeagent.meshview.snapshot import LocalWorkload
    from nodeagent.supervision.settings import ProxySettings

R = TypeVar("R")  # a rule's signature, as a backend compares it


class CaptureError(RuntimeError):
    """Installing, removing or reading capture failed; `reason` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class ProxyState(enum.Enum):
    """What capture does with workload traffic, given whether the proxy serves.

    SERVING: redirect to the proxy. BYPASS (failurePolicy open, proxy down): let
    traffic flow directly, unmeshed. REFUSE (failurePolicy closed, proxy down):
    connections are refused at once with a TCP reset, never left hanging."""

    SERVING = "serving"
    BYPASS = "bypass"
    REFUSE = "refuse"


INBOUND_MODES = ("tproxy", "redirect")


@dataclass(frozen=True)
class CaptureDiff:
    """Difference between what should be installed and what is."""

    missing: tuple[str, ...] = ()  # "CHAIN: rule" expected but absent
    unexpected: tuple[str, ...] = ()  # "CHAIN: rule" present but not expected
    jump_problems: tuple[str, ...] = ()  # structural problems (jumps, hooks, routes)

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

    def __add__(self, other: CaptureDiff) -> CaptureDiff:
        return CaptureDiff(self.missing + other.missing, self.unexpected + other.unexpected,
                           self.jump_problems + other.jump_problems)


class NetfilterTargets:
    """What the netfilter backends (iptables, nftables) capture: the settings,
    the node's workloads, the exclusions and control-plane addresses never
    captured, the DNS proxy's port (None = port 53 not captured), and the proxy
    state the watchdog last set."""

    def __init__(self, settings: ProxySettings, workloads: Sequence[LocalWorkload],
                 exclusions: Iterable[str] = (), control_plane: Sequence[str] = (),
                 dns_port: int | None = None) -> None:
        self.settings = settings
        self.dns_port = dns_port
        self.workloads = tuple(workloads)
        self.exclusions = tuple(exclusions)
        self.control_plane = tuple(control_plane)
        self.state = ProxyState.SERVING
        self.replaced = ""  # our rules install() found in place (and replaced atomically)


def diff_chains(expected: Mapping[str, Sequence[R]], present: Mapping[str, Sequence[R]],
                show: Callable[[R], str], prefix: str = "") -> CaptureDiff:
    """The one rule diff of the netfilter backends (iptables, nftables): chain
    by chain, order included (RETURNs must precede REDIRECTs). Rules are any
    comparable signature; `show` names one for a reader. A chain expected but
    absent, rules missing or unexpected, the same rules in the wrong order, and
    a chain present but not expected (a leftover) are each reported."""
    missing: list[str] = []
    unexpected: list[str] = []
    problems: list[str] = []
    for chain, want in expected.items():
        if chain not in present:
            problems.append(f"chain {prefix}{chain} does not exist")
            continue
        have = present[chain]
        if list(want) == list(have):
            continue
        chain_missing = [f"{prefix}{chain}: {show(r)}" for r in want if r not in have]
        chain_unexpected = [f"{prefix}{chain}: {show(r)}" for r in have if r not in want]
        missing += chain_missing
        unexpected += chain_unexpected
        if not chain_missing and not chain_unexpected:
            problems.append(f"chain {prefix}{chain} has the expected rules in the wrong order")
    problems += [f"leftover chain {prefix}{chain}" for chain in present if chain not in expected]
    return CaptureDiff(tuple(missing), tuple(unexpected), tuple(problems))


@dataclass(frozen=True)
class CaptureStatus:
    """What is installed now, for `nodemesh capture status` and status.json."""

    backend: str
    installed: bool
    # Human-readable listing: section (table/chain/program/route) -> lines.
    sections: dict[str, tuple[str, ...]] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "installed": self.installed,
                "sections": {k: list(v) for k, v in self.sections.items()}, **self.detail}


@runtime_checkable
class CaptureBackend(Protocol):
    """The agent's view of a capture backend (iptables, nftables, ebpf)."""

    name: str

    def install(self) -> None:
        """Install (or repair) capture atomically; leftovers are replaced. Raises CaptureError."""

    def remove(self) -> bool:
        """Remove exactly what this backend adds; True if anything was removed."""

    def status(self) -> Any:
        """What is installed now (a CaptureStatus or a backend-specific state)."""

    def verify(self) -> CaptureDiff:
        """Compare what is installed with what should be."""


@runtime_checkable
class AgentFailover(Protocol):
    """Backends whose rules cannot see whether the proxy listens (iptables,
    nftables): the agent's watchdog switches them between states. eBPF decides
    in the kernel and does not implement this."""

    def set_proxy_state(self, state: ProxyState) -> None:
        """Re-apply capture for `state` atomically."""
