"""eBPF capture: the Python mirrors of bpf/maps.h (bpflayout) against the BTF types bcc compiled
(root: compiling creates maps), and the pure rendering (no root)."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nodeagent.capture import bpfheaders, bpflayout, bpfnode, bpfprobe, bpfrender
from nodeagent.capture.base import CaptureError
from nodeagent.meshview.snapshot import LocalWorkload
from nodeagent.supervision.settings import ProxySettings
from tests.conftest import require_root, require_tool


def _layout(t: Any) -> list[tuple[str, int, int]] | int:
    """(field, offset, size) of a ctypes struct; the size of a scalar."""
    if hasattr(t, "_fields_"):
        return [(name, getattr(t, name).offset, getattr(t, name).size) for name, *_ in t._fields_]
    return ct.sizeof(t)


@pytest.fixture(scope="module")
def compiled() -> Any:
    require_root("compiling bpf/ with bcc (map creation needs CAP_BPF)")
    bpf = bpfprobe.load_programs()  # fails (not skips) with the reason if bcc or headers are missing
    yield bpf
    bpf.cleanup()


@pytest.mark.parametrize("name", sorted(bpflayout.MAP_LAYOUTS))
def test_map_layout_matches_compiled_program(compiled: Any, name: str) -> None:
    key, leaf, max_entries = bpflayout.MAP_LAYOUTS[name]
    table = compiled[name.encode()]
    assert _layout(table.Key) == _layout(key), f"{name} key layout differs from bpf/maps.h"
    assert ct.sizeof(table.Key) == ct.sizeof(key)
    # Per-CPU tables give bcc an array of leaves, one per CPU.
    bcc_leaf = table.Leaf._type_ if name == "nm_counters" else table.Leaf
    assert _layout(bcc_leaf) == _layout(leaf), f"{name} leaf layout differs from bpf/maps.h"
    assert ct.sizeof(bcc_leaf) == ct.sizeof(leaf)
    assert table.max_entries == max_entries


def _kernel_btf(bpf: Any) -> dict[int, dict[str, Any]]:
    """The BTF the kernel holds for the loaded programs (bpftool reads it back by
    id): every type of bpf/*.c, including bcc's `<map>_table_t` wrappers."""
    with open(f"/proc/self/fdinfo/{bpf[b'nm_config'].map_fd}") as f:
        map_id = next(int(line.split()[1]) for line in f if line.startswith("map_id:"))
    info = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "id", str(map_id)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info.get("btf_id"), f"the kernel holds no BTF for the maps ({info}): is the kernel built with BTF?"
    dump = json.loads(subprocess.run(["bpftool", "-j", "btf", "dump", "id", str(info["btf_id"])],
                                     capture_output=True, text=True, check=True).stdout)
    return {int(ty["id"]): ty for ty in dump["types"]}


def _btf_resolve(types: dict[int, dict[str, Any]], tid: int) -> dict[str, Any]:
    ty = types[tid]
    while ty["kind"] in ("TYPEDEF", "VOLATILE", "CONST", "RESTRICT"):
        ty = types[ty["type_id"]]
    return ty


def _btf_size(types: dict[int, dict[str, Any]], tid: int) -> int:
    ty = _btf_resolve(types, tid)
    if ty["kind"] == "ARRAY":
        return _btf_size(types, ty["type_id"]) * int(ty["nr_elems"])
    return int(ty["size"])


def _btf_layout(types: dict[int, dict[str, Any]], tid: int) -> list[tuple[str, int, int]] | int:
    """(field, offset, size) of a BTF struct, as _layout() gives them for ctypes; a scalar's size."""
    ty = _btf_resolve(types, tid)
    if ty["kind"] == "STRUCT":
        return [(m["name"], m["bits_offset"] // 8, _btf_size(types, m["type_id"])) for m in ty["members"]]
    return _btf_size(types, tid)


@pytest.mark.parametrize("name", sorted(bpflayout.MAP_LAYOUTS))
def test_map_layout_matches_the_kernels_btf(compiled: Any, name: str) -> None:
    """The mirrors against the kernel's own record of the C types (BTF), not only
    bcc's Python view of them: bcc describes each map as `<map>_table_t` with a
    `key` and a `leaf` member."""
    require_tool("bpftool")
    types = _kernel_btf(compiled)
    table_t = next((ty for ty in types.values() if ty["kind"] == "STRUCT" and ty["name"] == f"{name}_table_t"), None)
    assert table_t is not None, f"no {name}_table_t in the programs' BTF"
    members = {m["name"]: m["type_id"] for m in table_t["members"]}
    key, leaf, _ = bpflayout.MAP_LAYOUTS[name]
    assert _btf_layout(types, members["key"]) == _layout(key), f"{name} key differs from the kernel's BTF"
    assert _btf_layout(types, members["leaf"]) == _layout(leaf), f"{name} leaf differs from the kernel's BTF"


def test_every_map_in_the_program_is_mirrored(compiled: Any) -> None:
    ours = {n.decode() if isinstance(n, bytes) else n for n in compiled.tables}
    assert ours == set(bpflayout.MAP_LAYOUTS), "a map in bpf/maps.h has no Python mirror (or the reverse)"


def test_counter_names_match_counter_slots(compiled: Any) -> None:
    assert compiled[b"nm_counters"].max_entries == len(bpflayout.COUNTERS)
    source = (bpflayout.BPF_DIR / "maps.h").read_text()
    for i, name in enumerate(bpflayout.COUNTERS):
        assert f"NM_CTR_{name.upper()} {i}" in source, f"counter {name} is not slot {i} in maps.h"


def test_every_program_loads_with_its_attach_type(compiled: Any) -> None:
    for spec in bpflayout.PROGRAMS.values():
        assert spec.function.encode() in compiled.funcs


def test_dual_stack_programs_use_the_inet6_hooks() -> None:
    """connect6/getpeername6 must be loaded and attached as the IPv6 hooks
    (BPF_CGROUP_INET6_CONNECT 11, BPF_CGROUP_INET6_GETPEERNAME 30): the kernel
    runs only those for AF_INET6 sockets, IPv4-mapped destinations included."""
    for fn, attach in (("nm_connect6", 11), ("nm_connect6_uid", 11), ("nm_getpeername6", 30)):
        spec = bpflayout.PROGRAMS[fn]
        assert (spec.prog_type, spec.attach_type) == (18, attach)
        assert bpflayout.ATTACH_NAMES[spec.attach_name] == attach
    assert "v6_native_bypass" in bpflayout.COUNTERS


# ------------------------------------------------------------------ pure


def wl(name: str, uid: int | None = None, cgroup: str | None = None) -> LocalWorkload:
    return LocalWorkload(name, "default", name, "10.0.0.1", (), uid=uid, cgroup=cgroup)


def test_plan_cgroup_workloads_attach_to_their_cgroup_and_getsockopt_to_agent() -> None:
    plan = bpfrender.plan_attachments([wl("a", cgroup="/mesh/a")], "/system/agent")
    assert [p.describe() for p in plan] == [
        "/mesh/a cgroup_inet4_connect nm_connect4",
        "/mesh/a cgroup_inet4_getpeername nm_getpeername4",
        "/mesh/a cgroup_inet6_connect nm_connect6",
        "/mesh/a cgroup_inet6_getpeername nm_getpeername6",
        "/mesh/a cgroup_sock_ops nm_sockops",
        "/system/agent cgroup_getsockopt nm_getsockopt",
    ]


def test_plan_uid_workloads_attach_at_root_once() -> None:
    plan = bpfrender.plan_attachments([wl("a", uid=3001), wl("b", uid=3002)], "/")
    assert {p.describe() for p in plan} == {
        "/ cgroup_inet4_connect nm_connect4_uid",
        "/ cgroup_inet4_getpeername nm_getpeername4",
        "/ cgroup_inet6_connect nm_connect6_uid",
        "/ cgroup_inet6_getpeername nm_getpeername6",
        "/ cgroup_sock_ops nm_sockops",
        "/ cgroup_getsockopt nm_getsockopt",
    }
    assert bpfrender.render_uids([wl("a", uid=3001), wl("b", uid=3002), wl("c", cgroup="/x")]) == (3001, 3002)


def test_plan_without_workloads_attaches_nothing() -> None:
    assert bpfrender.plan_attachments([], "/") == ()


def test_config_is_in_network_order_where_the_kernel_is() -> None:
    cfg = bpfrender.render_config(ProxySettings("n", "10.0.0.1"), 77, "closed", 2.0)
    assert struct.pack("=I", cfg.proxy_ip4) == ipaddress.ip_address("127.0.0.1").packed
    assert (cfg.proxy_port, cfg.failure_policy, cfg.enabled, cfg.netns_cookie) == (15001, 1, 1, 77)
    assert cfg.liveness_timeout_ns == 2_000_000_000
    with pytest.raises(CaptureError, match="failurePolicy"):
        bpfrender.render_config(ProxySettings("n", "10.0.0.1"), 1, "maybe")


def test_exclusions_are_ipv4_lpm_keys_deduplicated() -> None:
    keys = bpfrender.render_exclusions(["10.1.2.3/32", "10.0.0.0/8", "10.0.0.5/8", "fd00::/8"])
    got = {(k.prefixlen, str(ipaddress.ip_address(struct.pack("=I", k.ip4)))) for k in keys}
    assert got == {(32, "10.1.2.3"), (8, "10.0.0.0")}


def test_source_concatenates_every_file_once() -> None:
    src = bpfrender.load_source()
    assert src.count("struct nm_config {") == 1
    for name in bpflayout.SOURCES:
        assert f'#line 1 "bpf/{name}"' in src
    assert '#include "maps.h"' not in src


def test_headers_merged_from_debian_trees(tmp_path: Path) -> None:
    src = tmp_path / "src"
    common = src / "linux-headers-6.1.0-9-common"
    arch = src / "linux-headers-6.1.0-9-amd64"
    (common / "include/linux").mkdir(parents=True)
    (common / "include/linux/a.h").write_text("common")
    (common / "include/linux/b.h").write_text("common")
    (arch / "include/generated").mkdir(parents=True)
    (arch / "include/generated/autoconf.h").write_text("arch")
    (arch / "include/linux").mkdir(parents=True)
    (arch / "include/linux/b.h").write_text("arch")
    tree = bpfheaders.find_headers(str(tmp_path / "cache"), str(src), release="0.0-none")
    merged = Path(tree.path)
    assert tree.version == "6.1.0-9" and merged == tmp_path / "cache" / "6.1.0-9"
    assert (merged / "include/linux/a.h").read_text() == "common"
    assert (merged / "include/linux/b.h").read_text() == "arch"  # the arch tree wins
    assert (merged / "include/generated/autoconf.h").exists()


def test_missing_headers_name_the_package(tmp_path: Path) -> None:
    with pytest.raises(bpfheaders.HeadersError, match="apt-get install linux-headers-amd64"):
        bpfheaders.find_headers(str(tmp_path / "cache"), str(tmp_path / "nothing"), release="0.0-none")


def test_plan_with_dns_adds_sendmsg_and_recvmsg_where_connect4_is() -> None:
    plan = bpfrender.plan_attachments([wl("a", cgroup="/mesh/a"), wl("b", uid=3001)], "/", dns=True)
    described = {p.describe() for p in plan}
    assert {"/mesh/a cgroup_udp4_sendmsg nm_sendmsg4", "/mesh/a cgroup_udp4_recvmsg nm_recvmsg4",
            "/ cgroup_udp4_sendmsg nm_sendmsg4_uid", "/ cgroup_udp4_recvmsg nm_recvmsg4"} <= described
    assert not any("udp4" in p.describe() for p in bpfrender.plan_attachments([wl("a", uid=1)], "/"))


def test_config_carries_the_dns_proxy_only_when_captured() -> None:
    s = ProxySettings("n", "10.0.0.1")
    cfg = bpfrender.render_config(s, 1, "open", dns_port=15053)
    assert (cfg.dns_port, struct.pack("=I", cfg.dns_ip4)) == (15053, bytes([127, 0, 0, 1]))
    off = bpfrender.render_config(s, 1, "open")
    assert (off.dns_port, off.dns_ip4) == (0, 0)
    with pytest.raises(CaptureError, match="dns.address"):
        bpfrender.render_config(s, 1, "open", dns_port=15053, dns_ip="::1")


def test_udp_bound_reads_proc_net_udp(tmp_path: Path) -> None:
    f = tmp_path / "udp"
    f.write_text(
        "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref\n"
        "  1: 0100007F:3ACD 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2\n")
    assert bpfnode.udp_bound("127.0.0.1", 15053, str(f))
    assert not bpfnode.udp_bound("127.0.0.1", 53, str(f))


def test_liveness_pin_path_is_per_netns(tmp_path: Path) -> None:
    from nodeagent.capture import heartbeat

    assert heartbeat.pin_path("/sys/fs/bpf", 0x1F) == "/sys/fs/bpf/nodemesh/1f/liveness"
    mounts = tmp_path / "mounts"
    mounts.write_text("sysfs /sys sysfs rw 0 0\nbpf /run/bpf bpf rw,relatime 0 0\n")
    assert heartbeat.bpffs_mount(str(mounts)) == "/run/bpf"


def test_liveness_map_round_trip_through_a_pin(tmp_path: Path) -> None:
    """The workers' writer (raw bpf(2), no bcc) against a map bcc created."""
    require_root("creating a BPF map")
    from nodeagent.capture import heartbeat

    bpf = bpfprobe.load_programs()
    try:
        mount = heartbeat.ensure_bpffs()
        path = f"{mount}/nodemesh-test-{abs(hash(str(tmp_path))) % 10**8}"
        heartbeat.obj_pin(bpf[b"nm_liveness"].map_fd, path)
        try:
            fd = heartbeat.obj_get(path)
            heartbeat.write_slot(fd, heartbeat.SLOT_PROXY, 12345)
            assert bpf[b"nm_liveness"][ct.c_int(0)].value == 12345
            assert heartbeat.read_slot(fd, heartbeat.SLOT_PROXY) == 12345
            import os

            os.close(fd)
            assert heartbeat.age_s(path, heartbeat.SLOT_DNS) is None  # never written
        finally:
            Path(path).unlink()
    finally:
        bpf.cleanup()
