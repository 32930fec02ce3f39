"""One logging set-up for every cldlr entry point (CLI, ServerApp): readable, and not drowned by Flower.

Flower's HTTP transport (httpx) logs every request at INFO — thousands of lines in a deployed
run — and Flower prints its own log lines through its own handler, so propagating them to the
root handler would show each twice.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Root handler at ``level``; httpx only from WARNING; Flower's lines once."""
    logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
    logging.getLogger("flwr").propagate = False
