"""``cldlr compare-backbones``: the seed's Table S2 — every registry backbone on the same split.

Each backbone is fine-tuned with the same settings, then scored two ways on the same test
cases: its own softmax output (the CNN) and the DLR SVM on its penultimate features. Paired
DeLong tests compare each with VGG11, the paper's choice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cldlr.client.site import SiteSession
from cldlr.common.config import Config
from cldlr.common.evaluation.metrics import auc_ci, delong_test
from cldlr.common.io import atomic_write_json, atomic_write_text
from cldlr.common.models.backbones import check_backbone
from cldlr.common.runs import new_run_dir
from cldlr.common.text import markdown_text
from cldlr.simulations.sites import load_sites, merge_sites
from cldlr.simulations.study import run_study

log = logging.getLogger(__name__)

DEFAULT_BACKBONES = ("vgg11", "alexnet", "vgg19_bn", "densenet201")
REFERENCE = "vgg11"


def _row(y: np.ndarray, score: np.ndarray, reference: np.ndarray | None) -> dict[str, float]:
    auc, low, high = auc_ci(y, score)
    row = {"auc": auc, "auc_ci_low": low, "auc_ci_high": high}
    if reference is not None:
        row["z_vs_vgg11"], row["p_vs_vgg11"] = delong_test(y, score, reference)
    return row


def table_s2(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown Table S2: per backbone, CNN and DLR test AUC (95% CI) with the DeLong P against VGG11."""
    lines = ["| Backbone | CNN AUC (95% CI) | P vs VGG11 | DLR AUC (95% CI) | P vs VGG11 |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        cells = []
        for kind in ("cnn", "dlr"):
            m = r[kind]
            p = m.get("p_vs_vgg11")
            cells += [f"{m['auc']:.3f} ({m['auc_ci_low']:.3f}–{m['auc_ci_high']:.3f})", "–" if p is None else f"{p:.3f}"]
        lines.append(f"| {markdown_text(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_backbones(config: Config, backbones: list[str] | tuple[str, ...] | None = None) -> Path:
    """Train every backbone on the same patient-level split; write ``table_s2.md``/``.json``."""
    names = list(backbones or DEFAULT_BACKBONES)
    if REFERENCE in names:
        names.remove(REFERENCE)
    names.insert(0, REFERENCE)
    for name in names:  # unknown names, DP with BatchNorm: refused before the first backbone trains
        check_backbone(config.replace(**{"model.backbone": name}).model, private=config.privacy.enabled)
    site = merge_sites(load_sites(config))
    run_dir = new_run_dir(config.replace(**{"run.name": f"{config.run.name}-backbones"}))
    scores: dict[str, dict[str, np.ndarray]] = {}
    y = None
    for name in names:
        arm = config.replace(**{"model.backbone": name})
        arm_dir = run_dir / name
        arm_dir.mkdir()
        outcome, artifacts = run_study(site, arm, arm_dir, progress=False)
        session = SiteSession(site, arm)
        y = session.test.labels
        scores[name] = {"cnn": session.cnn_probabilities(artifacts.model, "test"),
                        "dlr": artifacts.probabilities["dlr"]["test"]}
        log.info("%s: DLR test AUC %.3f", name, outcome.metrics["dlr"]["test"]["auc"])
    assert y is not None
    rows = {name: {kind: _row(y, s[kind], None if name == REFERENCE else scores[REFERENCE][kind]) for kind in s}
            for name, s in scores.items()}
    atomic_write_json(run_dir / "table_s2.json", rows)
    title = "# Table S2 — backbones on the same split (test cohort)"
    atomic_write_text(run_dir / "table_s2.md", f"{title}\n\n{table_s2(rows)}\n")
    return run_dir / "table_s2.md"
