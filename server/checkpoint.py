"""The centre's checkpoint: the global weights after the last complete round, and the history.

A round is saved in three steps, each safe to be interrupted:

1. :func:`write_weights` writes the round's weights to a file of their own,
   ``global-r<round>.safetensors`` (atomically; the previous round's file is untouched);
2. :func:`write_manifest` writes ``progress.json`` atomically: the completed rounds, the
   history, and the weights file *by name and sha256*;
3. :func:`prune_weights` removes every other weights file (and temporary files a crash left).

Resume (:func:`load_checkpoint`) trusts only the manifest: it loads the file it names and checks
its hash, so a crash at any point resumes from one consistent round — the previous one before
step 2 completes, the new one after. (Writing one ``global.safetensors`` and then the progress,
as before, let a crash in between pair round *k+1*'s weights with round *k*'s count, and resume
trained one round too many.) safetensors + JSON, no pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

PROGRESS = "progress.json"  # the manifest: the only file resume trusts
WEIGHTS_PATTERN = "global-r{round:04d}.safetensors"
_WEIGHTS_FILE = re.compile(r"^global-r\d{4,}\.safetensors$")
_LEFTOVER = re.compile(r"^\.(global-r\d{4,}\.safetensors|progress\.json)\..*$")  # atomic writes' temporaries


class CheckpointError(CldlrError):
    """A checkpoint folder cannot be resumed from (manifest unreadable, weights missing or altered)."""


@dataclass
class Progress:
    """Rounds completed so far and what each one did."""

    completed_rounds: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class WeightsFile:
    """One round's weights on disk: the file name (inside the checkpoint folder) and its sha256."""

    name: str
    sha256: str


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_weights(folder: Path, arrays: dict[str, np.ndarray], completed_round: int) -> WeightsFile:
    """Step 1: the round's weights, atomically, under a name of their own (the last round's stay valid)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = WEIGHTS_PATTERN.format(round=completed_round)
    with atomic_path(folder / name) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        digest = _sha256(tmp)  # hashed before the rename: the manifest names exactly these bytes
    return WeightsFile(name, digest)


def write_manifest(folder: Path, weights: WeightsFile, progress: Progress) -> None:
    """Step 2: the manifest, atomically; from here on resume starts after ``progress.completed_rounds``."""
    atomic_write_json(folder / PROGRESS, {
        "completed_rounds": progress.completed_rounds, "history": progress.history,
        "weights": {"file": weights.name, "sha256": weights.sha256},
    })


def prune_weights(folder: Path, keep: str) -> None:
    """Step 3: remove every weights file but ``keep``, and the temporary files an interrupted write left."""
    for path in folder.iterdir():
        if path.name != keep and (_WEIGHTS_FILE.match(path.name) or _LEFTOVER.match(path.name)) and path.is_file():
            path.unlink(missing_ok=True)


def save_checkpoint(folder: Path, arrays: dict[str, np.ndarray], progress: Progress) -> None:
    """Weights, then the manifest that names them by hash, then clean-up (a crash anywhere is harmless)."""
    weights = write_weights(folder, arrays, progress.completed_rounds)
    write_manifest(folder, weights, progress)
    prune_weights(folder, weights.name)


def _manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / PROGRESS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        weights = data["weights"]
        manifest: dict[str, Any] = {"completed_rounds": int(data["completed_rounds"]), "history": list(data["history"]),
                    "file": str(weights["file"]), "sha256": str(weights["sha256"])}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a checkpoint manifest ({type(exc).__name__}: {exc}); it may come from an "
                              "older cldlr or be damaged: start a new run (another run.name) instead of --resume") from exc
    if not _WEIGHTS_FILE.match(str(manifest["file"])):  # a bare name inside the folder, nothing else
        raise CheckpointError(f"{path} names weights file {manifest['file']!r}, not global-r<round>.safetensors")
    return manifest


def checkpoint_weights(folder: Path) -> Path | None:
    """The weights file the manifest names (the last complete round's global model), or None before round 1."""
    manifest = _manifest(folder)
    return None if manifest is None else folder / manifest["file"]


def load_checkpoint(folder: Path) -> tuple[dict[str, np.ndarray], Progress] | None:
    """The last complete round's weights and progress, or None when the run has none yet.

    Only what the manifest names counts: weights files it does not name (a round interrupted
    before its manifest) are ignored; a named file that is missing or whose sha256 differs is an
    error, never a silent restart.
    """
    manifest = _manifest(folder)
    if manifest is None:
        if any(_WEIGHTS_FILE.match(p.name) for p in folder.iterdir()) if folder.is_dir() else False:
            log.warning("%s holds weights but no %s (interrupted before round 1 completed); starting from round 1",
                        folder, PROGRESS)
        return None
    path = folder / manifest["file"]
    if not path.is_file():
        raise CheckpointError(f"{folder / PROGRESS} names {path.name} (round {manifest['completed_rounds']}), which is "
                              "missing; the checkpoint cannot be resumed: start a new run")
    if (digest := _sha256(path)) != manifest["sha256"]:
        raise CheckpointError(f"{path}: sha256 {digest[:12]}… differs from {manifest['sha256'][:12]}… in "
                              f"{folder / PROGRESS}; the weights were altered or damaged: start a new run")
    progress = Progress(manifest["completed_rounds"], manifest["history"])
    log.info("resuming after round %d from %s", progress.completed_rounds, path)
    return dict(load_file(str(path))), progress
