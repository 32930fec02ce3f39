"""The phantom generator: deterministic, contract-valid, non-IID across sites and learnable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cldlr.cli import main
from cldlr.common.data.imaging import read_image, read_mask
from cldlr.common.data.lesion import lesion_descriptors
from cldlr.common.data.schema import load_schema
from cldlr.common.data.site import read_site
from cldlr.common.data.validation import validate_site
from cldlr.common.errors import CldlrError
from cldlr.simulations.phantom import generate_phantom, phantom_schema_yaml

REPO = Path(__file__).resolve().parents[1]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default phantom (3 sites × 40 images at 160 px), generated once for the module."""
    out = tmp_path_factory.mktemp("phantom") / "data"
    generate_phantom(out, seed=0)
    return out


def load_all(root: Path) -> pd.DataFrame:
    schema = load_schema(root / "schema.yaml")
    frames = []
    for site in sorted(root.glob("site-*")):
        frame = read_site(site, schema).frame
        frame["site"] = site.name
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path: Path) -> None:
    kwargs = {"sites": 2, "images_per_site": 8, "image_size": 64}
    generate_phantom(tmp_path / "a", seed=3, **kwargs)
    generate_phantom(tmp_path / "b", seed=3, **kwargs)
    generate_phantom(tmp_path / "c", seed=4, **kwargs)
    a, b, c = (tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    images = [k for k in a if k.startswith("site-1/images/")]
    assert images and any(a[k] != c.get(k) for k in images)
    assert a["site-1/clinical.csv"] != c["site-1/clinical.csv"]


def test_every_site_follows_the_contract(phantom: Path) -> None:
    assert (phantom / "schema.yaml").read_text() == (REPO / "configs/schema/phantom.yaml").read_text()
    assert (phantom / "schema.yaml").read_text() == phantom_schema_yaml()
    schema = load_schema(phantom / "schema.yaml")
    sites = sorted(p.name for p in phantom.iterdir() if p.is_dir())
    assert sites == ["site-1", "site-2", "site-3"]
    for site in sites:
        report = validate_site(phantom / site, schema)
        assert report.ok, report.format_text()
        assert not report.warnings, report.format_text()
    frame = load_all(phantom)
    assert frame.groupby("site").size().tolist() == [40, 40, 40]
    per_patient = frame.groupby("patient_id")
    assert per_patient["site"].nunique().max() == 1  # sites are patient-disjoint
    assert per_patient["label"].nunique().max() == 1
    assert (per_patient.size() == 2).sum() >= 10  # several patients with two views
    assert frame["family_history"].isna().sum() < len(frame) * 0.15


def test_sites_are_non_iid(phantom: Path) -> None:
    frame = load_all(phantom)
    malignant = frame.drop_duplicates("patient_id").groupby("site")["label"].mean()
    assert malignant.max() - malignant.min() > 0.2
    brightness = [np.mean([read_image(p).mean() for p in g["image_path"]]) for _, g in frame.groupby("site")]
    assert np.ptp(brightness) > 3  # each device has its own look


def test_learnable_from_shape_and_clinical_columns(phantom: Path) -> None:
    """Logistic regression on mask shape + clinical columns, evaluated on held-out patients."""
    frame = load_all(phantom)
    shape = pd.DataFrame([lesion_descriptors(read_mask(p)) for p in frame["mask_path"]])
    columns = ["ttw_ratio", "circularity", "solidity", "convexity"]
    x = np.column_stack([shape[columns], frame[["age", "lesion_size_mm", "palpable"]],
                         frame["family_history"].fillna(frame["family_history"].mean())])
    y = frame["label"].to_numpy()
    train, test = next(GroupShuffleSplit(n_splits=1, test_size=0.35, random_state=0).split(x, y, frame["patient_id"]))
    assert set(frame["patient_id"].iloc[train]).isdisjoint(frame["patient_id"].iloc[test])
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(x[train], y[train])
    auc = roc_auc_score(y[test], model.predict_proba(x[test])[:, 1])
    assert auc > 0.8
    assert frame.loc[frame.label == 1, "age"].mean() > frame.loc[frame.label == 0, "age"].mean()


def test_images_carry_posterior_shadowing(phantom: Path) -> None:
    """Behind a malignant lesion the image is darker than beside it, relative to benign ones."""
    frame = load_all(phantom)
    ratios = []
    for image_path, mask_path in zip(frame["image_path"], frame["mask_path"]):
        image, mask = read_image(image_path).astype(float), read_mask(mask_path)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        band = image[rows[-1] + 2 : rows[-1] + 2 + image.shape[0] // 6]
        inside = np.zeros(image.shape[1], bool)
        inside[cols[0] : cols[-1] + 1] = True
        ratios.append(band[:, inside].mean() / band[:, ~inside].mean())
    ratios = np.array(ratios)
    labels = frame["label"].to_numpy()
    assert np.median(ratios[labels == 0]) - np.median(ratios[labels == 1]) > 0.1


def test_refuses_to_overwrite_and_checks_arguments(tmp_path: Path) -> None:
    out = tmp_path / "p"
    summary = generate_phantom(out, sites=2, images_per_site=4, image_size=48)
    assert "site-1" in summary and "site-2" in summary and "malig" in summary
    before = tree_bytes(out)
    with pytest.raises(CldlrError, match="already exists"):
        generate_phantom(out, sites=2, images_per_site=4, image_size=48, seed=1)
    assert tree_bytes(out) == before
    generate_phantom(out, sites=1, images_per_site=4, image_size=48, seed=1, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["schema.yaml", "site-1"]
    for bad in ({"sites": 0}, {"images_per_site": 1}, {"image_size": 8}):
        with pytest.raises(CldlrError):
            generate_phantom(tmp_path / "bad", **bad)
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["phantom", str(tmp_path / "cli"), "--sites", "2", "--images-per-site", "6", "--image-size", "48"]
    assert main(args) == 0
    assert "site-2" in capsys.readouterr().out
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
