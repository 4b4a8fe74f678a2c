"""The comparison benchmark's peer configs are valid for the real tools, and its
pure parts (certificates, the open-loop client, the report) do what they say.

The rendered HAProxy, nginx and Envoy configs are checked with `haproxy -c`,
`nginx -t` and `envoy --mode validate` (no network, no root needed). A missing
tool skips its check on a developer machine and fails under CI=true, where
scripts/setup.sh has installed it.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import compare  # bench/, on pytest's pythonpath (pyproject.toml)
import openloop
import peers
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import require_tool, unavailable


def need(tool: str) -> str:
    return require_tool(tool)


def envoy() -> str:
    try:
        return str(peers.envoy_binary())
    except FileNotFoundError as e:
        unavailable(str(e))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, peers.PeerPki, dict[str, peers.PeerPair]]:
    d = tmp_path_factory.mktemp("bench")
    pki = peers.make_pki(d / "pki")
    pairs = peers.build_pairs(d, "10.77.0.11", "10.77.0.12", pki)
    return d, pki, pairs


# ----------------------------------------------------------------- certificates
def test_pki_spiffe_leaves_signed_by_ca(rendered: Any) -> None:
    _d, pki, _ = rendered
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    for cert_path, want in ((pki.client_cert, peers.CLIENT_ID), (pki.server_cert, peers.SERVER_ID)):
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [want]
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    for key_file in (pki.client_key, pki.server_key, pki.client_bundle, pki.server_bundle):
        assert key_file.stat().st_mode & 0o077 == 0, f"{key_file} must not be readable by others"
    assert b"PRIVATE KEY" in pki.client_bundle.read_bytes() and b"CERTIFICATE" in pki.client_bundle.read_bytes()


# ----------------------------------------------------------------- HAProxy
def test_haproxy_configs_valid(rendered: Any) -> None:
    haproxy = need("haproxy")
    d, _pki, _ = rendered
    for name in ("haproxy-client.cfg", "haproxy-server.cfg"):
        res = subprocess.run([haproxy, "-c", "-f", str(d / "peers" / name)], capture_output=True, text=True,
                             timeout=30, check=False)
        assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"


def test_haproxy_pair_is_mtls_h2(rendered: Any) -> None:
    d, pki, _ = rendered
    client = (d / "peers" / "haproxy-client.cfg").read_text()
    server = (d / "peers" / "haproxy-server.cfg").read_text()
    assert "nbthread 1" in client and "nbthread 1" in server
    assert "ssl-min-ver TLSv1.3" in client
    # Node 1 presents its certificate and checks node 2's; node 2 requires a client certificate.
    assert f"crt {pki.client_bundle} ca-file {pki.ca} verify required" in client and "alpn h2" in client
    assert f"10.77.0.12:{peers.PORTS.haproxy_mtls} ssl" in client
    assert f"crt {pki.server_bundle} ca-file {pki.ca} verify required alpn h2 curves P-256" in server
    assert f"server nginx 127.0.0.1:{peers.PORTS.upstream_plain}" in server


# ----------------------------------------------------------------- nginx
def test_nginx_upstream_valid(tmp_path: Path) -> None:
    nginx = need("nginx")
    conf = peers.write(tmp_path / "nginx.conf", peers.render_nginx_upstream(tmp_path))
    res = subprocess.run([nginx, "-t", "-c", str(conf), "-e", str(tmp_path / "error.log")], capture_output=True,
                         text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    text = conf.read_text()
    for port in (peers.PORTS.upstream_mesh, peers.PORTS.upstream_plain, peers.PORTS.upstream_mesh_tcp):
        assert f"listen {port} reuseport;" in text
    assert "x" * 1024 in text and "x" * 1025 not in text


# ----------------------------------------------------------------- Envoy
@pytest.mark.parametrize("name", ["envoy-l7-client.json", "envoy-l7-server.json", "envoy-l4-client.json",
                                  "envoy-l4-server.json"])
def test_envoy_configs_validate(rendered: Any, name: str) -> None:
    binary = envoy()
    d, _pki, _ = rendered
    res = subprocess.run([binary, "--mode", "validate", "-c", str(d / "peers" / name), "--disable-hot-restart",
                          "-l", "error"], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and "OK" in res.stdout + res.stderr, f"{name}: {res.stdout[-2000:]}{res.stderr[-2000:]}"


def _tls_contexts(doc: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if isinstance(doc, dict):
        if doc.get("name") == "envoy.transport_sockets.tls":
            found.append(doc["typed_config"])
        for v in doc.values():
            found += _tls_contexts(v)
    elif isinstance(doc, list):
        for v in doc:
            found += _tls_contexts(v)
    return found


def test_envoy_tls_is_spiffe_mtls_13(rendered: Any) -> None:
    d, _pki, _ = rendered
    for name, peer_id, side in (("envoy-l7-client.json", peers.SERVER_ID, "Upstream"),
                                ("envoy-l7-server.json", peers.CLIENT_ID, "Downstream"),
                                ("envoy-l4-client.json", peers.SERVER_ID, "Upstream"),
                                ("envoy-l4-server.json", peers.CLIENT_ID, "Downstream")):
        doc = json.loads((d / "peers" / name).read_text())
        ctxs = _tls_contexts(doc)
        assert ctxs, name
        for ctx in ctxs:
            assert ctx["@type"].endswith(f"{side}TlsContext")
            if side == "Downstream":
                assert ctx["require_client_certificate"] is True
            common = ctx["common_tls_context"]
            assert common["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
            assert common["tls_params"]["ecdh_curves"] == ["P-256"]
            assert common["validation_context"]["match_typed_subject_alt_names"] == [
                {"san_type": "URI", "matcher": {"exact": peer_id}}]
    l7 = json.loads((d / "peers" / "envoy-l7-client.json").read_text())
    opts = l7["static_resources"]["clusters"][0]["typed_extension_protocol_options"]
    assert "http2_protocol_options" in json.dumps(opts)


def test_envoy_argv_one_worker(rendered: Any) -> None:
    _d, _pki, pairs = rendered
    for key in ("envoy_l7", "envoy_l4"):
        for proc in pairs[key].processes:
            argv = list(proc.argv)
            assert argv[argv.index("--concurrency") + 1] == "1"
            assert "--disable-hot-restart" in argv


# ----------------------------------------------------------------- open-loop client
def test_parse_head() -> None:
    assert openloop.parse_head(b"HTTP/1.1 200 OK\r\nServer: x\r\ncontent-length: 1024") == (200, 1024)
    with pytest.raises(openloop.ResponseError, match="Content-Length"):
        openloop.parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked")
    with pytest.raises(openloop.ResponseError, match="bad status line"):
        openloop.parse_head(b"garbage")


class _Slow(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    delay = 0.0

    def do_GET(self) -> None:
        time.sleep(self.delay)
        body = b"y" * 100
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _serve(delay: float) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = type("H", (_Slow,), {"delay": delay})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


def test_openloop_counts_every_request() -> None:
    srv, port = _serve(0.0)
    try:
        out = openloop.run("127.0.0.1", port, rate=200, seconds=0.5, connections=4, path="/")
    finally:
        srv.shutdown()
    assert out["n"] == out["expected"] == 100 and out["errors"] == 0
    assert 0 < out["p50_ms"] <= out["p99_ms"] <= out["max_ms"]


def test_openloop_counts_queueing_no_coordinated_omission() -> None:
    # 20 ms per response, one connection, a request due every 10 ms: the server can do
    # half the rate, so requests queue and latency from the scheduled time keeps
    # growing (a closed-loop client would report a flat ~20 ms).
    srv, port = _serve(0.02)
    try:
        out = openloop.run("127.0.0.1", port, rate=100, seconds=0.5, connections=1, path="/")
    finally:
        srv.shutdown()
    assert out["n"] == 50 and out["errors"] == 0
    assert out["max_ms"] > 300, out


def test_openloop_counts_unanswered_requests_with_their_wait() -> None:
    srv, port = _serve(0.3)
    try:
        out = openloop.run("127.0.0.1", port, rate=20, seconds=0.2, connections=1, path="/", drain_seconds=0.2)
    finally:
        srv.shutdown()
    assert out["unfinished"] >= 2 and out["errors"] == 0
    assert out["n"] + out["unfinished"] == out["expected"] == 4
    assert out["max_ms"] >= 300  # the oldest unanswered request waited the whole drain and more


# ----------------------------------------------------------------- report
def test_table_and_targets_from_summary() -> None:
    base = {"wrk_p50_ms": 1.0, "wrk_p99_ms": 2.0, "fixed_p50_ms": 0.2, "fixed_p999_ms": 1.0,
            "fixed_send_lag_p99_ms": 0.05, "generator_vcpu": 0.9, "host_busy": 0.95, "rounds_ok": 3}
    summary: dict[str, dict[str, Any]] = {
        "direct": {**base, "rps": 60000.0, "fixed_p99_ms": 0.3, "cpu_s_per_1k_max": None,
                   "cpu_s_per_1k_fixed": None, "bulk_MBps": 2000.0},
        "haproxy": {**base, "rps": 15000.0, "fixed_p99_ms": 0.8, "cpu_s_per_1k_max": 0.03,
                    "cpu_s_per_1k_fixed": 0.4, "bulk_MBps": None},
        "envoy_l4": {**base, "rps": 10000.0, "fixed_p99_ms": 0.6, "cpu_s_per_1k_max": 0.03,
                     "cpu_s_per_1k_fixed": 0.3, "bulk_MBps": 500.0},
        "mesh_l7": {**base, "rps": 16000.0, "fixed_p99_ms": 0.7, "cpu_s_per_1k_max": 0.02,
                    "cpu_s_per_1k_fixed": 0.35, "bulk_MBps": None},
        "mesh_l4": {"rounds_ok": 0, "errors": ["wrk failed"]},
    }
    text = compare.table(summary, 1000)
    assert "| direct | 60,000 (1.00) | 0.30 | – | – | 2,000 (1.00) |" in text
    # CPU µs per request at max load: cpu_s_per_1k_max × 1,000.
    assert "| HAProxy 2.6 L7 pair, h2 between | 15,000 (0.25) | 0.80 (+0.50) | 0.40 (0.03) | 30 | – |" in text
    assert "error: 'wrk failed'" in text
    checks = "\n".join(compare.target_checks(summary))
    assert "[met] L7 vs HAProxy pair: max req/s" in checks
    assert "[met] L7 vs HAProxy pair: added p99" in checks
    assert "[n/a] L4 vs Envoy L4 pair: max req/s" in checks
    assert "[n/a] 2 workers" in checks


def test_summarize_medians_and_errors() -> None:
    rounds: list[dict[str, dict[str, Any]]] = [{"direct": {"rps": 3.0}}, {"direct": {"rps": 1.0}},
                                               {"direct": {"error": "boom"}}, {"direct": {"rps": 2.0}}]
    s = compare.summarize(rounds, ["direct"])["direct"]
    assert s["rps"] == 2.0 and s["rounds_ok"] == 3 and s["errors"] == ["boom"]
