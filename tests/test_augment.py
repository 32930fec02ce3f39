"""Augmentation on the device-held uint8 batch: seeded, bounded, off means off, and resumable training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cldlr.common.config import AugmentConfig, Config, TrainConfig, load_config
from cldlr.common.data.augment import augment_batch, epoch_generator
from cldlr.common.errors import ConfigError

ON = AugmentConfig(enabled=True)


@pytest.fixture
def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (6, 1, 32, 32), generator=g, dtype=torch.uint8)


def test_same_seed_and_epoch_give_the_same_batch(batch: torch.Tensor) -> None:
    a = augment_batch(batch, ON, epoch_generator(3, 1, batch.device))
    b = augment_batch(batch, ON, epoch_generator(3, 1, batch.device))
    c = augment_batch(batch, ON, epoch_generator(3, 2, batch.device))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_output_is_unit_range_float_of_the_same_shape(batch: torch.Tensor) -> None:
    out = augment_batch(batch, ON, epoch_generator(0, 1, batch.device))
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.allclose(out, batch.float() / 255)


def test_disabled_is_only_the_conversion(batch: torch.Tensor) -> None:
    out = augment_batch(batch, AugmentConfig(enabled=False), epoch_generator(0, 1, batch.device))
    assert torch.equal(out, batch.float() / 255)


def test_a_certain_flip_alone_mirrors_every_image(batch: torch.Tensor) -> None:
    only_flip = AugmentConfig(enabled=True, hflip=1.0, rotate_deg=0, scale=0, translate=0, brightness=0, contrast=0,
                              gamma=0, speckle=0)
    out = augment_batch(batch, only_flip, epoch_generator(0, 1, batch.device))
    assert torch.equal(out, batch.float().div(255).flip(-1))


@pytest.mark.parametrize("key,value", [("hflip", 1.5), ("rotate_deg", -1), ("speckle", 2.0)])
def test_out_of_range_settings_name_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"train.augment.{key}"):
        load_config(None, [f"train.augment.{key}={value}", "train.augment.enabled=true"])


def test_config_override_reaches_the_train_section() -> None:
    config = load_config(None, ["train.augment.enabled=true", "train.augment.gamma=0.3"])
    assert isinstance(config, Config) and config.train.augment == dataclasses.replace(ON, gamma=0.3)


def test_augmented_training_is_reproducible_and_resumes_exactly(tmp_path) -> None:
    from cldlr.client.training import train_classifier
    from cldlr.common.config import ModelConfig
    from cldlr.common.data.transforms import Normalization
    from cldlr.common.models.backbones import build_model

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (12, 1, 32, 32), generator=g, dtype=torch.uint8)
    labels = np.array([0, 1] * 6)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, device="cpu", augment=ON)
    norm = Normalization((0.5,) * 3, (0.25,) * 3)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(ModelConfig(backbone="tiny", weights="none"))

    whole = model()
    train_classifier(whole, images, labels, cfg, norm, seed=5, progress=False)
    plain = model()
    train_classifier(plain, images, labels, dataclasses.replace(cfg, augment=AugmentConfig()), norm, seed=5,
                     progress=False)
    first = model()
    ckpt = tmp_path / "ckpt.pt"
    train_classifier(first, images, labels, cfg, norm, seed=5, epochs=1, checkpoint=ckpt, progress=False)
    resumed = model()
    train_classifier(resumed, images, labels, cfg, norm, seed=5, checkpoint=ckpt, resume=True, progress=False)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(whole.state_dict().values(), plain.state_dict().values()))
