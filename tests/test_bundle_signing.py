"""Signed model bundles: the centre's key (issued by the federation CA) signs, sites verify, edits and strangers are refused.

The attack this guards against: raise a bundle's threshold (0.4 → 0.99) and recompute its hashes,
and an unkeyed manifest would let predict call a malignant-looking score "benign".
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_bundle import CENTRE, export_tiny, make_tiny_study, trust_pem

from cldlr.cli import main
from cldlr.common.bundle import (
    HASHES_FILE,
    META_FILE,
    SIGNATURE_FILE,
    BundleError,
    BundleSigner,
    SignatureError,
    TrustAnchor,
    export_bundle,
    load_bundle,
    manifest_of,
    signature_section,
    study_signer,
)
from cldlr.common.config import Config
from cldlr.common.deploy.pki import load_ca
from cldlr.common.text import markdown_text


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> dict[str, Path]:
    """The federation's CA and the centre's bundle signer, made with `cldlr certs`; plus a stranger's CA and signer."""
    root = tmp_path_factory.mktemp("pki")
    for who in ("federation", "stranger"):
        assert main(["certs", "ca", str(root / who / "ca")]) == 0
        assert main(["certs", "bundle-signer", str(root / who / "signer"), "--ca-dir", str(root / who / "ca")]) == 0
    assert main(["certs", "server", str(root / "server"), "--ca-dir", str(root / "federation" / "ca")]) == 0
    return {"ca": root / "federation" / "ca" / "ca.crt", "signer": root / "federation" / "signer",
            "stranger": root / "stranger" / "signer", "stranger_ca": root / "stranger" / "ca" / "ca.crt",
            "server": root / "server"}


def export_bundle_spaced(study, out: Path, spacing) -> Path:
    """The tiny bundle, signed by the test centre, recording ``spacing`` as its training images' pixel spacing."""
    return export_bundle(out, model=study.model, model_config=study.model_cfg, data_config=study.data_cfg,
                         normalization=study.normalization, schema=study.schema, selected=study.selected,
                         encoder=study.encoder, fusion=study.fusion, threshold=0.4, signer=CENTRE,
                         model_card={"sites": ["site"]}, training_spacing=spacing)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_tiny_study(tmp_path_factory.mktemp("study"))


def predict_site(bundle: Path, study, out: Path, *extra: str) -> int:
    return main(["predict", "--model", str(bundle), "--site", str(study.site.root), "--out", str(out), *extra])


def reseal(path: Path, edit, signer: BundleSigner | None = None) -> None:
    """Edit bundle.json and recompute the manifest, as an attacker can; re-sign only if given a key."""
    meta = json.loads((path / META_FILE).read_text())
    edit(meta)
    (path / META_FILE).write_text(json.dumps(meta))
    (path / HASHES_FILE).write_text(manifest_of(path))
    if signer is not None:
        (path / SIGNATURE_FILE).write_text(signer.sign((path / HASHES_FILE).read_bytes()))


def test_cldlr_certs_issues_a_code_signing_leaf_of_the_federation_ca(federation):
    signer = BundleSigner.load(federation["signer"])
    ca, _ = load_ca(federation["ca"].parent)
    signer.certificate.verify_directly_issued_by(ca)
    assert (federation["signer"] / "bundle-signer.key").stat().st_mode & 0o077 == 0
    assert "centre's key" in signer.describe() and not signer.study_local


def test_a_bundle_signed_by_the_centre_predicts_and_says_who_signed(federation, study, tmp_path, capsys):
    bundle = export_tiny(study, tmp_path / "bundle", signer=BundleSigner.load(federation["signer"]))
    assert predict_site(bundle, study, tmp_path / "pred", "--trust", str(federation["ca"])) == 0
    assert "signature:   signed by CN=cldlr bundle signer" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    fingerprint = BundleSigner.load(federation["signer"]).certificate.fingerprint
    assert table["signature"].str.startswith("signed by CN=cldlr bundle signer (SHA-256 ").all()
    signer = json.loads((tmp_path / "pred" / "summary.json").read_text())["model"]["signer"]
    assert signer["verified"] is True and signer["issuer"] == "CN=cldlr federation CA"
    from cryptography.hazmat.primitives import hashes

    assert signer["fingerprint"] == fingerprint(hashes.SHA256()).hex(":").upper()
    # the signer's own certificate, pinned, is trusted as well as the CA
    assert predict_site(bundle, study, tmp_path / "pred2", "--trust", str(federation["signer"] / "bundle-signer.pem")) == 0


