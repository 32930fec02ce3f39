"""The coordinating centre's Flower ServerApp: reads the study config, runs :class:`FederatedRun`.

Flower's run config carries flat scalars only, so it names the study's YAML config and its
overrides: ``flwr run . --run-config 'config="configs/federated.yaml" overrides="train.epochs=2 ..."'``
(``run-dir`` and ``resume=true`` continue a stopped run). The programmatic simulation passes the
same keys through the ``CLDLR_RUN`` environment variable (``run_simulation`` has no run config).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cldlr.common.config import load_config
from cldlr.common.data.schema import resolve_schema
from cldlr.common.logs import configure_logging
from cldlr.common.runs import new_run_dir
from cldlr.server.orchestrator import FederatedRun
from cldlr.server.strategies import check_study_config

log = logging.getLogger("cldlr.centre")

ENV_KEY = "CLDLR_RUN"


def run_settings(context: Context) -> dict[str, Any]:
    """``config``, ``overrides``, ``run-dir``, ``resume`` from the run config, else from ``$CLDLR_RUN``."""
    settings: dict[str, Any] = dict(json.loads(os.environ.get(ENV_KEY, "{}")))
    # pyproject.toml declares these keys with "" defaults (Flower accepts only declared keys): "" = not given
    settings.update({k: v for k, v in context.run_config.items()
                     if k in ("config", "overrides", "run-dir", "resume") and v != ""})
    if "config" not in settings:
        raise SystemExit("no study config: pass --run-config 'config=\"path/to/study.yaml\"'")
    return settings


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp: read the study config Flower was given, then run every phase into one run folder."""
    configure_logging()  # INFO until the config is read (its errors must show)
    settings = run_settings(context)
    overrides = settings.get("overrides", "")
    config = load_config(settings["config"], shlex.split(overrides) if isinstance(overrides, str) else list(overrides))
    configure_logging(config.run.log_level)
    check_study_config(config)  # before the run folder exists
    run_dir = Path(settings["run-dir"]) if settings.get("run-dir") else new_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("federated study %s → %s", config.run.name, run_dir)
    FederatedRun(grid, context, config, resolve_schema(config), run_dir, resume=bool(settings.get("resume", False))).run()
