"""Argument helpers shared by the ``cldlr`` subcommand modules."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

#: ``add(name, handler, help) -> parser``: how a module registers a subcommand.
Add = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def config_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("config", type=Path, nargs=None if required else "?", help="YAML config (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=2 (repeatable)",
    )


def force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
