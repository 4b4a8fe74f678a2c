"""The systemd units we ship (deploy/systemd/) are exactly what `nodemesh install`
lays down, valid (systemd-analyze verify, offline) and hardened (systemd-analyze
security's exposure, offline); the Vagrantfile validates and runs the same
provisioning phases as the systemd cluster tier (nodemesh/cluster.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nodemesh.install import DEPLOY_PYTHON, deploy_units
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
# docs/systemd.md reports these; a change that weakens the sandboxing fails here.
MAX_EXPOSURE = {"nodemesh-agent.service": 2.5, "nodemesh-controlplane.service": 2.0}


def _need(tool: str, package: str) -> None:
    require_tool(tool, package)


def _local_copy(unit: Path, tmp_path: Path) -> Path:
    # Point ExecStart at this checkout's venv, where the real entry point is.
    text = unit.read_text().replace(DEPLOY_PYTHON, sys.executable)
    local = tmp_path / unit.name
    local.write_text(text)
    return local


def test_shipped_units_are_what_install_lays_down() -> None:
    rendered = deploy_units(ROOT)
    assert sorted(rendered) == [u.name for u in UNITS]
    for unit in UNITS:
        assert unit.read_text() == rendered[unit.name], \
            f"deploy/systemd/{unit.name} drifted from nodemesh install: run `python -m nodemesh.install`"


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_verifies(unit: Path, tmp_path: Path) -> None:
    _need("systemd-analyze", "systemd")
    local = _local_copy(unit, tmp_path)
    res = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, check=False)
    problems = [line for line in (res.stdout + res.stderr).splitlines()
                if unit.name in line or "ExecStart" in line]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_exposure(unit: Path, tmp_path: Path) -> None:
    _need("systemd-analyze", "systemd")
    local = _local_copy(unit, tmp_path)
    res = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(local)], capture_output=True,
                         text=True, check=False, cwd=tmp_path)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE[unit.name], res.stdout


def test_vagrantfile_validates(tmp_path: Path) -> None:
    """The multi-VM cluster cannot boot here (no KVM), but its Vagrantfile is checked offline."""
    _need("vagrant", "vagrant")
    work = tmp_path / "vagrant"
    shutil.copytree(ROOT / "vagrant", work, ignore=shutil.ignore_patterns(".vagrant", "tokens"))
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "vagrant-home"))
    res = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=work, capture_output=True,
                         text=True, env=env, timeout=120, check=False)
    assert res.returncode == 0 and "validated successfully" in res.stdout, res.stdout + res.stderr


def test_vagrant_and_the_cluster_tier_run_the_same_provisioning(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Both run vagrant/provision.sh's phases and nothing else: the Vagrantfile's
    provisioners and trigger, and what the tier runs in its machines."""
    from nodemesh import cluster

    vagrantfile = (ROOT / "vagrant" / "Vagrantfile").read_text()
    assert "inline:" not in vagrantfile.replace('t.run = {inline:', ''), "the VMs run provision.sh only"
    vagrant = re.findall(r'path: "provision\.sh",\s*args: \[\s*"(\w+)"', vagrantfile)
    vagrant += re.findall(r"provision\.sh (token) ", vagrantfile)
    c = cluster.Cluster("unit")
    for m in c.machines.values():
        m.root = tmp_path / m.host
        (m.root / "root").mkdir(parents=True)
    ran: list[tuple[str, list[str]]] = []

    def record(host: str, cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        ran.append((host, cmd))
        return subprocess.CompletedProcess(cmd, 0, "a-token\n", "")

    monkeypatch.setattr(c, "run", record)
    c.provision(log=lambda _msg: None)
    assert all(cmd[:2] == cluster.provision_argv("x")[:2] for _, cmd in ran)
    tier = [cmd[2] for _, cmd in ran]
    # The base phase runs once into the base root (nodemesh.cluster.build_base).
    assert 'provision_argv("base")' in (ROOT / "nodemesh" / "cluster.py").read_text()
    assert sorted(set(vagrant)) == sorted(set(tier) | {"base"}) == ["base", "controlplane", "hosts", "node", "token"]
    node_args = next(cmd[3:] for host, cmd in ran if cmd[2] == "node")
    assert len(node_args) == 4  # NAME IP CP_IP TOKEN_FILE, as the Vagrantfile passes them
    assert re.search(r'args: \["node", name, ip, NODES\["cp"\], "[^"]+"\]', vagrantfile)
