"""Golden tests for the nftables renderer (pure, no kernel) and the TPROXY
variants of the iptables renderer."""

from __future__ import annotations

import struct

import pytest

from nodeagent.capture import nftables
from nodeagent.capture.base import CaptureError, ProxyState
from nodeagent.capture.iptables import render_install, render_remove
from nodeagent.capture.nftables import encode_expr, expr_names, render
from nodeagent.meshview.snapshot import LocalWorkload
from nodeagent.supervision.settings import ProxySettings

REDIRECT = ProxySettings(node_name="node-1", node_address="10.0.0.2")
TPROXY = ProxySettings(node_name="node-1", node_address="10.0.0.2", inbound_mode="tproxy")
WORKLOADS = (
    LocalWorkload("web", "default", "web", "10.0.0.2", (8080, 8443), uid=2001),
    LocalWorkload("client", "default", "client", "10.0.0.2", (), uid=2003),
)

OUTPUT = """\
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta mark 0x00006e6d return
\t\tip daddr 127.0.0.0/8 return
\t\tip daddr 10.0.0.1 return
\t\tip daddr 192.168.0.0/16 return
\t\tmeta l4proto tcp meta skuid 2001 counter redirect to :15001
\t\tmeta l4proto tcp meta skuid 2003 counter redirect to :15001
\t}
"""


def text(settings: ProxySettings, state: ProxyState = ProxyState.SERVING) -> str:
    return render(settings, WORKLOADS, ["192.168.0.0/16"], ["10.0.0.1/32"], state).text()


def test_redirect_mode_golden() -> None:
    assert text(REDIRECT) == "table ip nodemesh {\n" + OUTPUT + """\
\tchain prerouting {
\t\ttype nat hook prerouting priority -100; policy accept;
\t\tip daddr 10.0.0.2 iifname != "lo" meta l4proto tcp tcp dport 8080 redirect to :15006
\t\tip daddr 10.0.0.2 iifname != "lo" meta l4proto tcp tcp dport 8443 redirect to :15006
\t}
}
"""


TPROXY_TAIL = """\
\tchain divert_out {
\t\ttype route hook output priority -150; policy accept;
\t\tmeta l4proto tcp meta mark 0x00006e6d fib saddr type != local ct mark set ct mark | 0x00010000
\t\tmeta l4proto tcp ct mark & 0x00010000 == 0x00010000 meta mark set meta mark | 0x00010000
\t}
}
"""


def test_tproxy_mode_golden() -> None:
    assert text(TPROXY) == "table ip nodemesh {\n" + OUTPUT + """\
\tchain tproxy {
\t\ttype filter hook prerouting priority -150; policy accept;
\t\tmeta l4proto tcp socket transparent 1 meta mark set meta mark | 0x00010000 accept
\t\tip daddr 10.0.0.2 iifname != "lo" meta l4proto tcp tcp dport 8080 meta mark set meta mark | 0x00010000 \
tproxy to :15006 accept
\t\tip daddr 10.0.0.2 iifname != "lo" meta l4proto tcp tcp dport 8443 meta mark set meta mark | 0x00010000 \
tproxy to :15006 accept
\t}
""" + TPROXY_TAIL


def test_bypass_returns_and_counts_instead_of_redirecting() -> None:
    out = text(TPROXY, ProxyState.BYPASS)
    assert "redirect" not in out and "tproxy to" not in out
    assert "meta l4proto tcp meta skuid 2001 counter return" in out
    # Established transparent sockets keep working while the proxy restarts.
    assert "socket transparent 1" in out


def test_refuse_keeps_redirect_and_resets_inbound() -> None:
    out = text(TPROXY, ProxyState.REFUSE)
    assert "meta skuid 2001 counter redirect to :15001" in out  # no listener: the kernel resets
    assert 'ip daddr 10.0.0.2 iifname != "lo" meta l4proto tcp tcp dport 8080 reject with tcp reset' in out
    assert "tproxy to" not in out  # TPROXY without a listener would drop (hang)


def test_expressions_carry_the_operands() -> None:
    rules = render(TPROXY, WORKLOADS).rules
    uid_rule = next(r for r in rules if "skuid 2001" in r.text)
    assert uid_rule.exprs == (("meta", nftables.META_L4PROTO), ("cmp", 0, b"\x06"),
                              ("meta", nftables.META_SKUID), ("cmp", 0, struct.pack("=I", 2001)),
                              ("counter",), ("imm", struct.pack("!H", 15001)), ("redir",))
    assert expr_names(uid_rule.exprs) == ("meta", "cmp", "meta", "cmp", "counter", "immediate", "redir")
    lo = next(r for r in rules if "127.0.0.0/8" in r.text)
    assert ("bitwise", b"\xff\0\0\0", b"\0\0\0\0") in lo.exprs


def test_every_expression_encodes_for_netlink() -> None:
    for state in ProxyState:
        for settings in (REDIRECT, TPROXY):
            for rule in render(settings, WORKLOADS, ["192.168.0.0/16"], [], state, dns_port=15053).rules:
                for e in rule.exprs:
                    attrs = dict(encode_expr(e)["attrs"])
                    assert attrs["NFTA_EXPR_NAME"] in expr_names([e])


