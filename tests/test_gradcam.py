"""Grad-CAM maps (shape, range, localisation, model left untouched) and overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cldlr.common.config import ModelConfig
from cldlr.common.data.transforms import Normalization
from cldlr.common.errors import CldlrError
from cldlr.common.models.backbones import build_model
from cldlr.common.models.gradcam import grad_cam, overlay

NORM = Normalization((0.5,) * 3, (0.25,) * 3)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 2),
    )


def brightness_model() -> nn.Module:
    """Class-1 logit = mean brightness, class-0 logit = its negative: the answer is known."""
    conv = nn.Conv2d(3, 1, 1, bias=False)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        head.bias.zero_()
    return nn.Sequential(conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def rois(n: int, size: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 1, size, size), dtype=np.uint8))


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("training", [True, False])
def test_maps_have_the_roi_shape_and_unit_range_and_leave_the_model_as_it_was(training):
    model = tiny_cnn().train(training)
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)  # a pending gradient must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maps = grad_cam(model, rois(5, 32), NORM, batch_size=2)
    assert maps.shape == (5, 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert all(m.max() == pytest.approx(1.0) or m.max() == 0.0 for m in maps)
    assert hooks_left(model) == 0
    assert model.training is training
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_map_points_at_the_evidence_for_the_target_class():
    image = np.zeros((1, 1, 32, 32), np.uint8)
    image[..., :12, :12] = 255  # bright top-left corner, dark elsewhere
    model = brightness_model()
    malignant = grad_cam(model, torch.from_numpy(image), NORM, target_class=1)[0]
    benign = grad_cam(model, torch.from_numpy(image), NORM, target_class=0)[0]
    assert malignant[:8, :8].min() > 0.9 and malignant[20:, 20:].max() < 0.1
    assert benign[20:, 20:].min() > 0.9 and benign[:8, :8].max() < 0.1
    with pytest.raises(CldlrError, match="target_class 2"):
        grad_cam(model, torch.from_numpy(image), NORM, target_class=2)
    assert hooks_left(model) == 0


def test_densenet_uses_its_full_feature_map():
    model = build_model(ModelConfig(backbone="densenet201", weights="none"), seed=0)
    maps = grad_cam(model, rois(2, 64), NORM)
    assert maps.shape == (2, 64, 64) and maps.min() >= 0.0 and maps.max() <= 1.0
    assert hooks_left(model) == 0


def test_overlay_blends_gray_with_jet():
    roi = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    heat = np.zeros((16, 16))
    heat[:, 8:] = 1.0
    gray = overlay(roi, heat, alpha=0.0)
    assert gray.shape == (16, 16, 3) and gray.dtype == np.uint8
    assert np.array_equal(gray, np.repeat(roi[..., None], 3, axis=2))
    colour = overlay(roi, heat, alpha=1.0)
    hot, cold = colour[0, 15].astype(int), colour[0, 0].astype(int)
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: 1 is red, 0 is blue
    half = overlay(roi, heat, alpha=0.4).astype(float)
    np.testing.assert_allclose(half, 0.6 * gray + 0.4 * colour, atol=1.0)
    with pytest.raises(CldlrError, match="same shape"):
        overlay(roi, heat[:8])
