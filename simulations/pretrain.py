"""``cldlr pretrain``: train the backbone on each site's images *outside* the study cohort first.

A hospital's archive holds far more breast ultrasound than its BI-RADS 4 study cohort (BUS-BRA:
1181 images of other BI-RADS categories beside the 693 of the cohort). Supervised pretraining on
their pathology labels gives the backbone ultrasound features before it ever sees a study
image; the output is a weights file that ``model.weights`` takes.

* ``federation.mode: federated`` — the real ServerApp and ClientApps over the archive sites with
  ``federation.phases=backbone``: the rounds of the main stage and nothing after them (no
  clinical statistics, no SVMs), so the archive never leaves its site either. Each site trains on
  its archive's training split, as in the main stage.
* otherwise — one data holder trains on every image of the (pooled) archive.

The archive must be patient-disjoint from the study cohort: a patient in both would let the
backbone learn a study patient's lesion before the study's test. The check compares patient ids
of every archive site with every study site and refuses an overlap, naming the first ids; its
result is written beside the weights (``<weights>.json``) with the archive's sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from cldlr.client.training import train_classifier
from cldlr.common.config import Config
from cldlr.common.data.contract import SiteData
from cldlr.common.data.roi import cache_for
from cldlr.common.data.transforms import normalization_for
from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_path, atomic_write_json
from cldlr.common.models.backbones import build_model
from cldlr.common.runs import new_run_dir
from cldlr.simulations.sites import load_sites, merge_sites

log = logging.getLogger(__name__)


def patient_overlap(archive: list[SiteData], study: list[SiteData]) -> list[str]:
    """Patient ids found in both the archive and the study cohort (sorted)."""
    study_ids = {str(p) for site in study for p in site.frame["patient_id"]}
    return sorted({str(p) for site in archive for p in site.frame["patient_id"]} & study_ids)


def _provenance(archive: list[SiteData], study: list[SiteData], config: Config, mode: str) -> dict[str, Any]:
    return {
        "mode": mode, "model": dataclasses.asdict(config.model), "train": dataclasses.asdict(config.train),
        "rounds": config.federation.rounds if mode == "federated" else None,
        "archive": [{"site": s.name, "images": len(s), "patients": int(s.frame["patient_id"].nunique()),
                     "malignant": int(s.labels.sum())} for s in archive],
        "study_patients_checked": int(sum(s.frame["patient_id"].nunique() for s in study)),
        "patient_overlap": 0,
    }


def _pooled(archive: list[SiteData], config: Config, out: Path) -> None:
    site = merge_sites(archive, name="archive")
    cache = cache_for(site, config.data, config.model.weights)
    torch.manual_seed(config.run.seed)
    model = build_model(config.model)
    train_classifier(model, cache.images, site.labels, dataclasses.replace(config.train, keep="last"),
                     normalization_for(config.data, config.model.weights), seed=config.run.seed,
                     groups=site.frame["patient_id"].to_numpy())
    with atomic_path(out) as tmp:
        torch.save(model.state_dict(), tmp)


def _federated(archive: list[SiteData], config: Config, out: Path) -> None:
    from cldlr.server.orchestrator import BACKBONE_FILE
    from cldlr.simulations.federated import run_federated_simulation

    run_dir = new_run_dir(config.replace(**{"run.name": f"{config.run.name}-pretrain"}))
    run_federated_simulation(archive, config.replace(**{"federation.phases": "backbone"}), run_dir)
    with atomic_path(out) as tmp:
        shutil.copyfile(run_dir / BACKBONE_FILE, tmp)


def pretrain(config: Config, archive_root: Path, out: Path, *, force: bool = False,
             drop_overlap: bool = False) -> Path:
    """Pretrain on ``archive_root`` (a site folder or a folder of sites); write the weights to ``out``.

    ``drop_overlap`` leaves the archive's images of study patients out (and says how many) instead of refusing.
    """
    if out.suffix not in (".pt", ".safetensors"):
        raise CldlrError(f"--out {out}: name the weights file .pt or .safetensors")
    if out.exists() and not force:
        raise CldlrError(f"--out {out} exists; choose another name or pass --force")
    mode = "federated" if config.federation.mode == "federated" else "pooled"
    if mode == "federated" and out.suffix != ".safetensors":
        raise CldlrError(f"--out {out}: a federated pretraining writes safetensors; name it .safetensors")
    study = load_sites(config)
    archive = load_sites(config.replace(**{"data.root": str(archive_root), "federation.sites": []}))
    overlap = patient_overlap(archive, study)
    dropped = 0
    if overlap and not drop_overlap:
        raise CldlrError(f"the archive {archive_root} shares {len(overlap)} patient(s) with the study cohort "
                         f"{config.data.root} (e.g. {', '.join(overlap[:5])}): remove them from the archive, or pass "
                         "--drop-overlap to leave their archive images out, since pretraining on a study patient "
                         "leaks into the study's test")
    if overlap:
        keep = [~s.frame["patient_id"].astype(str).isin(overlap).to_numpy() for s in archive]
        dropped = int(sum((~k).sum() for k in keep))
        archive = [s.subset(k) for s, k in zip(archive, keep) if k.any()]
        log.warning("left out %d archive image(s) of %d study patient(s): %s", dropped, len(overlap),
                    ", ".join(overlap[:10]))
    log.info("archive: %d sites, %d images; patient-disjoint from the study cohort (%d sites)",
             len(archive), sum(len(s) for s in archive), len(study))
    out.parent.mkdir(parents=True, exist_ok=True)
    (_federated if mode == "federated" else _pooled)(archive, config, out)
    atomic_write_json(out.with_name(out.name + ".json"),
                      {**_provenance(archive, study, config, mode), "overlap_images_dropped": dropped,
                       "overlap_patients_dropped": len(overlap)})
    log.info("pretrained weights: %s (use model.weights=%s)", out, out)
    return out
