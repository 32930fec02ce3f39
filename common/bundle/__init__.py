"""Model bundle: one folder (safetensors + JSON, no pickle), signed by the centre, that holds everything ``cldlr predict`` needs.

Layout: ``backbone.safetensors`` (state dict), ``fusion.safetensors`` (SVM arrays), ``bundle.json``
(versions, ROI settings, normalization, schema, encoder, fusion metadata, threshold, model card),
``hashes.json`` (the manifest: format version, sha256 and size of those three files, and their
digest, which is the bundle id) and ``signature.json`` (the centre's ECDSA signature over the
manifest, with its certificate). Loading checks, in this order, the file set and every hash, the
signature against what the site trusts, the versions and every number, before anything is built;
a damaged, edited, extra, unsigned or foreign bundle is named and refused instead of silently
changing a clinical score.

The modules: :mod:`.format` (layout, manifest), :mod:`.signing` (signer, trust anchor,
verification), :mod:`.checks` (range checks), :mod:`.model` (:class:`Bundle`, :class:`Prediction`),
:mod:`.export`, :mod:`.load`, :mod:`.study` (a run's bundle and its signer). Import from here.

Typical use at a site::

    trust = TrustAnchor.from_files(["ca.crt"])
    bundle = load_bundle("run/model", trust=trust)   # bundle.signer.text: who signed it
"""

from __future__ import annotations

from cldlr.common.bundle.checks import check_meta
from cldlr.common.bundle.export import export_bundle, sign_bundle
from cldlr.common.bundle.format import (
    BACKBONE_FILE,
    BUNDLE_FILES,
    FORMAT,
    FORMAT_VERSION,
    FUSION_FILE,
    HASHED_FILES,
    HASHES_FILE,
    META_FILE,
    SIGNATURE_FILE,
    BundleError,
    manifest_of,
    manifest_text,
    sha256_file,
)
from cldlr.common.bundle.load import Verification, load_bundle, verify_bundle
from cldlr.common.bundle.model import Bundle, ClinicalInputError, Prediction, expected_values
from cldlr.common.bundle.signing import BundleSigner, SignatureError, SignerInfo, TrustAnchor, fingerprint
from cldlr.common.bundle.study import (
    DP_COVERS,
    LOCAL_SIGNER_CERT,
    export_federated_bundle,
    export_study_bundle,
    signature_section,
    study_signer,
)

__all__ = ["BACKBONE_FILE", "BUNDLE_FILES", "Bundle", "BundleError", "BundleSigner", "ClinicalInputError", "DP_COVERS",
           "FORMAT", "FORMAT_VERSION", "FUSION_FILE", "HASHED_FILES", "HASHES_FILE", "LOCAL_SIGNER_CERT", "META_FILE",
           "Prediction", "SIGNATURE_FILE", "SignatureError", "SignerInfo", "TrustAnchor", "Verification",
           "check_meta", "expected_values", "export_bundle", "export_federated_bundle", "export_study_bundle",
           "fingerprint", "load_bundle", "manifest_of", "manifest_text", "sha256_file", "sign_bundle",
           "signature_section", "study_signer", "verify_bundle"]
