"""Signed bundles: the centre signs a bundle's manifest with ECDSA; a site verifies it against a key it trusts.

``signature.json`` holds a signed statement — the sha256 of ``hashes.json`` (which lists every
file's sha256 and size and the format version), the signing time and the signer's certificate —
and the ECDSA signature over its canonical JSON. Editing any file and recomputing the manifest
changes that sha256, so only a holder of a trusted key can produce a bundle a site accepts.

A site names what it trusts once (:class:`TrustAnchor`: ``--trust`` PEM files or its policy's
``trusted_bundle_signers``): a CA certificate (the federation CA; the signer must then be a leaf it
issued with the code-signing key usage, valid when it signed) or a signer's certificate or public
key (pinned). :class:`BundleSigner` is the signing side (``cldlr certs bundle-signer`` files, or a
throwaway study-local key for simulations).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from cldlr.common.bundle.format import HASHES_FILE, SIGNATURE_FILE, BundleError
from cldlr.common.deploy.pki import NIST_CURVES, is_ca, utc_now
from cldlr.common.deploy.signer import SIGNER_CERT, SIGNER_CURVE, SIGNER_KEY, signer_certificate

SIGNATURE_FORMAT = "cldlr-bundle-signature"
SIGNATURE_VERSION = 1
STUDY_LOCAL_NAME = "cldlr study-local bundle signer"
_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384,
                                                   "secp521r1": hashes.SHA512}
_STATEMENT = ("algorithm", "certificate", "format", "manifest", "manifest_sha256", "signed_at", "version")
_SKEW = dt.timedelta(minutes=5)


class SignatureError(BundleError):
    """A bundle is unsigned, its signature does not verify, or its signer is not trusted."""


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of a certificate, as ``openssl x509 -fingerprint -sha256`` prints it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _digest(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    if curve.name not in _DIGESTS:
        raise SignatureError(f"ECDSA curve {curve.name} is not supported for bundle signing; use one of {NIST_CURVES}")
    return _DIGESTS[curve.name]()


def _statement(fields: dict[str, Any]) -> bytes:
    return json.dumps({k: fields[k] for k in _STATEMENT}, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class BundleSigner:
    """A key that signs bundles and the certificate that names it (``study_local``: a throwaway simulation key)."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    study_local: bool = False

    @classmethod
    def load(cls, folder: str | Path) -> BundleSigner:
        """The centre's signer from ``bundle-signer.key``/``.pem`` (``cldlr certs bundle-signer``), checked."""
        key_path, cert_path = Path(folder) / SIGNER_KEY, Path(folder) / SIGNER_CERT
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise SignatureError(f"{folder}: cannot read the bundle signer {SIGNER_KEY}/{SIGNER_CERT} ({exc}); "
                                 "issue one with `cldlr certs bundle-signer OUT --ca-dir CA_DIR`") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in NIST_CURVES:
            raise SignatureError(f"{key_path}: bundles are signed with ECDSA on a NIST curve, not {type(key).__name__}")
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise SignatureError(f"{key_path} does not belong to {cert_path}; use the pair `cldlr certs bundle-signer` wrote")
        if is_ca(cert):
            raise SignatureError(f"{cert_path} is a CA certificate; sign bundles with a bundle-signer leaf it issues")
        if not cert.not_valid_before_utc <= utc_now() <= cert.not_valid_after_utc:
            raise SignatureError(f"{cert_path} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                                 f"{cert.not_valid_after_utc:%Y-%m-%d}); issue a new bundle signer")
        return cls(key, cert)

    @classmethod
    def throwaway(cls, name: str = STUDY_LOCAL_NAME) -> BundleSigner:
        """A fresh self-signed signer held in memory only: a simulation's study-local key."""
        key = ec.generate_private_key(SIGNER_CURVE)
        cert = signer_certificate(name, key, issuer=None, issuer_key=None, not_after=utc_now() + dt.timedelta(days=3650))
        return cls(key, cert, study_local=True)

    @property
    def certificate_pem(self) -> bytes:
        """The signer's certificate (what a site trusts to verify a study-local key's bundles)."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def describe(self) -> str:
        """Who signs, for reports: subject and fingerprint, and whether the key is study-local."""
        kind = "a study-local key" if self.study_local else "the centre's key"
        return f"signed by {kind}: {self.certificate.subject.rfc4514_string()} (SHA-256 {fingerprint(self.certificate)})"

    def sign(self, manifest: bytes, *, signed_at: dt.datetime | None = None) -> str:
        """``signature.json`` text for a bundle whose ``hashes.json`` has exactly the bytes ``manifest``."""
        fields: dict[str, Any] = {
            "algorithm": f"ecdsa-{_digest(self.key.curve).name}", "certificate": self.certificate_pem.decode("ascii"),
            "format": SIGNATURE_FORMAT, "manifest": HASHES_FILE, "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "signed_at": (signed_at or utc_now()).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "version": SIGNATURE_VERSION}
        signature = self.key.sign(_statement(fields), ec.ECDSA(_digest(self.key.curve)))
        return json.dumps({**fields, "signature": base64.b64encode(signature).decode("ascii")}, indent=2,
                          sort_keys=True) + "\n"


@dataclass(frozen=True)
class SignerInfo:
    """Who signed a loaded bundle, or why its signature was not verified (``verified`` False: ``--allow-unsigned``)."""

    verified: bool
    subject: str | None = None
    fingerprint: str | None = None
    issuer: str | None = None
    signed_at: str | None = None
    note: str = ""

    @property
    def text(self) -> str:
        """One line for outputs: ``signed by <subject> (SHA-256 <fp>)…`` or ``unverified (--allow-unsigned)…``."""
        if self.verified:
            return f"signed by {self.subject} (SHA-256 {self.fingerprint}), issued by {self.issuer}, at {self.signed_at}"
        return "unverified (--allow-unsigned)" + (f": {self.note}" if self.note else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON form for predictions and summaries."""
        return {"verified": self.verified, "subject": self.subject, "fingerprint": self.fingerprint,
                "issuer": self.issuer, "signed_at": self.signed_at, "note": self.note or None}


