"""Patient-level splits and patient-disjoint partitions: leakage, stratification, determinism, safe writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_site

from cldlr.common.data import splits as splits_mod
from cldlr.common.data.contract import read_clinical_csv
from cldlr.common.data.schema import Schema
from cldlr.common.data.site import read_site
from cldlr.common.data.splits import partition, partition_site, patient_split, site_table, split_site, with_split
from cldlr.common.errors import CldlrError


def synthetic_frame(n_patients: int = 60, malignant_share: float = 0.4, seed: int = 0) -> pd.DataFrame:
    """Patients with 1–4 images each; every image carries its patient's label."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.random() < malignant_share)
        for k in range(int(rng.integers(1, 5))):
            rows.append({"image_id": f"p{p}_{k}", "patient_id": f"P{p}", "label": label, "device": f"dev{p % 3}"})
    return pd.DataFrame(rows)


def sides_per_patient(frame: pd.DataFrame, groups: pd.Series) -> int:
    return int(groups.groupby(frame["patient_id"]).nunique().max())


def test_patient_split_is_patient_level_stratified_and_seeded() -> None:
    frame = synthetic_frame()
    split = patient_split(frame, test_fraction=0.3, seed=3)
    assert split.index.equals(frame.index) and set(split) == {"train", "test"}
    assert sides_per_patient(frame, split) == 1
    patients = frame.groupby("patient_id")["label"].first()
    test_patients = patients[frame.groupby("patient_id").apply(lambda g: split[g.index].iat[0]) == "test"]
    assert abs(len(test_patients) / len(patients) - 0.3) < 0.05
    assert abs(test_patients.mean() - patients.mean()) < 0.06  # malignant share kept in test
    assert patient_split(frame, test_fraction=0.3, seed=3).equals(split)
    assert not patient_split(frame, test_fraction=0.3, seed=4).equals(split)


def test_patient_split_rejects_tiny_class() -> None:
    frame = pd.DataFrame({"image_id": list("abcd"), "patient_id": ["A", "B", "C", "D"], "label": [0, 0, 0, 1]})
    with pytest.raises(CldlrError, match="malignant"):
        patient_split(frame)
    with pytest.raises(ValueError, match="test_fraction"):
        patient_split(synthetic_frame(), test_fraction=1.0)


def test_with_split_keeps_existing_or_draws(tmp_path: Path, tiny_schema: Schema) -> None:
    site = read_site(write_site(tmp_path / "s", with_split=True), tiny_schema)
    kept = with_split(site, test_fraction=0.5, seed=1)
    assert kept.frame["split"].tolist() == site.frame["split"].tolist()
    drawn = with_split(site, test_fraction=0.5, seed=1, use_existing=False)
    assert drawn.frame["split"].tolist() == patient_split(site.frame, test_fraction=0.5, seed=1).tolist()
    bare = read_site(write_site(tmp_path / "b"), tiny_schema)
    assert set(with_split(bare, test_fraction=0.3, seed=0).frame["split"]) == {"train", "test"}


def test_split_site_copies_and_never_touches_source(tiny_site: Path, tiny_schema: Schema, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in tiny_site.rglob("*") if p.is_file()}
    out = tmp_path / "split"
    table = split_site(tiny_site, out, tiny_schema, test_fraction=0.3, seed=0)
    assert {p: p.read_bytes() for p in tiny_site.rglob("*") if p.is_file()} == before
    written = read_site(out, tiny_schema)
    assert set(written.frame["split"]) == {"train", "test"}
    assert written.frame["image_id"].tolist() == read_site(tiny_site, tiny_schema).frame["image_id"].tolist()
    assert "test" in table and "malignant patients" in table
    for bad in (tiny_site, tiny_site / "inner", tmp_path):
        with pytest.raises(CldlrError):
            split_site(tiny_site, bad, tiny_schema, force=True)
    with pytest.raises(FileExistsError):
        split_site(tiny_site, out, tiny_schema)


def test_split_site_leaves_nothing_on_failure(tiny_site: Path, tiny_schema: Schema, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_copy(src: object, dst: object) -> None:
        calls.append(src)
        if len(calls) == 5:
            raise OSError("disk full")
        __import__("shutil").copyfile(src, dst)

    monkeypatch.setattr(splits_mod.shutil, "copy2", failing_copy)
    with pytest.raises(OSError):
        split_site(tiny_site, tmp_path / "out", tiny_schema)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["site", "schema.yaml"])


