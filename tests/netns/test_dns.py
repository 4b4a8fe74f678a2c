"""Mesh DNS through real capture: every node's resolv.conf names a fake
upstream resolver on the hub (10.X.0.1:53, UDP and TCP). A workload resolves
`web.default.svc.mesh` (and the bare `web`) to the VIP via the agent's DNS
proxy and curls it by name; other names reach the fake upstream and come back
unchanged; a silent upstream gives SERVFAIL in bounded time; TCP works; a
process that is not a workload is not captured.

This file doubles as the helper programs it runs inside the namespaces:
`--fake-upstream LOG` (the resolver) and `--ask NAME` (a one-shot client)."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.dns.message import (
    CLASS_IN,
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_TXT,
    Message,
    Question,
    Record,
    a_record,
    build_message,
    name_from_text,
    parse_message,
)

FAKE_ANSWER = "192.0.2.53"
HERE = str(Path(__file__).resolve())


# ------------------------------------------------------------------ helper programs


def fake_answer(query: bytes) -> bytes | None:
    """A for any name (192.0.2.53) plus a TXT naming the resolver; names starting
    with "drop" get no answer at all."""
    q = parse_message(query)
    name = q.questions[0].name
    if name and name[0].startswith(b"drop"):
        return None
    answers: tuple[Record, ...] = ()
    if q.questions[0].qtype == TYPE_A:
        answers = (a_record(name, FAKE_ANSWER, 123),
                   Record(name, TYPE_TXT, CLASS_IN, 123, b"\x0dfake-upstream"))
    return build_message(Message(q.id, FLAG_QR | FLAG_RD | FLAG_RA, q.questions, answers))


def serve_fake_upstream(log_path: str) -> None:
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - open for the whole life of the server

    def record(query: bytes, answer: bytes | None, transport: str) -> None:
        log.write(json.dumps({"id": struct.unpack_from("!H", query)[0], "transport": transport,
                              "name": b".".join(parse_message(query).questions[0].name).decode(),
                              "answer": answer.hex() if answer else None}) + "\n")

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            answer = fake_answer(data)
            record(data, answer, "udp")
            if answer:
                self.transport.sendto(answer, addr)

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(n)
                answer = fake_answer(data)
                record(data, answer, "tcp")
                if answer:
                    writer.write(struct.pack("!H", len(answer)) + answer)
        except asyncio.IncompleteReadError:
            writer.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(Udp, local_addr=("0.0.0.0", 53))
        server = await asyncio.start_server(tcp, "0.0.0.0", 53)
        print("fake upstream listening", flush=True)
        await server.serve_forever()

    asyncio.run(main())


def ask(name: str, server: str, tcp: bool, msg_id: int, timeout: float) -> dict[str, Any]:
    """Send one A query the way a resolver would; report the raw answer."""
    q = build_message(Message(msg_id, FLAG_RD, (Question(name_from_text(name), TYPE_A, CLASS_IN),)))
    t0 = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.connect((server, 53))
        if tcp:
            s.sendall(struct.pack("!H", len(q)) + q)
            buf = b""
            while len(buf) < 2 or len(buf) < 2 + struct.unpack_from("!H", buf)[0]:
                chunk = s.recv(65535)
                if not chunk:
                    return {"error": "closed", "elapsed": time.monotonic() - t0}
                buf += chunk
            data = buf[2:]
        else:
            s.send(q)
            data = s.recv(65535)
    except TimeoutError:
        return {"error": "timeout", "elapsed": time.monotonic() - t0}
    finally:
        s.close()
    return {"answer": data.hex(), "elapsed": time.monotonic() - t0}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--fake-upstream", metavar="LOG")
    ap.add_argument("--ask", metavar="NAME")
    ap.add_argument("--server", default="")
    ap.add_argument("--tcp", action="store_true")
    ap.add_argument("--id", type=int, default=4321)
    ap.add_argument("--timeout", type=float, default=6.0)
    args = ap.parse_args()
    if args.fake_upstream:
        serve_fake_upstream(args.fake_upstream)
    else:
        print(json.dumps(ask(args.ask, args.server, args.tcp, args.id, args.timeout)))
    sys.exit(0)


# ------------------------------------------------------------------ the test

from nodemesh.lab.harness import Lab, LabWorkload  # noqa: E402 - the part above also runs as a script in the lab
from tests.conftest import require_root, require_tool  # noqa: E402 - the part above also runs as a script in the lab
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID, WEB_UID  # noqa: E402 - the part above also runs as a script in the lab

pytestmark = pytest.mark.netns


# eBPF captures port 53 with connect4/sendmsg4/recvmsg4 (docs/capture-ebpf.md).
@pytest.fixture(params=["iptables", "nftables", "ebpf"])
def dns_mesh(request: pytest.FixtureRequest) -> Iterator[Lab]:
    require_root("namespace tests")
    for tool in ("ip", "iptables-restore", "curl", "setpriv"):
        require_tool(tool)
    lab_id = f"d{abs(hash(request.node.name)) % 100000}"
    lab = Lab(nodes=2, lab_id=lab_id, lease_seconds=4)
    lab.node_resolv_conf = f"nameserver {lab.cp_ip}\n"  # the hub, where the fake upstream listens
    lab.capture_mode = request.param
    with lab:
        lab.spawn("fakedns", lab.hub,
                  [sys.executable, HERE, "--fake-upstream", str(lab.workdir / "fakedns-queries.jsonl")])
        lab.wait_for(lambda: "listening" in lab.log("fakedns"), 10, "the fake upstream resolver",
                     lambda: lab.log("fakedns"))
        lab.start_controlplane()
        lab.apply(BASE_CONFIG)
        lab.add_workload(LabWorkload("web-2", node=2, uid=WEB_UID, ports=(8080,), service_account="web",
                                     labels={"app": "web"}))
        lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client",
                                     labels={"app": "client"}))
        lab.start_app("web-2")
        lab.start_agent(1)
        lab.start_agent(2)
        try:
            yield lab
        finally:
            if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
                print(f"--- agent-1 log ---\n{lab.log('agent-1')[-4000:]}")
                print(f"--- fakedns log ---\n{lab.log('fakedns')[-2000:]}")


def _ask(lab: Lab, name: str, uid: int | None = CLIENT_UID, tcp: bool = False, msg_id: int = 4321) -> dict[str, Any]:
    argv = [sys.executable, HERE, "--ask", name, "--server", lab.cp_ip, "--id", str(msg_id)]
    res = lab.ns_exec(lab.node_ns(1), argv + (["--tcp"] if tcp else []), uid=uid, check=False, timeout=15)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def _upstream_log(lab: Lab) -> list[dict[str, Any]]:
    path = lab.workdir / "fakedns-queries.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_workload_resolves_mesh_names_and_forwards_the_rest(dns_mesh: Lab) -> None:
    lab = dns_mesh
    vip = lab.service_vip("web")
    assert lab.agent_status(1).get("dns_listening") is True

    # By name through the mesh, with no change to the workload.
    for url in ("http://web.default.svc.mesh/by-name", "http://web/bare"):
        res = lab.curl(1, url, uid=CLIENT_UID)
        assert res.returncode == 0, f"curl {url}: {res.stderr}\n{lab.log('agent-1')[-3000:]}"
        assert json.loads(res.stdout)["replica"] == "web-2"
    mesh = parse_message(bytes.fromhex(_ask(lab, "web.default.svc.mesh", msg_id=101)["answer"]))
    assert mesh.id == 101 and mesh.answers[0].rdata == bytes(map(int, vip.split(".")))
    leaked = [e["name"] for e in _upstream_log(lab) if e["name"].startswith("web")]
    assert not leaked, f"mesh names reached the upstream: {leaked}"

    # Not a mesh name: the upstream's answer, byte for byte, with the client's ID.
    out = _ask(lab, "www.example.test", msg_id=202)
    got = bytes.fromhex(out["answer"])
    sent = [e for e in _upstream_log(lab) if e["name"] == "www.example.test"]
    assert len(sent) == 1 and sent[0]["transport"] == "udp"
    assert got == struct.pack("!H", 202) + bytes.fromhex(sent[0]["answer"])[2:]

    # A silent upstream: SERVFAIL once the agent's upstream timeout (2 s) passes.
    dead = _ask(lab, "drop.example.test", msg_id=303)
    assert "answer" in dead, dead
    assert parse_message(bytes.fromhex(dead["answer"])).rcode == RCODE_SERVFAIL
    assert 1.5 < dead["elapsed"] < 4.0

    # TCP to port 53 is captured too: mesh names answered, others forwarded over TCP.
    tcp_mesh = parse_message(bytes.fromhex(_ask(lab, "web.default.svc.mesh", tcp=True, msg_id=404)["answer"]))
    assert tcp_mesh.id == 404 and tcp_mesh.answers[0].rdata == bytes(map(int, vip.split(".")))
    tcp_fwd = parse_message(bytes.fromhex(_ask(lab, "tcp.example.test", tcp=True, msg_id=505)["answer"]))
    assert tcp_fwd.id == 505 and tcp_fwd.answers[0].rdata == bytes([192, 0, 2, 53])
    assert [e["transport"] for e in _upstream_log(lab) if e["name"] == "tcp.example.test"] == ["tcp"]

    # A process that is not a declared workload is not captured: it talks to
    # the upstream itself, which knows nothing of the mesh.
    direct = parse_message(bytes.fromhex(_ask(lab, "web.default.svc.mesh", uid=None, msg_id=606)["answer"]))
    assert direct.answers[0].rdata == bytes([192, 0, 2, 53])
