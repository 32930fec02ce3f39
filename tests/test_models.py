"""Backbone registry, offline weight loading, embeddings and name-keyed state exchange."""

from __future__ import annotations

import logging
import os
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from torch import nn

from cldlr.common.config import ModelConfig
from cldlr.common.data.transforms import Normalization
from cldlr.common.errors import CldlrError
from cldlr.common.models.backbones import (
    BACKBONES,
    Backbone,
    build_model,
    embed,
    embedding_dim,
    head_layer,
    last_conv_layer,
    load_numpy_state,
    predict_proba,
    register_backbone,
    state_dict_to_numpy,
    tiny_cnn,
)

NORM = Normalization((0.5,) * 3, (0.25,) * 3)
TINY = "tiny_models_test"


@pytest.fixture
def tiny(monkeypatch):
    """A registered tiny backbone with a fake ImageNet URL (removed again after the test)."""
    monkeypatch.setitem(BACKBONES, TINY, Backbone(TINY, tiny_cnn, "https://example.invalid/models/tiny-0123abcd.pth"))
    return TINY


def rois(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 1, size, size), dtype=np.uint8))


@pytest.mark.parametrize(("name", "size", "dim"), [("vgg11", 32, 4096), ("alexnet", 64, 4096),
                                                   ("vgg19_bn", 32, 4096), ("densenet201", 32, 1920)])
def test_registry_backbones_have_two_outputs_and_the_paper_embedding(name, size, dim):
    model = build_model(ModelConfig(backbone=name, weights="none", num_classes=2), seed=0)
    assert head_layer(model)[1].out_features == 2
    assert embedding_dim(model) == dim
    features = embed(model, rois(2, size), NORM)
    assert features.shape == (2, dim) and features.dtype == np.float32
    layer = last_conv_layer(model)
    if name == "densenet201":
        assert layer is model.features.norm5
    else:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert isinstance(layer, nn.Conv2d) and layer is convs[-1]


def test_unknown_backbone_lists_the_registry():
    with pytest.raises(CldlrError, match="available: .*vgg11"):
        build_model(ModelConfig(backbone="resnet9000", weights="none"))


def test_register_refuses_silent_replacement(tiny):
    with pytest.raises(CldlrError, match="already registered"):
        register_backbone(Backbone(tiny, tiny_cnn))


def test_missing_imagenet_file_names_the_expected_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / os.path.basename(urlparse(tvm.VGG11_Weights.DEFAULT.url).path)
    with pytest.raises(CldlrError) as info:
        build_model(ModelConfig(backbone="vgg11", weights="imagenet"))
    assert str(expected) in str(info.value)


def test_imagenet_file_loads_and_its_1000_class_head_is_skipped(tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    source = tiny_cnn(1000)
    (tmp_path / "checkpoints").mkdir()
    torch.save(source.state_dict(), tmp_path / "checkpoints" / "tiny-0123abcd.pth")
    with caplog.at_level(logging.INFO, logger="cldlr.common.models.backbones"):
        model = build_model(ModelConfig(backbone=tiny, weights="imagenet", num_classes=2))
    assert "1000-class head" in caplog.text
    loaded, original = model.state_dict(), source.state_dict()
    head = head_layer(model)[0]
    for key, value in loaded.items():
        if key.startswith(head + "."):
            assert value.shape[0] == 2
        else:
            assert torch.equal(value, original[key]), key


def test_state_dict_path_loads_a_full_model(tiny, tmp_path):
    source = build_model(ModelConfig(backbone=tiny, weights="none"), seed=1)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = build_model(ModelConfig(backbone=tiny, weights=str(tmp_path / "w.pt")), seed=2)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_state_dict_with_another_head_size_is_loaded_without_the_head(tiny, tmp_path, caplog):
    source = build_model(ModelConfig(backbone=tiny, weights="none", num_classes=5), seed=1)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    fresh = build_model(ModelConfig(backbone=tiny, weights="none"), seed=2)
    with caplog.at_level(logging.INFO, logger="cldlr.common.models.backbones"):
        model = build_model(ModelConfig(backbone=tiny, weights=str(tmp_path / "w.pt")), seed=2)
    assert "skipping its 5-class head" in caplog.text
    head = head_layer(model)[0]
    for key, value in model.state_dict().items():
        expected = fresh.state_dict()[key] if key.startswith(head + ".") else source.state_dict()[key]
        assert torch.equal(value, expected), key


def test_state_dict_that_does_not_fit_lists_the_keys(tiny, tmp_path):
    state = tiny_cnn(2).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["0.bias"]
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CldlrError, match=r"missing keys: 0\.bias.*unexpected keys: extra\.weight"):
        build_model(ModelConfig(backbone=tiny, weights=str(tmp_path / "w.pt")))
    with pytest.raises(CldlrError, match="does not exist"):
        build_model(ModelConfig(backbone=tiny, weights=str(tmp_path / "absent.pt")))


def test_embed_is_the_head_input_in_eval_mode_and_deterministic(tiny):
    model = build_model(ModelConfig(backbone=tiny, weights="none"), seed=0).train()
    images = rois(7, 32)
    first = embed(model, images, NORM, batch_size=3)
    second = embed(model, images, NORM)
    assert model.training  # mode restored
    assert first.shape == (7, embedding_dim(model)) == (7, 12)
    np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-6)
    head = head_layer(model)[1]
    with torch.no_grad():
        logits = head(torch.from_numpy(first))
        reference = model.eval()(NORM.apply(images))
    np.testing.assert_allclose(logits.numpy(), reference.numpy(), rtol=1e-4, atol=1e-5)
    proba = predict_proba(model, images, NORM, batch_size=4)
    np.testing.assert_allclose(proba, torch.softmax(reference, 1)[:, 1].numpy(), rtol=1e-4, atol=1e-6)
    with pytest.raises(CldlrError, match="uint8"):
        embed(model, images.float(), NORM)


def test_numpy_state_round_trip_by_name(tiny):
    source = build_model(ModelConfig(backbone=tiny, weights="none"), seed=1)
    target = build_model(ModelConfig(backbone=tiny, weights="none"), seed=2)
    arrays = state_dict_to_numpy(source)
    assert set(arrays) == set(source.state_dict())
    load_numpy_state(target, {k: v.astype(np.float16) for k, v in arrays.items()})  # half-precision transfer
    for key, value in target.state_dict().items():
        assert value.dtype == torch.float32
        np.testing.assert_allclose(value.numpy(), arrays[key], atol=1e-2)
    load_numpy_state(target, arrays)
    assert all(torch.equal(target.state_dict()[k], source.state_dict()[k]) for k in arrays)

    bad = dict(arrays)
    bad["0.weight"] = np.zeros((1, 1), np.float32)
    with pytest.raises(CldlrError, match=r"shape mismatch: 0\.weight"):
        load_numpy_state(target, bad)
    del bad["0.weight"]
    with pytest.raises(CldlrError, match=r"missing: 0\.weight"):
        load_numpy_state(target, bad)


def test_wrapper_prefixes_and_legacy_densenet_names_are_understood():
    from cldlr.common.models.backbones import normalize_keys

    value = torch.zeros(1)
    renamed = normalize_keys({
        "module.features.denseblock1.denselayer1.norm.1.weight": value,
        "_module.features.denseblock1.denselayer12.conv.2.weight": value,
        "features.norm5.running_mean": value,
    })
    assert set(renamed) == {"features.denseblock1.denselayer1.norm1.weight",
                            "features.denseblock1.denselayer12.conv2.weight", "features.norm5.running_mean"}
