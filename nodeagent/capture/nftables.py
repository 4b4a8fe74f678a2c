"""Traffic capture with nftables, through pyroute2's netlink API (no `nft` binary).

Everything lives in one table of our own, `ip nodemesh`. A pure renderer turns
the settings and workloads into a `Ruleset` (chains and rules, each rule both as
nft-syntax text and as the low-level expressions the kernel runs); a thin
executor sends the whole table in ONE netlink batch transaction:

    add table ip nodemesh; delete table ip nodemesh; add table ...; chains; rules

so a leftover of a killed agent is replaced atomically, and stop deletes the
table whole. Nothing outside the table is touched (policy routes for TPROXY are
added and removed exactly by nodeagent.capture.policyroute).

Rule semantics mirror the iptables backend (see nodeagent.capture.iptables).
Limits of pyroute2 0.9.7, and what we do instead:
  * `socket cgroupv2` cannot be expressed (pyroute2 knows neither the key
    NFT_SOCKET_CGROUPV2 nor the attribute NFTA_SOCKET_LEVEL), and `meta cgroup`
    is the cgroup v1 net_cls classid, not a substitute. A cgroup workload makes
    this backend refuse to render, naming the workload; `auto` then falls back
    to iptables (xt_cgroup --path), or use ebpf.
  * pyroute2 declares fib's `result` as a flag set and `flags` as an enum (the
    kernel has it the other way round); we encode the right numbers through them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from nodeagent.meshview.snapshot import LocalWorkload
from nodeagent.supervision.settings import ProxySettings

from . import policyroute
from .base import CaptureDiff, CaptureError, CaptureStatus, NetfilterTargets, ProxyState, diff_chains

log = logging.getLogger(__name__)

TABLE = "nodemesh"
FAMILY = "ip"
NFPROTO_IPV4 = 2

# Kernel uapi numbers (include/uapi/linux/netfilter/nf_tables.h).
HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
META_MARK, META_IIFNAME, META_SKUID, META_L4PROTO = 3, 6, 10, 16
CT_MARK = 3
CMP_EQ, CMP_NEQ = 0, 1
PAYLOAD_NETWORK, PAYLOAD_TRANSPORT = 1, 2
NF_ACCEPT, NFT_RETURN = 1, -5
NFT_REJECT_TCP_RST = 1
SOCKET_TRANSPARENT = 0
RTN_LOCAL = 2
IPPROTO_TCP = 6
IPPROTO_UDP = 17
PRIO_MANGLE = -150
PRIO_DSTNAT = -100

# One expression: (kind, args). Hashable, comparable, no netlink objects, so
# a Ruleset can be golden-tested and compared without a kernel.
Expr = tuple[Any, ...]


@dataclass(frozen=True)
class NftRule:
    chain: str
    text: str  # nft syntax, also stored as the rule's comment
    exprs: tuple[Expr, ...]


@dataclass(frozen=True)
class Chain:
    name: str
    type: str  # filter | nat | route
    hook: str
    priority: int

    def text(self) -> str:
        return f"type {self.type} hook {self.hook} priority {self.priority}; policy accept;"


@dataclass(frozen=True)
class Ruleset:
    chains: tuple[Chain, ...]
    rules: tuple[NftRule, ...]

    def chain_rules(self, name: str) -> tuple[NftRule, ...]:
        return tuple(r for r in self.rules if r.chain == name)

    def text(self) -> str:
        """The table in `nft list table` form (golden tests, docs, status)."""
        lines = [f"table {FAMILY} {TABLE} {{"]
        for c in self.chains:
            lines.append(f"\tchain {c.name} {{")
            lines.append(f"\t\t{c.text()}")
            lines += [f"\t\t{r.text}" for r in self.chain_rules(c.name)]
            lines.append("\t}")
        lines.append("}")
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ rule building


class _R:
    """Accumulates matching expressions and their nft text for one rule."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.exprs: list[Expr] = []

    def add(self, text: str, *exprs: Expr) -> _R:
        if text:
            self.words.append(text)
        self.exprs += exprs
        return self

    def tcp(self) -> _R:
        return self.l4("tcp")

    def l4(self, proto: str) -> _R:
        num = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}[proto]
        return self.add(f"meta l4proto {proto}", ("meta", META_L4PROTO), ("cmp", CMP_EQ, bytes([num])))

    def mark(self, mark: int) -> _R:
        return self.add(f"meta mark {mark:#010x}", ("meta", META_MARK), ("cmp", CMP_EQ, struct.pack("=I", mark)))

    def daddr(self, cidr: str) -> _R:
        net = ipaddress.IPv4Network(cidr, strict=False)
        exprs: list[Expr] = [("payload", PAYLOAD_NETWORK, 16, 4)]
        if net.prefixlen < 32:
            exprs.append(("bitwise", net.netmask.packed, b"\0\0\0\0"))
        exprs.append(("cmp", CMP_EQ, net.network_address.packed))
        text = f"ip daddr {net.network_address}" if net.prefixlen == 32 else f"ip daddr {net}"
        return self.add(text, *exprs)

    def not_lo(self) -> _R:
        return self.add('iifname != "lo"', ("meta", META_IIFNAME), ("cmp", CMP_NEQ, b"lo".ljust(16, b"\0")))

    def dport(self, port: int, proto: str = "tcp") -> _R:
        return self.add(f"{proto} dport {port}", ("payload", PAYLOAD_TRANSPORT, 2, 2),
                        ("cmp", CMP_EQ, struct.pack("!H", port)))

    def skuid(self, uid: int) -> _R:
        return self.add(f"meta skuid {uid}", ("meta", META_SKUID), ("cmp", CMP_EQ, struct.pack("=I", uid)))

    def counter(self) -> _R:
        return self.add("counter", ("counter",))

    def set_mark_or(self, mark: int) -> _R:
        # meta mark set meta mark | M: (mark & ~M) ^ M sets M's bits, keeps the rest.
        return self.add(f"meta mark set meta mark | {mark:#010x}", ("meta", META_MARK),
                        ("bitwise", struct.pack("=I", ~mark & 0xFFFFFFFF), struct.pack("=I", mark)),
                        ("meta_set", META_MARK))

    def done(self, chain: str, verdict_text: str, *exprs: Expr) -> NftRule:
        words = self.words + ([verdict_text] if verdict_text else [])
        return NftRule(chain, " ".join(words), tuple(self.exprs) + exprs)


