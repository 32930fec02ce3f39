"""``cldlr certs bundle-signer``: the centre's model-bundle signing key, issued by the federation CA.

A hospital trusts a model bundle because the federation CA vouches for the key that signed it
(see :mod:`cldlr.common.bundle.signing`). The signer is a leaf certificate of its own, with the
code-signing extended key usage, so the SuperLink's TLS key (issued by the same CA) cannot sign
bundles and the bundle key never has to sit on the SuperLink host.
"""

from __future__ import annotations

import datetime as dt
import logging
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from cldlr.common.deploy.pki import (
    NODE_CURVE,
    Paths,
    PkiError,
    certificate_builder,
    load_ca,
    pem_certificate,
    pem_private_key,
    prepare_pki_dir,
    utc_now,
    write_pki_files,
)

log = logging.getLogger(__name__)

SIGNER_CERT, SIGNER_KEY = "bundle-signer.pem", "bundle-signer.key"
SIGNER_CURVE = NODE_CURVE  # ECDSA P-384, signed with SHA-384


def signer_certificate(name: str, key: ec.EllipticCurvePrivateKey, *, issuer: x509.Certificate | None,
                       issuer_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None,
                       not_after: dt.datetime) -> x509.Certificate:
    """A bundle-signing leaf certificate for ``key``, issued by ``issuer`` (self-signed when it is None).

    Leaf (CA:FALSE), digitalSignature only, extended key usage codeSigning: what
    :class:`~cldlr.common.bundle.signing.TrustAnchor` demands of a CA-issued bundle signer.
    """
    signing_key = key if issuer is None or issuer_key is None else issuer_key
    builder = (certificate_builder(name, None if issuer is None else issuer.subject, key.public_key(),
                                   signing_key.public_key(), not_after, ca=False)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False))
    digest = hashes.SHA384() if isinstance(signing_key, ec.EllipticCurvePrivateKey) else hashes.SHA256()
    return builder.sign(signing_key, digest)


def create_bundle_signer(out_dir: str | os.PathLike[str], *, ca_dir: str | os.PathLike[str],
                         name: str = "cldlr bundle signer", days: int = 1095, force: bool = False) -> Paths:
    """Issue the centre's bundle-signing key (``bundle-signer.key`` 0600) and certificate (``bundle-signer.pem``).

    Signed by the CA in ``ca_dir``; validity is capped at the CA's. Hospitals then trust the CA
    certificate (``cldlr predict --trust ca.crt``) or this certificate itself.
    """
    if days < 1:
        raise PkiError(f"--days must be at least 1, got {days}")
    ca_cert, ca_key = load_ca(ca_dir)
    not_after = min(utc_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(SIGNER_CURVE)
    cert = signer_certificate(name, key, issuer=ca_cert, issuer_key=ca_key, not_after=not_after)
    out = prepare_pki_dir(out_dir)
    paths = Paths(cert=out / SIGNER_CERT, key=out / SIGNER_KEY)
    write_pki_files([(paths.key, pem_private_key(key), True), (paths.cert, pem_certificate(cert), False)], force=force)
    log.info("issued bundle signer %r: %s (key %s)", name, paths.cert, paths.key)
    return paths
