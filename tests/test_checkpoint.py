"""Tests for cldlr.server.checkpoint: a crash at any step of saving a round resumes from one consistent round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cldlr.server.checkpoint import (
    PROGRESS,
    CheckpointError,
    Progress,
    checkpoint_weights,
    load_checkpoint,
    prune_weights,
    save_checkpoint,
    write_manifest,
    write_weights,
)


def _weights(round_: int) -> dict[str, np.ndarray]:
    """Distinct weights per round, so a loaded model tells which round it is."""
    rng = np.random.default_rng(round_)
    return {"conv.weight": rng.normal(size=(4, 3)).astype(np.float32), "fc.bias": np.full(2, round_, np.float32)}


def _progress(rounds: int) -> Progress:
    return Progress(rounds, [{"round": r, "sites": {}} for r in range(1, rounds + 1)])


def _round_of(arrays: dict[str, np.ndarray]) -> int:
    round_ = int(arrays["fc.bias"][0])
    for name, value in _weights(round_).items():
        np.testing.assert_array_equal(arrays[name], value)
    return round_


def _partial(path: Path, source: bytes) -> None:
    """What a process killed mid-write leaves: the first half of the bytes."""
    path.write_bytes(source[: len(source) // 2])


def _crash_saving_round_2(folder: Path, step: str) -> None:
    """Save round 2 up to ``step``, leaving the files a crash there would leave."""
    progress = _progress(2)
    if step == "inside-weights":
        save_checkpoint(folder / "scratch", _weights(2), progress)
        _partial(folder / ".global-r0002.safetensors.k3j2.safetensors",
                 (folder / "scratch" / "global-r0002.safetensors").read_bytes())
        return
    weights = write_weights(folder, _weights(2), 2)
    if step == "after-weights":
        return
    if step == "inside-manifest":
        write_manifest(folder / "scratch", weights, progress)
        _partial(folder / ".progress.json.x8d1.tmp", (folder / "scratch" / PROGRESS).read_bytes())
        return
    write_manifest(folder, weights, progress)
    if step == "after-manifest":
        return
    prune_weights(folder, weights.name)


@pytest.mark.parametrize(("step", "resumed_round"), [
    ("inside-weights", 1), ("after-weights", 1), ("inside-manifest", 1), ("after-manifest", 2), ("done", 2)])
def test_a_crash_at_any_step_resumes_from_a_consistent_round(tmp_path: Path, step: str, resumed_round: int) -> None:
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, _weights(1), _progress(1))
    _crash_saving_round_2(folder, step)

    saved = load_checkpoint(folder)
    assert saved is not None
    arrays, progress = saved
    assert progress.completed_rounds == resumed_round
    assert [h["round"] for h in progress.history] == list(range(1, resumed_round + 1))
    assert _round_of(arrays) == resumed_round  # the weights are those of the round the count says

    # the resumed run goes on and leaves exactly one weights file and no temporaries
    save_checkpoint(folder, _weights(resumed_round + 1), _progress(resumed_round + 1))
    names = sorted(p.name for p in folder.iterdir() if p.name != "scratch")
    assert names == [f"global-r{resumed_round + 1:04d}.safetensors", PROGRESS]
    assert checkpoint_weights(folder) == folder / names[0]


def test_no_checkpoint_before_round_one_completes(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    assert load_checkpoint(folder) is None
    write_weights(folder, _weights(1), 1)  # crashed before its manifest
    assert load_checkpoint(folder) is None and checkpoint_weights(folder) is None


def test_altered_or_missing_weights_are_refused_not_restarted(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, _weights(3), _progress(3))
    path = checkpoint_weights(folder)
    assert path is not None
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"global-r0003\.safetensors: sha256 .* differs"):
        load_checkpoint(folder)
    path.unlink()
    with pytest.raises(CheckpointError, match=r"names global-r0003\.safetensors \(round 3\), which is missing"):
        load_checkpoint(folder)


@pytest.mark.parametrize("text", ['{"completed_rounds": 2, "history": []}',  # an older cldlr's progress.json
                                  '{"completed_rounds": 2, "history": [], "weights": {"file": "../x.safetensors", '
                                  '"sha256": "00"}}', "{not json"])
def test_a_manifest_that_does_not_name_its_weights_is_refused(tmp_path: Path, text: str) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / PROGRESS).write_text(text)
    with pytest.raises(CheckpointError, match="progress.json"):
        load_checkpoint(folder)
