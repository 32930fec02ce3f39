"""``cldlr certs show``: who must hold which file, and what each file in a folder is.

Recognises certificates and keys by content (not by name), checks who signed what, which key
pairs with which certificate, validity and SANs, and warns about readable secrets.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from cldlr.common.deploy.pki import CA_KEY, SERVER_KEY, is_ca, key_type, node_key_problem, utc_now

_ROLES = """\
Who holds what
  centre, SuperLink host: ca.crt, server.crt, server.key (SECRET)
      flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key \\
          --enable-supernode-auth
  centre, offline: ca.key (SECRET) - only to issue/renew server.crt; keep it off the SuperLink host
  each hospital: ca.crt, its supernode-<site>.key (SECRET)
      flower-supernode --superlink HOST:PORT --root-certificates ca.crt \\
          --auth-supernode-private-key supernode-<site>.key
  registration: the hospital sends supernode-<site>.pub to the centre, which runs
      flwr supernode register supernode-<site>.pub <connection>
  model bundles: the centre signs with bundle-signer.key (SECRET; `cldlr certs bundle-signer`)
      cldlr certs sign-bundle RUN/model --signer DIR
  each hospital verifies them: cldlr predict --trust ca.crt (or bundle-signer.pem) ...
"""


@dataclass(frozen=True)
class _Found:
    """One recognised file: its kind (cert, key, ssh-private, ssh-public, unreadable) and parsed object."""

    path: Path
    kind: str
    obj: Any
    secret: bool

    @property
    def spki(self) -> bytes | None:
        """DER public key, to pair keys with certificates and .pub files."""
        if self.kind == "unreadable":
            return None
        public = self.obj.public_key() if self.kind in ("cert", "key", "ssh-private") else self.obj
        der: bytes = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return der


def _classify(path: Path) -> _Found | None:
    """Recognise a file by its content rather than its name; None if it is neither key nor certificate."""
    try:
        if path.stat().st_size > 1_000_000:
            return None
        data = path.read_bytes()
    except OSError as exc:
        return _Found(path, "unreadable", f"cannot read ({exc})", path.suffix == ".key")
    secret = b"PRIVATE KEY-----" in data
    try:
        if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
            return _Found(path, "ssh-private", serialization.load_ssh_private_key(data, password=None), True)
        if secret:
            return _Found(path, "key", serialization.load_pem_private_key(data, password=None), True)
        if b"-----BEGIN CERTIFICATE-----" in data:
            return _Found(path, "cert", x509.load_pem_x509_certificates(data)[0], False)
        if data.startswith((b"ecdsa-sha2-", b"ssh-")):
            return _Found(path, "ssh-public", serialization.load_ssh_public_key(data.strip()), False)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return _Found(path, "unreadable", f"cannot parse ({exc}); encrypted or corrupt?", secret)
    return None


def _ssh_fingerprint(public_key: Any) -> str:
    """``SHA256:...`` exactly as ``ssh-keygen -lf`` prints it, so sites can compare by phone."""
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    return "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode().rstrip("=")


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def _cert_details(cert: x509.Certificate, cas: list[_Found]) -> tuple[list[str], list[str]]:
    now, start, end = utc_now(), cert.not_valid_before_utc, cert.not_valid_after_utc
    state = "EXPIRED" if end <= now else "NOT YET VALID" if start > now else f"{(end - now).days} days left"
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = x509.ExtendedKeyUsage([])
    leaf = not is_ca(cert)
    tls = leaf and ExtendedKeyUsageOID.CODE_SIGNING not in usage  # the bundle signer speaks no TLS: no SANs
    kind = "CA" if not leaf else "leaf" if tls else "bundle-signer"
    info = [f"{kind} certificate, {key_type(cert.public_key())}",
            f"subject: {cert.subject.rfc4514_string()}", f"issuer:  {cert.issuer.rfc4514_string()}",
            f"valid: {start:%Y-%m-%d %H:%M} -> {end:%Y-%m-%d %H:%M} UTC ({state})",
            "SHA-256 fingerprint: " + cert.fingerprint(hashes.SHA256()).hex(":").upper()]
    warn = [f"certificate is {state}"] if not state.endswith("left") else []
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        info.append("SANs: " + ", ".join(str(n.value) for n in sans))
        if tls and ipaddress.ip_address("127.0.0.1") not in sans.get_values_for_type(x509.IPAddress):
            warn.append("SANs lack 127.0.0.1: the SuperLink's own SuperExec will fail TLS verification")
    except x509.ExtensionNotFound:
        if tls:
            warn.append("no subjectAltName: TLS clients will refuse this certificate")
    if leaf and cas:
        issuers = [ca.path.name for ca in cas if _issued_by(cert, ca.obj)]
        if issuers:
            info.append("signed by: " + ", ".join(issuers))
        else:
            warn.append("not signed by the CA certificate in this folder")
    return info, warn


def _file_report(item: _Found, found: list[_Found]) -> tuple[list[str], list[str]]:
    """What to print about one file: facts, then warnings."""
    pairs = ", ".join(f.path.name for f in found if f is not item and f.kind in ("cert", "ssh-public")
                      and item.kind in ("key", "ssh-private") and f.spki == item.spki)
    info: list[str] = []
    warn: list[str] = []
    if item.kind == "cert":
        info, warn = _cert_details(item.obj, [f for f in found if f.kind == "cert" and is_ca(f.obj)])
    elif item.kind == "key":
        info = [f"private key, {key_type(item.obj)}", f"pairs with: {pairs or 'no certificate here'}"]
    elif item.kind == "ssh-private":
        info = [f"SuperNode auth private key (OpenSSH), {key_type(item.obj)}",
                f"fingerprint: {_ssh_fingerprint(item.obj.public_key())}", f"pairs with: {pairs or 'no .pub here'}"]
    elif item.kind == "ssh-public":
        info = [f"SuperNode public key (register it at the centre), {key_type(item.obj)}",
                f"fingerprint: {_ssh_fingerprint(item.obj)}"]
    else:
        warn = [str(item.obj)]
    problem = node_key_problem(item.obj) if item.kind.startswith("ssh-") else None
    if problem is not None:
        warn.append(problem)
    mode = stat.S_IMODE(item.path.stat().st_mode)
    info.append(f"mode {mode:04o}" + (" (SECRET)" if item.secret else ""))
    if item.secret and mode & 0o077:
        warn.append(f"SECRET file is readable by group/others (mode {mode:04o}); run: chmod 600 {item.path}")
    if mode & 0o022:
        warn.append(f"writable by group/others (mode {mode:04o}), so it could be swapped; run: chmod go-w {item.path}")
    return info, warn


def describe(directory: str | os.PathLike[str]) -> str:
    """Explain who must hold which file, then list each certificate/key in ``directory`` with checks.

    Checks: validity, SANs (incl. 127.0.0.1), chain to a CA in the folder, key/cert pairing,
    Flower's node-key type, and permissions (secrets must be owner-only, nothing group-writable).
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give the folder that holds the certificates/keys")
    paths = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    found = [f for f in map(_classify, paths) if f is not None]
    lines, n_warn = [_ROLES, f"Files in {root}:"], 0
    for item in found:
        info, warn = _file_report(item, found)
        lines += [f"  {item.path.name}"] + [f"    {s}" for s in info] + [f"    WARNING: {s}" for s in warn]
        n_warn += len(warn)
    names = {f.path.name for f in found}
    if CA_KEY in names and SERVER_KEY in names:
        lines.append(f"  WARNING: {CA_KEY} sits next to {SERVER_KEY}; keep the CA key offline, "
                     "not on the SuperLink host")
        n_warn += 1
    if not found:
        lines.append("  (no certificates or keys found)")
    lines.append(f"{n_warn} warning(s)")
    return "\n".join(lines)
