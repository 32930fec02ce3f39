"""``cldlr simulate --repeats N``: N patient-level splits, summarised; a stopped run resumes without redoing repeats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cldlr.cli import main
from cldlr.simulations.phantom import generate_phantom
from cldlr.simulations.repeats import summarise


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "data"
    generate_phantom(root, sites=1, images_per_site=40, seed=5, image_size=96)
    return root


def args(site: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"data.root={site / 'site-1'}", f"data.schema={site / 'schema.yaml'}", f"data.cache_dir={out / 'cache'}",
            f"run.output_dir={out}", "data.image_size=32", "model.backbone=tiny", "model.weights=none",
            "train.epochs=1", "train.batch_size=8", "svm.embedding_pca=4", "evaluation.min_count=1", "run.name=rep",
            *extra]
    return [x for s in sets for x in ("--set", s)]


def test_repeats_use_different_splits_and_summarise_them(site: Path, tmp_path: Path) -> None:
    assert main(["simulate", "configs/paper.yaml", *args(site, tmp_path), "--repeats", "3"]) == 0
    run = tmp_path / "rep"
    data = json.loads((run / "repeats.json").read_text())
    assert data["repeats"] == 3 and len(data["per_repeat"]) == 3
    configs = [json.loads((run / f"repeat-{r}" / "report.json").read_text())["config"] for r in (1, 2, 3)]
    assert [c["data"]["split_seed"] for c in configs] == [0, 1, 2] and [c["run"]["seed"] for c in configs] == [0, 1, 2]
    tests = [data["per_repeat"][r]["Study"]["clinical"]["test"] for r in range(3)]
    assert len(set(tests)) > 1  # different splits, different test cohorts
    diff = data["summary"]["Study"]["cldlr_minus_clinical"]
    expected = [data["per_repeat"][r]["Study"]["cldlr"]["test"] - tests[r] for r in range(3)]
    assert diff["values"] == pytest.approx(expected) and diff["mean"] == pytest.approx(sum(expected) / 3)
    assert "CLDLR − Clinical" in (run / "report.md").read_text()

    # resume: finished repeats are not run again (their reports keep their modification time)
    stamp = (run / "repeat-2" / "report.json").stat().st_mtime_ns
    (run / "repeats.json").unlink()
    assert main(["simulate", "configs/paper.yaml", *args(site, tmp_path), "--repeats", "3", "--resume", str(run)]) == 0
    assert (run / "repeat-2" / "report.json").stat().st_mtime_ns == stamp
    assert json.loads((run / "repeats.json").read_text())["summary"] == data["summary"]


def test_summary_statistics_against_a_hand_example() -> None:
    reps = [{"A": {"clinical": {"test": 0.8}, "cldlr": {"test": 0.9}, "dlr": {"test": 0.7, "train": 0.9}}},
            {"A": {"clinical": {"test": 0.8}, "cldlr": {"test": 0.7}, "dlr": {"test": 0.6, "train": 0.9}}}]
    s = summarise(reps)["A"]
    assert s["cldlr_minus_clinical"]["mean"] == pytest.approx(0.0)
    assert s["cldlr_minus_clinical"]["sd"] == pytest.approx(0.1414213, abs=1e-6)
    assert s["cldlr_minus_clinical"]["positive"] == 1
    assert s["dlr"]["train_minus_test"]["mean"] == pytest.approx(0.25)


def test_one_repeat_is_refused_with_a_reason(site: Path, tmp_path: Path, capsys) -> None:
    assert main(["simulate", "configs/paper.yaml", *args(site, tmp_path), "--repeats", "0"]) != 0
    assert "--repeats 0" in capsys.readouterr().err
