"""Tests for cldlr.common.deploy.pki: CA/server chain, SANs, file modes, no silent overwrite, Flower-loadable node keys."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store, VerificationError

from cldlr.cli import main
from cldlr.common.deploy.pki import (
    NODE_CURVE,
    PkiError,
    create_ca,
    create_node_keys,
    create_server_cert,
    load_node_private_key,
    load_node_public_key,
)
from cldlr.common.deploy.pki_show import describe

HOSTS = ["fl.example.org", "10.1.2.3"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture()
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = create_ca(tmp_path / "ca", name="test CA", days=30)
    server = create_server_cert(tmp_path / "link", ca_dir=tmp_path / "ca", hosts=HOSTS, days=20)
    assert server.ca_cert is not None
    return {"ca_dir": tmp_path / "ca", "ca_crt": ca.cert, "ca_key": ca.key, "crt": server.cert,
            "key": server.key, "ca_copy": server.ca_cert}


def _verifier(ca: x509.Certificate) -> PolicyBuilder:
    return PolicyBuilder().store(Store([ca])).time(dt.datetime.now(dt.UTC))


def test_server_chain_verifies_for_every_name_and_loopback(pki: dict[str, Path]) -> None:
    ca, leaf = _cert(pki["ca_crt"]), _cert(pki["crt"])
    names = [DNSName("fl.example.org"), DNSName("localhost"),
             IPAddress(ipaddress.ip_address("10.1.2.3")), IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for name in names:
        chain = _verifier(ca).build_server_verifier(name).verify(leaf, [])
        assert chain[0] == leaf and chain[-1] == ca
    with pytest.raises(VerificationError):
        _verifier(ca).build_server_verifier(DNSName("other.example.org")).verify(leaf, [])
    with pytest.raises(VerificationError):
        _verifier(ca).build_server_verifier(IPAddress(ipaddress.ip_address("10.9.9.9"))).verify(leaf, [])


def test_server_cert_rejected_by_a_foreign_ca(pki: dict[str, Path], tmp_path: Path) -> None:
    other = _cert(create_ca(tmp_path / "other", days=30).cert)
    with pytest.raises(VerificationError):
        _verifier(other).build_server_verifier(DNSName("fl.example.org")).verify(_cert(pki["crt"]), [])


def test_server_cert_contents(pki: dict[str, Path]) -> None:
    ca, leaf = _cert(pki["ca_crt"]), _cert(pki["crt"])
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(map(str, sans.get_values_for_type(x509.IPAddress))) == {"10.1.2.3", "127.0.0.1"}
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert pki["ca_copy"].read_bytes() == pki["ca_crt"].read_bytes()
    key = serialization.load_pem_private_key(pki["key"].read_bytes(), password=None)
    assert key.public_key() == leaf.public_key()


def test_file_modes(pki: dict[str, Path]) -> None:
    assert _mode(pki["ca_key"]) == 0o600
    assert _mode(pki["key"]) == 0o600
    assert _mode(pki["ca_crt"]) == 0o644
    assert _mode(pki["crt"]) == 0o644
    assert _mode(pki["ca_copy"]) == 0o644


def test_server_validity_capped_at_ca(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca", days=3)
    server = create_server_cert(tmp_path / "link", ca_dir=tmp_path / "ca", hosts=["fl.example.org"], days=825)
    assert _cert(server.cert).not_valid_after_utc <= _cert(ca.cert).not_valid_after_utc


def test_refuses_to_overwrite_without_force(pki: dict[str, Path], tmp_path: Path) -> None:
    before = pki["ca_key"].read_bytes()
    with pytest.raises(FileExistsError, match="ca.key"):
        create_ca(pki["ca_dir"], name="test CA", days=30)
    assert pki["ca_key"].read_bytes() == before
    server_before = pki["key"].read_bytes()
    with pytest.raises(FileExistsError, match="server.key"):
        create_server_cert(pki["key"].parent, ca_dir=pki["ca_dir"], hosts=HOSTS)
    assert pki["key"].read_bytes() == server_before
    create_ca(pki["ca_dir"], name="test CA", days=30, force=True)
    assert pki["ca_key"].read_bytes() != before
    assert _mode(pki["ca_key"]) == 0o600 and _mode(pki["ca_crt"]) == 0o644
    create_node_keys(tmp_path / "node", name="site-a")
    with pytest.raises(FileExistsError, match="supernode-site-a"):
        create_node_keys(tmp_path / "node", name="site-a")


def test_one_existing_file_blocks_the_whole_set(tmp_path: Path) -> None:
    create_ca(tmp_path / "ca", days=30)
    out = tmp_path / "link"
    out.mkdir()
    (out / "ca.crt").write_text("someone else's CA\n")
    with pytest.raises(FileExistsError, match="ca.crt"):
        create_server_cert(out, ca_dir=tmp_path / "ca", hosts=HOSTS)
    assert not (out / "server.key").exists() and not (out / "server.crt").exists()


def test_bad_ca_dir_and_mismatched_key(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="ca.crt not found"):
        create_server_cert(tmp_path / "link", ca_dir=tmp_path / "nowhere", hosts=HOSTS)
    create_ca(tmp_path / "a", days=30)
    create_ca(tmp_path / "b", days=30)
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(PkiError, match="does not belong"):
        create_server_cert(tmp_path / "link", ca_dir=tmp_path / "a", hosts=HOSTS)


@pytest.mark.parametrize("host", ["fl.example.org:8000", "https://fl.example.org", "bad_host", "-x.org", ""])
def test_invalid_hosts_rejected(tmp_path: Path, host: str) -> None:
    create_ca(tmp_path / "ca", days=30)
    with pytest.raises(PkiError, match="--host"):
        create_server_cert(tmp_path / "link", ca_dir=tmp_path / "ca", hosts=[host])
    assert not (tmp_path / "link").exists()


def test_ipv6_host_becomes_ip_san(tmp_path: Path) -> None:
    create_ca(tmp_path / "ca", days=30)
    server = create_server_cert(tmp_path / "link", ca_dir=tmp_path / "ca", hosts=["fd00::5", "FL.Example.org"])
    sans = _cert(server.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("fd00::5") in sans.get_values_for_type(x509.IPAddress)
    assert "fl.example.org" in sans.get_values_for_type(x509.DNSName)


def test_node_keys_load_with_flowers_own_loaders(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    private, public = create_node_keys(tmp_path / "node", name="hospital-a")
    assert _mode(private) == 0o600 and _mode(public) == 0o644
    # what `flower-supernode --auth-supernode-private-key` does
    loaded = _try_setup_client_authentication(
        argparse.Namespace(auth_supernode_private_key=str(private), auth_supernode_public_key=None))
    assert loaded is not None
    priv_key, pub_key = loaded
    assert isinstance(priv_key.curve, ec.SECP384R1) and uses_nist_ec_curve(pub_key)
    # what `flwr supernode register <pub>` does; it must be the same key the SuperNode signs with
    assert try_load_public_key(public) == public_key_to_bytes(pub_key)
    other_private, _ = create_node_keys(tmp_path / "node", name="hospital-b")
    other = serialization.load_ssh_private_key(other_private.read_bytes(), password=None)
    assert try_load_public_key(public) != public_key_to_bytes(other.public_key())  # type: ignore[arg-type]


def test_flower_rejects_a_pem_key_so_the_format_matters(pki: dict[str, Path]) -> None:
    """Run in a subprocess: Flower's exit path starts a thread that calls os._exit() seconds later."""
    import subprocess
    import sys

    code = ("import argparse, sys\n"
            "from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication\n"
            f"_try_setup_client_authentication(argparse.Namespace(auth_supernode_private_key={str(pki['key'])!r}, "
            "auth_supernode_public_key=None))\n"
            "sys.exit(0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0, done.stdout + done.stderr


def test_node_key_loaders_check_what_flower_checks_and_name_the_file(pki: dict[str, Path], tmp_path: Path) -> None:
    private, public = create_node_keys(tmp_path / "node", name="site-a")
    key = load_node_private_key(private)
    assert isinstance(key.curve, type(NODE_CURVE))
    assert load_node_public_key(public).public_numbers() == key.public_key().public_numbers()
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_key, ed_pub = tmp_path / "ed.key", tmp_path / "ed.pub"
    ed_key.write_bytes(ed.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption()))
    ed_pub.write_bytes(ed.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    for loader, path in ((load_node_private_key, ed_key), (load_node_public_key, ed_pub)):
        with pytest.raises(PkiError, match=f"{path}: Flower 1.41 accepts only ECDSA .* not Ed25519"):
            loader(path)
    with pytest.raises(PkiError, match=f"{pki['key']} is not an unencrypted OpenSSH private key"):
        load_node_private_key(pki["key"])  # a PEM key: Flower would refuse it too
    with pytest.raises(PkiError, match=f"{private} is not an OpenSSH public key line"):
        load_node_public_key(private)
    with pytest.raises(PkiError, match=f"cannot read the SuperNode key {tmp_path / 'missing.key'}"):
        load_node_private_key(tmp_path / "missing.key")
    assert "not Ed25519PublicKey" in describe(tmp_path)  # `certs show` warns with the same check


def test_invalid_site_name(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="--name"):
        create_node_keys(tmp_path, name="../escape")


def test_show_reports_files_and_flags_readable_secret(pki: dict[str, Path]) -> None:
    folder = pki["key"].parent
    text = describe(folder)
    leaf = _cert(pki["crt"])
    assert "ca.key (SECRET)" in text and "keep it off the SuperLink host" in text
    assert leaf.fingerprint(hashes.SHA256()).hex(":").upper() in text
    assert "fl.example.org" in text and "10.1.2.3" in text and "127.0.0.1" in text
    assert "signed by: ca.crt" in text and "pairs with: server.crt" in text
    assert "readable by group/others" not in text
    os.chmod(pki["key"], 0o644)
    flagged = describe(folder)
    assert "SECRET file is readable by group/others (mode 0644)" in flagged
    assert f"chmod 600 {pki['key']}" in flagged


def test_show_warns_when_ca_key_sits_with_server_key_and_on_node_keys(pki: dict[str, Path], tmp_path: Path) -> None:
    create_server_cert(pki["ca_dir"], ca_dir=pki["ca_dir"], hosts=HOSTS)
    assert "keep the CA key offline" in describe(pki["ca_dir"])
    create_node_keys(tmp_path / "node", name="site-a")
    text = describe(tmp_path / "node")
    assert "pairs with: supernode-site-a.pub" in text and "0 warning(s)" in text


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> None:
    """One TLS handshake over loopback; raises what the client's verification raises."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (socket.create_connection(listener.getsockname(), timeout=10) as raw,
                  client_ctx.wrap_socket(raw, server_hostname=hostname) as tls):
                assert tls.version() is not None
        finally:
            thread.join(timeout=10)


def _client(ca_path: Path) -> ssl.SSLContext:
    """A client set up the way Flower's SuperNode HTTP client is (PROTOCOL_TLS_CLIENT + cadata)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca_path.read_text())
    return ctx


def test_real_tls_handshake_on_loopback(pki: dict[str, Path], tmp_path: Path) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki["crt"], pki["key"])
    _handshake(server_ctx, _client(pki["ca_copy"]), "127.0.0.1")
    _handshake(server_ctx, _client(pki["ca_copy"]), "fl.example.org")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, _client(pki["ca_copy"]), "evil.example.org")
    other = create_ca(tmp_path / "other", days=30)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, _client(other.cert), "127.0.0.1")