def test_the_site_policy_names_the_trusted_signers_once(federation, study, tmp_path):
    bundle = export_tiny(study, tmp_path / "bundle", signer=BundleSigner.load(federation["signer"]))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "federation-ca.crt").write_bytes(federation["ca"].read_bytes())
    policy = tmp_path / "site" / "policy.yaml"
    policy.write_text(yaml.safe_dump({"schema": "schema.yaml", "folders": {"state": str(tmp_path / "state")},
                                      "trusted_bundle_signers": ["federation-ca.crt"]}))  # relative to the policy
    assert predict_site(bundle, study, tmp_path / "pred", "--policy", str(policy)) == 0
    stranger = export_tiny(study, tmp_path / "stranger", signer=BundleSigner.load(federation["stranger"]))
    assert predict_site(stranger, study, tmp_path / "pred2", "--policy", str(policy)) == 2


def test_a_raised_threshold_with_recomputed_hashes_is_refused(federation, study, tmp_path, capsys):
    bundle = export_tiny(study, tmp_path / "bundle", signer=BundleSigner.load(federation["signer"]))
    trust = TrustAnchor.from_files([federation["ca"]])
    assert load_bundle(bundle, trust=trust).threshold == 0.4
    reseal(bundle, lambda m: m.update(threshold=0.99))
    with pytest.raises(SignatureError, match="changed after it was signed"):
        load_bundle(bundle, trust=trust)
    assert predict_site(bundle, study, tmp_path / "pred", "--trust", str(federation["ca"])) == 2
    assert "changed after it was signed" in capsys.readouterr().err
    assert not (tmp_path / "pred").exists()
    # re-signing it with a key of the attacker's own does not help either
    (bundle / SIGNATURE_FILE).write_text(BundleSigner.throwaway("cldlr bundle signer").sign((bundle / HASHES_FILE).read_bytes()))
    with pytest.raises(SignatureError, match="does not trust"):
        load_bundle(bundle, trust=trust)


def test_a_bundle_signed_by_another_cas_key_is_refused(federation, study, tmp_path, capsys):
    bundle = export_tiny(study, tmp_path / "bundle", signer=BundleSigner.load(federation["stranger"]))
    assert predict_site(bundle, study, tmp_path / "pred", "--trust", str(federation["ca"])) == 2
    err = capsys.readouterr().err
    assert "which this site does not trust" in err and "neither issued by nor pinned" in err
    assert load_bundle(bundle, trust=TrustAnchor.from_files([federation["stranger_ca"]])).signer.verified


