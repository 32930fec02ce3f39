"""The centre's checkpoint: the global weights after the last complete round, and the history.

Written atomically after every round (safetensors + JSON, no pickle), so a ServerApp restarted
with ``--resume`` continues from the last complete round and loses nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from cldlr.common.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

WEIGHTS = "global.safetensors"
PROGRESS = "progress.json"


@dataclass
class Progress:
    """Rounds completed so far and what each one did."""

    completed_rounds: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(folder: Path, arrays: dict[str, np.ndarray], progress: Progress) -> None:
    """Weights first, then the progress file that points at them (a crash in between is harmless)."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    atomic_write_json(folder / PROGRESS, {"completed_rounds": progress.completed_rounds, "history": progress.history})


def load_checkpoint(folder: Path) -> tuple[dict[str, np.ndarray], Progress] | None:
    """The last complete round's weights and progress, or None when the run has none yet."""
    if not (folder / PROGRESS).is_file() or not (folder / WEIGHTS).is_file():
        return None
    data = json.loads((folder / PROGRESS).read_text())
    progress = Progress(int(data["completed_rounds"]), list(data["history"]))
    log.info("resuming after round %d from %s", progress.completed_rounds, folder)
    return dict(load_file(str(folder / WEIGHTS))), progress
