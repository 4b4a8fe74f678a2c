"""Added TCP connect latency of each capture backend, side by side in one run.

A client process (uid 3999, in its own cgroup v2) connects to 10.200.0.1:8080
inside a fresh network namespace and times socket() + connect() + close():
- none: straight to the listener on 10.200.0.1:8080;
- loopback: straight to the 127.0.0.1:15001 listener (where captured connects land);
- iptables: nat REDIRECT (uid match) to a listener on 127.0.0.1:15001;
- nftables: `redirect to :15001` (meta skuid) in table ip nodemesh, through netlink;
- ebpf: cgroup/connect4 (cgroup attach) rewrites to 127.0.0.1:15001, sockops files the tuple.
The listener on 15001 reads SO_ORIGINAL_DST for each connection, as the proxy
does. Rounds are rotated so drift on this shared machine hits every mode alike.

Run as root: .venv/bin/python bench/capture_latency.py [--connects 2000 --rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DST = ("10.200.0.1", 8080)
CLIENT_UID = 3999
CGROUP = "/nodemesh-bench/client"

CLIENT = """
import socket, sys, time, json
n = int(sys.argv[1]); host = sys.argv[2]; port = int(sys.argv[3]); out = []
for _ in range(n):
    s = socket.socket()
    t0 = time.perf_counter_ns()
    s.connect((host, port))
    out.append(time.perf_counter_ns() - t0)
    s.close()
print(json.dumps(out))
"""


def acceptor(port: int, host: str, read_orig: bool) -> None:
    sys.path.insert(0, str(ROOT))
    from nodeagent.proxy.netutil import original_dst

    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(4096)

    def loop() -> None:
        while True:
            c, _ = ls.accept()
            if read_orig:
                with contextlib.suppress(OSError):
                    original_dst(c)
            c.close()

    threading.Thread(target=loop, daemon=True).start()


def run_client(n: int, cgroup_root: str, dst: tuple[str, int] = DST) -> list[int]:
    procs = os.path.join(cgroup_root, CGROUP.strip("/"), "cgroup.procs")
    argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, "setpriv", f"--reuid={CLIENT_UID}",
            f"--regid={CLIENT_UID}", "--clear-groups", "/usr/bin/python3", "-c", CLIENT, str(n), dst[0], str(dst[1])]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [int(x) for x in json.loads(out)]


def inner(connects: int, rounds: int) -> None:
    sys.path.insert(0, str(ROOT))
    from nodeagent.capture.bpfnode import cgroup2_mount
    from nodeagent.capture.ebpf import EbpfCapture
    from nodeagent.capture.heartbeat import LivenessWriter
    from nodeagent.capture.iptables import IptablesCapture
    from nodeagent.capture.nftables import NftablesCapture
    from nodeagent.meshview.snapshot import LocalWorkload
    from nodeagent.supervision.settings import ProxySettings

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # No dummy driver on every kernel: a veth pair inside the namespace holds the address.
    subprocess.run(["ip", "link", "add", "bench0", "type", "veth", "peer", "name", "bench1"], check=True)
    subprocess.run(["ip", "addr", "add", "10.200.0.1/24", "dev", "bench0"], check=True)
    subprocess.run(["ip", "link", "set", "bench0", "up"], check=True)
    mount = cgroup2_mount()
    os.makedirs(os.path.join(mount, CGROUP.strip("/")), exist_ok=True)
    acceptor(DST[1], "0.0.0.0", False)
    acceptor(15001, "127.0.0.1", True)
    settings = ProxySettings("bench", DST[0])
    ipt = IptablesCapture(settings, [LocalWorkload("c", "default", "c", DST[0], (), uid=CLIENT_UID)])
    nft = NftablesCapture(settings, [LocalWorkload("c", "default", "c", DST[0], (), uid=CLIENT_UID)])
    bpf = EbpfCapture(settings, [LocalWorkload("c", "default", "c", DST[0], (), cgroup=CGROUP)])

    # "loopback": no capture, straight to the 15001 listener: where captured connects end up.
    samples: dict[str, list[int]] = {"none": [], "loopback": [], "iptables": [], "nftables": [], "ebpf": []}
    # Stands in for the proxy workers: keeps the kernel's liveness entry fresh
    # (else eBPF capture would fail open after 2 s and measure a direct connect).
    beating = threading.Event()

    def beat() -> None:
        writer = LivenessWriter()
        while not beating.wait(0.5):
            writer.beat()

    threading.Thread(target=beat, daemon=True).start()
    run_client(200, mount)  # warm up
    try:
        for _ in range(rounds):
            for mode in samples:
                if mode == "iptables":
                    ipt.install()
                elif mode == "nftables":
                    nft.install()
                elif mode == "ebpf":
                    bpf.install()
                try:
                    dst = ("127.0.0.1", 15001) if mode == "loopback" else DST
                    samples[mode] += run_client(connects, mount, dst)
                finally:
                    if mode == "iptables":
                        ipt.remove()
                    elif mode == "nftables":
                        nft.remove()
                    elif mode == "ebpf":
                        bpf.remove()
    finally:
        beating.set()
        ipt.remove()
        nft.remove()
        bpf.remove()
    result = {}
    for mode, xs in samples.items():
        xs.sort()
        result[mode] = {"n": len(xs), "p50_us": xs[len(xs) // 2] / 1000, "p99_us": xs[int(len(xs) * 0.99)] / 1000,
                        "mean_us": statistics.fmean(xs) / 1000}
    print(json.dumps(result))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connects", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        inner(args.connects, args.rounds)
        return 0
    if os.geteuid() != 0:
        print("capture_latency: run as root (network namespace, capture)", file=sys.stderr)
        return 1
    ns = f"nmbench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--inner",
                              "--connects", str(args.connects), "--rounds", str(args.rounds)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        res = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
        from nodemesh.lab.harness import cgroup2_root

        for p in (cgroup2_root() / CGROUP.strip("/"), cgroup2_root() / "nodemesh-bench"):
            with contextlib.suppress(OSError):
                p.rmdir()
    base = res["none"]["p50_us"]
    print(f"TCP connect latency through capture ({res['none']['n']} connects per mode, {args.rounds} rotated rounds)")
    print(f"{'mode':<10}{'p50 µs':>10}{'p99 µs':>10}{'mean µs':>10}{'p50 added':>12}")
    for mode, r in res.items():
        print(f"{mode:<10}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}{r['mean_us']:>10.1f}{r['p50_us'] - base:>+12.1f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
