"""Run folders: every study writes into its own ``<run.output_dir>/<run.name>`` and never reuses another's.

Used by the ServerApp, ``cldlr simulate`` and ``cldlr compare-backbones``; what goes into the
folder (report, bundle, ledger, checkpoints) is up to each of them.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from cldlr.common.config import Config
from cldlr.common.data.ids import id_error, is_safe_id
from cldlr.common.errors import ConfigError


def new_run_dir(config: Config) -> Path:
    """Create ``runs/<name>`` exclusively; if taken, ``<name>-2``, ``-3``… (never reuse another run's folder)."""
    base = Path(config.run.output_dir)
    if not is_safe_id(config.run.name):  # the name becomes a folder: never a way out of output_dir
        raise ConfigError(id_error("run.name", config.run.name))
    base.mkdir(parents=True, exist_ok=True)
    for k in itertools.count(1):
        candidate = base / (config.run.name if k == 1 else f"{config.run.name}-{k}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")
