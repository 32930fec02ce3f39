"""Grad-CAM heatmaps of the fine-tuned backbone, and colour overlays for the report.

The activation of the target layer is captured with a forward hook and its gradient taken with
``torch.autograd.grad``, so no parameter ``.grad`` is touched and the model is left exactly as it
was (hooks removed, train/eval mode restored).
"""

from __future__ import annotations

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cldlr.common.data.transforms import Normalization
from cldlr.common.errors import CldlrError
from cldlr.common.models.backbones import last_conv_layer, model_device


def grad_cam(model: nn.Module, images_uint8: torch.Tensor, normalization: Normalization, *,
             target_class: int = 1, layer: nn.Module | None = None, batch_size: int = 16) -> np.ndarray:
    """Grad-CAM maps ``[N, S, S]`` in [0, 1] for ``target_class`` (1 = malignant), one per ROI.

    ``layer`` defaults to :func:`~cldlr.common.models.backbones.last_conv_layer`. Each map is the ReLU of the
    gradient-weighted channel sum, upsampled bilinearly to the ROI size and min-max scaled per
    image (a flat map becomes all zeros).
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 1:
        raise CldlrError(f"Grad-CAM expects uint8 ROIs shaped [N,1,S,S], got {images_uint8.dtype} "
                         f"{tuple(images_uint8.shape)}")
    layer = layer if layer is not None else last_conv_layer(model)
    device = model_device(model)
    size = images_uint8.shape[-2:]
    captured: list[torch.Tensor] = []

    def keep_output(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        # Return a copy so a following in-place ReLU cannot overwrite the captured activation.
        captured.append(output)
        return output.clone()

    hook = layer.register_forward_hook(keep_output)
    was_training = model.training
    model.eval()
    maps = []
    try:
        for start in range(0, len(images_uint8), batch_size):
            captured.clear()
            x = normalization.apply(images_uint8[start:start + batch_size].to(device)).requires_grad_(True)
            with torch.enable_grad():
                logits = model(x)
                if not 0 <= target_class < logits.shape[1]:
                    raise CldlrError(f"target_class {target_class} is not one of the model's {logits.shape[1]} outputs")
                if not captured:
                    raise CldlrError(f"Grad-CAM layer {type(layer).__name__} was not used by the forward pass")
                activation = captured[-1]
                (grad,) = torch.autograd.grad(logits[:, target_class].sum(), activation)
            weights = grad.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * activation.detach()).sum(dim=1, keepdim=True)).float()
            cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
            low = cam.amin(dim=(1, 2), keepdim=True)
            span = cam.amax(dim=(1, 2), keepdim=True) - low
            cam = torch.where(span > 0, (cam - low) / span.clamp_min(1e-12), torch.zeros_like(cam))
            maps.append(cam.clamp_(0.0, 1.0).cpu())
    finally:
        hook.remove()
        model.train(was_training)
    if not maps:
        return np.zeros((0, *size), np.float32)
    return torch.cat(maps).numpy()


def overlay(roi_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a gray ROI ``[S,S]`` with a 'jet'-coloured heatmap ``[S,S]`` into uint8 RGB ``[S,S,3]``."""
    roi = np.asarray(roi_uint8)
    heat = np.asarray(heatmap, dtype=np.float64)
    if roi.ndim != 2 or heat.shape != roi.shape:
        raise CldlrError(f"overlay needs a 2-D ROI and a heatmap of the same shape, got {roi.shape} and {heat.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise CldlrError(f"overlay alpha must be in [0, 1], got {alpha}")
    colour = matplotlib.colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    gray = np.repeat(roi.astype(np.float64)[..., None], 3, axis=2)
    return np.clip((1.0 - alpha) * gray + alpha * colour, 0, 255).round().astype(np.uint8)
