"""Certificates and SuperNode keys for a real Flower 1.41 deployment (CA, SuperLink TLS, node auth).

Also the one place that reads a SuperNode key back (:func:`load_node_private_key` on the hospital,
:func:`load_node_public_key` at the centre) with the check Flower applies to it, so a wrong key is
refused before Flower starts. ``describe`` (``cldlr certs show``) lives in :mod:`cldlr.common.deploy.pki_show`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_write_bytes

log = logging.getLogger(__name__)

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"
ALWAYS_HOSTS = ("127.0.0.1", "localhost")  # the SuperLink's own SuperExec dials 127.0.0.1
NODE_CURVE = ec.SECP384R1()  # = `ssh-keygen -t ecdsa -b 384`; Flower accepts NIST curves only, no ed25519
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what OpenSSH calls nistp256/384/521
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CLOCK_SKEW = dt.timedelta(minutes=5)  # back-date notBefore so a slightly slow peer clock still accepts


class PkiError(CldlrError, ValueError):
    """A CA, certificate, key or host name is missing, unreadable or unusable."""


@dataclass(frozen=True)
class Paths:
    """Files one command wrote: the certificate, its private key and (server only) the CA copy."""

    cert: Path
    key: Path
    ca_cert: Path | None = None


def utc_now() -> dt.datetime:
    """The current time, timezone-aware in UTC, as certificate validity is compared."""
    return dt.datetime.now(dt.UTC)


def is_ca(cert: x509.Certificate) -> bool:
    """Whether ``cert`` may sign others (basicConstraints CA:TRUE); a missing extension means no."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def write_pki_files(files: list[tuple[Path, bytes, bool]], *, force: bool) -> None:
    """Write (path, data, secret) triples atomically; refuse to clobber any of them unless ``force``.

    Secrets land 0600 from the start (``mkstemp`` creates 0600 temp files), public files are
    opened up to 0644 after the rename. If one write fails, files this call created are removed.
    """
    existing = [str(p) for p, _, _ in files if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FileExistsError(
            f"refusing to overwrite {', '.join(existing)}: existing keys/certificates may be in use; "
            "pass --force to replace them (anything issued with the old ones stops working)")
    created: list[Path] = []
    try:
        for path, data, secret in files:
            fresh = not path.exists()
            atomic_write_bytes(path, data)
            if fresh:
                created.append(path)
            os.chmod(path, 0o600 if secret else 0o644)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise


def tighten_pki_dir(folder: str | os.PathLike[str]) -> None:
    """Make an existing PKI folder owner-only (0700) and its private keys (``*.key``) 0600, logging each change.

    ``mkdir(mode=0o700)`` only applies to a folder it creates: one made earlier by hand (often
    0755) would keep its keys listable and, with a loose key file, readable by every local user.
    Symbolic links are left alone (``chmod`` would change whatever they point at).
    """
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return
    mode = stat.S_IMODE(folder.stat().st_mode)
    if mode & 0o077:
        os.chmod(folder, mode & 0o700)
        log.warning("PKI folder %s had mode %04o; tightened to %04o (it holds private keys)", folder, mode,
                    mode & 0o700)
    for path in sorted(folder.glob("*.key")):
        if path.is_symlink() or not path.is_file():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, mode & 0o600)
            log.warning("private key %s had mode %04o; tightened to %04o", path, mode, mode & 0o600)


def prepare_pki_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create the output folder owner-only (it will hold secrets); an existing one is tightened."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    tighten_pki_dir(out)
    return out


def pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """An unencrypted PKCS#8 PEM private key (written 0600 by :func:`write_pki_files`)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_certificate(cert: x509.Certificate) -> bytes:
    """A certificate as PEM text bytes."""
    return cert.public_bytes(serialization.Encoding.PEM)


def certificate_builder(subject_cn: str, issuer: x509.Name | None, public: Any, issuer_public: Any,
                        not_after: dt.datetime, *, ca: bool) -> x509.CertificateBuilder:
    """What CA, server and bundle-signer certificates share: names, serial, validity, constraints, key ids.

    The strict profile (critical basicConstraints/keyUsage, SKI/AKI) is what OpenSSL's
    ``-x509_strict`` and cryptography's verifier demand, so Python 3.13+ clients accept it too.
    """
    if not 1 <= len(subject_cn) <= 64:
        raise PkiError(f"certificate name {subject_cn!r} must be 1 to 64 characters long")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    usage = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                           "encipher_only", "decipher_only"), False)
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(utc_now() - _CLOCK_SKEW).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, **usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False)
    )


def create_ca(out_dir: str | os.PathLike[str], *, name: str = "cldlr federation CA", days: int = 3650,
              force: bool = False) -> Paths:
    """Create a self-signed federation CA (``ca.crt`` 0644, ``ca.key`` 0600) in ``out_dir``.

    The CA only signs the SuperLink certificate and the model-bundle signer (path length 0), so its
    key can live offline.
    """
    if days < 1:
        raise PkiError(f"--days must be at least 1, got {days}")
    key = ec.generate_private_key(ec.SECP384R1())
    cert = certificate_builder(name, None, key.public_key(), key.public_key(), utc_now() + dt.timedelta(days=days),
                     ca=True).sign(key, hashes.SHA384())
    out = prepare_pki_dir(out_dir)
    paths = Paths(cert=out / CA_CERT, key=out / CA_KEY)
    write_pki_files([(paths.key, pem_private_key(key), True), (paths.cert, pem_certificate(cert), False)], force=force)
    log.info("created CA %r in %s (keep %s offline)", name, out, paths.key)
    return paths


def load_ca(ca_dir: str | os.PathLike[str]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    """Load and sanity-check ``ca.crt``/``ca.key`` from ``ca_dir``."""
    cert_path, key_path = Path(ca_dir) / CA_CERT, Path(ca_dir) / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise PkiError(f"{path} not found; create a CA first with `cldlr certs ca {ca_dir}`")
    tighten_pki_dir(ca_dir)  # the CA folder holds the federation's most valuable key
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise PkiError(f"{cert_path} is not a PEM certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{key_path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise PkiError(f"{key_path}: only EC or RSA CA keys are supported, got {type(key).__name__}")
    if key.public_key() != cert.public_key():  # any key type: a certificate's key need not be EC or RSA
        raise PkiError(f"{key_path} does not belong to {cert_path}; use the key created with that certificate")
    if not is_ca(cert):
        raise PkiError(f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE missing)")
    if cert.not_valid_after_utc <= utc_now():
        raise PkiError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; create a new CA")
    return cert, key


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    """Turn host names / IPs into SAN entries (always adding 127.0.0.1 and localhost), deduplicated."""
    names: list[x509.GeneralName] = []
    for raw in [*hosts, *ALWAYS_HOSTS]:
        host = raw.strip().lower().rstrip(".")
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            if not host or len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
                raise PkiError(f"--host {raw!r} is neither an IP address nor a valid DNS name "
                               "(give the bare name or IP, without scheme or :port)") from None
            entry = x509.DNSName(host)
        if entry not in names:
            names.append(entry)
    return names


def create_server_cert(out_dir: str | os.PathLike[str], *, ca_dir: str | os.PathLike[str], hosts: list[str],
                       days: int = 825, force: bool = False) -> Paths:
    """Issue the SuperLink TLS certificate, signed by the CA in ``ca_dir``, plus a copy of ``ca.crt``.

    SANs cover every ``hosts`` entry (what SuperNodes and the ``flwr`` CLI dial) and 127.0.0.1 and
    localhost (what the SuperLink's own SuperExec dials). Validity is capped at the CA's.
    """
    if days < 1:
        raise PkiError(f"--days must be at least 1, got {days}")
    ca_cert, ca_key = load_ca(ca_dir)
    sans = _san_entries(list(hosts))
    if not hosts:
        log.warning("no --host given: only SuperNodes on this machine (127.0.0.1/localhost) can verify the SuperLink")
    out = prepare_pki_dir(out_dir)
    same_dir = out.resolve() == Path(ca_dir).resolve()
    if same_dir:
        log.warning("server files are written next to %s; move the CA key offline before deploying",
                    Path(ca_dir) / CA_KEY)
    not_after = utc_now() + dt.timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        log.warning("capping the server certificate at the CA's expiry %s", f"{ca_cert.not_valid_after_utc:%Y-%m-%d}")
        not_after = ca_cert.not_valid_after_utc
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        certificate_builder(str(sans[0].value), ca_cert.subject, key.public_key(), ca_key.public_key(), not_after, ca=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA384() if isinstance(ca_key, ec.EllipticCurvePrivateKey) else hashes.SHA256())
    )
    paths = Paths(cert=out / SERVER_CERT, key=out / SERVER_KEY, ca_cert=out / CA_CERT)
    files = [(paths.key, pem_private_key(key), True), (paths.cert, pem_certificate(cert), False)]
    if not same_dir:
        files.append((out / CA_CERT, pem_certificate(ca_cert), False))
    write_pki_files(files, force=force)
    log.info("issued %s for %s", paths.cert, ", ".join(str(s.value) for s in sans))
    return paths


def node_key_names(name: str) -> tuple[str, str]:
    """File names of a site's SuperNode key pair (private, public)."""
    return f"supernode-{name}.key", f"supernode-{name}.pub"


def create_node_keys(out_dir: str | os.PathLike[str], *, name: str, force: bool = False) -> tuple[Path, Path]:
    """Create a hospital's SuperNode authentication key pair as Flower 1.41 expects it.

    ECDSA P-384; the private key in OpenSSH format (``--auth-supernode-private-key``, 0600), the
    public key as an OpenSSH line (``flwr supernode register <pub>``, 0644).
    """
    if not _SITE.match(name):
        raise PkiError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (max 64), e.g. hospital-a")
    out = prepare_pki_dir(out_dir)
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    priv_name, pub_name = node_key_names(name)
    priv_path, pub_path = out / priv_name, out / pub_name
    write_pki_files([(priv_path, private, True), (pub_path, public + f" cldlr-supernode-{name}\n".encode(), False)],
                 force=force)
    log.info("created SuperNode key pair %s / %s", priv_path, pub_path)
    return priv_path, pub_path


def key_type(key: object) -> str:
    """A key's algorithm as people name it (``ECDSA secp384r1``, ``RSA 2048 bit``, ``Ed25519PublicKey``)."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"RSA {key.key_size} bit"
    return type(key).__name__.lstrip("_")


def node_key_problem(key: object) -> str | None:
    """Why Flower 1.41 would refuse ``key`` as a SuperNode key (it signs with ECDSA on NIST curves only), or None."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and key.curve.name in NIST_CURVES:
        return None
    return (f"Flower 1.41 accepts only ECDSA (NIST curve) SuperNode keys, not {key_type(key)}; "
            "recreate it with `cldlr certs node OUT --name SITE`")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read the {what} {path} ({exc})") from exc


def load_node_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """Read a hospital's ``supernode-<site>.key`` and check Flower 1.41 will take it; :class:`PkiError` says why not."""
    path = Path(path)
    try:
        key = serialization.load_ssh_private_key(_read(path, "SuperNode key"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{path} is not an unencrypted OpenSSH private key ({exc}); Flower 1.41 needs the "
                       "supernode-<site>.key that `cldlr certs node` writes") from exc
    problem = node_key_problem(key)
    if problem is not None or not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: {problem}")
    return key


def load_node_public_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePublicKey:
    """Read a hospital's ``supernode-<site>.pub`` (OpenSSH line) and check Flower 1.41 will register it."""
    path = Path(path)
    try:
        key = serialization.load_ssh_public_key(_read(path, "SuperNode public key").strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{path} is not an OpenSSH public key line ({exc}); the hospital makes it with "
                       "`cldlr certs node OUT --name SITE`") from exc
    problem = node_key_problem(key)
    if problem is not None or not isinstance(key, ec.EllipticCurvePublicKey):
        raise PkiError(f"{path}: {problem}")
    return key