def _ret() -> tuple[str, Expr]:
    return "return", ("verdict", NFT_RETURN)


def render(settings: ProxySettings, workloads: Sequence[LocalWorkload], exclusions: Iterable[str] = (),
           control_plane: Sequence[str] = (), state: ProxyState = ProxyState.SERVING,
           dns_port: int | None = None) -> Ruleset:
    """The whole `ip nodemesh` table for these settings and this proxy state (pure)."""
    for wl in workloads:
        if wl.uid is None and wl.cgroup:
            raise CaptureError(
                "nft_cgroup_unsupported",
                f"workload {wl.key} is matched by cgroup {wl.cgroup}, which the nftables backend cannot express "
                "through pyroute2 (no `socket cgroupv2`): use capture.mode iptables or ebpf, or give it a uid")
    chains: list[Chain] = [Chain("output", "nat", "output", PRIO_DSTNAT)]
    rules: list[NftRule] = []

    # -- outbound: same order as the iptables backend (RETURNs before redirects)
    rules.append(_R().mark(settings.mark).done("output", *_ret()))
    if dns_port is not None:
        # Mesh DNS (docs/dns.md): a workload's port 53 to any address, loopback
        # stubs included, goes to the agent's DNS proxy, hence before the RETURNs.
        for wl in workloads:
            if wl.uid is None:
                continue
            for proto in ("udp", "tcp"):
                rules.append(_R().l4(proto).skuid(wl.uid).dport(53, proto).done(
                    "output", f"redirect to :{dns_port}", ("imm", struct.pack("!H", dns_port)), ("redir",)))
    rules.append(_R().daddr("127.0.0.0/8").done("output", *_ret()))
    seen: set[str] = set()
    for cidr in list(control_plane) + list(exclusions):
        net = ipaddress.ip_network(cidr, strict=False)
        if net.version != 4 or str(net) in seen:
            continue  # an `ip` table sees IPv4 only
        seen.add(str(net))
        rules.append(_R().daddr(str(net)).done("output", *_ret()))
    for wl in workloads:
        if wl.uid is None:
            continue
        r = _R().tcp().skuid(wl.uid).counter()
        if state is ProxyState.BYPASS:
            # The counter counts connections that bypassed the mesh (nat sees first packets only).
            rules.append(r.done("output", *_ret()))
        else:
            # REFUSE keeps the redirect: nothing listens, so the kernel resets at once.
            rules.append(r.done("output", f"redirect to :{settings.outbound_port}",
                                ("imm", struct.pack("!H", settings.outbound_port)), ("redir",)))

    ports = [(wl.ip, p) for wl in workloads if ipaddress.ip_address(wl.ip).version == 4 for p in wl.ports]
    m = settings.tproxy_mark
    if settings.inbound_mode == "tproxy":
        chains.append(Chain("tproxy", "filter", "prerouting", PRIO_MANGLE))
        chains.append(Chain("divert_out", "route", "output", PRIO_MANGLE))
        rules.append(_R().tcp().add("socket transparent 1", ("socket", SOCKET_TRANSPARENT),
                                    ("cmp", CMP_EQ, struct.pack("=I", 1)))
                     .set_mark_or(m).done("tproxy", "accept", ("verdict", NF_ACCEPT)))
        for ip, port in ports:
            r = _R().daddr(ip).not_lo().tcp().dport(port)
            if state is ProxyState.SERVING:
                rules.append(r.set_mark_or(m).done(
                    "tproxy", f"tproxy to :{settings.inbound_plain_port} accept",
                    ("imm", struct.pack("!H", settings.inbound_plain_port)), ("tproxy",), ("verdict", NF_ACCEPT)))
            elif state is ProxyState.REFUSE:
                # TPROXY with no listener drops (the caller would hang): reset instead.
                rules.append(r.done("tproxy", "reject with tcp reset", ("reject_rst",)))
        # The proxy's upstream sockets that carry a caller's source address:
        # remember the connection, and send the workload's replies back to the proxy.
        rules.append(_R().tcp().mark(settings.mark).add(
            "fib saddr type != local", ("fib_saddr_type",), ("cmp", CMP_NEQ, struct.pack("=I", RTN_LOCAL)))
            .done("divert_out", f"ct mark set ct mark | {m:#010x}", ("ct", CT_MARK),
                  ("bitwise", struct.pack("=I", ~m & 0xFFFFFFFF), struct.pack("=I", m)), ("ct_set", CT_MARK)))
        rules.append(_R().tcp().add(f"ct mark & {m:#010x} == {m:#010x}", ("ct", CT_MARK),
                                    ("bitwise", struct.pack("=I", m), b"\0\0\0\0"),
                                    ("cmp", CMP_EQ, struct.pack("=I", m)))
                     .set_mark_or(m).done("divert_out", ""))
    else:
        chains.append(Chain("prerouting", "nat", "prerouting", PRIO_DSTNAT))
        if state is not ProxyState.BYPASS:
            for ip, port in ports:
                rules.append(_R().daddr(ip).not_lo().tcp().dport(port).done(
                    "prerouting", f"redirect to :{settings.inbound_plain_port}",
                    ("imm", struct.pack("!H", settings.inbound_plain_port)), ("redir",)))
    return Ruleset(tuple(chains), tuple(rules))


