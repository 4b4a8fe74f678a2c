"""Agent config: valid files parse into settings and local workloads; bad ones name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeagent.config import ConfigError, load_config, parse_config

GOOD = """
node: {name: node-1, address: 10.0.0.2, zone: z1, addresses: [10.1.0.2]}
controlPlane: {address: "10.0.0.1:15010"}
capture: {mode: iptables, excludeCidrs: [192.168.0.0/16], failurePolicy: open}
proxy: {workers: 2, accessLog: "/tmp/a.log", outboundPort: 15001, inboundPort: 15006, hbonePort: 15008,
        adminPort: 15000}
workloads:
  - {name: web, namespace: default, serviceAccount: web, labels: {app: web}, uid: 2001, ports: [8080]}
  - {name: db, namespace: data, cgroup: /nodemesh/db, ip: 10.0.0.3, ports: [5432]}
stateDir: /tmp/nm-state
"""


def raw() -> Any:
    return yaml.safe_load(GOOD)


def error_of(doc: Any) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    return e.value


def test_good_config_produces_settings_and_workloads(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(GOOD)
    cfg = load_config(path)
    s = cfg.proxy_settings()
    assert (s.node_name, s.node_address, s.workers, s.access_log) == ("node-1", "10.0.0.2", 2, "/tmp/a.log")
    assert s.excluded_cidrs == ("10.0.0.1/32", "192.168.0.0/16")
    web, db = cfg.local_workloads()
    assert (web.uid, web.cgroup, web.ip, web.ports, web.labels) == (2001, None, "10.0.0.2", (8080,),
                                                                   (("app", "web"),))
    assert (db.uid, db.cgroup, db.ip, db.service_account) == (None, "/nodemesh/db", "10.0.0.3", "default")
    assert cfg.node.all_addresses == ("10.0.0.2", "10.1.0.2")
    assert cfg.state_dir == "/tmp/nm-state"


def test_unix_control_plane_is_not_excluded() -> None:
    doc = raw()
    doc["controlPlane"]["address"] = "unix:/run/cp.sock"
    assert parse_config(doc).control_plane_exclusions() == ()


@pytest.mark.parametrize("mutate, path, reason", [
    (lambda d: d["node"].update(color="red"), "node.color", "unknown field"),
    (lambda d: d.update(extra=1), "extra", "unknown field"),
    (lambda d: d["workloads"][0].update(gid=3), "workloads[0].gid", "unknown field"),
    (lambda d: d["node"].pop("name"), "node.name", "required"),
    (lambda d: d["node"].update(address="nope"), "node.address", "not an IP address"),
    (lambda d: d["controlPlane"].update(address="nohost"), "controlPlane.address", "host:port"),
    (lambda d: d["controlPlane"].update(xdsProtocol="grpc"), "controlPlane.xdsProtocol", "delta"),
    (lambda d: d["controlPlane"].update(dependsOn=["web"]), "controlPlane.dependsOn[0]", "namespace/name"),
    (lambda d: d["capture"].update(mode="carrier-pigeon"), "capture.mode", "must be one of"),
    (lambda d: d["capture"].update(excludeCidrs=["10.0.0.0/33"]), "capture.excludeCidrs[0]", "not a CIDR"),
    (lambda d: d["capture"].update(failurePolicy="maybe"), "capture.failurePolicy", "must be one of"),
    (lambda d: d["proxy"].update(workers=0), "proxy.workers", "must be an integer in 1..256"),
    (lambda d: d["proxy"].update(hbonePort=15001), "proxy.hbonePort", "also proxy.outboundPort"),
    (lambda d: d["workloads"][0].update(ports=[70000]), "workloads[0].ports[0]", "must be an integer in 1..65535"),
    (lambda d: d["workloads"][0].update(cgroup="/x"), "workloads[0]", "exactly one of uid or cgroup"),
    (lambda d: d["workloads"][1].pop("cgroup"), "workloads[1]", "exactly one of uid or cgroup"),
    (lambda d: d["workloads"][1].update(name="web", namespace="default"), "workloads[1].name", "also workloads[0]"),
    (lambda d: d["workloads"][1].update(cgroup=None, uid=2001), "workloads[1].uid", "uid 2001"),
    (lambda d: d["workloads"][1].update(ports=[8080]), "workloads[1].ports", "port 8080"),
    (lambda d: d["workloads"][0].update(ports=[15008]), "workloads[0].ports", "proxy's own ports"),
    (lambda d: d["workloads"][0].update(name="Web_1"), "workloads[0].name", "DNS label"),
    (lambda d: d["workloads"][0].update(labels={"app": [3]}), "workloads[0].labels.app", "must be a string"),
    (lambda d: d.update(workloads={"web": 1}), "workloads", "must be a list"),
])
def test_bad_fields_are_named(mutate: Any, path: str, reason: str) -> None:
    doc = raw()
    mutate(doc)
    err = error_of(doc)
    assert err.path == path, str(err)
    assert reason in err.reason, str(err)


def test_xds_protocol_is_delta_unless_set() -> None:
    assert parse_config(raw()).control_plane.xds_protocol == "delta"
    doc = raw()
    doc["controlPlane"]["xdsProtocol"] = "sotw"
    assert parse_config(doc).control_plane.xds_protocol == "sotw"
    doc["controlPlane"]["dependsOn"] = ["shop/web"]
    assert parse_config(doc).control_plane.depends_on == ("shop/web",)


def test_config_objects_are_frozen() -> None:
    cfg = parse_config(raw())
    with pytest.raises(AttributeError):
        cfg.state_dir = "/elsewhere"  # type: ignore[misc]


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