@pytest.mark.parametrize("by", ["column", "iid", "dirichlet"])
def test_partitions_are_patient_disjoint_and_seeded(by: str) -> None:
    frame = synthetic_frame(n_patients=45)
    sites = partition(frame, by=by, column="device", num_sites=3, alpha=0.5, seed=7)
    assert sites.index.equals(frame.index) and sites.nunique() == 3
    assert sides_per_patient(frame, sites) == 1
    assert partition(frame, by=by, column="device", num_sites=3, alpha=0.5, seed=7).equals(sites)


def test_iid_is_balanced_and_column_maps_values() -> None:
    frame = synthetic_frame(n_patients=61)
    sites = partition(frame, by="iid", num_sites=4, seed=0)
    per_site = frame.assign(site=sites).groupby("site")["patient_id"].nunique()
    assert per_site.max() - per_site.min() <= 1
    by_dev = partition(frame, by="column", column="device")
    assert (by_dev == frame["device"]).all()


def test_column_partition_rejects_patient_on_two_values() -> None:
    frame = synthetic_frame(n_patients=6)
    rows = frame.index[frame["patient_id"] == frame["patient_id"].value_counts().index[0]]
    assert len(rows) >= 2
    frame.loc[rows[-1], "device"] = "other"
    with pytest.raises(CldlrError, match="several device values"):
        partition(frame, by="column", column="device")
    with pytest.raises(CldlrError, match="missing"):
        partition(frame, by="column", column="scanner")


def test_small_alpha_skews_label_mix() -> None:
    frame = synthetic_frame(n_patients=200, malignant_share=0.5, seed=1)
    patients = frame.groupby("patient_id")["label"].first()

    def mean_skew(alpha: float) -> float:
        skews = []
        for seed in range(5):
            sites = partition(frame, by="dirichlet", num_sites=4, alpha=alpha, seed=seed)
            site_of = sites.groupby(frame["patient_id"]).first()
            share = patients.groupby(site_of).mean()
            skews.append(float(np.abs(share - patients.mean()).mean()))
        return float(np.mean(skews))

    assert mean_skew(0.1) > 0.25 > mean_skew(1000.0)


def test_dirichlet_fills_every_site_even_when_draws_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(splits_mod, "_MAX_DRAWS", 1)
    frame = synthetic_frame(n_patients=20)
    sites = partition(frame, by="dirichlet", num_sites=6, alpha=0.01, seed=0)
    assert sites.nunique() == 6 and sides_per_patient(frame, sites) == 1


def test_site_table_counts() -> None:
    frame = synthetic_frame(n_patients=30)
    sites = partition(frame, by="iid", num_sites=2, seed=0)
    table = site_table(frame.assign(site=sites), "site")
    lines = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in table.splitlines()[2:]}
    for name in ("site1", "site2"):
        group = frame[sites == name]
        patients = group.groupby("patient_id")["label"].first()
        expected = [(patients == 0).sum(), (patients == 1).sum(), (group["label"] == 0).sum(), (group["label"] == 1).sum()]
        assert lines[name] == expected
    assert lines["total"][2] + lines["total"][3] == len(frame)


def test_partition_site_writes_valid_disjoint_sites(tmp_path: Path, tiny_schema: Schema) -> None:
    root = write_site(tmp_path / "src", n_patients=12, images_per_patient=2)
    raw = read_clinical_csv(root)
    raw["device"] = ["A" if int(p[1:]) < 6 else "B C" for p in raw["patient_id"]]
    raw.to_csv(root / "clinical.csv", index=False)
    out = tmp_path / "sites"
    table = partition_site(root, out, tiny_schema, by="column", column="device", num_sites=3, alpha=0.5, seed=0)
    assert sorted(p.name for p in out.iterdir()) == ["A", "B_C"]
    seen: set[str] = set()
    for folder in out.iterdir():
        site = read_site(folder, tiny_schema)
        assert not seen & set(site.frame["patient_id"])
        seen |= set(site.frame["patient_id"])
        assert len(list((folder / "images").iterdir())) == len(site)
    assert len(seen) == 12 and "B_C" in table
    with pytest.raises(CldlrError):
        partition_site(root, root / "parts", tiny_schema, by="iid", column="", num_sites=2, alpha=1.0, seed=0)
