"""Control-plane trust material: root rotation with an overlap (old and new
roots trusted together, new leaves from the new root, the old root dropped
when the overlap ends, all persisted), and an intermediate CA signed by an
operator's own root, loaded from files."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane.ca import ROOT_KEY_FILE, CaError, CertificateAuthority
from nodemesh.identity import Identity
from tests.unit.test_cp_ca import make_csr

TD = "cluster.local"
ID = Identity(TD, "default", "web")


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def issuer_of(ca: CertificateAuthority) -> x509.Name:
    leaf = ca.sign(x509.load_pem_x509_csr(make_csr(ID.uri).encode()), ID, 3600)
    return leaf.issuer


def test_rotation_keeps_the_old_root_trusted_for_the_overlap(tmp_path: Path) -> None:
    clock = Clock()
    ca = CertificateAuthority.load_or_create(str(tmp_path), TD, clock)
    old_pem, old_subject = ca.root_pem, ca.root_cert.subject
    assert ca.trust_bundle == [old_pem]
    old_fp, new_fp = ca.rotate(TD, overlap_s=600)
    assert old_fp != new_fp and ca.root_pem != old_pem
    assert ca.trust_bundle == [ca.root_pem, old_pem]
    assert issuer_of(ca) == ca.root_cert.subject != old_subject
    assert stat.S_IMODE(os.stat(tmp_path / ROOT_KEY_FILE).st_mode) == 0o600
    assert ca.next_bundle_change() == clock.t + 600
    # A restart during the overlap keeps both roots.
    again = CertificateAuthority.load_or_create(str(tmp_path), TD, clock)
    assert again.trust_bundle == ca.trust_bundle
    clock.t += 601
    assert ca.trust_bundle == [ca.root_pem] and ca.next_bundle_change() is None


def _operator_ca(tmp_path: Path) -> tuple[str, str, str]:
    now = datetime.datetime.now(datetime.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator root")])
    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    inter = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh intermediate")]))
             .issuer_name(root_name).public_key(key.public_key()).serial_number(2)
             .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=10))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .sign(root_key, hashes.SHA256()))
    paths = (tmp_path / "inter.pem", tmp_path / "inter.key", tmp_path / "chain.pem")
    paths[0].write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(paths[1], 0o600)
    paths[2].write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return str(paths[0]), str(paths[1]), str(paths[2])


def test_intermediate_from_operator_files(tmp_path: Path) -> None:
    cert, key, chain = _operator_ca(tmp_path)
    ca = CertificateAuthority.from_files(cert, key, chain)
    root = x509.load_pem_x509_certificate(Path(chain).read_bytes())
    inter = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    assert ca.trust_bundle == [root.public_bytes(serialization.Encoding.PEM).decode()]
    leaf = ca.sign(x509.load_pem_x509_csr(make_csr(ID.uri).encode()), ID, 3600)
    leaf.verify_directly_issued_by(inter)
    assert ca.chain[0] == inter.public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(CaError, match="operator"):
        ca.rotate(TD)


def test_operator_files_errors_name_the_file(tmp_path: Path) -> None:
    cert, key, chain = _operator_ca(tmp_path)
    with pytest.raises(CaError, match="--ca-cert"):
        CertificateAuthority.from_files(str(tmp_path / "missing.pem"), key, chain)
    (tmp_path / "x").mkdir()
    other = _operator_ca(tmp_path / "x")
    with pytest.raises(CaError, match="do not belong together"):
        CertificateAuthority.from_files(cert, other[1], chain)
    with pytest.raises(CaError, match="--ca-chain"):
        CertificateAuthority.from_files(cert, key, other[2])
    # The private key never appears in an error message.
    try:
        CertificateAuthority.from_files(cert, other[1], chain)
    except CaError as e:
        assert "PRIVATE KEY" not in str(e)


def _write(path: Path, *certs: x509.Certificate) -> str:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return str(path)


def test_operator_files_refusals_say_what_to_fix(tmp_path: Path) -> None:
    cert, key, chain = _operator_ca(tmp_path)
    inter = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    root = x509.load_pem_x509_certificate(Path(chain).read_bytes())
    # The intermediate file holding the root too: the chain goes in --ca-chain.
    with pytest.raises(CaError, match="holds 2 certificates"):
        CertificateAuthority.from_files(_write(tmp_path / "both.pem", inter, root), key, chain)
    # A chain that does not end with a self-signed root: no trust anchor.
    with pytest.raises(CaError, match="not a self-signed root"):
        CertificateAuthority.from_files(cert, key, "")
    # A key readable by every user is refused before it is parsed.
    os.chmod(key, 0o644)
    with pytest.raises(CaError, match="chmod 600"):
        CertificateAuthority.from_files(cert, key, chain)
    os.chmod(key, 0o600)
    # Garbage where PEM is expected names the flag and the file.
    (tmp_path / "junk").write_bytes(os.urandom(64))
    for args, flag in (((str(tmp_path / "junk"), key, chain), "--ca-cert"),
                       ((cert, str(tmp_path / "junk"), chain), "--ca-key"),
                       ((cert, key, str(tmp_path / "junk")), "--ca-chain")):
        if flag == "--ca-key":
            os.chmod(tmp_path / "junk", 0o600)
        with pytest.raises(CaError, match=flag):
            CertificateAuthority.from_files(*args)
    # Not valid any more (the operator's clock says 2100): issue a new one.
    with pytest.raises(CaError, match="not valid now"):
        CertificateAuthority.from_files(cert, key, chain, clock=lambda: 4_102_444_800.0)
    # A leaf certificate (CA:FALSE) cannot be the intermediate.
    k = serialization.load_pem_private_key(Path(key).read_bytes(), None)
    assert isinstance(k, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    leaf = (x509.CertificateBuilder().subject_name(inter.subject).issuer_name(inter.subject)
            .public_key(k.public_key()).serial_number(9).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(k, hashes.SHA256()))
    with pytest.raises(CaError, match="not a CA certificate"):
        CertificateAuthority.from_files(_write(tmp_path / "leaf.pem", leaf), key, chain)


def test_controlplane_settings_need_all_three_ca_files(tmp_path: Path) -> None:
    from controlplane.process import ControlPlaneSettings

    with pytest.raises(ValueError, match="go together"):
        ControlPlaneSettings(state_dir=str(tmp_path), ca_cert="x.pem")
    ControlPlaneSettings(state_dir=str(tmp_path), ca_cert="a", ca_key="b", ca_chain="c")


def test_serve_with_operator_ca_bad_chain_exits_with_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    cert, key, _chain = _operator_ca(tmp_path)
    other = tmp_path / "o"
    other.mkdir()
    wrong_chain = _operator_ca(other)[2]
    p = subprocess.run([sys.executable, "-m", "nodemesh", "controlplane", "serve", "--state-dir",
                        str(tmp_path / "state"), "--listen", f"unix:{tmp_path}/cp.sock", "--web-listen", "",
                        "--ca-cert", cert, "--ca-key", key, "--ca-chain", wrong_chain],
                       capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode == 1
    assert "--ca-chain" in p.stderr and "did not issue" in p.stderr and "Traceback" not in p.stderr
    assert "PRIVATE KEY" not in p.stderr + p.stdout
