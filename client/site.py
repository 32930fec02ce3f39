"""A hospital's side of the study, with no Flower in sight.

:class:`SiteSession` wraps one validated site: its patient-level split, its device-held ROI
cache and every computation that must happen where the data lives — fine-tuning the backbone,
embedding ROIs, the local sums of clinical statistics, of the SVM objective and of the score
histograms. The single-site study, the simulations and the Flower ClientApp all call it, so
each stage exists once.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cldlr.client.training import TrainResult, inner_validation_split, train_classifier
from cldlr.common.clinical.features import ClinicalEncoder
from cldlr.common.clinical.stats import ParameterStatistics, compute_statistics, noisy_sums_view
from cldlr.common.config import Config
from cldlr.common.data.contract import SiteData
from cldlr.common.data.roi import cache_for
from cldlr.common.data.schema import Parameter, Schema
from cldlr.common.data.splits import with_split
from cldlr.common.data.transforms import Normalization, normalization_for
from cldlr.common.models.backbones import embed, predict_proba

log = logging.getLogger(__name__)


@dataclass
class Cohort:
    """The rows of one split of a site, with their ROIs (uint8, [N,1,S,S]) and labels."""

    site: SiteData
    images: torch.Tensor
    labels: np.ndarray

    @property
    def patients(self) -> np.ndarray:
        """Patient id per image: the groups a validation split must keep together."""
        return self.site.frame["patient_id"].to_numpy()

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class SiteSession:
    """One site's data prepared once: split, ROI cache, normalization."""

    site: SiteData
    config: Config
    #: where the decoded ROIs go; a SuperNode passes its policy's cache folder, never the centre's
    #: ``data.cache_dir`` (which pooled and simulated studies, run by one researcher, keep using)
    cache_dir: Path | None = None
    train: Cohort = field(init=False)
    test: Cohort = field(init=False)
    normalization: Normalization = field(init=False)
    #: rows of ``train`` the backbone trains on, and those the SVMs are fitted on (``fusion.fit_on``):
    #: both are every row for ``train``; disjoint, patient-level halves of it for ``holdout``
    backbone_rows: np.ndarray = field(init=False)
    fusion_rows: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        data = self.config.data
        self.site = with_split(self.site, test_fraction=data.test_fraction, seed=data.split_seed,
                               use_existing=data.use_existing_split)
        local = data if self.cache_dir is None else dataclasses.replace(data, cache_dir=str(self.cache_dir))
        cache = cache_for(self.site, local, self.config.model.weights)
        split = self.site.frame["split"].to_numpy()
        labels = self.site.labels
        self.normalization = normalization_for(data, self.config.model.weights)
        self.train = self._cohort(split == "train", cache.images, labels)
        self.test = self._cohort(split == "test", cache.images, labels)
        everything = np.arange(len(self.train))
        self.backbone_rows, self.fusion_rows = everything, everything
        if self.config.fusion.fit_on == "holdout":
            self.backbone_rows, self.fusion_rows = inner_validation_split(
                self.train.labels, self.train.patients, self.config.fusion.holdout_fraction, data.split_seed)
            log.info("site %s: fusion hold-out of %d training images (%d patients) kept from the backbone",
                     self.site.name, len(self.fusion_rows), len(np.unique(self.train.patients[self.fusion_rows])))
        log.info("site %s: %d train / %d test images", self.name, len(self.train), len(self.test))

    def _cohort(self, rows: np.ndarray, images: torch.Tensor, labels: np.ndarray) -> Cohort:
        index = torch.from_numpy(np.flatnonzero(rows))
        return Cohort(self.site.subset(rows), images.index_select(0, index), labels[rows])

    @property
    def name(self) -> str:
        """The site's display name (logs, reports)."""
        return self.site.name

    def cohort(self, split: str) -> Cohort:
        """The ``train`` or ``test`` cohort; anything else is a programming error."""
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
        return self.train if split == "train" else self.test

    def fusion_view(self, split: str) -> np.ndarray:
        """Rows of ``cohort(split)`` the fusion is fitted and scored on: the hold-out for ``train``, else all."""
        return self.fusion_rows if split == "train" else np.arange(len(self.cohort(split)))

    @property
    def n_backbone(self) -> int:
        """How many images the backbone trains on (what a round's ``num-examples`` must announce)."""
        return len(self.backbone_rows)

    # -- backbone ---------------------------------------------------------------------------
    def fit_backbone(self, model: torch.nn.Module, *, epochs: int | None = None, seed: int | None = None,
                     checkpoint: Path | None = None, resume: bool = False, proximal_mu: float = 0.0,
                     global_params: dict[str, torch.Tensor] | None = None, progress: bool = True,
                     **hooks: Any) -> TrainResult:
        """Fine-tune ``model`` in place on this site's training cohort.

        ``hooks`` (``batch_sampler``, ``prepare``) come from :mod:`cldlr.client.privacy` for DP-SGD.
        """
        whole = len(self.backbone_rows) == len(self.train)  # fusion.fit_on=train: no copy of the ROI tensor
        images = self.train.images if whole else self.train.images.index_select(0, torch.from_numpy(self.backbone_rows))
        return train_classifier(
            model, images, self.train.labels[self.backbone_rows], self.config.train,
            self.normalization, seed=self.config.run.seed if seed is None else seed, epochs=epochs,
            groups=self.train.patients[self.backbone_rows],
            checkpoint=checkpoint, resume=resume, proximal_mu=proximal_mu, global_params=global_params,
            progress=progress, **hooks,
        )

    def embeddings(self, model: torch.nn.Module, split: str) -> np.ndarray:
        """Penultimate-layer features of one cohort (they never leave the site)."""
        return embed(model, self.cohort(split).images, self.normalization, batch_size=64)

    def cnn_probabilities(self, model: torch.nn.Module, split: str) -> np.ndarray:
        """The CNN's own softmax probability of malignancy (Table S2 scores the backbone alone)."""
        return predict_proba(model, self.cohort(split).images, self.normalization)

    # -- clinical ---------------------------------------------------------------------------
    def clinical_statistics(self, histogram_ranges: dict[str, tuple[float, float]] | None = None, *,
                            noisy: bool = False) -> ParameterStatistics:
        """Per-class sufficient statistics of the training cohort (the selection's input).

        ``noisy`` (whole-study DP): on the schema's public ``dp_range``s, values clipped into them.
        """
        frame, schema = self.clinical_view(noisy)
        return compute_statistics(frame, self.train.labels, schema, histogram_ranges=histogram_ranges)

    def clinical_view(self, noisy: bool) -> tuple[pd.DataFrame, Schema]:
        """The training frame and the schema its clinical sums are computed on (see :func:`noisy_sums_view`)."""
        frame = self.train.site.frame
        return noisy_sums_view(frame, self.site.schema) if noisy else (frame, self.site.schema)

    def clinical_block(self, encoder: ClinicalEncoder, split: str) -> np.ndarray:
        """The SVM's clinical columns of one cohort, encoded with the training cohort's statistics."""
        return encoder.transform(self.cohort(split).site.frame)

    def model_parameters(self, names: list[str]) -> list[Parameter]:
        """Schema entries of the selected parameters, in the selection's order."""
        return [self.site.schema.get(n) for n in names]
