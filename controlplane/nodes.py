"""Registered nodes and workloads as frozen types, and the one conversion from
the NodeRegistration protobuf (with every check a registration must pass)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from nodemesh.identity import IdentityError, check_dns_label
from nodemesh.v1 import mesh_pb2
from nodemesh.xdsnames import HBONE_PORT


class RegistrationError(ValueError):
    """A registration that is refused; lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class RegisteredWorkload:
    name: str
    namespace: str
    service_account: str
    ip: str
    ports: tuple[int, ...]
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def label_map(self) -> Mapping[str, str]:
        return dict(self.labels)

    def serves(self, port: int) -> bool:
        # A workload that lists no ports serves whatever it is sent.
        return not self.ports or port in self.ports


@dataclass(frozen=True)
class RegisteredNode:
    name: str
    addresses: tuple[str, ...]
    hbone_port: int = HBONE_PORT
    zone: str = ""
    workloads: tuple[RegisteredWorkload, ...] = ()
    agent_version: str = ""
    # (workload key, target port) its agent's active health checks found failing;
    # merged in by NodeRegistry.nodes(), never persisted (the agent re-reports).
    unhealthy: frozenset[tuple[str, int]] = frozenset()

    @property
    def address(self) -> str:
        """Where peers reach this node's HBONE listener."""
        return self.addresses[0]


def _valid_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def node_from_proto(reg: mesh_pb2.NodeRegistration) -> RegisteredNode:
    """Check a registration and convert it. Raises RegistrationError listing
    every problem, each naming the field."""
    problems: list[str] = []

    def label(value: str, what: str) -> None:
        try:
            check_dns_label(value, what)
        except IdentityError as e:
            problems.append(str(e))

    label(reg.node_name, "node_name")
    if not reg.addresses:
        problems.append("addresses: at least one node address is required (peers reach HBONE at the first)")
    for i, a in enumerate(reg.addresses):
        if not _valid_ip(a):
            problems.append(f"addresses[{i}]: {a!r} is not an IP address")
    if reg.hbone_port > 65535:
        problems.append(f"hbone_port: {reg.hbone_port} is not a port (1..65535, 0 = {HBONE_PORT})")
    workloads: list[RegisteredWorkload] = []
    seen: set[tuple[str, str]] = set()
    for i, w in enumerate(reg.workloads):
        where = f"workloads[{i}]"
        label(w.name, f"{where}.name")
        label(w.namespace, f"{where}.namespace")
        label(w.service_account, f"{where}.service_account")
        if not _valid_ip(w.ip):
            problems.append(f"{where}.ip: {w.ip!r} is not an IP address")
        for j, p in enumerate(w.ports):
            if not 1 <= p <= 65535:
                problems.append(f"{where}.ports[{j}]: {p} is not a port (1..65535)")
        if (w.namespace, w.name) in seen:
            problems.append(f"{where}.name: workload {w.namespace}/{w.name} is listed twice")
        seen.add((w.namespace, w.name))
        workloads.append(RegisteredWorkload(
            name=w.name, namespace=w.namespace, service_account=w.service_account, ip=w.ip,
            ports=tuple(sorted(set(w.ports))), labels=tuple(sorted(w.labels.items()))))
    if problems:
        raise RegistrationError(problems)
    return RegisteredNode(
        name=reg.node_name, addresses=tuple(reg.addresses), hbone_port=reg.hbone_port or HBONE_PORT,
        zone=reg.zone, workloads=tuple(sorted(workloads, key=lambda w: (w.namespace, w.name))),
        agent_version=reg.agent_version)
