"""Backend selection (`capture.mode`, `auto`), the proxy liveness probe and the
failover watchdog's state machine, without root."""

from __future__ import annotations

import asyncio
import sys
import types
from typing import Any

import pytest

from nodeagent.capture import select
from nodeagent.capture.base import AgentFailover, CaptureBackend, CaptureError, ProxyState
from nodeagent.capture.failover import Failover, state_for
from nodeagent.capture.iptables import IptablesCapture
from nodeagent.capture.liveness import listening_ports
from nodeagent.capture.nftables import NftablesCapture
from nodeagent.meshview.snapshot import LocalWorkload
from nodeagent.supervision.settings import ProxySettings

SETTINGS = ProxySettings(node_name="node-1", node_address="10.0.0.2")
UID_WL = (LocalWorkload("web", "default", "web", "10.0.0.2", (8080,), uid=2001),)
CGROUP_WL = (LocalWorkload("db", "data", "db", "10.0.0.2", (5432,), cgroup="nodemesh/db"),)


def test_explicit_modes_build_their_backend() -> None:
    assert isinstance(select.choose("iptables", SETTINGS, UID_WL).backend, IptablesCapture)
    choice = select.choose("nftables", SETTINGS, UID_WL, dns_port=15053)
    assert isinstance(choice.backend, NftablesCapture) and choice.backend.dns_port == 15053
    assert choice.reason == "capture.mode is nftables"
    for backend in (IptablesCapture(SETTINGS, UID_WL), NftablesCapture(SETTINGS, UID_WL)):
        assert isinstance(backend, CaptureBackend) and isinstance(backend, AgentFailover)


def fake_ebpf(monkeypatch: pytest.MonkeyPatch, ok: bool, why: str) -> None:
    mod = types.ModuleType("nodeagent.capture.ebpf")

    class EbpfCapture:
        name = "ebpf"

        def __init__(self, settings: ProxySettings, workloads: Any, exclusions: Any = (),
                     failure_policy: str = "open") -> None:
            self.failure_policy = failure_policy

    mod.available = lambda: (ok, why)  # type: ignore[attr-defined]
    mod.EbpfCapture = EbpfCapture  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nodeagent.capture.ebpf", mod)


def test_auto_prefers_ebpf_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ebpf(monkeypatch, True, "bcc loads here")
    choice = select.choose("auto", SETTINGS, UID_WL, failure_policy="closed")
    assert choice.mode == "ebpf" and "bcc loads here" in choice.reason
    assert choice.backend.failure_policy == "closed"  # type: ignore[attr-defined]


def test_auto_falls_back_in_order_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ebpf(monkeypatch, False, "no kernel headers")
    monkeypatch.setattr(select, "nftables_available", lambda wls: (False, "no nf_tables"))
    monkeypatch.setattr(select, "iptables_available", lambda: (True, "iptables-restore found"))
    choice = select.choose("auto", SETTINGS, UID_WL)
    assert choice.mode == "iptables"
    assert "ebpf: no kernel headers" in choice.reason and "nftables: no nf_tables" in choice.reason


def test_auto_skips_nftables_for_cgroup_workloads(monkeypatch: pytest.MonkeyPatch) -> None:
    ok, why = select.nftables_available(CGROUP_WL)
    assert not ok and "data/db" in why and "cgroupv2" in why


def test_nothing_available_is_an_error_listing_every_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ebpf(monkeypatch, False, "e")
    monkeypatch.setattr(select, "nftables_available", lambda wls: (False, "n"))
    monkeypatch.setattr(select, "iptables_available", lambda: (False, "i"))
    with pytest.raises(CaptureError, match="ebpf: e; nftables: n; iptables: i"):
        select.choose("auto", SETTINGS, UID_WL)