# ------------------------------------------------------------------ netlink encoding


def _data(value: bytes) -> dict[str, Any]:
    return {"attrs": [("NFTA_DATA_VALUE", value)]}


def _genex(name: str, attrs: list[tuple[str, Any]]) -> dict[str, Any]:
    return {"attrs": [("NFTA_EXPR_NAME", name),
                      ("NFTA_EXPR_DATA", {"attrs": [(f"NFTA_{name.upper()}_{k.upper()}", v) for k, v in attrs]})]}


def encode_expr(e: Expr) -> dict[str, Any]:
    """One of our expressions as pyroute2's netlink attribute structure."""
    kind = e[0]
    if kind == "meta":
        return _genex("meta", [("dreg", 1), ("key", e[1])])
    if kind == "meta_set":
        return _genex("meta", [("key", e[1]), ("sreg", 1)])
    if kind == "cmp":
        return _genex("cmp", [("sreg", 1), ("op", e[1]), ("data", _data(e[2]))])
    if kind == "payload":
        return _genex("payload", [("dreg", 1), ("base", e[1]), ("offset", e[2]), ("len", e[3])])
    if kind == "bitwise":
        return _genex("bitwise", [("sreg", 1), ("dreg", 1), ("len", len(e[1])), ("mask", _data(e[1])),
                                  ("xor", _data(e[2]))])
    if kind == "imm":
        return _genex("immediate", [("dreg", 1), ("data", _data(e[1]))])
    if kind == "verdict":
        return _genex("immediate", [("dreg", 0), ("data", {"attrs": [
            ("NFTA_DATA_VERDICT", {"attrs": [("NFTA_VERDICT_CODE", e[1])]})]})])
    if kind == "counter":
        return _genex("counter", [])
    if kind == "redir":
        return _genex("redir", [("reg_proto_min", 1)])
    if kind == "tproxy":
        return _genex("tproxy", [("family", NFPROTO_IPV4), ("reg_port", 1)])
    if kind == "socket":
        return _genex("socket", [("key", e[1]), ("dreg", 1)])
    if kind == "ct":
        return _genex("ct", [("dreg", 1), ("key", e[1])])
    if kind == "ct_set":
        return _genex("ct", [("key", e[1]), ("sreg", 1)])
    if kind == "fib_saddr_type":
        # result NFT_FIB_RESULT_ADDRTYPE (3) through pyroute2's flag-set view of
        # it (bits 0 and 1); flags NFTA_FIB_F_SADDR (1) through its enum view.
        return _genex("fib", [("dreg", 1), ("result", frozenset({"NFT_FIB_RESULT_UNSPEC", "NFT_FIB_RESULT_OIF"})),
                              ("flags", 1)])
    if kind == "reject_rst":
        return _genex("reject", [("type", NFT_REJECT_TCP_RST), ("icmp_code", 0)])
    raise ValueError(f"unknown nft expression {kind!r}")


