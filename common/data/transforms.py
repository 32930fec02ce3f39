"""From cached uint8 ROIs to model input: scale, replicate gray to 3 channels, normalize.

This runs on the device, per batch, on slices of the device-held ROI cache, so no image is
decoded or copied from the host during training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cldlr.common.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and standard deviation applied to [0, 1] intensities."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def apply(self, batch_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[N,1,S,S]`` uint8 → ``[N,3,S,S]`` normalized float on the same device."""
        return self.apply_unit(batch_uint8.to(dtype).div_(255.0))

    def apply_unit(self, batch: torch.Tensor) -> torch.Tensor:
        """``[N,1,S,S]`` float intensities in [0, 1] (e.g. an augmented batch) → ``[N,3,S,S]`` normalized."""
        dtype = batch.dtype
        x = batch.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def normalization_for(data: DataConfig, weights: str) -> Normalization:
    """ImageNet statistics when ImageNet weights are used (or asked for), else the configured ones."""
    if data.normalize == "imagenet" or (data.normalize == "auto" and weights == "imagenet"):
        return Normalization(IMAGENET_MEAN, IMAGENET_STD)
    return Normalization((data.mean,) * 3, (data.std,) * 3)
