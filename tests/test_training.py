"""The site-side trainer: learning, reproducibility, resume, FedProx and best-val keeping (CPU, tiny CNN)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from cldlr.client import training
from cldlr.client.training import inner_validation_split, train_classifier
from cldlr.common.config import ModelConfig, TrainConfig
from cldlr.common.data.transforms import Normalization
from cldlr.common.errors import CldlrError
from cldlr.common.models.backbones import BACKBONES, Backbone, build_model, predict_proba, tiny_cnn

NORM = Normalization((0.5,) * 3, (0.25,) * 3)
CFG = TrainConfig(epochs=2, batch_size=4, lr=0.01, device="cpu", checkpoint_every=1)
TINY = "tiny_training_test"


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    monkeypatch.setitem(BACKBONES, TINY, Backbone(TINY, tiny_cnn))


def model(seed: int = 0) -> nn.Module:
    return build_model(ModelConfig(backbone=TINY, weights="none"), seed=seed)


def bright_dark(n: int = 16, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Bright ROIs are malignant (1), dark ones benign (0); two images per patient."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) // 2 % 2
    images = np.where(labels[:, None, None, None] == 1,
                      rng.integers(150, 256, (n, 1, size, size)), rng.integers(0, 100, (n, 1, size, size)))
    return torch.from_numpy(images.astype(np.uint8)), labels, np.array([f"P{i // 2}" for i in range(n)])


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_training_learns_a_separable_task():
    images, labels, _ = bright_dark()
    net = model()
    result = train_classifier(net, images, labels, dataclasses.replace(CFG, epochs=5), NORM, progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.steps == 5 * 4 and result.best_epoch == 5
    proba = predict_proba(net, images, NORM)
    assert proba[labels == 1].min() > proba[labels == 0].max()


def test_same_seed_same_weights_and_caller_rng_untouched():
    images, labels, _ = bright_dark()
    before = torch.get_rng_state()
    a, b, c = model(), model(), model()
    train_classifier(a, images, labels, CFG, NORM, seed=3, progress=False)
    train_classifier(b, images, labels, CFG, NORM, seed=3, progress=False)
    train_classifier(c, images, labels, CFG, NORM, seed=4, progress=False)
    assert same_weights(a, b)
    assert not same_weights(a, c)
    assert torch.equal(before, torch.get_rng_state())


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    images, labels, _ = bright_dark()
    ckpt = tmp_path / "ckpt" / "train.pt"
    straight = model()
    full = train_classifier(straight, images, labels, CFG, NORM, seed=1, progress=False)
    train_classifier(model(), images, labels, CFG, NORM, seed=1, epochs=1, checkpoint=ckpt, progress=False)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    resumed = model()
    rest = train_classifier(resumed, images, labels, CFG, NORM, seed=1, checkpoint=ckpt, resume=True, progress=False)
    assert same_weights(straight, resumed)
    assert rest.history == full.history and rest.steps == full.steps
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["train.pt"]  # no temporary files left
    with pytest.raises(CldlrError, match="another run"):
        train_classifier(model(), images, labels, CFG, NORM, seed=2, checkpoint=ckpt, resume=True, progress=False)


def test_a_checkpoint_cut_short_is_refused_naming_the_file(tmp_path):
    """A copy cut by a full disk: a clear error naming the file and what to do, not a zip-reader traceback."""
    images, labels, _ = bright_dark()
    ckpt = tmp_path / "ckpt.pt"
    train_classifier(model(), images, labels, CFG, NORM, seed=1, epochs=1, checkpoint=ckpt, progress=False)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CldlrError, match=rf"checkpoint {ckpt} cannot be read .*remove it to train this run from epoch 1"):
        train_classifier(model(), images, labels, CFG, NORM, seed=1, checkpoint=ckpt, resume=True, progress=False)


def test_fedprox_with_a_huge_mu_stays_near_the_global_model():
    images, labels, _ = bright_dark()
    cfg = dataclasses.replace(CFG, epochs=3)
    start = model()
    global_params = {k: v.detach().clone() for k, v in start.named_parameters()}

    def drift(mu: float) -> float:
        net = model()
        train_classifier(net, images, labels, cfg, NORM, proximal_mu=mu, global_params=global_params, progress=False)
        return float(sum(((p.detach() - global_params[k]) ** 2).sum() for k, p in net.named_parameters()).sqrt())

    assert drift(1e5) < 0.3 * drift(0.0)
    with pytest.raises(CldlrError, match="global_params"):
        train_classifier(model(), images, labels, cfg, NORM, proximal_mu=1.0, progress=False)


def test_best_val_restores_the_best_epoch(monkeypatch):
    images, labels, groups = bright_dark(20)
    cfg = dataclasses.replace(CFG, keep="best_val", val_fraction=0.25)
    real = training._evaluate

    def scripted(aucs):
        calls = iter(aucs)

        def evaluate(*args, **kwargs):
            return {**real(*args, **kwargs), "val_auc": next(calls)}
        return evaluate

    monkeypatch.setattr(training, "_evaluate", scripted([0.5, 0.9]))
    two = model()
    result_two = train_classifier(two, images, labels, cfg, NORM, epochs=2, groups=groups, progress=False)
    monkeypatch.setattr(training, "_evaluate", scripted([0.5, 0.9, 0.6]))
    three = model()
    result = train_classifier(three, images, labels, cfg, NORM, epochs=3, groups=groups, progress=False)

    assert result.best_epoch == 2 and result_two.best_epoch == 2
    assert same_weights(two, three)  # epoch 3 was trained, then the epoch-2 weights came back
    assert {"val_loss", "val_accuracy", "val_auc"} <= set(result.history[0])
    val = result.val_indices
    assert val is not None and set(groups[val]).isdisjoint(np.delete(groups, val))
    assert set(labels[val]) == {0, 1}


def test_inner_validation_split_is_patient_level_and_stratified():
    labels = np.array([0, 0, 1, 1] * 10)
    groups = np.repeat(np.arange(20), 2)
    train_idx, val_idx = inner_validation_split(labels, groups, 0.2, seed=0)
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(40))
    assert set(groups[train_idx]).isdisjoint(groups[val_idx])
    assert 0.1 <= len(val_idx) / 40 <= 0.3 and set(labels[val_idx]) == {0, 1}
    with pytest.raises(CldlrError, match="at least 5 patients"):
        inner_validation_split(labels[:6], groups[:6], 0.2, seed=0)


def test_optimizer_state_can_be_carried_across_calls():
    images, labels, _ = bright_dark()
    net = model()
    first = train_classifier(net, images, labels, CFG, NORM, epochs=1, progress=True)  # tqdm path too
    assert float(first.optimizer_state["state"][0]["step"]) == first.steps == 4
    second = train_classifier(net, images, labels, CFG, NORM, epochs=1, optimizer_state=first.optimizer_state,
                              progress=False)
    assert float(second.optimizer_state["state"][0]["step"]) == 8


def test_bad_inputs_are_refused_clearly():
    images, labels, _ = bright_dark()
    with pytest.raises(CldlrError, match="uint8"):
        train_classifier(model(), images.float(), labels, CFG, NORM, progress=False)
    with pytest.raises(CldlrError, match="labels have shape"):
        train_classifier(model(), images, labels[:-1], CFG, NORM, progress=False)
    with pytest.raises(CldlrError, match=r"integers in \[0, 1\]"):
        train_classifier(model(), images, labels + 1, CFG, NORM, progress=False)