@dataclass(frozen=True)
class TrustAnchor:
    """What a site trusts to sign bundles: CA certificates (issuers of signers) and pinned signer keys."""

    authorities: tuple[x509.Certificate, ...]
    pinned: tuple[bytes, ...]
    sources: tuple[str, ...]

    @classmethod
    def from_files(cls, paths: Iterable[str | Path]) -> TrustAnchor:
        """Read PEM files: CA certificates become authorities; other certificates and public keys are pinned."""
        authorities: list[x509.Certificate] = []
        pinned: list[bytes] = []
        sources = []
        for path in (Path(p).expanduser() for p in paths):
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise SignatureError(f"--trust {path}: cannot read it ({exc})") from exc
            try:
                certs = x509.load_pem_x509_certificates(data) if b"-----BEGIN CERTIFICATE-----" in data else []
                keys = [serialization.load_pem_public_key(data)] if b"-----BEGIN PUBLIC KEY-----" in data else []
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                raise SignatureError(f"--trust {path}: not a PEM certificate or public key ({exc})") from exc
            if not certs and not keys:
                raise SignatureError(f"--trust {path}: no PEM certificate or public key in it; give the federation "
                                     "CA (ca.crt), the signer's certificate (bundle-signer.pem) or its public key")
            authorities += [c for c in certs if is_ca(c)]
            pinned += [_spki(c.public_key()) for c in certs if not is_ca(c)] + [_spki(k) for k in keys]
            sources.append(str(path))
        if not sources:
            raise SignatureError("no trusted bundle signer given (--trust PEM or the policy's trusted_bundle_signers)")
        return cls(tuple(authorities), tuple(pinned), tuple(sources))

    def problem(self, cert: x509.Certificate, when: dt.datetime) -> str | None:
        """Why ``cert`` may not sign bundles for this site at ``when``, or None when it may."""
        if _spki(cert.public_key()) in self.pinned:
            return None
        for ca in self.authorities:
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            if is_ca(cert):
                return "its certificate is a CA certificate; bundles are signed by a bundle-signer leaf"
            for c, what in ((ca, "the CA"), (cert, "the signer's certificate")):
                if not c.not_valid_before_utc - _SKEW <= when <= c.not_valid_after_utc:
                    return f"{what} was not valid when the bundle was signed ({when:%Y-%m-%d %H:%M} UTC)"
            try:
                usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound:
                usage = x509.ExtendedKeyUsage([])
            if ExtendedKeyUsageOID.CODE_SIGNING not in usage:
                return "its certificate lacks the code-signing key usage (a TLS certificate, not a bundle signer)"
            return None
        return f"it is neither issued by nor pinned in {', '.join(self.sources)}"