def test_dns_capture_precedes_loopback_return() -> None:
    out = render(REDIRECT, WORKLOADS, dns_port=15053).text().splitlines()
    dns = [i for i, line in enumerate(out) if "dport 53 redirect to :15053" in line]
    lo = next(i for i, line in enumerate(out) if "127.0.0.0/8 return" in line)
    assert len(dns) == 4 and max(dns) < lo


def test_cgroup_workloads_are_refused_with_the_reason() -> None:
    wl = LocalWorkload("db", "data", "db", "10.0.0.2", (5432,), cgroup="nodemesh/db")
    with pytest.raises(CaptureError, match="data/db.*cgroup.*iptables or ebpf"):
        render(REDIRECT, (wl,))


def test_ipv6_exclusions_are_skipped_in_an_ip_table() -> None:
    assert "::" not in render(REDIRECT, WORKLOADS, ["fd00::/8"]).text()


# ---------------------------------------------------------------- iptables, tproxy mode

EMPTY = "*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"


def test_iptables_tproxy_golden() -> None:
    text = render_install(TPROXY, WORKLOADS, [], [], EMPTY)
    assert text == """\
*nat
:NODEMESH_OUTPUT - [0:0]
-I OUTPUT 1 -j NODEMESH_OUTPUT
-A NODEMESH_OUTPUT -m mark --mark 0x6e6d -j RETURN
-A NODEMESH_OUTPUT -d 127.0.0.0/8 -j RETURN
-A NODEMESH_OUTPUT -p tcp -m owner --uid-owner 2001 -j REDIRECT --to-ports 15001
-A NODEMESH_OUTPUT -p tcp -m owner --uid-owner 2003 -j REDIRECT --to-ports 15001
COMMIT
*mangle
:NODEMESH_TPROXY - [0:0]
:NODEMESH_DIVERT - [0:0]
:NODEMESH_MANGLE_OUT - [0:0]
-I PREROUTING 1 -j NODEMESH_TPROXY
-I OUTPUT 1 -j NODEMESH_MANGLE_OUT
-A NODEMESH_TPROXY -p tcp -m socket --transparent -j NODEMESH_DIVERT
-A NODEMESH_TPROXY -d 10.0.0.2/32 ! -i lo -p tcp -m tcp --dport 8080 -j TPROXY --on-port 15006 --on-ip 0.0.0.0 \
--tproxy-mark 0x10000/0x10000
-A NODEMESH_TPROXY -d 10.0.0.2/32 ! -i lo -p tcp -m tcp --dport 8443 -j TPROXY --on-port 15006 --on-ip 0.0.0.0 \
--tproxy-mark 0x10000/0x10000
-A NODEMESH_DIVERT -j MARK --set-xmark 0x10000/0x10000
-A NODEMESH_DIVERT -j ACCEPT
-A NODEMESH_MANGLE_OUT -p tcp -m mark --mark 0x6e6d -m addrtype ! --src-type LOCAL -j CONNMARK --set-xmark \
0x10000/0x10000
-A NODEMESH_MANGLE_OUT -p tcp -m connmark --mark 0x10000/0x10000 -j MARK --set-xmark 0x10000/0x10000
COMMIT
*filter
:NODEMESH_INPUT - [0:0]
-I INPUT 1 -j NODEMESH_INPUT
COMMIT
"""


def test_iptables_refuse_uses_filter_reject() -> None:
    text = render_install(TPROXY, WORKLOADS, [], [], EMPTY, ProxyState.REFUSE)
    assert "-A NODEMESH_INPUT -d 10.0.0.2/32 ! -i lo -p tcp -m tcp --dport 8080 -j REJECT --reject-with tcp-reset" \
        in text
    assert "-j TPROXY" not in text


def test_switching_mode_removes_the_other_modes_chains() -> None:
    installed_redirect = ("*nat\n:OUTPUT ACCEPT [0:0]\n:PREROUTING ACCEPT [0:0]\n:NODEMESH_OUTPUT - [0:0]\n"
                          ":NODEMESH_PREROUTING - [0:0]\n-A PREROUTING -j NODEMESH_PREROUTING\n"
                          "-A OUTPUT -j NODEMESH_OUTPUT\nCOMMIT\n")
    text = render_install(TPROXY, WORKLOADS, [], [], installed_redirect)
    assert "-D PREROUTING -j NODEMESH_PREROUTING" in text and "-X NODEMESH_PREROUTING" in text
    assert "-I OUTPUT 1 -j NODEMESH_OUTPUT" not in text.split("*mangle")[0]  # the nat jump exists already


def test_remove_covers_every_table() -> None:
    installed = render_install(TPROXY, WORKLOADS, [], [], EMPTY)
    # Turn the install script into what iptables-save would print afterwards.
    save = installed.replace("-I OUTPUT 1 -j", "-A OUTPUT -j").replace("-I PREROUTING 1 -j", "-A PREROUTING -j") \
        .replace("-I INPUT 1 -j", "-A INPUT -j")
    text = render_remove(save)
    for chain in ("NODEMESH_OUTPUT", "NODEMESH_TPROXY", "NODEMESH_DIVERT", "NODEMESH_MANGLE_OUT", "NODEMESH_INPUT"):
        assert f"-X {chain}" in text
    assert text.count("-D ") == 4