def test_the_superlink_tls_key_cannot_sign_bundles(federation, study, tmp_path):
    """Same CA, but a TLS server certificate: without the code-signing usage it is no bundle signer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((federation["server"] / "server.key").read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate((federation["server"] / "server.crt").read_bytes())
    bundle = export_tiny(study, tmp_path / "bundle", signer=BundleSigner(key, cert))  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match="lacks the code-signing key usage"):
        load_bundle(bundle, trust=TrustAnchor.from_files([federation["ca"]]))


def test_an_unsigned_bundle_is_refused_unless_allow_unsigned_and_the_output_says_so(federation, study, tmp_path, capsys):
    bundle = export_tiny(study, tmp_path / "bundle", signer=None)
    assert predict_site(bundle, study, tmp_path / "pred", "--trust", str(federation["ca"])) == 2
    err = capsys.readouterr().err
    assert "the bundle is unsigned" in err and "--allow-unsigned" in err
    assert predict_site(bundle, study, tmp_path / "pred") == 2  # no trust at all: refused too
    assert "no trusted bundle signer given" in capsys.readouterr().err
    assert not (tmp_path / "pred").exists()
    assert predict_site(bundle, study, tmp_path / "pred", "--allow-unsigned") == 0
    captured = capsys.readouterr()
    assert "WARNING: model bundle" in captured.err and "signature unverified (--allow-unsigned)" in captured.err
    table = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert (table["signature"] == "unverified (--allow-unsigned): the bundle is unsigned").all()
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["model"]["signature"].startswith("unverified (--allow-unsigned)")
    assert summary["model"]["signer"]["verified"] is False
    r = study.site.frame.iloc[0]
    out = tmp_path / "lesion.json"
    assert main(["predict", "--model", str(bundle), "--image", r["image_path"], "--mask", r["mask_path"],
                 "--clinical", f"age={r['age']:g}", "--clinical", f"palpable={int(r['palpable'])}",
                 "--clinical", f"side={r['side']}", "--out", str(out), "--allow-unsigned"]) == 0
    assert json.loads(out.read_text())["signature"] == "unverified (--allow-unsigned): the bundle is unsigned"


def test_the_reader_packet_verifies_the_bundle_too(federation, study, tmp_path):
    bundle = export_tiny(study, tmp_path / "bundle", signer=BundleSigner.load(federation["stranger"]))
    args = ["reader-study", "packet", "--model", str(bundle), "--site", str(study.site.root)]
    assert main([*args, "--out", str(tmp_path / "p1"), "--trust", str(federation["ca"])]) == 2
    assert not (tmp_path / "p1").exists()
    assert main([*args, "--out", str(tmp_path / "p2"), "--trust", str(federation["ca"]), "--allow-unsigned"]) == 0
    readme = (tmp_path / "p2" / "README.md").read_text()
    assert "signature: " + markdown_text("unverified (--allow-unsigned)") in readme


@pytest.mark.parametrize("extra", ["notes.txt", ".hidden", "subfolder"])
def test_an_extra_file_is_an_error_even_when_unsigned_is_allowed(study, tmp_path, extra):
    bundle = export_tiny(study, tmp_path / "bundle")
    (bundle / extra).mkdir() if extra == "subfolder" else (bundle / extra).write_text("x")
    with pytest.raises(BundleError, match=f"{bundle / extra}: not part of the bundle"):
        load_bundle(bundle, allow_unsigned=True)


def test_a_missing_file_is_an_error_even_when_unsigned_is_allowed(study, tmp_path):
    bundle = export_tiny(study, tmp_path / "bundle")
    (bundle / META_FILE).unlink()
    with pytest.raises(BundleError, match=f"{bundle / META_FILE}: missing"):
        load_bundle(bundle, allow_unsigned=True)


def test_a_tampered_signature_file_is_refused(study, tmp_path):
    bundle = export_tiny(study, tmp_path / "bundle")
    trust = TrustAnchor.from_files([trust_pem(tmp_path)])
    doc = json.loads((bundle / SIGNATURE_FILE).read_text())
    other = json.loads(BundleSigner.throwaway().sign((bundle / HASHES_FILE).read_bytes()))
    for edit, message in [({"signature": other["signature"]}, "does not verify"),
                          ({"certificate": other["certificate"]}, "does not verify"),
                          ({"signed_at": "2999-01-01T00:00:00Z"}, "does not verify"),
                          ({"manifest_sha256": "0" * 64}, "signs a different")]:
        (bundle / SIGNATURE_FILE).write_text(json.dumps({**doc, **edit}))
        with pytest.raises(SignatureError, match=message):
            load_bundle(bundle, trust=trust)


def test_a_signature_outside_the_certificates_validity_is_refused(federation, study, tmp_path):
    import datetime as dt

    bundle = export_tiny(study, tmp_path / "bundle")
    signer, trust = BundleSigner.load(federation["signer"]), TrustAnchor.from_files([federation["ca"]])
    manifest = (bundle / HASHES_FILE).read_bytes()
    (bundle / SIGNATURE_FILE).write_text(signer.sign(manifest, signed_at=dt.datetime(2001, 1, 1, tzinfo=dt.UTC)))
    with pytest.raises(SignatureError, match="was not valid when the bundle was signed"):
        load_bundle(bundle, trust=trust)
    (bundle / SIGNATURE_FILE).write_text(signer.sign(manifest, signed_at=dt.datetime(2999, 1, 1, tzinfo=dt.UTC)))
    with pytest.raises(SignatureError, match="not a past UTC time"):
        load_bundle(bundle, trust=trust)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda m: m.update(threshold=1.5), "threshold"),
    (lambda m: m.update(threshold=0), "threshold"),
    (lambda m: m.update(threshold="0.4"), "threshold"),
    (lambda m: m.update(threshold=math.nan), "threshold"),
    (lambda m: m["roi"].update(image_size=0), "roi.image_size"),
    (lambda m: m["roi"].update(image_size=100_000), "roi.image_size"),
    (lambda m: m["roi"].update(margin=-1), "roi.margin"),
    (lambda m: m["normalization"].update(std=[0.25, 0.0, 0.25]), "normalization.std"),
    (lambda m: m["model"].update(num_classes=True), "model.num_classes"),
    (lambda m: m["encoder"]["mean"].__setitem__(0, math.inf), "encoder.mean[0]"),
    (lambda m: m["fusion"].update(n_deep=-3), "fusion.n_deep"),
    (lambda m: m["fusion"].update(n_clinical=99), "fusion.n_clinical"),
    (lambda m: m.update(units={"training_spacing_mm": [[0.1, 0.0]]}), "units.training_spacing_mm"),
    (lambda m: m.update(units={"training_spacing_mm": [[0.1, 50.0]]}), "units.training_spacing_mm"),
    (lambda m: m.update(units={"training_spacing_mm": [[0.1]]}), "units.training_spacing_mm"),
    (lambda m: m.update(units={"training_spacing_mm": "0.1"}), "units.training_spacing_mm"),
    (lambda m: m.update(units=[0.1]), "units"),
])
def test_a_signed_bundle_with_bad_numbers_is_refused_naming_the_field(study, tmp_path, edit, field):
    bundle = export_tiny(study, tmp_path / "bundle")
    reseal(bundle, edit, signer=CENTRE)  # signed by the trusted centre: the signature alone would pass
    with pytest.raises(BundleError, match=rf"{META_FILE}: field(s)? {re.escape(field)}"):
        load_bundle(bundle, trust=TrustAnchor.from_files([trust_pem(tmp_path)]))


def test_training_spacing_round_trips_and_an_unrecorded_one_loads(study, tmp_path):
    trust = TrustAnchor.from_files([trust_pem(tmp_path)])
    spaced = export_bundle_spaced(study, tmp_path / "spaced", [(0.1, 0.12)])
    assert load_bundle(spaced, trust=trust).meta["units"] == {"training_spacing_mm": [[0.1, 0.12]]}
    unknown = export_tiny(study, tmp_path / "unknown")
    assert load_bundle(unknown, trust=trust).meta["units"] == {"training_spacing_mm": None}
    with pytest.raises(BundleError, match="field units.training_spacing_mm"):
        export_bundle_spaced(study, tmp_path / "bad", [(0.1, -1.0)])
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.5, math.nan])
def test_export_refuses_an_out_of_range_threshold(study, tmp_path, threshold):
    with pytest.raises(BundleError, match="field threshold"):
        export_tiny(study, tmp_path / "bundle", threshold=threshold)
    assert not (tmp_path / "bundle").exists()


def test_a_simulation_signs_with_a_study_local_key_and_the_centre_re_signs(federation, study, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    signer = study_signer(Config(), run)
    assert signer.study_local and (run / "model-signer.pem").is_file()
    (section,) = signature_section(signer, run).values()
    assert "signed by a study-local key" in section and "model-signer.pem" in section
    bundle = export_tiny(study, run / "model", signer=signer)
    local = TrustAnchor.from_files([run / "model-signer.pem"])
    assert load_bundle(bundle, trust=local).signer.verified
    with pytest.raises(SignatureError):
        load_bundle(bundle, trust=TrustAnchor.from_files([federation["ca"]]))
    assert main(["certs", "sign-bundle", str(bundle), "--signer", str(federation["signer"])]) == 0
    assert "signed by the centre's key" in capsys.readouterr().out
    assert load_bundle(bundle, trust=TrustAnchor.from_files([federation["ca"]])).signer.verified
    centre = study_signer(Config().replace(**{"run.bundle_signer": str(federation["signer"])}), run)
    assert not centre.study_local and "signed by the centre's key" in next(iter(signature_section(centre, run).values()))


def test_trust_files_that_hold_no_key_are_errors_naming_the_file(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(SignatureError, match=f"--trust {junk}: no PEM certificate or public key"):
        TrustAnchor.from_files([junk])
    with pytest.raises(SignatureError, match="cannot read"):
        TrustAnchor.from_files([tmp_path / "absent.pem"])


def test_certs_show_names_the_bundle_signer_without_tls_warnings(federation, tmp_path, capsys):
    folder = tmp_path / "pki"
    folder.mkdir()
    for src in (federation["ca"], federation["signer"] / "bundle-signer.pem"):
        (folder / src.name).write_bytes(src.read_bytes())
    assert main(["certs", "show", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "bundle-signer certificate" in out and "signed by: ca.crt" in out
    assert "subjectAltName" not in out and "sign-bundle" in out


def test_a_recalibrated_bundle_is_signed_by_its_own_key_and_keeps_the_training_spacing(study, tmp_path):
    from cldlr.common.recalibrate import RECALIBRATION_LOCAL_NAME, recalibration_signer, write_recalibrated_bundle

    trust = TrustAnchor.from_files([trust_pem(tmp_path)])
    bundle = load_bundle(export_bundle_spaced(study, tmp_path / "spaced", [(0.1, 0.12)]), trust=trust)
    signer = recalibration_signer(None)
    new = write_recalibrated_bundle(bundle, {"cldlr": (0.2, 0.9)}, {"site": "local"}, tmp_path / "new", signer=signer)
    with pytest.raises(SignatureError, match="does not trust"):  # the centre never signed the recalibrated model
        load_bundle(new, trust=trust)
    (tmp_path / "local.pem").write_bytes(signer.certificate_pem)
    loaded = load_bundle(new, trust=TrustAnchor.from_files([tmp_path / "local.pem"]))
    assert loaded.meta["units"] == {"training_spacing_mm": [[0.1, 0.12]]}
    signed_by = loaded.meta["model_card"]["recalibration"]["signed_by"]
    assert RECALIBRATION_LOCAL_NAME in signed_by["subject"] and signed_by["key"].startswith("recalibration-local")
