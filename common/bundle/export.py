"""Writing a model bundle: safetensors + JSON (no pickle), its manifest and — given a signer — its signature.

The folder appears atomically, complete, and only if its description passes the same checks a
loader applies (:mod:`cldlr.common.bundle.checks`), so a study never leaves a bundle behind that
a site would refuse for its numbers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import numpy as st_numpy
from safetensors import torch as st_torch
from torch import nn

from cldlr.common import versions
from cldlr.common.bundle.checks import check_consistent, check_meta
from cldlr.common.bundle.format import (
    BACKBONE_FILE,
    FORMAT,
    FORMAT_VERSION,
    FUSION_FILE,
    HASHES_FILE,
    META_FILE,
    SIGNATURE_FILE,
    BundleError,
    check_files,
    manifest_of,
)
from cldlr.common.bundle.signing import BundleSigner
from cldlr.common.clinical.features import ClinicalEncoder
from cldlr.common.config import DataConfig, ModelConfig
from cldlr.common.data.schema import Schema
from cldlr.common.data.transforms import Normalization
from cldlr.common.data.units import Spacing
from cldlr.common.fusion import FusionModels
from cldlr.common.io import atomic_directory, atomic_write_text, jsonable
from cldlr.common.models.backbones import embedding_dim

log = logging.getLogger(__name__)


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared tensors keyed without DataParallel/Opacus prefixes (what safetensors stores)."""
    state = {}
    for key, tensor in model.state_dict().items():
        for prefix in ("module.", "_module."):
            key = key.removeprefix(prefix)
        state[key] = tensor.detach().cpu().clone().contiguous()
    return state


def export_bundle(out_dir: str | Path, *, model: nn.Module, model_config: ModelConfig, data_config: DataConfig,
                  normalization: Normalization, schema: Schema, selected: list[str], encoder: ClinicalEncoder,
                  fusion: FusionModels, threshold: float, model_card: dict[str, Any],
                  signer: BundleSigner | None = None, overwrite: bool = False,
                  training_spacing: list[Spacing] | None = None) -> Path:
    """Write the bundle folder atomically (nothing appears unless every file was written, hashed and signed).

    Without ``signer`` the bundle is unsigned: sites refuse it unless told ``--allow-unsigned``.
    ``training_spacing``: the pixel spacings of the training images, when every one is known
    (``None``: unknown); predict compares a new image's spacing with them for pixel-unit inputs.
    """
    check_consistent(where=Path(out_dir) / META_FILE, selected=list(selected), encoded=[p.name for p in encoder.parameters],
                     n_clinical=fusion.n_clinical, n_features=len(encoder.feature_names), n_deep=fusion.n_deep,
                     embedding=embedding_dim(model))
    arrays, fusion_meta = fusion.to_arrays()
    meta = jsonable({
        "format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions.runtime_versions(),
        "model": {"backbone": model_config.backbone, "num_classes": model_config.num_classes},
        "roi": {"image_size": data_config.image_size, "margin": data_config.margin},
        "normalization": {"mean": list(normalization.mean), "std": list(normalization.std)},
        "schema": schema.to_dict(), "selected": list(selected), "encoder": encoder.to_dict(),
        "fusion": fusion_meta, "threshold": float(threshold), "model_card": jsonable(model_card, finite=True),
        "units": {"training_spacing_mm": None if training_spacing is None else [list(s) for s in training_spacing]},
    })
    check_meta(meta, Path(out_dir) / META_FILE)
    if not all(np.isfinite(np.asarray(v)).all() for v in arrays.values() if np.asarray(v).dtype.kind == "f"):
        raise BundleError(f"{Path(out_dir) / FUSION_FILE}: the fitted SVMs hold NaN or infinite values; not exported")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        st_torch.save_file(plain_state(model), str(tmp / BACKBONE_FILE), metadata={"format": FORMAT})
        st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / FUSION_FILE),
                           metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        manifest = manifest_of(tmp)
        (tmp / HASHES_FILE).write_text(manifest, encoding="utf-8")
        if signer is not None:
            (tmp / SIGNATURE_FILE).write_text(signer.sign(manifest.encode("utf-8")), encoding="utf-8")
    log.info("model bundle written: %s (%s, %d clinical parameter(s), %s)", out_dir, model_config.backbone,
             len(selected), signer.describe() if signer else "UNSIGNED")
    return out_dir


def sign_bundle(path: str | Path, signer: BundleSigner) -> Path:
    """(Re-)sign an exported bundle, e.g. replace a study-local signature with the centre's offline key.

    The bundle is checked first (every file, size and sha256); only its ``signature.json`` changes.
    """
    manifest = check_files(path)
    atomic_write_text(Path(path) / SIGNATURE_FILE, signer.sign(manifest.text))
    log.info("%s: %s", path, signer.describe())
    return Path(path)


__all__ = ["export_bundle", "plain_state", "sign_bundle"]