def test_missing_ebpf_module_counts_as_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nodeagent.capture.ebpf", None)  # import raises ImportError
    ok, why = select.ebpf_available()
    assert not ok and "no eBPF backend" in why
    with pytest.raises(CaptureError, match="capture.mode ebpf cannot be used here"):
        select.choose("ebpf", SETTINGS, UID_WL)


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 00000000:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0B4D0A0A:1F90 0C4D0A0A:C350 01 00000000:00000000 00:00000000 00000000  2001        0 3 1
"""


def test_liveness_reads_listening_ports_only() -> None:
    assert listening_ports(PROC_NET_TCP) == {15001, 15006}


class FakeCapture:
    def __init__(self, fail: bool = False) -> None:
        self.state = ProxyState.SERVING
        self.calls: list[ProxyState] = []
        self.fail = fail

    def set_proxy_state(self, state: ProxyState) -> None:
        if self.fail:
            raise CaptureError("iptables_failed", "boom")
        self.calls.append(state)
        self.state = state


def run_ticks(fo: Failover, cap: Any, ups: list[bool], clock: list[float]) -> list[bool]:
    it = iter(ups)
    fo._probe = lambda port: next(it)
    out = []
    for _ in ups:
        out.append(asyncio.run(fo.tick(cap)))
        clock[0] += 0.2
    return out


@pytest.mark.parametrize("policy, down_state", [("open", ProxyState.BYPASS), ("closed", ProxyState.REFUSE)])
def test_failover_switches_once_per_window_and_counts(policy: str, down_state: ProxyState) -> None:
    clock = [100.0]
    fo = Failover(policy, 15001, clock=lambda: clock[0])
    cap = FakeCapture()
    changed = run_ticks(fo, cap, [True, False, False, False, True, True, False, True], clock)
    assert changed == [False, True, False, False, True, False, True, True]
    assert cap.calls == [down_state, ProxyState.SERVING, down_state, ProxyState.SERVING]
    st = fo.status()
    assert st["proxy_down_windows"] == 2 and st["proxy_state"] == "serving"
    assert st["proxy_down_seconds"] == pytest.approx(0.8)


def test_failover_keeps_trying_after_an_error() -> None:
    clock = [0.0]
    fo = Failover("open", 15001, clock=lambda: clock[0])
    assert run_ticks(fo, FakeCapture(fail=True), [False, False], clock) == [False, False]
    assert "boom" in fo.status()["failover_error"] and fo.windows == 0


def test_failover_ignores_backends_that_decide_in_the_kernel() -> None:
    fo = Failover("open", 15001, probe=lambda port: False)
    assert asyncio.run(fo.tick(object())) is False


def test_state_for() -> None:
    assert state_for(True, "closed") is ProxyState.SERVING
    assert state_for(False, "open") is ProxyState.BYPASS
    assert state_for(False, "closed") is ProxyState.REFUSE


def _cfg(capture: dict[str, Any]) -> Any:
    from nodeagent.config import parse_config

    return parse_config({"node": {"name": "n1", "address": "10.0.0.2"},
                         "controlPlane": {"address": "10.0.0.1:15010"}, "capture": capture})


def test_capture_config_fields() -> None:
    cfg = _cfg({"mode": "auto", "failurePolicy": "closed", "inbound": "redirect", "tproxyTable": 200})
    settings = cfg.proxy_settings()
    assert cfg.capture.mode == "auto" and settings.inbound_mode == "redirect" and settings.tproxy_table == 200
    assert _cfg({}).proxy_settings().inbound_mode == "tproxy"


@pytest.mark.parametrize("capture, path, reason", [
    ({"inbound": "nat"}, "capture.inbound", "must be one of"),
    ({"tproxyMark": 0x1}, "capture.tproxyMark", "shares bits with the proxy's own socket mark"),
    ({"tproxyTable": 254}, "capture.tproxyTable", "kernel routing table"),
])
def test_capture_config_errors_name_the_field(capture: dict[str, Any], path: str, reason: str) -> None:
    from nodeagent.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _cfg(capture)
    assert err.value.path == path and reason in err.value.reason


def test_the_ebpf_probe_compiles_once_and_the_first_install_attaches_its_programs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """available() compiles and loads bpf/ to answer; the first load_programs()
    (the install) takes that copy rather than compiling again (bcc's compile is
    the slowest step of an eBPF start); later installs (a reload) compile anew."""
    from nodeagent.capture import bpfprobe

    compiled: list[object] = []

    def compile_and_load() -> object:
        compiled.append(object())
        return compiled[-1]

    monkeypatch.setattr(bpfprobe, "_available", None)
    monkeypatch.setattr(bpfprobe, "_prepared", None)
    monkeypatch.setattr(bpfprobe, "_compile_and_load", compile_and_load)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr(bpfprobe, "cgroup2_mount", lambda: "/sys/fs/cgroup")
    monkeypatch.setattr(bpfprobe, "netns_cookie", lambda: 1)
    assert bpfprobe.available()[0] and bpfprobe.available()[0] and len(compiled) == 1
    assert bpfprobe.load_programs() is compiled[0] and len(compiled) == 1
    assert bpfprobe.load_programs() is compiled[1]