def expr_names(exprs: Sequence[Expr]) -> tuple[str, ...]:
    """The kernel's expression names for our expressions (what a dump shows)."""
    names: dict[str, str] = {"meta_set": "meta", "imm": "immediate", "verdict": "immediate", "ct_set": "ct",
             "fib_saddr_type": "fib", "reject_rst": "reject"}
    return tuple(names.get(str(e[0]), str(e[0])) for e in exprs)


def expr_values(exprs: Sequence[Expr]) -> tuple[bytes, ...]:
    """The operands that matter (cmp data): uids, addresses, ports, marks."""
    return tuple(e[2] for e in exprs if e[0] == "cmp")


# ------------------------------------------------------------------ executor


@dataclass(frozen=True)
class InstalledRule:
    chain: str
    handle: int
    comment: str
    names: tuple[str, ...]
    values: tuple[bytes, ...]
    packets: int | None = None


@dataclass(frozen=True)
class NftState:
    """What our table holds now (parsed from a netlink dump)."""

    exists: bool = False
    chains: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # name -> (type, hook, priority)
    rules: tuple[InstalledRule, ...] = ()


_HOOK_NAMES = {v: k for k, v in HOOKS.items()}


def _value_bytes(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        # pyroute2 prints cdata as "aa:bb:..." hex
        try:
            return bytes.fromhex(v.replace(":", ""))
        except ValueError:
            return v.encode()
    return bytes(v) if v is not None else b""


class NftablesCapture(NetfilterTargets):
    """Applies a rendered Ruleset in one netlink transaction; deletes the table whole."""

    name = "nftables"

    def __init__(self, settings: ProxySettings, workloads: Sequence[LocalWorkload],
                 exclusions: Iterable[str] = (), control_plane: Sequence[str] = (),
                 dns_port: int | None = None) -> None:
        super().__init__(settings, workloads, exclusions, control_plane, dns_port)

    @property
    def tproxy(self) -> bool:
        return self.settings.inbound_mode == "tproxy"

    def expected(self) -> Ruleset:
        return render(self.settings, self.workloads, self.exclusions, self.control_plane, self.state,
                      self.dns_port)

    # -- netlink plumbing
    @staticmethod
    @contextmanager
    def _socket() -> Iterator[Any]:
        """pyroute2's NFTables on a plain selector loop (see policyroute.netlink_loop)."""
        try:
            from pyroute2.nftables.main import AsyncNFTables, NFTables
        except ImportError:
            raise CaptureError("pyroute2_missing", "pyroute2 (with nftables support) is not installed") from None

        class _Nft(NFTables):  # type: ignore[misc]
            def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
                self.asyncore = AsyncNFTables(1, 0, NFPROTO_IPV4)
                self.asyncore.use_event_loop = loop  # instead of the policy's (uv)loop
                self.asyncore.local.keep_event_loop = True
                self.asyncore.event_loop.run_until_complete(self.asyncore.setup_endpoint())

        with policyroute.netlink_loop() as loop:
            try:
                nft = _Nft(loop)
            except OSError as e:
                raise CaptureError("nft_unavailable", f"cannot open a netfilter netlink socket: {e}; "
                                                      "is nf_tables available in this kernel?") from None
            try:
                yield nft
            finally:
                nft.close()

    @staticmethod
    def _msg(msg_class: Any, msg_type: int, attrs: list[Any], flags: int) -> Any:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
        from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES

        m = msg_class()
        m["attrs"] = attrs
        m["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | msg_type
        m["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
        m["nfgen_family"] = NFPROTO_IPV4
        return m

    @staticmethod
    def _batch_marker(kind: int) -> Any:
        from pyroute2.netlink import NLM_F_REQUEST
        from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg

        m = nfgen_msg()
        m["res_id"] = NFNL_SUBSYS_NFTABLES
        m["header"]["type"] = kind  # NFNL_MSG_BATCH_BEGIN 0x10 / END 0x11
        m["header"]["flags"] = NLM_F_REQUEST
        return m

    def _transaction(self, ruleset: Ruleset | None) -> None:
        """One batch: ensure the table, delete it, and (ruleset given) recreate it whole."""
        from pyroute2.netlink import NLM_F_APPEND, NLM_F_CREATE
        from pyroute2.netlink.nfnetlink.nftsocket import (
            NFT_MSG_DELTABLE,
            NFT_MSG_NEWCHAIN,
            NFT_MSG_NEWRULE,
            NFT_MSG_NEWTABLE,
            nft_chain_msg,
            nft_rule_msg,
            nft_table_msg,
        )

        create = NLM_F_CREATE | NLM_F_APPEND
        msgs = [self._batch_marker(0x10),
                # "add" of an existing table is a no-op, so the delete never fails.
                self._msg(nft_table_msg, NFT_MSG_NEWTABLE, [("NFTA_TABLE_NAME", TABLE)], create),
                self._msg(nft_table_msg, NFT_MSG_DELTABLE, [("NFTA_TABLE_NAME", TABLE)], 0)]
        if ruleset is not None:
            msgs.append(self._msg(nft_table_msg, NFT_MSG_NEWTABLE, [("NFTA_TABLE_NAME", TABLE)], create))
            for c in ruleset.chains:
                msgs.append(self._msg(nft_chain_msg, NFT_MSG_NEWCHAIN, [
                    ("NFTA_CHAIN_TABLE", TABLE), ("NFTA_CHAIN_NAME", c.name),
                    ("NFTA_CHAIN_HOOK", {"attrs": [["NFTA_HOOK_HOOKNUM", HOOKS[c.hook]],
                                                   ["NFTA_HOOK_PRIORITY", c.priority]]}),
                    ("NFTA_CHAIN_TYPE", c.type)], create))
            for r in ruleset.rules:
                msgs.append(self._msg(nft_rule_msg, NFT_MSG_NEWRULE, [
                    ("NFTA_RULE_TABLE", TABLE), ("NFTA_RULE_CHAIN", r.chain),
                    ("NFTA_RULE_EXPRESSIONS", [encode_expr(e) for e in r.exprs]),
                    ("NFTA_RULE_USERDATA", r.text)], create))
        msgs.append(self._batch_marker(0x11))
        with self._socket() as nft:
            try:
                nft.nlm_request_batch(msgs)
            except Exception as e:  # noqa: BLE001 - pyroute2 raises NetlinkError and others
                action = "installing" if ruleset is not None else "removing"
                raise CaptureError("nft_failed", f"nftables transaction {action} table {FAMILY} {TABLE} failed: "
                                                 f"{e}; is the agent root (CAP_NET_ADMIN) with nf_tables, nft_redir, "
                                                 "nft_tproxy and nft_socket in the kernel?") from None

    def read(self) -> NftState:
        with self._socket() as nft:
            return self._read(nft)

    def _read(self, nft: Any) -> NftState:
        try:
            tables = [t.get_attr("NFTA_TABLE_NAME") for t in nft.get_tables() if t["nfgen_family"] == NFPROTO_IPV4]
            if TABLE not in tables:
                return NftState()
            chains: dict[str, tuple[str, str, int]] = {}
            for c in nft.get_chains():
                if c["nfgen_family"] != NFPROTO_IPV4 or c.get_attr("NFTA_CHAIN_TABLE") != TABLE:
                    continue
                hook = c.get_attr("NFTA_CHAIN_HOOK")
                hooknum = hook.get_attr("NFTA_HOOK_HOOKNUM") if hook else None
                prio = hook.get_attr("NFTA_HOOK_PRIORITY") if hook else 0
                hook_name = _HOOK_NAMES.get(int(hooknum or 0), str(hooknum))
                chains[c.get_attr("NFTA_CHAIN_NAME")] = (c.get_attr("NFTA_CHAIN_TYPE") or "", hook_name, int(prio or 0))
            rules = []
            for r in nft.get_rules():
                if r["nfgen_family"] != NFPROTO_IPV4 or r.get_attr("NFTA_RULE_TABLE") != TABLE:
                    continue
                names: list[str] = []
                values: list[bytes] = []
                packets = None
                for e in r.get_attr("NFTA_RULE_EXPRESSIONS") or []:
                    name = e.get_attr("NFTA_EXPR_NAME")
                    names.append(name)
                    data = e.get_attr("NFTA_EXPR_DATA")
                    if name == "cmp" and data is not None:
                        values.append(_value_bytes(data.get_attr("NFTA_CMP_DATA").get_attr("NFTA_DATA_VALUE")))
                    if name == "counter" and data is not None:
                        packets = data.get_attr("NFTA_COUNTER_PACKETS")
                comment = r.get_attr("NFTA_RULE_USERDATA")
                rules.append(InstalledRule(r.get_attr("NFTA_RULE_CHAIN"), r.get_attr("NFTA_RULE_HANDLE"),
                                           comment if isinstance(comment, str) else "",
                                           tuple(names), tuple(values), packets))
            return NftState(True, chains, tuple(rules))
        except CaptureError:
            raise
        except Exception as e:  # noqa: BLE001 - any netlink/decoding failure is reported
            raise CaptureError("nft_read_failed", f"cannot read nftables table {FAMILY} {TABLE}: {e}") from None

    # -- the CaptureBackend interface
    def install(self) -> None:
        before = self.read()
        # What was there (the agent says whose: its own, a restart's, a killed agent's).
        self.replaced = f"table {FAMILY} {TABLE}, {len(before.rules)} rules" if before.exists else ""
        if self.replaced:
            log.debug("capture: replacing nftables %s in place", self.replaced)
        pr = policyroute.for_settings(self.settings)
        if self.tproxy:
            policyroute.install(pr)
        else:
            policyroute.remove(pr)
        self._transaction(self.expected())
        diff = self.verify()
        if not diff.ok:
            raise CaptureError("capture_mismatch", f"nftables table differs right after install: {diff.describe()}; "
                                                   "is another tool rewriting table ip nodemesh?")

    def set_proxy_state(self, state: ProxyState) -> None:
        self.state = state
        self._transaction(self.expected())

    def remove(self) -> bool:
        existed = self.read().exists
        if existed:
            self._transaction(None)
        pr = policyroute.for_settings(self.settings)
        return policyroute.remove(pr) or existed

    def status(self) -> CaptureStatus:
        st = self.read()
        sections: dict[str, tuple[str, ...]] = {}
        for name, (ctype, hook, prio) in st.chains.items():
            lines = [f"type {ctype} hook {hook} priority {prio}"]
            for r in st.rules:
                if r.chain == name:
                    count = f"  [packets {r.packets}]" if r.packets is not None else ""
                    lines.append(f"{r.comment or '(rule without nodemesh comment: ' + ','.join(r.names) + ')'}{count}")
            sections[f"table {FAMILY} {TABLE} chain {name}"] = tuple(lines)
        pr = policyroute.for_settings(self.settings)
        nrules, nroutes = policyroute.present(pr)
        if nrules or nroutes:
            sections["policy routing"] = pr.describe()
        installed = st.exists and self.verify_state(st).ok
        return CaptureStatus("nftables", installed, sections,
                             {"inbound": self.settings.inbound_mode, "state": self.state.value,
                              "table_exists": st.exists})

    def verify_state(self, st: NftState) -> CaptureDiff:
        """Our table's chains (type, hook, priority), then their rules by
        signature (comment, expression names, values) with base.diff_chains."""
        want = self.expected()
        if not st.exists:
            return CaptureDiff(jump_problems=(f"table {FAMILY} {TABLE} does not exist",))
        problems = tuple(f"chain {c.name} is {st.chains[c.name]}, expected {(c.type, c.hook, c.priority)}"
                         for c in want.chains
                         if c.name in st.chains and st.chains[c.name] != (c.type, c.hook, c.priority))
        expected = {c.name: [(r.text, expr_names(r.exprs), expr_values(r.exprs)) for r in want.chain_rules(c.name)]
                    for c in want.chains}
        present = {name: [(r.comment, r.names, r.values) for r in st.rules if r.chain == name] for name in st.chains}
        return diff_chains(expected, present, lambda sig: sig[0] or ",".join(sig[1])) + CaptureDiff(
            jump_problems=problems)

    def verify(self) -> CaptureDiff:
        pr = policyroute.for_settings(self.settings)
        return self.verify_state(self.read()) + CaptureDiff(jump_problems=policyroute.diff(pr, self.tproxy))


def remove_leftovers(settings: ProxySettings | None = None) -> bool:
    """Delete our table and default policy route without knowing the config."""
    s = settings or ProxySettings(node_name="", node_address="")
    return NftablesCapture(s, ()).remove()