def test_cli_certs_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, link, node = tmp_path / "ca", tmp_path / "link", tmp_path / "node"
    assert main(["certs", "ca", str(ca_dir), "--days", "30"]) == 0
    assert main(["certs", "server", str(link), "--ca-dir", str(ca_dir), "--host", "fl.example.org"]) == 0
    assert "--ssl-certfile" in capsys.readouterr().out
    assert main(["certs", "node", str(node), "--name", "site-a"]) == 0
    assert (node / "supernode-site-a.key").is_file() and (node / "supernode-site-a.pub").is_file()
    assert main(["certs", "node", str(node), "--name", "site-a"]) == 2
    assert "supernode-site-a.key" in capsys.readouterr().err
    assert main(["certs", "node", str(node), "--name", "site-a", "--force"]) == 0
    assert main(["certs", "server", str(tmp_path / "x"), "--ca-dir", str(tmp_path / "none")]) == 2
    assert "ca.crt not found" in capsys.readouterr().err
    assert main(["certs", "show", str(link)]) == 0
    assert "server.crt" in capsys.readouterr().out


def test_a_ca_certificate_with_a_non_ec_or_rsa_key_is_a_mismatch_not_a_crash(tmp_path: Path) -> None:
    # ca.key is the EC key create_ca wrote, ca.crt a self-signed Ed25519 CA: key and certificate differ
    create_ca(tmp_path / "ca", days=30)
    other = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "ed25519 CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(other.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(other, None))
    (tmp_path / "ca" / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(PkiError, match="does not belong"):
        create_server_cert(tmp_path / "link", ca_dir=tmp_path / "ca", hosts=HOSTS)


@pytest.mark.parametrize("command", ["ca", "server", "node"])
def test_an_existing_loose_pki_folder_is_tightened(tmp_path: Path, command: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A folder made earlier by hand (0755) with a world-readable key gets 0700 / 0600 on the next `certs` run."""
    ca_dir = tmp_path / "ca"
    if command != "ca":
        create_ca(ca_dir, name="test CA", days=30)
    out = tmp_path / "pki"
    out.mkdir(mode=0o755)
    os.chmod(out, 0o755)  # whatever the umask
    stale = out / "old-supernode.key"
    stale.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    os.chmod(stale, 0o644)
    public = out / "old.pub"
    public.write_text("ecdsa-sha2-nistp384 AAAA\n")
    os.chmod(public, 0o644)
    with caplog.at_level("WARNING", logger="cldlr.common.deploy.pki"):
        if command == "ca":
            create_ca(out, name="test CA", days=30)
        elif command == "server":
            create_server_cert(out, ca_dir=ca_dir, hosts=HOSTS, days=20)
        else:
            create_node_keys(out, name="site-a")
    assert _mode(out) == 0o700
    assert _mode(stale) == 0o600
    assert _mode(public) == 0o644  # public files stay readable
    assert all(_mode(p) == 0o600 for p in out.glob("*.key"))
    assert f"{out} had mode 0755; tightened to 0700" in caplog.text
    assert f"{stale} had mode 0644; tightened to 0600" in caplog.text


def test_a_loose_ca_folder_is_tightened_when_it_signs(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca", name="test CA", days=30)
    os.chmod(tmp_path / "ca", 0o755)
    os.chmod(ca.key, 0o640)
    create_server_cert(tmp_path / "link", ca_dir=tmp_path / "ca", hosts=HOSTS, days=20)
    assert _mode(tmp_path / "ca") == 0o700 and _mode(ca.key) == 0o600


def test_show_only_reports_a_loose_key_and_changes_nothing(pki: dict[str, Path]) -> None:
    os.chmod(pki["key"], 0o644)
    describe(pki["key"].parent)
    assert _mode(pki["key"]) == 0o644
