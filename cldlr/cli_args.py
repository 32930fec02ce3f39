"""Argument helpers shared by the ``cldlr`` subcommand modules."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cldlr.common.logs import configure_logging

if TYPE_CHECKING:
    from cldlr.common.config import Config

#: ``add(name, handler, help) -> parser``: how a module registers a subcommand.
Add = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def config_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The config file and ``--set`` overrides, spelled alike by every command that reads a study config."""
    parser.add_argument("config", type=Path, nargs=None if required else "?", help="YAML config (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=2 (repeatable)",
    )


def force(parser: argparse.ArgumentParser) -> None:
    """``--force``: a command never replaces an existing output folder unless asked to."""
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")


def bundle_trust(parser: argparse.ArgumentParser) -> None:
    """``--trust``, ``--policy`` and ``--allow-unsigned``: what a command that loads a model bundle verifies it against.

    The one definition every bundle-loading command uses (predict, reader-study packet, evaluate),
    so a site states its trust the same way everywhere (``cldlr.client.predict.site_trust``).
    """
    parser.add_argument("--trust", action="append", default=[], type=Path, metavar="PEM",
                        help="a CA certificate (the federation's ca.crt) or the signer's certificate/public key that "
                             "model bundles must be signed by (repeatable)")
    parser.add_argument("--policy", type=Path, metavar="FILE", help="the site's policy: trust its trusted_bundle_signers")
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="use an unsigned or untrusted bundle anyway; outputs record 'signature: unverified'")


def study_config(args: argparse.Namespace) -> Config:
    """The command's config (file, then ``--set``) with ``-v``/``--log-level`` as ``run.log_level``, now applied.

    The command line wins over the file, and the level travels with the config: a federated
    simulation's ServerApp and ClientApps log at it too.
    """
    from cldlr.common.config import load_config

    level = getattr(args, "log_level", None)
    config = load_config(args.config, [*args.overrides, *([f"run.log_level={level}"] if level else [])])
    configure_logging(config.run.log_level)
    return config
