"""Leave-one-site-out arms of ``simulate --compare`` (``federation.compare_loso``) on three phantom sites."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cldlr.cli import main
from cldlr.common.config import load_config
from cldlr.simulations.federated import simulation_policy
from cldlr.simulations.loso import loso_markdown, run_loso
from cldlr.simulations.phantom import generate_phantom

TINY = ("model.backbone=tiny", "model.weights=none", "data.image_size=32", "train.batch_size=8", "svm.embedding_pca=4",
        "svm.rff_features=32", "evaluation.min_count=1", "evaluation.gradcam_examples=2", "federation.rounds=1",
        "federation.local_epochs=1", "federation.min_sites=2")


def cell(auc: float) -> dict:
    metrics = {"auc": auc, "auc_ci_low": auc - 0.1, "auc_ci_high": auc + 0.05, "n": 12, "n_malignant": 5}
    return {"metrics": {"cldlr": metrics, "dlr": metrics}, "calibration": {"cldlr": {"slope": 0.9, "brier": 0.2}}}


def test_loso_table_shows_the_held_out_column_and_only_shared_cells() -> None:
    sites = ["a", "b"]
    kept = {"tested_on": "test", "shared": False, "sites": sites,
            "matrix": {"a": {"a": {**cell(0.7), "held_out": True}}, "b": {"b": {**cell(0.6), "held_out": True}}}}
    text = loso_markdown(kept)
    assert "| a | – | 0.700 (0.600–0.750) | 0.700 (0.600–0.750) | 0.900 | 0.200 | 12 (5) |" in text
    assert "| a | **0.700 (0.600–0.750)** | not shared |" in text and "| b | not shared | **0.600 (0.500–0.650)** |" in text
    assert "none does here" in text
    nan_slope = {**kept, "matrix": {**kept["matrix"], "b": {"b": {**cell(0.6), "held_out": True,
                                                                   "calibration": {"cldlr": {"slope": math.nan, "brier": 0.1}}}}}}
    assert "| b | – | 0.600 (0.500–0.650) | 0.600 (0.500–0.650) | – | 0.100 | 12 (5) |" in loso_markdown(nan_slope)
    shared = {**kept, "shared": True, "matrix": {"a": {"a": {**cell(0.7), "held_out": True}, "b": cell(0.8)},
                                                  "b": {"a": cell(0.75), "b": {**cell(0.6), "held_out": True}}}}
    assert "| a | **0.700 (0.600–0.750)** | 0.800 (0.700–0.850) |" in loso_markdown(shared)


def test_simulated_sites_opt_in_to_the_matrix_only_for_loso() -> None:
    assert simulation_policy(load_config(None, []))["share_local_metrics"] is False
    assert simulation_policy(load_config(None, ["federation.compare_loso=true"]))["share_local_metrics"] is True


def test_loso_needs_two_sites(tmp_path: Path) -> None:
    from cldlr.common.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 2 sites"):
        run_loso([], load_config(None, []), tmp_path)


@pytest.mark.slow
def test_compare_with_loso_arms_on_three_phantom_sites(tmp_path: Path) -> None:
    generate_phantom(tmp_path / "phantom", sites=3, images_per_site=36, seed=2, image_size=64)
    sets = [f"data.root={tmp_path / 'phantom'}", f"data.schema={tmp_path / 'phantom' / 'schema.yaml'}",
            f"data.cache_dir={tmp_path / 'cache'}", f"run.output_dir={tmp_path / 'runs'}", "run.name=loso",
            "federation.compare_loso=true", "federation.compare_strategies=[fedavg]", *TINY]
    assert main(["simulate", "configs/federated.yaml", "--compare", *[x for s in sets for x in ("--set", s)]]) == 0
    run = tmp_path / "runs" / "loso"
    loso = json.loads((run / "loso.json").read_text())
    names = ["site-1", "site-2", "site-3"]
    assert loso["sites"] == names and loso["shared"] is True
    for held in names:
        trained = json.loads((run / f"loso-without-{held}" / "report.json").read_text())
        assert sorted(s["name"] for s in trained["sites"]) == sorted(set(names) - {held})  # never saw the held-out site
        row = loso["matrix"][held]
        assert set(row) == set(names) and row[held]["held_out"] and not any(row[t]["held_out"] for t in row if t != held)
        for target, entry in row.items():
            m = entry["metrics"]["cldlr"]
            assert 0 <= m["auc"] <= 1 and m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"], (held, target)
            assert not math.isnan(entry["calibration"]["cldlr"]["brier"])
    for target in names:  # every cell is the site's test split, the one its local arm was tested on
        (local,) = json.loads((run / f"local-{target}" / "report.json").read_text())["sites"]
        assert all(loso["matrix"][h][target]["metrics"]["cldlr"]["n"] == local["n_test"] for h in names), target
    text = (run / "report.md").read_text()
    assert "Leave-one-site-out" in text and "**" in text and "Trained without ↓ / tested on →" in text