def _field(doc: dict[str, Any], name: str, where: Path) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise SignatureError(f"{where}: field {name!r} is missing or not text; the signature file is damaged")
    return value


def verify_signature(folder: str | Path, manifest: bytes, trust: TrustAnchor) -> SignerInfo:
    """Check ``signature.json`` against the manifest's exact bytes and ``trust``; :class:`SignatureError` says why not."""
    where = Path(folder) / SIGNATURE_FILE
    if not where.is_file():
        raise SignatureError(f"{where}: missing — the bundle is unsigned")
    try:
        doc = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SignatureError(f"{where}: not readable JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT or doc.get("version") != SIGNATURE_VERSION:
        raise SignatureError(f"{where}: not a {SIGNATURE_FORMAT} v{SIGNATURE_VERSION} file")
    fields = {k: doc["version"] if k == "version" else _field(doc, k, where) for k in _STATEMENT}
    if fields["manifest"] != HASHES_FILE or fields["manifest_sha256"] != hashlib.sha256(manifest).hexdigest():
        raise SignatureError(f"{where}: signs a different {HASHES_FILE}; the bundle was changed after it was signed — "
                             "do not use it")
    try:
        cert = x509.load_pem_x509_certificate(fields["certificate"].encode("ascii"))
        signature = base64.b64decode(_field(doc, "signature", where), validate=True)
        when = dt.datetime.fromisoformat(fields["signed_at"])
    except (ValueError, UnicodeEncodeError) as exc:
        raise SignatureError(f"{where}: certificate, signature or signed_at unreadable ({exc})") from exc
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or fields["algorithm"] != f"ecdsa-{_digest(public.curve).name}":
        raise SignatureError(f"{where}: algorithm {fields['algorithm']!r} does not match the signer's key")
    try:
        public.verify(signature, _statement(fields), ec.ECDSA(_digest(public.curve)))
    except InvalidSignature:
        raise SignatureError(f"{where}: the signature does not verify; the bundle or its signature was changed — "
                             "do not use it") from None
    if when.tzinfo is None or when > utc_now() + _SKEW:
        raise SignatureError(f"{where}: signed_at {fields['signed_at']!r} is not a past UTC time")
    subject, fp = cert.subject.rfc4514_string(), fingerprint(cert)
    problem = trust.problem(cert, when)
    if problem is not None:
        raise SignatureError(f"{where}: signed by {subject} (SHA-256 {fp}), which this site does not trust: {problem}. "
                             "Use a bundle signed by the centre, or trust its signer with --trust")
    return SignerInfo(True, subject, fp, cert.issuer.rfc4514_string(), fields["signed_at"])


def signature_status(folder: str | Path, manifest: bytes, trust: TrustAnchor | None, *,
                     allow_unsigned: bool = False) -> SignerInfo:
    """The verified signer, or — only with ``allow_unsigned`` — an unverified status saying why; else an error."""
    if trust is None:
        problem = (f"no trusted bundle signer given to check {Path(folder) / SIGNATURE_FILE} against: pass "
                   "--trust PEM (the federation CA or the centre's bundle-signer.pem) or the site's --policy")
        if not allow_unsigned:
            raise SignatureError(problem + "; or, knowing nobody vouches for the model, --allow-unsigned")
        signed = (Path(folder) / SIGNATURE_FILE).is_file()
        return SignerInfo(False, note="signature not checked (no --trust)" if signed else "the bundle is unsigned")
    try:
        return verify_signature(folder, manifest, trust)
    except SignatureError as exc:
        if not allow_unsigned:
            raise SignatureError(f"{exc}; or, knowing nobody vouches for the model, --allow-unsigned") from None
        return SignerInfo(False, note=str(exc))


__all__ = ["BundleSigner", "SIGNATURE_FORMAT", "STUDY_LOCAL_NAME", "SignatureError", "SignerInfo", "TrustAnchor",
           "fingerprint", "signature_status", "verify_signature"]
