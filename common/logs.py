"""One logging set-up for every cldlr entry point (CLI, ServerApp, ClientApp): readable, and not drowned by Flower.

The level is the study's ``run.log_level`` (the CLI's ``-v``/``--log-level`` override it), so
the centre and every site log at the level the study asked for. Flower's HTTP transport (httpx)
logs every request at INFO — thousands of lines in a deployed run — and Flower prints its own
log lines through its own handler, so propagating them to the root handler would show each twice.
"""

from __future__ import annotations

import logging

from cldlr.common.errors import ConfigError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def level_number(level: int | str) -> int:
    """``"debug"``, ``"INFO"`` or ``logging.INFO`` as the number; a name outside :data:`LEVELS` is refused."""
    if isinstance(level, int):
        return level
    name = level.strip().upper()
    if name not in LEVELS:
        raise ConfigError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    return logging.getLevelNamesMapping()[name]


def configure_logging(level: int | str = logging.INFO) -> None:
    """Root handler at ``level``; httpx only from WARNING; Flower's lines once.

    Safe to call again (the CLI does once the config is read): the handler is added once and
    the level follows the latest call.
    """
    number = level_number(level)
    logging.basicConfig(format=FORMAT)  # adds the handler only where the root logger has none
    logging.getLogger().setLevel(number)
    logging.getLogger("httpx").setLevel(max(number, logging.WARNING))
    logging.getLogger("flwr").propagate = False
